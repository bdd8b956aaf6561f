"""One storage layer for every user path: local, gs:// or any scheme etils.epath knows.

Workdirs, checkpoints, config.json, metrics, subset ids, results and reports go
through here, never through os.path or open(): those would turn `gs://bucket/x`
into a local directory `./gs:/bucket/x` (and so does epath's own `resolve()`).
"""

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(p: PathLike) -> bool:
  return '://' in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: a URL as given, a local path made absolute (orbax needs that)."""
  s = os.fspath(p)
  return epath.Path(s if is_url(s) else os.path.abspath(s))


def write_text_atomic(p: PathLike, text: str) -> None:
  """Readers see the old file or the new one, never a partial one."""
  p = path(p)
  tmp = p.parent / (p.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(p)


def append_text(p: PathLike, text: str) -> None:
  with path(p).open('a') as f:
    f.write(text)


def glob(pattern: str) -> list[str]:
  """Matches of a glob pattern, local or URL, sorted."""
  if not is_url(pattern):
    return sorted(str(p) for p in epath.Path('/').glob(os.path.abspath(pattern).lstrip('/')))
  parts = pattern.split('/')
  # The part before the first wildcard is a plain directory; epath globs the rest.
  first = next((i for i, part in enumerate(parts) if any(c in part for c in '*?[')), len(parts))
  if first == len(parts):
    return [pattern] if epath.Path(pattern).exists() else []
  base = epath.Path('/'.join(parts[:first]))
  return sorted(str(p) for p in base.glob('/'.join(parts[first:])))


def files_below(root: PathLike, name: str = '') -> list[epath.Path]:
  """Every file under `root` (called `name` if given), sorted; epath has no recursive glob."""
  return sorted(
      epath.Path(d) / f for d, _, files in path(root).walk() for f in files if not name or f == name
  )
