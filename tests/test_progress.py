"""ddep.runs.progress: ETA formatting and rate-limited lines, with a fake clock."""

import sys
import types

import pytest

from ddep.runs import progress


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.mark.parametrize(
    'seconds, text',
    [
        (0, '0s'),
        (44.6, '45s'),
        (59.4, '59s'),
        (60, '1m00s'),
        (606, '10m06s'),
        (3599, '59m59s'),
        (3600, '1h00m'),
        (7380 + 59, '2h03m'),
        (-1, '?'),
        (float('inf'), '?'),
        (float('nan'), '?'),
    ],
)
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_format_line_eta_from_rate_so_far():
  # 120 images in 40 s: 3.0/s, 1880 left -> 626.67 s.
  line = progress.format_line('predict', 120, 2000, 'images', 40.0)
  assert line == '[ddep] predict 120/2000 images, 3.0 images/s, ETA 10m27s'
  assert progress.format_line('prepare', 30, None, 'examples', 10.0) == (
      '[ddep] prepare 30 examples, 3.0 examples/s, 10s elapsed'
  )
  assert progress.format_line('score', 4, 8, 'files', 125.0, final=True) == (
      '[ddep] score 4/8 files in 2m05s, 31.2s each'
  )  # 0.03/s would read as 0.0/s.


def test_progress_prints_every_s_and_once_at_the_end():
  clock, lines = FakeClock(), []
  p = progress.Progress(
      5, 'predict', unit='images', every_s=10.0, print_fn=lines.append, clock=clock, enabled=True
  )
  for step in range(5):
    clock.now += 4.0
    p.update()
    if step == 1:
      assert lines == []  # 8 s in: not yet due.
  p.done()
  p.done()  # A second done() prints nothing.
  assert lines == [
      '[ddep] predict 3/5 images, 0.2 images/s, ETA 8s',  # 12 s: due.
      '[ddep] predict 5/5 images in 20s, 0.2 images/s',  # The last item: only the summary.
  ]


def test_progress_every_n_and_disabled():
  clock, lines = FakeClock(), []
  p = progress.Progress(
      None, 'x', every_s=None, every_n=2, print_fn=lines.append, clock=clock, enabled=True
  )
  for _ in range(5):
    clock.now += 1.0
    p.update()
  assert [l.split(' x ')[1].split(' ')[0] for l in lines] == ['2', '4']
  quiet = []
  q = progress.Progress(3, 'x', every_s=0.0, print_fn=quiet.append, clock=clock, enabled=False)
  q.update(3)
  q.done()
  assert quiet == [] and q.count == 3


def test_track_counts_after_each_item_and_skips_summary_on_error():
  clock, lines = FakeClock(), []
  items = []
  for item in progress.track(
      [1, 2, 3], desc='t', every_s=None, print_fn=lines.append, clock=clock, enabled=True
  ):
    items.append(item)
  assert items == [1, 2, 3] and lines == ['[ddep] t 3/3 items in 0s, ? items/s']
  failed = []
  with pytest.raises(RuntimeError):
    with progress.Progress(2, 't', print_fn=failed.append, clock=clock, enabled=True):
      raise RuntimeError('boom')
  assert failed == []


def test_is_main_process_asks_jax_only_once_it_is_up(monkeypatch):
  from jax._src import xla_bridge  # The real one: its state says whether a backend is up.

  monkeypatch.delitem(sys.modules, 'jax', raising=False)
  assert progress.is_main_process()
  calls = []
  fake = types.SimpleNamespace(
      process_index=lambda: calls.append(1) or 1,
      distributed=types.SimpleNamespace(is_initialized=lambda: False),
  )
  monkeypatch.setitem(sys.modules, 'jax', fake)
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  assert progress.is_main_process() and calls == []  # Not started: never started by us.
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  assert not progress.is_main_process() and calls == [1]  # Process 1 prints nothing.
