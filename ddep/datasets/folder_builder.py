"""The files of a folder dataset (`folder:NAME`): finding them, pairing images with masks,
checking every one in full, and the two TFDS builders that store them.

What is stored, and where: ddep.datasets.folder. The build itself (fingerprint, stale
files, metadata) is ddep.data.preparation.prepare_folder. Every problem with an input
file is a FolderError whose one-line message names the file; with `skip_bad` the file
is left out and named in `skipped` instead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ddep.datasets import folder
from ddep.datasets import folder_labels
from ddep.runs import storage

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
MASK_SUFFIX = '.png'
# Files kept as they are: the input pipeline decodes them with tf.io.decode_image(channels=3),
# greyscale, palette and RGBA included. Anything else (CMYK JPEG, 16-bit PNG) is stored as
# an RGB PNG of what PIL reads, so that training never meets a file TF decodes differently.
_KEPT = {'JPEG': ('RGB', 'L'), 'PNG': ('RGB', 'L', 'P', 'RGBA')}
# Files read and checked at once (PIL decodes and storage reads release the GIL).
_WORKERS = 8


class FolderError(ValueError):
  """An input that cannot become the dataset; the message names the file or the folder."""


class BadFileError(FolderError):
  """One input file that cannot be stored: `skip_bad` leaves it out."""

  def __init__(self, path: str, why: str):
    super().__init__(f'{path}: {why}')
    self.path, self.why = path, why


@dataclasses.dataclass(frozen=True)
class Item:
  """One image (and its mask): `image_id` is its path relative to its folder, no suffix."""

  image_id: str
  image: str
  mask: str | None = None


@dataclasses.dataclass
class Plan:
  """What a build stores: split -> items, for the labelled and the pretraining builder,
  and the files left out before reading (with `skip_bad`)."""

  labelled: dict[str, list[Item]]
  pretraining: dict[str, list[Item]]
  skipped: list[tuple[str, str]]


def _relative(path: str, root: str) -> str:
  return path[len(root) :].lstrip('/')


def list_files(root: str, suffixes: tuple[str, ...], flag: str) -> dict[str, str]:
  """{image id: path} of the files below `root` (nested folders too) with one of `suffixes`."""
  base = storage.path(root)
  if not base.is_dir():
    raise FolderError(f'--{flag}={root} is not a directory')
  base_str, found = os.fspath(base).rstrip('/'), {}
  for path in storage.files_below(base):
    path = os.fspath(path)
    rel = _relative(path, base_str)
    stem, suffix = os.path.splitext(rel)
    # Hidden files (.DS_Store, macOS's ._x.jpg companions) are no one's images.
    if suffix.lower() not in suffixes or any(p.startswith('.') for p in rel.split('/')):
      continue
    if stem in found:
      raise FolderError(
          f'{found[stem]} and {path} are one image id {stem!r} in --{flag}: rename one'
      )
    found[stem] = path
  if not found:
    raise FolderError(
        f'--{flag}={root} holds no {"/".join(suffixes)} file (nested folders are searched)'
    )
  return found


def pair(
    images: dict[str, str],
    masks: dict[str, str],
    *,
    flags: tuple[str, str],
    skip_bad: bool,
    skipped: list[tuple[str, str]],
) -> list[Item]:
  """Items of the images that have a mask of the same relative path and stem."""
  orphans = [
      (images[i], f'image has no mask {i}{MASK_SUFFIX} in --{flags[1]}')
      for i in images
      if i not in masks
  ]
  orphans += [
      (masks[i], f'mask has no image {i}.jpg/.jpeg/.png in --{flags[0]}')
      for i in masks
      if i not in images
  ]
  if orphans and not skip_bad:
    path, why = orphans[0]
    more = f' (and {len(orphans) - 1} more unpaired files; --skip_bad leaves them out)'
    raise BadFileError(path, why + (more if len(orphans) > 1 else ''))
  skipped.extend(orphans)
  return [Item(i, images[i], masks[i]) for i in sorted(images) if i in masks]


def plan(
    *,
    images: str,
    masks: str,
    val_images: str | None,
    val_masks: str | None,
    val_fraction: float | None,
    unlabelled: str | None,
    pretrain_on_labelled: bool,
    skip_bad: bool,
) -> Plan:
  """Lists and pairs every file, and splits train from validation; reads no file."""
  skipped = []
  labelled = pair(
      list_files(images, IMAGE_SUFFIXES, 'images'),
      list_files(masks, (MASK_SUFFIX,), 'masks'),
      flags=('images', 'masks'),
      skip_bad=skip_bad,
      skipped=skipped,
  )
  if val_images:
    train = labelled
    validation = pair(
        list_files(val_images, IMAGE_SUFFIXES, 'val_images'),
        list_files(val_masks, (MASK_SUFFIX,), 'val_masks'),
        flags=('val_images', 'val_masks'),
        skip_bad=skip_bad,
        skipped=skipped,
    )
  else:
    validation = [i for i in labelled if folder.in_validation(i.image_id, val_fraction)]
    train = [i for i in labelled if not folder.in_validation(i.image_id, val_fraction)]
    if not validation or not train:
      raise FolderError(
          f'--val_fraction={val_fraction} puts {len(validation)} of the {len(labelled)} '
          f'labelled images of --images={images} in validation: choose a fraction that leaves '
          'both splits some, or pass --val_images and --val_masks'
      )
  if not train or not validation:
    flag = 'images' if not train else 'val_images'
    raise FolderError(f'--{flag}: no image is left with its mask (all skipped)')
  pretraining = {}
  if unlabelled:
    found = list_files(unlabelled, IMAGE_SUFFIXES, 'unlabelled')
    pretraining['unlabelled'] = [Item(i, found[i]) for i in sorted(found)]
    if pretrain_on_labelled:
      pretraining['train'] = [Item(i.image_id, i.image) for i in train]
  return Plan(
      labelled={'train': train, 'validation': validation}, pretraining=pretraining, skipped=skipped
  )


def _stat(path: str) -> tuple[int, float]:
  stat = storage.path(path).stat()
  return int(stat.length), float(stat.mtime)


def fingerprint(plan_: Plan, *, classes_text: str, options: dict) -> str:
  """A digest of every input: file names, sizes and modification times, the classes file
  and the options. Any change (a fixed mask, a new image, a flag) rebuilds the dataset."""
  files = sorted(
      {
          (split, i.image_id, p)
          for d in (plan_.labelled, plan_.pretraining)
          for split, items in d.items()
          for i in items
          for p in (i.image, i.mask)
          if p
      }
  )
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    stats = list(pool.map(_stat, [p for _, _, p in files]))
  record = dict(
      format=folder.FORMAT,
      classes=classes_text,
      options=options,
      files=[[*f, *s] for f, s in zip(files, stats)],
      skipped=sorted(plan_.skipped),
  )
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _open(data: bytes, path: str, what: str) -> Image.Image:
  """`data` decoded in full: a truncated or corrupt file fails here, named, not in training."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # Decodes every pixel: PIL's open() reads the header only.
    return image
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadFileError(path, f'the {what} cannot be read in full (corrupt or truncated?): {e}')


def _read(path: str) -> bytes:
  try:
    return storage.path(path).read_bytes()
  except OSError as e:
    raise BadFileError(path, f'cannot be read: {e}') from None


def read_image(path: str) -> tuple[bytes, tuple[int, int]]:
  """(bytes to store, (height, width)) of one image file, checked in full."""
  data = _read(path)
  image = _open(data, path, 'image')
  if image.mode not in _KEPT.get(image.format, ()):
    out = io.BytesIO()
    image.convert('RGB').save(out, format='PNG')
    data = out.getvalue()
  return data, (image.height, image.width)


def _png(ids: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(ids, mode='L').save(out, format='PNG')
  return out.getvalue()


def read_labelled(item: Item, classes: folder_labels.Classes, reduce_zero_label: bool) -> dict:
  """One labelled example (TFDS features plus '_pixels', '_hw' for the build's report)."""
  image, hw = read_image(item.image)
  mask = _open(_read(item.mask), item.mask, 'mask')
  if (mask.height, mask.width) != hw:
    raise BadFileError(
        item.mask,
        f'mask size {mask.width}x{mask.height} != image size {hw[1]}x{hw[0]} of {item.image}',
    )
  try:
    ids = folder_labels.mask_ids(mask, classes, reduce_zero_label=reduce_zero_label)
  except folder_labels.LabelError as e:
    raise BadFileError(item.mask, str(e)) from None
  return {
      'image': image,
      'segmentation': _png(ids),
      'image_id': item.image_id,
      'labels': folder_labels.image_labels(ids, classes.num_classes),
      '_pixels': folder_labels.class_pixels(ids, classes.num_classes),
      '_hw': hw,
  }


def read_unlabelled(item: Item) -> dict:
  image, hw = read_image(item.image)
  return {'image': image, 'image_id': item.image_id, '_hw': hw}


def _attempt(fn, item):
  try:
    return fn(item), None
  except BadFileError as e:
    return None, e


def checked(
    fn: Callable[[Item], dict], items: Iterable[Item]
) -> Iterator[tuple[Item, dict, Exception]]:
  """(item, fn(item) or None, its FolderError or None), in order, a few files read at once."""
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(_attempt, fn, item)))
      if len(pending) >= 4 * _WORKERS:  # Bounded: a 100k-image folder is never all in memory.
        item_, future = pending.popleft()
        yield (item_, *future.result())
    while pending:
      item_, future = pending.popleft()
      yield (item_, *future.result())


@dataclasses.dataclass
class SplitReport:
  """What a build found in one split: examples, left-out files, class pixels, largest size."""

  examples: int = 0
  pixels: np.ndarray | None = None
  max_hw: tuple[int, int] = (0, 0)


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stores the items of `splits`; not registered, read back by TFDS's read-only builder."""

  VERSION = tfds.core.Version(folder.VERSION)
  RELEASE_NOTES = {folder.VERSION: 'Images as their files, masks as train ids (255 ignored).'}

  def __init__(self, *, splits: dict[str, list[Item]], read, skip_bad: bool, **kwargs):
    self._splits, self._read, self._skip_bad = splits, read, skip_bad
    self.skipped: list[tuple[str, str]] = []
    self.reports: dict[str, SplitReport] = {}
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are read from the user's folders.
    return {split: self._generate_examples(split, items) for split, items in self._splits.items()}

  def _generate_examples(self, split: str, items: list[Item]):
    report = self.reports.setdefault(split, SplitReport())
    for item, example, error in checked(self._read, items):
      if error is not None:
        if not self._skip_bad:
          raise error
        self.skipped.append((error.path, error.why))
        continue
      pixels, hw = example.pop('_pixels', None), example.pop('_hw')
      if pixels is not None:
        report.pixels = pixels if report.pixels is None else report.pixels + pixels
      report.max_hw = (max(report.max_hw[0], hw[0]), max(report.max_hw[1], hw[1]))
      report.examples += 1
      yield item.image_id, example
    if not report.examples:  # Raised inside the build: TFDS removes what it wrote.
      raise FolderError(f'every image of the {split} split was left out (--skip_bad); see above')


class DdepFolder(_FolderBuilder, skip_registration=True):
  """Labelled images of a folder dataset: train and validation."""

  def __init__(self, *, classes: folder_labels.Classes, reduce_zero_label: bool, **kwargs):
    self._classes = classes
    read = lambda item: read_labelled(item, classes, reduce_zero_label)  # noqa: E731
    super().__init__(read=read, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Your own images and masks (ddep.prepare --dataset=folder:NAME); '
        '`segmentation` holds train ids, 255 ignored; `labels` the classes each mask shows.',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3)),
                'segmentation': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                'image_id': tfds.features.Text(),
                'labels': tfds.features.Tensor(shape=(self._classes.num_classes,), dtype=np.uint8),
            }
        ),
    )


class DdepFolderImages(_FolderBuilder, skip_registration=True):
  """Images of a folder dataset for denoising pretraining: unlabelled (and train)."""

  def __init__(self, **kwargs):
    super().__init__(read=read_unlabelled, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Images for denoising pretraining (ddep.prepare --dataset=folder:NAME '
        '--unlabelled=DIR); `train` repeats the labelled train images.',
        features=tfds.features.FeaturesDict(
            {'image': tfds.features.Image(shape=(None, None, 3)), 'image_id': tfds.features.Text()}
        ),
    )


def builder_config(dataset: str) -> tfds.core.BuilderConfig:
  return tfds.core.BuilderConfig(name=folder.short_name(dataset), version=folder.VERSION)
