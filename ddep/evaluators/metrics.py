"""Semantic segmentation metrics: confusion matrix, IoU, mIoU (paper Sec. 4.1).

mIoU is computed the way the benchmarks (cityscapesScripts, the ADE20K and
Pascal Context toolkits) define it: one confusion matrix summed over the whole
evaluation set, per-class IoU = TP / (TP + FP + FN) from that matrix, and the
mean over the classes whose union is non-empty. It is never an average of
per-image or per-batch IoUs.

Cross-device and cross-host sums: `confusion_matrix` is a pure jnp function, so
calling it under `jax.jit` on a globally sharded batch already sums over every
device of every host (XLA inserts the all-reduce). To read the result on each
host, make the output replicated (`out_shardings=NamedSharding(mesh, P())`)
or fetch it with `jax.experimental.multihost_utils.process_allgather`; then
every host feeds the same global matrix to `ConfusionMatrixAccumulator`. Only
the padding mask (big_vision's `_mask`) keeps padded examples from counting.

This module imports no TensorFlow.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


# Compiled as one program per shape: eager, its dozen ops would each compile and dispatch
# on their own, per image size of a protocol's per-image evaluation.
@functools.partial(jax.jit, static_argnames=('num_classes', 'ignore_label', 'unmatched_column'))
def confusion_matrix(
    labels,
    predictions,
    num_classes: int,
    *,
    ignore_label: int = IGNORE_LABEL,
    mask=None,
    unmatched_column: bool = False,
):
  """Counts (ground truth, prediction) pixel pairs; jit-friendly, fixed shape.

  Args:
      labels: int array of ground-truth train ids, any shape, e.g. (B, H, W).
      predictions: int array of predicted train ids, same shape as `labels`.
      num_classes: C, the number of evaluated classes.
      ignore_label: ground-truth value whose pixels are not counted. Any other
          ground-truth value outside [0, C) is not counted either.
      mask: optional bool/0-1 array broadcastable from the left over `labels`,
          e.g. (B,) for big_vision-style padded eval batches (`_mask`) or (B, H, W)
          for padded pixels; False entries are not counted.
      unmatched_column: if False the result is (C, C) and pixels predicted
          outside [0, C) are not counted at all (argmax outputs never are). If True
          the result is (C, C + 1) and column C counts, per ground-truth class,
          the pixels predicted as none of the C classes: a false negative for the
          row's class and a false positive for no class, as cityscapesScripts
          scores predictions of non-evaluated label ids.

  Returns:
      int32 array, rows = ground truth, columns = prediction. int32 holds any one
      batch (< 2**31 pixels); accumulate across batches in int64 on the host
      with `ConfusionMatrixAccumulator`.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  predictions = jnp.asarray(predictions).astype(jnp.int32)
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} and predictions {predictions.shape} differ in shape')
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  if mask is not None:
    mask = jnp.asarray(mask).astype(bool)
    if mask.shape != labels.shape[: mask.ndim]:
      raise ValueError(f'mask {mask.shape} is not a leading part of labels {labels.shape}')
    valid &= mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
  in_range = (predictions >= 0) & (predictions < num_classes)
  if unmatched_column:
    columns = num_classes + 1
    predictions = jnp.where(in_range, predictions, num_classes)
  else:
    columns = num_classes
    valid &= in_range
  # Invalid pixels are sent to cell 0 with weight 0, so every index is in bounds.
  index = jnp.where(valid, labels * columns + predictions, 0).reshape(-1)
  counts = (
      jnp.zeros((num_classes * columns,), jnp.int32)
      .at[index]
      .add(valid.reshape(-1).astype(jnp.int32))
  )
  return counts.reshape(num_classes, columns)


class ConfusionMatrixAccumulator:
  """Host-side int64 sum of per-batch confusion matrices.

  Feed it matrices that already cover the global batch (see module docstring);
  int64 cannot overflow for any realistic evaluation set, unlike int32, which
  the 500 Cityscapes val images at 1024x2048 (~1e9 pixels) nearly reach.
  """

  def __init__(self, num_classes: int | None = None):
    self._cm = None
    self._num_classes = num_classes

  def update(self, cm) -> None:
    cm = np.asarray(cm).astype(np.int64)
    if cm.ndim != 2 or cm.shape[1] not in (cm.shape[0], cm.shape[0] + 1):
      raise ValueError(f'confusion matrix must be (C, C) or (C, C + 1), got {cm.shape}')
    if self._num_classes is not None and cm.shape[0] != self._num_classes:
      raise ValueError(f'expected {self._num_classes} classes, got a {cm.shape} matrix')
    if (cm < 0).any():
      raise ValueError('confusion matrix has negative counts (int32 overflow upstream?)')
    if self._cm is None:
      self._cm = cm.copy()
    elif self._cm.shape != cm.shape:
      raise ValueError(f'matrix shape changed from {self._cm.shape} to {cm.shape}')
    else:
      self._cm += cm

  def reset(self) -> None:
    self._cm = None

  def result(self) -> np.ndarray:
    if self._cm is None:
      if self._num_classes is None:
        raise ValueError('no matrix accumulated yet and num_classes unknown')
      return np.zeros((self._num_classes, self._num_classes), np.int64)
    return self._cm.copy()


def _nanmean(values: np.ndarray) -> float:
  # np.nanmean warns on all-NaN input; an empty evaluation is simply NaN.
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else math.nan


def segmentation_metrics(cm, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Benchmark metrics from a summed confusion matrix.

  Args:
      cm: (C, C) or (C, C + 1) counts, rows = ground truth; a trailing column
          holds pixels predicted as no evaluated class (see `confusion_matrix`).
      class_names: optional C names for the per-class dicts.

  Returns:
      dict with
          miou: mean IoU over classes with a non-empty union (NaN ones left out);
          per_class_iou: {name: IoU}; TP / (TP + FP + FN), NaN when the class is
              neither in the ground truth nor predicted, 0 when only predicted;
          pixel_accuracy: correctly labelled / counted pixels;
          mean_class_accuracy: mean over classes present in the ground truth of
              TP / (TP + FN);
          per_class_accuracy: {name: TP / (TP + FN)} (NaN if absent from the GT);
          num_pixels: counted pixels;
          class_names: the names, in class order.
  """
  cm = np.asarray(cm, np.float64)
  num_classes = cm.shape[0]
  if cm.ndim != 2 or cm.shape[1] not in (num_classes, num_classes + 1):
    raise ValueError(f'confusion matrix must be (C, C) or (C, C + 1), got {cm.shape}')
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
  tp = np.diagonal(cm[:, :num_classes])
  gt_pixels = cm.sum(axis=1)  # TP + FN, including predictions of no class.
  predicted = cm[:, :num_classes].sum(axis=0)  # TP + FP.
  union = gt_pixels + predicted - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, tp / union, np.nan)
    accuracy = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
  total = cm.sum()
  return {
      'miou': _nanmean(iou),
      'per_class_iou': {n: float(v) for n, v in zip(class_names, iou)},
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else math.nan,
      'mean_class_accuracy': _nanmean(accuracy),
      'per_class_accuracy': {n: float(v) for n, v in zip(class_names, accuracy)},
      'num_pixels': int(total),
      'class_names': list(class_names),
  }


def json_safe(value):
  """`value` with NaN as None, recursively: JSON has no NaN, and an IoU is NaN for a
  class absent from both ground truth and prediction (null, not averaged)."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, Mapping):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.generic):
    return json_safe(value.item())
  return value


def _percent(value: float) -> str:
  return '   n/a' if math.isnan(value) else f'{100 * value:6.2f}'


def format_table(metrics: dict[str, Any]) -> str:
  """A per-class IoU / accuracy table, values x100 to two decimals."""
  names = list(metrics['per_class_iou'])
  width = max([len('mean_class_accuracy')] + [len(n) for n in names])
  lines = [f"{'class':<{width}}    IoU    Acc", '-' * (width + 15)]
  for name in names:
    acc = metrics.get('per_class_accuracy', {}).get(name, math.nan)
    lines.append(f"{name:<{width}} {_percent(metrics['per_class_iou'][name])} {_percent(acc)}")
  lines.append('-' * (width + 15))
  for key in ('miou', 'pixel_accuracy', 'mean_class_accuracy'):
    if key in metrics:
      lines.append(f'{key:<{width}} {_percent(metrics[key])}')
  return '\n'.join(lines)
