r"""Label maps and colour overlays for image files, from a trained segmentation run.

  python -m ddep.predict --workdir=DIR --images=DIR_OR_GLOB --output=DIR
      [--checkpoint=PATH] [--config=configs/x.py] [--protocol=NAME]

The run's `<workdir>/config.json` says the model, dataset and protocol (--config
replaces it; --protocol overrides `eval.protocol`); the checkpoint is chosen as
in ddep.evaluate (best, else latest). A directory is searched recursively for
.png/.jpg/.jpeg files; a glob takes whatever files it matches. For an input
<rel>/<name>.<ext> (relative to the directory, or to the glob's matches' common
folder) it writes

  <output>/labels/<rel>/<name>.png    uint8 ids in the dataset's ground-truth
      format, i.e. the inverse of its label map: Cityscapes labelIds (road = 7),
      ADE20K and Pascal Context 59 train id + 1, train ids otherwise. So
      `python -m ddep.score --dataset=D --predictions=<output>/labels` scores them.
  <output>/overlays/<rel>/<name>.png  the image blended with the dataset palette.

Pixels are scaled as in training (x / 127.5 - 1). The 'whole' protocol takes any
image size: it pads at the bottom/right with 0 (as the eval pipeline does) to at
least `data.eval_pad_to`, so images that fit are predicted exactly as evaluation
saw them, and to a multiple of the model's output stride, then crops the logits.

Bad input: a file that cannot be read as an image, or that the protocol cannot
take (e.g. cityscapes_halves on a non 1:2 image), is reported on stderr with its
name and skipped; every other image is still written, and the command exits 1.
"""

import dataclasses
import functools
import glob
import os
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from PIL import Image

from ddep import evaluate
from ddep.config import validation as config_validation
from ddep.datasets import specs
from ddep.evaluators import inference
from ddep.reporting import visualisation
from ddep.runs import process
from ddep.runs import progress
from ddep.runs import workdir as workdir_lib

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


class ImageError(Exception):
  """An input image that cannot be read, named or predicted; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ImageFile:
  path: str
  stem: str  # Output path relative to labels/ and overlays/, without '.png'.


def label_id_table(spec: specs.DatasetSpec) -> np.ndarray:
  """(num_classes,) uint8: train id -> the raw id written for it.

  The inverse of the label map the ground truth goes through (smallest raw id
  if several share a train id), so reading a prediction back with the dataset's
  own label map, as ddep.score and the official scripts do, gives the train id.
  """
  label_map = np.asarray(spec.label_map)
  table = np.zeros((spec.num_classes,), np.uint8)
  for train_id in range(spec.num_classes):
    raw = np.flatnonzero(label_map == train_id)
    if not raw.size:
      raise ValueError(f'{spec.name}: no raw id maps to train id {train_id}')
    table[train_id] = raw[0]
  return table


def find_images(images: str, *, exclude: Optional[str] = None) -> list[ImageFile]:
  """Image files of a directory (recursive, by extension) or of a glob, sorted.

  `exclude` (the output directory) is skipped so reruns never predict overlays.
  """
  exclude = os.path.abspath(exclude) if exclude else None
  if os.path.isdir(images):
    base = images
    paths = [
        os.path.join(root, name)
        for root, _, names in os.walk(images)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
  else:
    paths = [p for p in glob.glob(images, recursive=True) if os.path.isfile(p)]
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ''
  if exclude:
    paths = [p for p in paths if os.path.commonpath([os.path.abspath(p), exclude]) != exclude]
  if not paths:
    raise FileNotFoundError(
        f'no images found at {images!r} (a directory of '
        f'{"/".join(IMAGE_EXTENSIONS)} files, or a glob)'
    )
  files, seen = [], {}
  for path in sorted(paths):
    stem = os.path.splitext(os.path.relpath(os.path.abspath(path), os.path.abspath(base)))[0]
    if stem in seen:
      raise ImageError(f'{seen[stem]} and {path} would both be written as {stem}.png')
    seen[stem] = path
    files.append(ImageFile(path, stem))
  return files


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8; grey and RGBA images are converted to RGB."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable data.
    raise ImageError(f'cannot read image {path}: {e}') from e


def padded_size(
    height: int, width: int, *, stride: int, min_hw: Sequence[int] = (0, 0)
) -> tuple[int, int]:
  """The smallest size >= the image and `min_hw`, in multiples of `stride`."""
  up = lambda n: -(-n // stride) * stride  # noqa: E731
  return up(max(height, int(min_hw[0]))), up(max(width, int(min_hw[1])))


def make_predictor(
    config, model, params, *, protocol: Optional[str] = None
) -> Callable[[np.ndarray], np.ndarray]:
  """`fn(image uint8 (H, W, 3)) -> train ids uint8 (H, W)` with the config's protocol."""
  name = protocol or config.eval.protocol
  if name not in inference.PROTOCOLS:
    raise config_validation.ConfigError(
        f'config.eval.protocol: unknown {name!r}; known: {", ".join(inference.PROTOCOLS)}'
    )
  stride = model.output_stride
  whole = name == 'whole'
  # 'whole' sees images padded as the eval pipeline pads them (to eval_pad_to); the
  # other protocols get each image at its own size, as train.evaluate_segmentation
  # crops them back to orig_hw, and call the model on fixed-size windows.
  min_hw = tuple(config.data.eval_pad_to) if whole and config.data.eval_pad_to else (0, 0)

  @jax.jit
  def apply(params, images):
    # Windows the model cannot take whole (never the case for the paper's
    # protocols) are padded to the stride and their logits cropped back.
    h, w = images.shape[1:3]
    ph, pw = padded_size(h, w, stride=stride)
    images = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
    return model.apply({'params': params}, images)[:, :h, :w]

  params = jax.device_put(params)
  protocol_fn = inference.make_protocol(
      name,
      functools.partial(apply, params),
      batch_size=int(config.eval.batch_size) or None,
      flip=bool(config.eval.flip),
  )

  def predict(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    # The same float32 arithmetic as preprocess.scale_to_minus1_1.
    x = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if whole:
      # Padding first also means one compile per padded size, not per image size.
      ph, pw = padded_size(h, w, stride=stride, min_hw=min_hw)
      x = np.pad(x, ((0, ph - h), (0, pw - w), (0, 0)))
    labels = inference.predict_labels(protocol_fn, x[None])[0, :h, :w]
    return np.asarray(labels).astype(np.uint8)

  return predict


def _save_png(array: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def predict_files(
    predictor: Callable[[np.ndarray], np.ndarray],
    files: Sequence[ImageFile],
    output: str,
    spec: specs.DatasetSpec,
) -> list[str]:
  """Writes labels/ and overlays/ for each file; returns one message per failed file."""
  ids, colours = label_id_table(spec), visualisation.palette(spec)
  errors = []
  for file in progress.track(files, desc='predict', unit='images'):
    try:
      image = read_image(file.path)
      try:
        train_ids = predictor(image)
      except ValueError as e:  # A protocol's size requirement, e.g. halves need W = 2H.
        raise ImageError(
            f'cannot predict {file.path} ({image.shape[1]}x{image.shape[0]}): {e}'
        ) from e
    except ImageError as e:
      print(f'ddep.predict: error: {e}', file=sys.stderr, flush=True)
      errors.append(str(e))
      continue
    _save_png(ids[train_ids], os.path.join(output, 'labels', file.stem + '.png'))
    _save_png(
        visualisation.overlay(image, train_ids, colours),
        os.path.join(output, 'overlays', file.stem + '.png'),
    )
  return errors


def predict(
    workdir: str,
    images: str,
    output: str,
    *,
    config=None,
    checkpoint: Optional[str] = None,
    protocol: Optional[str] = None,
) -> list[str]:
  """Predicts every image; returns the messages of the files that failed."""
  config = workdir_lib.load_config(workdir, config)
  evaluate.check_segmentation_config(config)
  # data_dir: a folder dataset's spec (its classes) is read from its prepared files.
  spec = specs.get(config.data.dataset, data_dir=config.data.data_dir or None)
  files = find_images(images, exclude=output)
  checkpoint_dir = workdir_lib.find_checkpoint(workdir, checkpoint)
  model, params = workdir_lib.load_params(config, checkpoint_dir, spec)
  errors = predict_files(
      make_predictor(config, model, params, protocol=protocol), files, output, spec
  )
  print(
      f'ddep.predict: {len(files) - len(errors)}/{len(files)} images from {checkpoint_dir} '
      f'-> {os.path.join(output, "labels")}, {os.path.join(output, "overlays")}',
      flush=True,
  )
  return errors


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config',
      None,
      'Experiment config file; default: the ' "workdir's config.json.",
      lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'The trained segmentation run.')
  flags.DEFINE_string('images', None, 'A directory (searched recursively) or a glob.')
  flags.DEFINE_string('output', None, 'Where labels/ and overlays/ are written.')
  flags.DEFINE_string('checkpoint', None, workdir_lib.CHECKPOINT_HELP)
  flags.DEFINE_string('protocol', '', "Overrides eval.protocol, e.g. 'whole'.")
  flags.mark_flags_as_required(['workdir', 'images', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  process.configure_gc()
  f = flags.FLAGS
  try:
    errors = predict(
        f.workdir,
        f.images,
        f.output,
        config=f.config,
        checkpoint=f.checkpoint,
        protocol=f.protocol or None,
    )
  except (
      workdir_lib.CheckpointError,
      ImageError,
      FileNotFoundError,
      config_validation.ConfigError,
  ) as e:
    print(f'ddep.predict: error: {e}', file=sys.stderr, flush=True)
    return 2  # As ddep.main: bad input the user can fix.
  if errors:  # Some images failed, the others were written.
    print(f'ddep.predict: {len(errors)} image(s) failed; see above', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
