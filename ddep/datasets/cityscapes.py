"""Cityscapes through TFDS's own `cityscapes` builder, and the 'cityscapes' spec.

TFDS stores `image_left` (1024x2048x3), `segmentation_label` (the raw
`*_labelIds.png`, ids 0..33) and `image_id`. Two configs matter here:

  semantic_segmentation        train 2,975 / validation 500 / test 1,525, fine
                               labels; needs leftImg8bit_trainvaltest.zip and
                               gtFine_trainvaltest.zip.
  semantic_segmentation_extra  train 2,975 + train_extra 19,998 (+ validation),
                               coarse labels; needs leftImg8bit_trainvaltest.zip,
                               leftImg8bit_trainextra.zip and gtCoarse.zip.

Fine-tuning and evaluation use the first; denoising pretraining uses the images
of the second's train + train_extra (paper Sec. 5.2: TRAIN_FINE + TRAIN_COARSE,
22,973 images), whose coarse labels it never reads.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ddep.datasets import archives
from ddep.datasets import specs

TFDS_NAME = 'cityscapes/semantic_segmentation'
PRETRAIN_TFDS_NAME = 'cityscapes/semantic_segmentation_extra'

# What TFDS's builder opens for each config (its `zip_root`), so that a missing
# one is named before TFDS fails on it.
MANUAL_FILES = {
    'semantic_segmentation': ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip'),
    'semantic_segmentation_extra': (
        'leftImg8bit_trainvaltest.zip',
        'leftImg8bit_trainextra.zip',
        'gtCoarse.zip',
    ),
}

# cityscapesScripts' labels.py: labelId -> trainId for the 19 evaluated classes.
# Every other labelId in 0..33 is void. License plates (labelId -1) are never
# drawn into *_labelIds.png, so no stored pixel carries them.
LABEL_ID_TO_TRAIN_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
NUM_LABEL_IDS = 34
LABEL_MAP = specs.make_label_map(
    {
        label_id: LABEL_ID_TO_TRAIN_ID.get(label_id, specs.IGNORE_LABEL)
        for label_id in range(NUM_LABEL_IDS)
    }
)

# trainId -> labelId, for writing predictions that the official scripts score.
TRAIN_ID_TO_LABEL_ID = np.zeros((len(LABEL_ID_TO_TRAIN_ID),), np.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
  TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id
del _label_id, _train_id

CLASS_NAMES = (
    'road',
    'sidewalk',
    'building',
    'wall',
    'fence',
    'pole',
    'traffic light',
    'traffic sign',
    'vegetation',
    'terrain',
    'sky',
    'person',
    'rider',
    'car',
    'truck',
    'bus',
    'train',
    'motorcycle',
    'bicycle',
)

# The official colours of the 19 train ids (cityscapesScripts' labels.py).
PALETTE = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
    ],
    np.uint8,
)


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
  """Predicted train ids -> labelIds; ignored pixels become 0 ('unlabeled')."""
  train_ids = np.asarray(train_ids)
  out = np.zeros(train_ids.shape, np.uint8)
  valid = train_ids < len(TRAIN_ID_TO_LABEL_ID)
  out[valid] = TRAIN_ID_TO_LABEL_ID[train_ids[valid]]
  return out


def check_manual_files(config: str, manual_dir: os.PathLike | str):
  """Raises FileNotFoundError naming each archive `config` needs that is missing."""
  if config not in MANUAL_FILES:
    raise ValueError(f'Unknown Cityscapes config {config!r}; known: {sorted(MANUAL_FILES)}')
  missing = [f for f in MANUAL_FILES[config] if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise FileNotFoundError(
        f"Cityscapes config {config!r} is missing manual file(s) {', '.join(missing)}: "
        f'download them from https://www.cityscapes-dataset.com/downloads/ (login required) '
        f'and put them, unextracted, in the manual directory {os.fspath(manual_dir)} '
        f'(see {archives.DOCS}).'
    )


def download_and_prepare(tfds_name: str, data_dir: str, manual_dir: str | None = None):
  """Builds `tfds_name` ('cityscapes/<config>') from the archives in `manual_dir`.

  `manual_dir` defaults to TFDS's own, `<data_dir>/downloads/manual`.
  """
  config = tfds_name.split('/', 1)[1] if '/' in tfds_name else 'semantic_segmentation'
  manual_dir = manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  check_manual_files(config, manual_dir)
  builder = tfds.builder(f'cityscapes/{config}', data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


SPEC = specs.register(
    specs.DatasetSpec(
        name='cityscapes',
        tfds_name=TFDS_NAME,
        num_classes=len(CLASS_NAMES),
        train_split='train',
        eval_split='validation',
        # Paper Sec. 5.2: pretraining on TRAIN_FINE + TRAIN_COARSE images.
        pretrain_tfds_name=PRETRAIN_TFDS_NAME,
        pretrain_splits=('train', 'train_extra'),
        class_names=CLASS_NAMES,
        palette=PALETTE,
        label_map=LABEL_MAP,
        image_key='image_left',
        label_key='segmentation_label',
    )
)
