"""Protocol evaluation on sharded parameters: planned calls, devices, processes."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddep.evaluators import inference
from ddep.evaluators import metrics as metrics_lib
from ddep.evaluators import protocol as protocol_eval
from ddep.training import sharding
import protocol_eval_worker as worker
from test_multihost import _free_port
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    'protocol, sizes',
    [
        (inference.PROTOCOLS['cityscapes_halves'], [(16, 32), (8, 16)]),
        (inference.PROTOCOLS['ade20k_sliding'], [(384, 512), (512, 300), (200, 900)]),
        (inference.PROTOCOLS['pascal_context_sliding'], [(500, 375), (300, 520)]),
        (worker.PROTOCOL, worker.SIZES),
    ],
)
@pytest.mark.parametrize('batch_size', [2, 3])
def test_planned_calls_are_the_calls_the_protocol_makes(protocol, sizes, batch_size):
  for h, w in sizes:
    calls = []

    def predict(x):
      calls.append(x.shape)
      return np.zeros(x.shape[:3] + (2,), np.float32)

    window, _ = inference.protocol_windows(protocol, h, w)
    inference.run_protocol(
        protocol, predict, np.zeros((h, w, 3), np.float32), batch_size=batch_size
    )
    assert len(calls) == protocol_eval.num_calls(protocol, h, w, batch_size), (protocol.name, h, w)
    assert {c[1:3] for c in calls} == {window}


def test_window_batches_are_whole_per_local_device():
  mesh = sharding.make_mesh()  # Two CPU devices (conftest).
  assert [protocol_eval.window_batch_size(n, mesh) for n in (0, 1, 2, 3, 8)] == [2, 2, 2, 4, 8]


def _host_reference(indices):
  """The confusion matrix computed image by image on host parameters, one device."""
  model = worker.Head()
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  fn = functools.partial(
      inference.run_protocol,
      worker.PROTOCOL,
      lambda x: model.apply({'params': params}, x),
      batch_size=2,
  )
  total = np.zeros((worker.NUM_CLASSES,) * 2, np.int64)
  for b in worker.batches(indices):
    for i in np.flatnonzero(b['_mask']):
      h, w = b['orig_hw'][i]
      pred = inference.predict_labels(fn, b['image'][i, :h, :w][None], output_size=(h, w))
      total += np.asarray(
          metrics_lib.confusion_matrix(b['label'][i, :h, :w][None], pred, worker.NUM_CLASSES)
      )
  return total


def test_two_devices_equal_the_host_protocol(tmp_path):
  worker.main(str(tmp_path / 'one.npy'))  # One process, its two CPU devices.
  assert np.array_equal(np.load(tmp_path / 'one.npy'), _host_reference(range(4)))


def test_two_processes_with_unequal_windows_equal_one_process(tmp_path):
  """Process 0 has 10 windows to predict, process 1 has 3: no hang, the same matrix."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
        JAX_NUM_PROCESSES='2',
        JAX_PROCESS_ID=str(i),
        XLA_FLAGS=xla_flags.with_devices(1),
    )
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, 'tests', 'protocol_eval_worker.py'),
                str(tmp_path / 'two.npy'),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(o[-2000:] for o in outs)
  assert np.array_equal(np.load(tmp_path / 'two.npy'), _host_reference(range(4)))
