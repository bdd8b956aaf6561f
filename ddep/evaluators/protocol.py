"""Evaluation protocols (halves, sliding windows) on sharded parameters, over every device.

`ddep/evaluators/inference.py` cuts each image into fixed-shape windows and stitches their
logits back; here every window batch is one global batch over all devices of
all processes, predicted with the training state's own (replicated or FSDP)
parameters. Such a call is a collective: every process must make the same
calls, with the same shapes, in the same order, even though their images
differ in size and so in window count. So before each eval batch the
processes exchange a plan (window shape and call count of each image) and
each pads its calls, per window shape, to the most any process needs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from ddep.evaluators import inference
from ddep.evaluators import metrics as metrics_lib
from ddep.runs import progress
from ddep.training import optimizer as optimizer_lib
from ddep.training import sharding


def num_calls(protocol: inference.Protocol, height: int, width: int, batch_size: int) -> int:
  """How many predict calls `inference.run_protocol` makes for one image of this size."""
  _, count = inference.protocol_windows(protocol, height, width)
  return math.ceil(count * (2 if protocol.flip else 1) / batch_size)


def window_batch_size(requested: int, mesh) -> int:
  """Windows per process and call: `requested` (0: one per local device) rounded up to a
  multiple of the local devices, so each device gets whole windows."""
  local = mesh.devices.size // jax.process_count()
  return max(local, math.ceil(max(requested, 1) / local) * local)


class LockstepPredict:
  """`predict_fn(windows) -> logits` for inference's protocols, as one global batch.

  Each process passes its own (batch_size, h, w, 3) windows and gets its own
  rows back; `calls` counts the calls made, which the plan must match.
  """

  def __init__(self, model, params, frozen, mesh):
    self._mesh = mesh
    self._params, self._frozen = params, frozen
    self._apply = jax.jit(
        lambda p, f, x: model.apply({'params': optimizer_lib.merge(p, f)}, x),
        out_shardings=sharding.batch_sharding(mesh),
    )
    self.calls = 0

  def __call__(self, windows):
    self.calls += 1
    x = sharding.global_batch({'x': np.asarray(windows, np.float32)}, self._mesh)['x']
    logits = self._apply(self._params, self._frozen, x)
    return multihost_utils.global_array_to_host_local_array(logits, self._mesh, P(sharding.DATA))


def _plan(batch, protocol, batch_size: int) -> np.ndarray:
  """(B, 3) int32: window height, window width and calls of each image; 0 for padding."""
  plan = np.zeros((len(batch['_mask']), 3), np.int32)
  for i in np.flatnonzero(batch['_mask']):
    h, w = batch['orig_hw'][i] if 'orig_hw' in batch else batch['image'].shape[1:3]
    window, _ = inference.protocol_windows(protocol, int(h), int(w))
    plan[i] = (*window, num_calls(protocol, int(h), int(w), batch_size))
  return plan


def _everyones(plan: np.ndarray) -> np.ndarray:
  """(processes, B, 3): every process's plan."""
  if jax.process_count() == 1:
    return plan[None]
  return np.asarray(multihost_utils.process_allgather(plan))


def confusion_matrix(
    model,
    state: dict,
    mesh,
    eval_batches: Iterable[dict],
    *,
    protocol: inference.Protocol,
    num_classes: int,
    ignore_label: int,
    batch_size: int = 0,
) -> np.ndarray:
  """The dataset's confusion matrix under `protocol`, summed over all processes.

  `eval_batches` yields this process's batches (`ddep.data.eval_data.EvalDataset`:
  the same number on every process, padding rows with `_mask` False, and with
  `orig_hw` when images were padded to one size).
  """
  batch_size = window_batch_size(batch_size, mesh)
  predict = LockstepPredict(model, state['params'], state['frozen'], mesh)
  protocol_fn = lambda image, size: inference.run_protocol(  # pylint: disable=g-long-lambda
      protocol, predict, image, output_size=size, batch_size=batch_size
  )
  local = np.zeros((num_classes, num_classes), np.int64)
  for batch in progress.track(eval_batches, desc=f'eval {protocol.name}', unit='batches'):
    plan = _plan(batch, protocol, batch_size)
    everyone = _everyones(plan)
    # Window shapes in one order on every process; within a shape, the most calls anyone needs.
    shapes = sorted({tuple(p[:2]) for p in everyone.reshape(-1, 3) if p[2]})
    for shape in shapes:
      mine = [i for i in np.flatnonzero(batch['_mask']) if tuple(plan[i, :2]) == shape]
      needed = int(max(sum(p[2] for p in rows if tuple(p[:2]) == shape) for rows in everyone))
      start = predict.calls
      for i in mine:
        image, label = batch['image'][i], batch['label'][i]
        if 'orig_hw' in batch:
          h, w = batch['orig_hw'][i]
          image, label = image[:h, :w], label[:h, :w]
        pred = jnp.argmax(protocol_fn(image[None], label.shape), axis=-1)
        local += np.asarray(
            metrics_lib.confusion_matrix(label[None], pred, num_classes, ignore_label=ignore_label)
        )
      made = predict.calls - start
      if made != sum(int(plan[i, 2]) for i in mine):
        raise AssertionError(
            f'protocol {protocol.name} made {made} calls for window {shape}, '
            f'planned {sum(int(plan[i, 2]) for i in mine)}'
        )
      for _ in range(needed - made):  # Others still have windows of this shape.
        predict(np.zeros((batch_size, *shape, 3), np.float32))
  if jax.process_count() > 1:
    local = np.sum(np.asarray(multihost_utils.process_allgather(local)), axis=0)
  return local


def protocol_from_config(eval_config) -> inference.Protocol:
  """The config's `eval.protocol` with its `eval.flip`."""
  if eval_config.protocol not in inference.PROTOCOLS:
    raise ValueError(
        f'unknown protocol {eval_config.protocol!r}; known: ' f'{", ".join(inference.PROTOCOLS)}'
    )
  return dataclasses.replace(inference.PROTOCOLS[eval_config.protocol], flip=bool(eval_config.flip))
