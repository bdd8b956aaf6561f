"""Segmentation evaluation: the dataset-level confusion matrix of a train state over every
evaluation example once, across all hosts, under the config's protocol; and the evaluator
the train loop runs (scalars, TensorBoard previews, the line it prints)."""

import functools
from typing import Optional

import jax
import numpy as np

from ddep.data import eval_data
from ddep.evaluators import metrics as metrics_lib
from ddep.evaluators import protocol as protocol_eval
from ddep.runs import progress
from ddep.runs import summaries
from ddep.training import sharding
from ddep.training import steps as steps_lib


def _fetch(x) -> np.ndarray:
  """A replicated array's value; works when the array spans other processes' devices."""
  return np.asarray(x.addressable_data(0))


@functools.lru_cache(maxsize=8)
def _whole_image_eval_step(model, num_classes: int, ignore_label: int, flip: bool, mesh):
  # One compiled step per model for every evaluation of every run in this process.
  return jax.jit(
      steps_lib.make_segmentation_eval_step(model, num_classes, ignore_label, flip=flip),
      out_shardings=sharding.replicated(mesh),
  )


def evaluate_segmentation(config, model, state, mesh, spec, *, eval_iter) -> dict:
  """Dataset-level confusion matrix over every eval example once, across all hosts."""
  num_classes = spec.num_classes
  acc = metrics_lib.ConfusionMatrixAccumulator(num_classes)
  if config.eval.protocol == 'whole':
    eval_step = _whole_image_eval_step(
        model, num_classes, spec.ignore_label, bool(config.eval.flip), mesh
    )
    for batch in progress.track(eval_iter, desc='eval whole', unit='batches'):
      batch = sharding.global_batch({k: batch[k] for k in ('image', 'label', '_mask')}, mesh)
      acc.update(_fetch(eval_step(state['params'], state['frozen'], batch)))
  else:
    # Protocols (halves, sliding windows): window batches over all devices of all processes,
    # on the state's own (possibly FSDP) parameters.
    acc.update(
        protocol_eval.confusion_matrix(
            model,
            state,
            mesh,
            eval_iter,
            protocol=protocol_eval.protocol_from_config(config.eval),
            num_classes=num_classes,
            ignore_label=spec.ignore_label,
            batch_size=int(config.eval.batch_size),
        )
    )
  return metrics_lib.segmentation_metrics(acc.result(), class_names=spec.class_names)


class SegmentationValidation:
  """The loop's evaluator of a segment run: mIoU on the eval split; best/ follows it."""

  best_key = 'val/miou'

  def __init__(self, config, model, spec, mesh, writer, *, data_dir: Optional[str] = None):
    self._config, self._model, self._spec, self._mesh, self._writer = (
        config,
        model,
        spec,
        mesh,
        writer,
    )
    d = config.data
    self.eval_iter = eval_data.eval_dataset(
        spec,
        batch_size=int(d.eval_batch_size) // jax.process_count(),
        split=d.eval_split or None,
        data_dir=data_dir,
        pad_to=tuple(d.eval_pad_to) or None,
    )
    self._pictures = int(config.eval.get('summary_images', 0))
    self._previews = (
        summaries.first_examples(self.eval_iter, self._pictures)
        if jax.process_index() == 0
        else None
    )
    self.result = None  # The last evaluation's full metrics (per-class IoU, ...).

  def run(self, state, step: int) -> dict[str, float]:
    self.result = evaluate_segmentation(
        self._config, self._model, state, self._mesh, self._spec, eval_iter=self.eval_iter
    )
    panels = None
    if self._pictures:
      params = steps_lib.host_params(state)  # Every process: a gather when the params are sharded.
      panels = summaries.preview_panels(
          self._config, self._model, params, self._spec, self._previews
      )
    summaries.write_segmentation(self._writer, step, self.result, panels)
    if jax.process_index() == 0:
      print(f'[ddep] step {step}: val mIoU {100 * self.result["miou"]:.2f}', flush=True)
    return {'val/miou': self.result['miou'], 'val/pixel_accuracy': self.result['pixel_accuracy']}
