"""Moved to `ddep.config.recipes`, so that config files load from any directory.

Kept as a re-export for code that still does `from configs import recipes`.
"""

from ddep.config.recipes import *  # noqa: F401,F403  pylint: disable=wildcard-import
