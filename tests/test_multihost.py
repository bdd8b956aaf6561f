"""Multi-process runs through `python -m ddep.main`: one global plan, preemption, resume.

Each process gets its own CPU devices and joins the run through JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID on 127.0.0.1, as on a cluster.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import flax
import numpy as np
import pytest

from ddep.runs import checkpointing
from ddep.training import compiled
from ddep.training import layouts
from ddep.training import trainer as train
import test_layouts
import tiny_runs
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
  return {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _launch(workdir, data_dir, *, processes, config='tests/configs/tiny_finetune.py'):
  """`python -m ddep.main` as `processes` processes of one run, 4 CPU devices in all."""
  port = _free_port()
  procs = []
  for i in range(processes):
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_DISABLE_MOST_OPTIMIZATIONS='true',
        XLA_FLAGS=xla_flags.with_devices(4 // processes),
    )
    if processes > 1:
      env.update(
          JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
          JAX_NUM_PROCESSES=str(processes),
          JAX_PROCESS_ID=str(i),
      )
    cmd = [
        sys.executable,
        '-m',
        'ddep.main',
        f'--config={config}',
        f'--workdir={workdir}',
        f'--config.data.data_dir={data_dir}',
    ]
    procs.append(
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    )
  return procs


def _finish(procs, timeout=400):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [p.returncode for p in procs], outs


def _finetune_config(data_dir):
  return tiny_runs.cli_config('tiny_finetune', data_dir)


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  """A 2-process CLI fine-tuning run by epochs on 11 labelled images, and the same run in
  one process (here, in-process: what matters is its global batches, not the launcher)."""
  root = tmp_path_factory.mktemp('cli')
  data_dir = str(root / 'data')  # Empty: the 2-process run prepares it (process 0 only).
  two, one = str(root / 'two'), str(root / 'one')
  codes, outs = _finish(_launch(two, data_dir, processes=2))
  for code, out in zip(codes, outs):
    assert code == 0, out[-3000:]
  train.train_and_evaluate(_finetune_config(data_dir), one)
  return dict(two=two, one=one, outs=outs, data_dir=data_dir, root=root)


def test_two_processes_through_the_cli_plan_alike_and_match_one_process(cli_runs):
  outs = cli_runs['outs']
  # Both planned 2 epochs of 11 examples at global batch 4 = 6 steps, and got there.
  assert 'process 0/2 finished at step 6' in outs[0], outs[0][-3000:]
  assert 'process 1/2 finished at step 6' in outs[1], outs[1][-3000:]
  # Only process 0 writes the progress lines (and the files).
  assert '[ddep] segment step 6/6' in outs[0] and '[ddep]' not in outs[1]
  two, one = cli_runs['two'], cli_runs['one']
  ids = [open(os.path.join(w, 'subset_ids.txt')).read().split() for w in (two, one)]
  assert len(ids[0]) == 11 and ids[0] == ids[1]
  results = json.load(open(os.path.join(two, 'results.json')))
  assert results['label_fraction'] == pytest.approx(11 / 24)
  _assert_trained_alike(checkpointing.load_params(two), checkpointing.load_params(one))
  # The parameters' norm, logged from the (sharded) state at each step, agrees too.
  norms = [_train_rows(w, 'train/param_norm') for w in (two, one)]
  assert len(norms[0]) == 6 and norms[0][0] != norms[0][-1]
  np.testing.assert_allclose(norms[0], norms[1], rtol=1e-5)


def _train_rows(workdir, key):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [row[key] for row in map(json.loads, f) if 'train/loss' in row]


def _assert_trained_alike(a, b):
  """The same global batches, up to the rounding of sums reduced in another order."""
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys() and len(a) > 50
  d = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
  # Adam's normalisation turns rounding into a whole update (~1e-3) for the few near-zero
  # gradients (measured: 0.003% of elements); other batches would move almost all of them.
  assert d.mean() < 1e-6 and (d > 1e-4).mean() < 1e-3, (d.mean(), (d > 1e-4).mean())


def test_sigterm_on_two_processes_saves_one_step_and_resumes_on_one(cli_runs, monkeypatch):
  workdir = str(cli_runs['root'] / 'preempted')
  procs = _launch(workdir, cli_runs['data_dir'], processes=2)
  seen = []
  for line in procs[0].stdout:
    seen.append(line)
    if '[ddep] segment step 2/6' in line:
      for p in procs:  # A TPU VM or SLURM preemption notice reaches every host.
        p.send_signal(signal.SIGTERM)
      break
  codes, outs = _finish(procs, timeout=120)
  outs[0] = ''.join(seen) + outs[0]
  assert codes == [train.PREEMPTED_EXIT_CODE] * 2, outs[0][-3000:] + outs[1][-3000:]
  # The processes agree on the first step that both reach after the notice: step 2 itself
  # when process 1 had not yet passed its check there, else a later one. Step 2 is also a
  # regular checkpoint, so the message below is what shows that the preemption path saved.
  saved = checkpointing.Checkpointer(workdir, keep=3).latest_step()
  assert 2 <= saved < 6, saved
  for out in outs:
    assert f'preempted (SIGTERM) at step {saved}/6: every process saved step {saved}' in out
  # Both processes' input positions are in that step, in the slices of one global batch.
  with open(os.path.join(workdir, 'checkpoints', str(saved), 'data', 'metadata')) as f:
    data_states = json.load(f)
  assert [data_states[f'process_{i}']['position'] for i in range(2)] == [4 * saved, 4 * saved + 2]

  # One process (of 2 devices, not 4) continues the same global stream from there, with
  # its state in other layouts than the default ones, as a GPU may choose (the CPU's
  # choice is the default): restored, moved into them, stepped, saved and evaluated.
  compiled.clear()
  monkeypatch.setattr(layouts, 'preferred_layout', test_layouts.reversed_axes)
  placed, place = [], layouts.DonatingStep.place

  def spy(self, state, batch):
    state = place(self, state, batch)
    placed.append(state['params']['encoder']['conv_root']['kernel'].format.layout)
    return state

  monkeypatch.setattr(layouts.DonatingStep, 'place', spy)
  try:
    result = train.train_and_evaluate(_finetune_config(cli_runs['data_dir']), workdir)
  finally:
    compiled.clear()
  assert result.step == 6
  assert [layout.major_to_minor for layout in placed] == [(3, 2, 1, 0)]
  reference = checkpointing.load_params(cli_runs['one'])
  _assert_trained_alike(checkpointing.load_params(workdir), reference)
  with open(os.path.join(cli_runs['one'], 'results.json')) as f:
    assert result.metrics['miou'] == pytest.approx(json.load(f)['miou'], abs=1e-4)
