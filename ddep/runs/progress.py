"""Progress with an ETA for long loops, as plain lines for a terminal and a log file alike.

  for image in progress.track(images, desc='predict', unit='images'):
    ...

prints, at most every `every_s` seconds (and once at the end),

  [ddep] predict 120/2000 images, 3.1 images/s, ETA 10m06s
  [ddep] predict 2000/2000 images in 10m45s, 3.1 images/s

No carriage returns or terminal control, so a log file reads like the terminal.
Only process 0 prints in a multi-process JAX run; jax is never imported here.
"""

import functools
import math
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar('T')
PREFIX = '[ddep]'
DEFAULT_EVERY_S = 10.0

_print_flushed = functools.partial(print, flush=True)


def format_duration(seconds: float) -> str:
  """'45s', '10m06s', '2h03m' (seconds are dropped past an hour); '?' if unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f'{minutes}m{seconds:02d}s'
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m'


def format_rate(count: float, elapsed: float, unit: str) -> str:
  """'3.1 images/s'; '12.5s each' when slower than one per 10 s, where a rate reads as 0.0."""
  if elapsed <= 0 or count <= 0:
    return f'? {unit}/s'
  rate = count / elapsed
  if rate < 0.1:
    return f'{elapsed / count:.1f}s each'
  return f'{rate:.1f} {unit}/s'


def format_line(
    desc: str, count: int, total: Optional[int], unit: str, elapsed: float, *, final: bool = False
) -> str:
  """One progress line; the ETA assumes the rate so far holds for the rest."""
  done = f'{count}/{total}' if total is not None else f'{count}'
  rate = format_rate(count, elapsed, unit)
  if final:
    return f'{PREFIX} {desc} {done} {unit} in {format_duration(elapsed)}, {rate}'
  if total is None or count <= 0:
    return f'{PREFIX} {desc} {done} {unit}, {rate}, {format_duration(elapsed)} elapsed'
  eta = (total - count) * elapsed / count
  return f'{PREFIX} {desc} {done} {unit}, {rate}, ETA {format_duration(eta)}'


def is_main_process() -> bool:
  """False on JAX processes other than 0; True where jax is not in use.

  Asks jax only once it is imported and its backend (or jax.distributed) is already up:
  starting a backend just to print would take a GPU's memory in a data-only tool.
  """
  jax = sys.modules.get('jax')
  if jax is None:
    return True
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    started = xla_bridge.backends_are_initialized() or jax.distributed.is_initialized()
  except (ImportError, AttributeError):  # Another jax version: ask it directly.
    started = True
  return not started or jax.process_index() == 0


class Progress:
  """Counts items and prints a line at most every `every_s` seconds and/or `every_n` items.

  `clock` and `print_fn` are injectable for tests. `enabled=None` means: on process 0.
  """

  def __init__(
      self,
      total: Optional[int],
      desc: str,
      *,
      unit: str = 'items',
      every_s: Optional[float] = DEFAULT_EVERY_S,
      every_n: Optional[int] = None,
      print_fn: Callable[[str], object] = _print_flushed,
      clock: Callable[[], float] = time.monotonic,
      enabled: Optional[bool] = None,
  ):
    self.total = None if total is None else int(total)
    self.desc, self.unit = desc, unit
    self.every_s, self.every_n = every_s, every_n
    self.count = 0
    self._print, self._clock = print_fn, clock
    self._enabled = is_main_process() if enabled is None else enabled
    self._start = self._last_time = clock()
    self._last_count = 0
    self._finished = False

  @property
  def elapsed(self) -> float:
    return self._clock() - self._start

  def _due(self, now: float) -> bool:
    if self.every_n and self.count - self._last_count >= self.every_n:
      return True
    return self.every_s is not None and now - self._last_time >= self.every_s

  def update(self, n: int = 1) -> None:
    """Adds `n` finished items; prints a line if one is due."""
    self.count += n
    if not self._enabled:
      return
    now = self._clock()
    if self._due(now) and not (self.total is not None and self.count >= self.total):
      # The last item is left to done(), so a loop ends with one summary line, not two.
      self._print(format_line(self.desc, self.count, self.total, self.unit, now - self._start))
      self._last_time, self._last_count = now, self.count

  def done(self) -> None:
    """Prints the summary line (once)."""
    if self._finished:
      return
    self._finished = True
    if self._enabled:
      self._print(
          format_line(self.desc, self.count, self.total, self.unit, self.elapsed, final=True)
      )

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:  # A failed loop's error says enough; no summary that reads as success.
      self.done()


def track(
    iterable: Iterable[T],
    *,
    total: Optional[int] = None,
    desc: str = '',
    unit: str = 'items',
    **kwargs,
) -> Iterator[T]:
  """Yields `iterable`'s items, counting one after each is processed; `kwargs` go to Progress.

  `total` defaults to len(iterable) where it has one.
  """
  if total is None and hasattr(iterable, '__len__'):
    total = len(iterable)
  progress = Progress(total, desc, unit=unit, **kwargs)
  for item in iterable:
    yield item
    progress.update()
  progress.done()
