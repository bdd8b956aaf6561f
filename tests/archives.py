"""Tiny fake dataset archives in the real datasets' layouts, for builder tests.

Each writer puts its archive(s) in `manual_dir` and returns what it wrote:
{split: {image_id: Example}}, so tests can compare what TFDS reads back.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Example:
  image: np.ndarray  # (H, W, 3) uint8 before any encoding
  image_bytes: bytes  # the file as written into the archive
  label: np.ndarray | None = None  # (H, W) uint8 raw ids


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
  """A gradient image (JPEG keeps it within a few levels) that differs per seed."""
  y, x = np.mgrid[0:h, 0:w]
  channels = [(x * 3 + y * 2 + 40 * seed + 70 * c) % 200 + 20 for c in range(3)]
  return np.stack(channels, -1).astype(np.uint8)


def block_label(h: int, w: int, ids, seed: int, block: int = 8) -> np.ndarray:
  """Random ids from `ids` in block x block squares; every id appears once at least."""
  rng = np.random.default_rng(seed)
  cells = rng.choice(np.asarray(ids, np.uint8), size=(-(-h // block), -(-w // block)))
  cells.flat[: len(ids)] = ids
  return np.kron(cells, np.ones((block, block), np.uint8))[:h, :w]


def encode(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(
      buf, format=fmt, **({'quality': 95, 'subsampling': 0} if fmt == 'JPEG' else {})
  )
  return buf.getvalue()


def _write_zip(path: str, members: dict[str, bytes]):
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in members.items():
      zf.writestr(name, data)


def _write_tar(path: str, members: dict[str, bytes]):
  with tarfile.open(path, 'w') as tf:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


# (H, W) of the tiny images; deliberately non-square both ways.
SIZES = ((32, 48), (48, 32), (32, 40))


def write_ade20k(
    manual_dir: str, replace: dict[str, bytes] | None = None
) -> dict[str, dict[str, Example]]:
  """ADEChallengeData2016.zip: 3 training and 2 validation images.

  `replace` overwrites members by name, to make bad archives.
  """
  written = {'train': {}, 'validation': {}}
  members = {'ADEChallengeData2016/sceneCategories.txt': b'ADE_train_00000001 bathroom\n'}
  seed = 0
  for split, subdir, prefix, n in (
      ('train', 'training', 'ADE_train', 3),
      ('validation', 'validation', 'ADE_val', 2),
  ):
    for i in range(n):
      h, w = SIZES[i % len(SIZES)]
      image_id = f'{prefix}_{i + 1:08d}'
      image = smooth_image(h, w, seed)
      label = block_label(h, w, [0, 1, 150, 75, 12], seed)
      example = Example(image, encode(image, 'JPEG'), label)
      members[f'ADEChallengeData2016/images/{subdir}/{image_id}.jpg'] = example.image_bytes
      members[f'ADEChallengeData2016/annotations/{subdir}/{image_id}.png'] = encode(label, 'PNG')
      written[split][image_id] = example
      seed += 1
  members.update(replace or {})
  _write_zip(os.path.join(manual_dir, 'ADEChallengeData2016.zip'), members)
  return written


def _voc_tar_members(
    year: str, image_ids, seed0: int
) -> tuple[dict[str, bytes], dict[str, Example]]:
  """JPEGImages plus the files beside them that a builder must skip."""
  members, examples = {}, {}
  for i, image_id in enumerate(image_ids):
    h, w = SIZES[i % len(SIZES)]
    image = smooth_image(h, w, seed0 + i)
    examples[image_id] = Example(image, encode(image, 'JPEG'))
    members[f'VOCdevkit/VOC{year}/JPEGImages/{image_id}.jpg'] = examples[image_id].image_bytes
    members[f'VOCdevkit/VOC{year}/Annotations/{image_id}.xml'] = b'<annotation/>'
  members[f'VOCdevkit/VOC{year}/SegmentationClass/{image_ids[0]}.png'] = encode(
      np.zeros((4, 4), np.uint8), 'PNG'
  )
  members[f'VOCdevkit/VOC{year}/ImageSets/Main/train.txt'] = '\n'.join(image_ids).encode()
  return members, examples


def write_pascal_voc(manual_dir: str) -> dict[str, dict[str, Example]]:
  """VOCtrainval_11-May-2012.tar with 3 JPEGs."""
  members, examples = _voc_tar_members(
      '2012', ['2007_000027', '2008_000002', '2012_004331'], seed0=10
  )
  _write_tar(os.path.join(manual_dir, 'VOCtrainval_11-May-2012.tar'), members)
  return {'train': examples}


def write_pascal_context(manual_dir: str) -> dict[str, dict[str, Example]]:
  """VOCtrainval_03-May-2010.tar with 4 JPEGs and the converted labels of 3.

  2 ids in train.txt, 1 in val.txt; the 4th image has no Context label, so
  the builder must leave it out.
  """
  split_ids = {'train': ['2008_000002', '2010_000003'], 'validation': ['2008_000007']}
  all_ids = split_ids['train'] + split_ids['validation'] + ['2009_000001']
  members, examples = _voc_tar_members('2010', all_ids, seed0=20)
  _write_tar(os.path.join(manual_dir, 'VOCtrainval_03-May-2010.tar'), members)
  root = os.path.join(manual_dir, 'VOCdevkit', 'VOC2010')
  os.makedirs(os.path.join(root, 'SegmentationClassContext'))
  os.makedirs(os.path.join(root, 'ImageSets', 'SegmentationContext'))
  written = {}
  for split, ids in split_ids.items():
    list_name = 'train.txt' if split == 'train' else 'val.txt'
    with open(os.path.join(root, 'ImageSets', 'SegmentationContext', list_name), 'w') as f:
      f.write('\n'.join(ids) + '\n')
    written[split] = {}
    for i, image_id in enumerate(ids):
      example = examples[image_id]
      h, w = example.image.shape[:2]
      example.label = block_label(h, w, [0, 1, 59, 37, 22], seed=30 + i)
      Image.fromarray(example.label).save(
          os.path.join(root, 'SegmentationClassContext', f'{image_id}.png')
      )
      written[split][image_id] = example
  return written


# Cityscapes' TFDS builder declares (1024, 2048) images, so its fakes are full size.
CITYSCAPES_SHAPE = (1024, 2048)
_CITIES = {
    'train': ('aachen', 'bad-honnef'),
    'val': ('frankfurt',),
    'test': ('berlin',),
    'train_extra': ('augsburg', 'bad-honnef'),
}
_TFDS_SPLIT = {'train': 'train', 'val': 'validation', 'test': 'test', 'train_extra': 'train_extra'}


def write_cityscapes(manual_dir: str) -> dict[str, dict[str, Example]]:
  """All four archives of both segmentation configs: one image per city.

  Labels are labelIds (0..33); the gt zips also hold a `*_color.png` decoy
  that the builder must not pick up. Splits are keyed by TFDS split name;
  'train' examples carry the fine label and `coarse[image_id]` the coarse one.
  """
  h, w = CITYSCAPES_SHAPE
  zips = {
      name: {}
      for name in (
          'leftImg8bit_trainvaltest.zip',
          'gtFine_trainvaltest.zip',
          'leftImg8bit_trainextra.zip',
          'gtCoarse.zip',
      )
  }
  written = {split: {} for split in _TFDS_SPLIT.values()}
  written['coarse'] = {}
  seed = 40
  for split, cities in _CITIES.items():
    image_zip = (
        'leftImg8bit_trainextra.zip' if split == 'train_extra' else 'leftImg8bit_trainvaltest.zip'
    )
    for city in cities:
      image_id = f'{city}_{seed:06d}_000019'
      # The train ids' labelIds, two voids and an id beyond them (6 = ground).
      ids = [7, 33, 0, 6, 26, 24, 11, 23]
      image = smooth_image(h, w, seed)
      fine = block_label(h, w, ids, seed, block=64)
      coarse = block_label(h, w, ids, seed + 1, block=128)
      example = Example(image, encode(image, 'PNG'), fine)
      zips[image_zip][
          f'leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png'
      ] = example.image_bytes
      decoy = encode(np.full((h, w, 3), 128, np.uint8), 'PNG')
      if split != 'train_extra':
        fine_dir = f'gtFine/{split}/{city}/{image_id}'
        zips['gtFine_trainvaltest.zip'][f'{fine_dir}_gtFine_labelIds.png'] = encode(fine, 'PNG')
        zips['gtFine_trainvaltest.zip'][f'{fine_dir}_gtFine_color.png'] = decoy
      if split != 'test':
        coarse_dir = f'gtCoarse/{split}/{city}/{image_id}'
        zips['gtCoarse.zip'][f'{coarse_dir}_gtCoarse_labelIds.png'] = encode(coarse, 'PNG')
        zips['gtCoarse.zip'][f'{coarse_dir}_gtCoarse_color.png'] = decoy
        written['coarse'][image_id] = coarse
      written[_TFDS_SPLIT[split]][image_id] = example
      seed += 1
  for name, members in zips.items():
    _write_zip(os.path.join(manual_dir, name), members)
  return written
