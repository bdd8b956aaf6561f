"""Moved to `ddep.config.schema`, so that config files load from any directory.

Kept as a re-export for code that still does `from configs import common`.
"""

from ddep.config.schema import *  # noqa: F401,F403  pylint: disable=wildcard-import
