"""What a run shows in TensorBoard besides its scalars (issue 15), through clu's writers.

  step 0        hparams (the flattened config), parameter counts, analytic GFLOPs per image;
  denoise eval  a grid per held-out image: clean | noisy | predicted ε | denoised;
  segment eval  per fixed validation image: image | ground truth | prediction overlays,
                and the IoU of every class.

The pictures are built by pure functions of host arrays (uint8, (N, H, W, 3)); the
`write_*` functions write them on process 0 only, since every process computes the
same values and other processes' writers only log.
"""

import functools
import math
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np

from ddep.evaluators import inference
from ddep.models import flops as flops_lib
from ddep.reporting import visualisation


def _is_main() -> bool:
  return jax.process_index() == 0


def flat_hparams(config) -> dict[str, Any]:
  """The config as {'a.b': scalar}: what TensorBoard's hparams plugin can show."""
  out = {}

  def visit(prefix, value):
    if isinstance(value, Mapping):
      for k in sorted(value):
        visit(f'{prefix}.{k}' if prefix else str(k), value[k])
    elif isinstance(value, (bool, int, float, str)):
      out[prefix] = value
    else:  # Tuples, lists, None: shown as text.
      out[prefix] = str(list(value)) if isinstance(value, (tuple, list)) else str(value)

  visit('', config.to_dict() if hasattr(config, 'to_dict') else config)
  return out


def model_scalars(model, image_hw, *, num_trainable: int, num_frozen: int) -> dict[str, float]:
  """Parameter counts and analytic GFLOPs of one image's forward pass (ddep.models.flops)."""
  out = {'model/params_trainable': float(num_trainable), 'model/params_frozen': float(num_frozen)}
  try:
    out['model/gflops_per_image'] = (
        flops_lib.forward_flops(flops_lib.model_ops(model, tuple(image_hw))) / 1e9
    )
  except (ValueError, AttributeError) as e:  # A backbone the analytic count does not know.
    logging.info('no analytic GFLOPs for this model: %s', e)
  return out


def write_start(writer, config, model, *, num_trainable: int, num_frozen: int) -> None:
  """Step 0: hparams, parameter counts and GFLOPs."""
  if not _is_main():
    return
  writer.write_hparams(flat_hparams(config))
  writer.write_scalars(
      0,
      model_scalars(
          model, config.data.image_size, num_trainable=num_trainable, num_frozen=num_frozen
      ),
  )


def write_denoising(writer, step: int, examples: Mapping[str, np.ndarray]) -> None:
  """The grid of the pictures of `denoise_eval.Evaluator.run`."""
  if not _is_main() or not len(examples['clean']):
    return
  writer.write_images(
      step,
      {
          'val/denoising': visualisation.denoising_grid(
              examples['clean'], examples['noisy'], examples['eps_hat'], examples['x_hat']
          )
      },
  )


def per_class_iou(result: Mapping[str, Any]) -> dict[str, float]:
  """{'val_iou/<class>': IoU} of the classes with one (absent classes have NaN)."""
  return {
      f'val_iou/{name}': float(v)
      for name, v in result['per_class_iou'].items()
      if not math.isnan(v)
  }


def first_examples(eval_iter, count: int) -> Optional[dict[str, list[np.ndarray]]]:
  """This process's first `count` eval examples (image, label, orig_hw): the fixed previews.

  Each `iter(eval_iter)` starts at the split's beginning, so taking them leaves the
  evaluations untouched. Lists, as images of different batches may differ in size.
  """
  if count <= 0:
    return None
  out = {'image': [], 'label': []}
  for batch in iter(eval_iter):
    for i in np.flatnonzero(batch['_mask'])[: count - len(out['image'])]:
      out['image'].append(np.asarray(batch['image'][i]))
      out['label'].append(np.asarray(batch['label'][i]))
      if 'orig_hw' in batch:
        out.setdefault('orig_hw', []).append(np.asarray(batch['orig_hw'][i]))
    if len(out['image']) >= count:
      break
  return out


def predict_previews(predict_labels, previews: Mapping[str, np.ndarray], *, whole: bool):
  """(images, labels, predictions) at each preview's own size.

  `predict_labels(image (1, H, W, 3), output_size) -> (1, H, W)` is the evaluation's
  protocol. The 'whole' protocol sees the padded image, as evaluation does (its size
  fits the model's stride); the others see the image itself.
  """
  images, labels, preds = [], [], []
  for i, (image, label) in enumerate(zip(previews['image'], previews['label'])):
    h, w = previews['orig_hw'][i] if 'orig_hw' in previews else image.shape[:2]
    if whole:
      pred = np.asarray(predict_labels(image[None], image.shape[:2]))[0, :h, :w]
    else:
      pred = np.asarray(predict_labels(image[None, :h, :w], (h, w)))[0]
    images.append(image[:h, :w])
    labels.append(label[:h, :w])
    preds.append(pred)
  return images, labels, preds


def write_segmentation(writer, step: int, result: Mapping[str, Any], panels=None) -> None:
  """Per-class IoU scalars, and the preview panels (a list of (H, 3W, 3)) if given."""
  if not _is_main():
    return
  writer.write_scalars(step, per_class_iou(result))
  if panels:
    # Sizes differ between images; TensorBoard takes one batch per key.
    writer.write_images(step, {f'val/segmentation/{i}': p[None] for i, p in enumerate(panels)})


@functools.lru_cache(maxsize=4)
def jitted_apply(model):
  """`(params, images) -> outputs`, compiled: one forward per model (and image shape) for
  the whole process, not one per evaluation; eager, each op would compile on its own."""
  # Params go in as an argument: closed over, they would be baked in as constants.
  return jax.jit(lambda p, x: model.apply({'params': p}, x))


def preview_panels(config, model, params, spec, previews) -> Optional[list[np.ndarray]]:
  """The previews predicted by host `params` under the config's eval protocol, as panels."""
  if previews is None or not _is_main():
    return None
  apply = jitted_apply(model)
  protocol = inference.make_protocol(
      config.eval.protocol,
      lambda x: apply(params, x),
      batch_size=int(config.eval.batch_size) or None,
      flip=bool(config.eval.flip),
  )
  images, labels, preds = predict_previews(
      lambda x, size: inference.predict_labels(protocol, x, output_size=size),
      previews,
      whole=config.eval.protocol == 'whole',
  )
  return visualisation.segmentation_panels(
      images, labels, preds, visualisation.palette(spec), ignore_label=spec.ignore_label
  )
