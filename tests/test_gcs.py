"""A gs:// workdir end to end, through the CLIs, against a GCS API on 127.0.0.1.

Train, preempt (SIGTERM), resume, evaluate and report with every path on
gs://: orbax's arrays go through TensorStore's GCS driver, summaries, metrics,
configs, results and figures through TensorFlow's GCS filesystem (epath's
backend). Both are pointed at one emulator (tests/gcs_emulator.py), so what
the test reads back is what a bucket would hold.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from ddep.training import trainer as train
import gcs_emulator
import xla_flags
from test_multihost import _finetune_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = 'runs/finetune'


@pytest.fixture(scope='module')
def bucket(tmp_path_factory):
  emulator = gcs_emulator.GcsEmulator(str(tmp_path_factory.mktemp('gcs')))
  yield emulator
  emulator.stop()


def _env(emulator):
  return dict(
      os.environ,
      **emulator.env,
      PYTHONPATH=REPO,
      JAX_DISABLE_MOST_OPTIMIZATIONS='true',
      XLA_FLAGS=xla_flags.with_devices(2),
  )


def _start(emulator, cwd, args):
  """`python -m ARGS` started with the emulator's environment, output piped."""
  return subprocess.Popen(
      [sys.executable, '-m', *args],
      cwd=cwd,
      env=_env(emulator),
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
  )


def _cli(emulator, cwd, *args, timeout=300):
  """Runs `python -m ARGS` to the end; (exit code, output)."""
  p = _start(emulator, cwd, args)
  try:
    out = p.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    p.kill()  # As subprocess.run would: no child left behind.
    raise
  return p.returncode, out


def _train_until_preempted(emulator, cwd, args, *, at_line: str):
  """Starts a training CLI, sends SIGTERM when `at_line` appears; (exit code, output)."""
  p = _start(emulator, cwd, args)
  lines = []
  for line in p.stdout:
    lines.append(line)
    if at_line in line:
      p.send_signal(signal.SIGTERM)
      break
  lines += p.stdout.readlines()
  return p.wait(timeout=300), ''.join(lines)


def _read(emulator, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe='')
  url = f'{emulator.url}/storage/v1/b/{emulator.bucket}/o/{quoted}?alt=media'
  with urllib.request.urlopen(url) as r:
    return r.read()


@pytest.fixture(scope='module')
def gcs_run(bucket, tmp_path_factory):
  """The tiny fine-tuning run on gs://, preempted at step 2 and resumed; then evaluated and
  reported. Launched from an empty directory, which must stay empty."""
  root = tmp_path_factory.mktemp('gcs_run')
  cwd = root / 'cwd'
  cwd.mkdir()
  data_dir = str(root / 'data')
  workdir = f'gs://{bucket.bucket}/{RUN}'
  config = os.path.join(REPO, 'tests', 'configs', 'tiny_finetune.py')
  # Checkpoints: the preemption's and the last (each is a few seconds on the emulator).
  train_args = [
      'ddep.main',
      f'--config={config}',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      '--config.checkpoint_every=6',
  ]
  out = {}
  out['preempted'] = _train_until_preempted(bucket, cwd, train_args, at_line='step 2/')
  out['resumed'] = _cli(bucket, cwd, *train_args)
  out['evaluate'] = _cli(bucket, cwd, 'ddep.evaluate', f'--workdir={workdir}')  # config.json.
  out['report'] = _cli(
      bucket,
      cwd,
      'ddep.report',
      f'--workdirs=gs://{bucket.bucket}/runs',
      f'--output=gs://{bucket.bucket}/report',
  )
  # The same run uninterrupted, on local disk: what the preempted one must equal.
  local = train.train_and_evaluate(_finetune_config(data_dir), str(root / 'local'))
  return dict(out, cwd=cwd, local=local, objects=bucket.objects())


def test_a_gs_run_is_preempted_saves_and_resumes_on_the_bucket(gcs_run):
  code, out = gcs_run['preempted']
  assert code == 75, out[-3000:]
  assert 'preempted (SIGTERM)' in out and f'gs://ddep-test/{RUN}/checkpoints' in out, out[-2000:]
  code, out = gcs_run['resumed']
  assert code == 0, out[-3000:]
  assert f'resumed gs://ddep-test/{RUN} at step' in out, out[-2000:]
  steps = {
      int(n.split('/')[3])
      for n in gcs_run['objects']
      if n.startswith(f'{RUN}/checkpoints/') and n.split('/')[3].isdigit()
  }
  assert 6 in steps and steps & {2, 3}, sorted(steps)


def test_a_resumed_gs_run_equals_the_uninterrupted_local_one(gcs_run, bucket):
  results = json.loads(_read(bucket, f'{RUN}/results.json'))
  assert results['miou'] == pytest.approx(gcs_run['local'].metrics['miou'], abs=1e-7)
  rows = [json.loads(line) for line in _read(bucket, f'{RUN}/metrics.jsonl').splitlines()]
  train_steps = [r['step'] for r in rows if 'train/loss' in r]
  assert train_steps == sorted(set(train_steps)) == list(range(1, 7))  # No doubled-back rows.


def test_every_layer_writes_to_the_bucket_and_nothing_lands_locally(gcs_run):
  names = gcs_run['objects']
  for expected in ('config.json', 'subset_ids.txt', 'results.json', 'metrics.jsonl'):
    assert f'{RUN}/{expected}' in names, expected
  assert any(n.startswith(f'{RUN}/events.out.tfevents') for n in names), names  # clu / TF.
  assert any(n.startswith(f'{RUN}/checkpoints/6/') for n in names)  # orbax / TensorStore.
  assert os.listdir(gcs_run['cwd']) == []  # No local ./gs:/... directory.


def test_evaluate_and_report_read_and_write_gs(gcs_run):
  code, out = gcs_run['evaluate']
  assert code == 0, out[-3000:]
  assert f'wrote gs://ddep-test/{RUN}/best/6/eval_' in out, out[-2000:]  # Next to its params.
  assert any(n.startswith(f'{RUN}/best/6/eval_') for n in gcs_run['objects'])
  code, out = gcs_run['report']
  assert code == 0, out[-3000:]
  assert '1 runs -> gs://ddep-test/report' in out, out
  reports = [n for n in gcs_run['objects'] if n.startswith('report/')]
  assert any(n.endswith('.md') for n in reports) and any(
      n.endswith('.png') for n in reports
  ), reports


# Copies a local folder to gs:// (run in a child that has the emulator's environment).
_UPLOAD = """
import sys
import tensorflow as tf
src, dst = sys.argv[1:]
for root, _, files in tf.io.gfile.walk(src):
  rel = root[len(src):].strip('/')
  for name in files:
    tf.io.gfile.copy(f'{root}/{name}', '/'.join(p for p in (dst, rel, name) if p))
"""


def test_a_folder_dataset_on_gs_is_prepared_onto_the_bucket(bucket, tmp_path):
  """Issue 23: images, masks and the classes file read from gs://."""
  import test_folder_dataset as folder_test  # pylint: disable=g-import-not-at-top

  local = tmp_path / 'folder'
  folder_test.make_folder(local, num_labelled=6, num_unlabelled=2)
  src = f'gs://{bucket.bucket}/user_folder'
  upload = subprocess.run(
      [sys.executable, '-c', _UPLOAD, str(local), src],
      env=_env(bucket),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert upload.returncode == 0, upload.stderr[-3000:]
  code, out = _cli(
      bucket,
      str(tmp_path),
      'ddep.prepare',
      f'--dataset={folder_test.DATASET}',
      f'--images={src}/images',
      f'--masks={src}/masks',
      f'--classes={src}/classes.txt',
      f'--unlabelled={src}/unlabelled',
      '--val_fraction=0.4',
      # Local: TFDS finishes a build by renaming its directory, and the emulator lacks the
      # storageLayout call that TF's GCS filesystem makes for that (real GCS has it).
      f'--data_dir={tmp_path / "tfds"}',
  )
  assert code == 0, out[-3000:]
  assert 'train 3' in out and 'validation 3' in out, out[-2000:]
  meta = json.loads(
      (tmp_path / 'tfds' / 'ddep_folder' / 'mine' / '1.0.0' / 'ddep_folder.json').read_text()
  )
  assert meta['class_names'] == list(folder_test.CLASSES), meta
