"""The storage layer: gs:// paths stay URLs, local paths become absolute, writes are atomic."""

import os

import pytest

from ddep.reporting import records
from ddep.runs import checkpointing
from ddep.runs import storage
from ddep.runs import workdir as workdir_lib


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.path('gs://bucket/run') / 'checkpoints') == 'gs://bucket/run/checkpoints'
  assert str(storage.path('run')) == str(tmp_path / 'run')
  assert storage.path('gs://bucket/run/checkpoints/7').name == '7'
  assert not os.path.exists(tmp_path / 'gs:')


def test_atomic_write_append_glob_and_find(tmp_path):
  target = tmp_path / 'a' / 'results.json'
  target.parent.mkdir()
  storage.write_text_atomic(str(target), '{"x": 1}')
  storage.write_text_atomic(str(target), '{"x": 2}')
  assert target.read_text() == '{"x": 2}' and os.listdir(target.parent) == ['results.json']
  storage.append_text(str(tmp_path / 'm.jsonl'), 'one\n')
  storage.append_text(str(tmp_path / 'm.jsonl'), 'two\n')
  assert (tmp_path / 'm.jsonl').read_text() == 'one\ntwo\n'
  (tmp_path / 'b' / 'c').mkdir(parents=True)
  (tmp_path / 'b' / 'c' / 'results.json').write_text('{}')
  assert storage.glob(str(tmp_path / '*' / 'results.json')) == [str(target)]
  assert [str(p) for p in storage.files_below(tmp_path, 'results.json')] == [
      str(target),
      str(tmp_path / 'b' / 'c' / 'results.json'),
  ]


def test_a_gs_workdir_never_becomes_a_local_directory(tmp_path, monkeypatch):
  # No network on this machine: every layer must fail on the bucket itself. Before the
  # storage layer, os.path.abspath and os.makedirs turned it into ./gs:/bucket/run.
  monkeypatch.chdir(tmp_path)
  workdir = 'gs://ddep-test-no-such-bucket/run'
  layers = [
      lambda: checkpointing.Checkpointer(workdir, keep=1, async_save=False),
      lambda: checkpointing.resolve_checkpoint(workdir),
      lambda: workdir_lib.write_results(
          workdir,
          method='dep',
          dataset='demo',
          label_fraction=1.0,
          subset_seed=0,
          decoder_width=1,
          metrics={'miou': 0.5},
      ),
      lambda: records.load_run(workdir),
      lambda: storage.write_text_atomic(workdir + '/config.json', '{}'),
  ]
  for layer in layers:
    with pytest.raises(Exception):  # Whatever GCS answers offline; never a local write.
      layer()
  assert checkpointing.latest_step_dir(workdir + '/checkpoints') is None
  assert os.listdir(tmp_path) == []
