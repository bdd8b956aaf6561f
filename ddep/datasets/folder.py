"""Datasets prepared from a user's folders of images and masks: `folder:NAME`.

`python -m ddep.prepare --dataset=folder:NAME --images=DIR --masks=DIR --classes=FILE`
(ddep.data.preparation.prepare_folder) writes, under a TFDS data_dir:

  ddep_folder/NAME/1.0.0/          train and validation: image, segmentation (train ids,
                                   255 ignored), image_id, labels (multi-hot classes)
  ddep_folder/NAME/1.0.0/ddep_folder.json   what the spec needs (class names, palette,
                                   splits) and the fingerprint of the inputs; written
                                   last, so a dataset without it is not prepared
  ddep_folder_images/NAME/1.0.0/   the pretraining images when `--unlabelled` is given:
                                   unlabelled (and train, unless --nopretrain_on_labelled)

Both are read by TFDS's read-only builder (no builder class is registered), so any
config takes `config.data.dataset='folder:NAME'`. `load_spec` builds the DatasetSpec
from the metadata; `specs.get('folder:NAME', data_dir=...)` calls it. This module
imports no TensorFlow for local paths: config validation reads the metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re

import numpy as np

from ddep.datasets import specs
from ddep.runs import storage

PREFIX = 'folder:'
VERSION = '1.0.0'
BUILDER = 'ddep_folder'
IMAGES_BUILDER = 'ddep_folder_images'
METADATA_FILE = 'ddep_folder.json'
# Bumped when the stored layout changes, so that an older preparation is rebuilt.
FORMAT = 1
# A TFDS config name, kept to characters every file system and URL takes as they are.
_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_-]*$')
PREPARE_ARGS = '--images=DIR --masks=DIR --classes=FILE'


class NotPreparedError(FileNotFoundError):
  """`folder:NAME` has no prepared dataset under the data_dir; the message has the command."""


def is_folder(dataset: str) -> bool:
  return isinstance(dataset, str) and dataset.startswith(PREFIX)


def short_name(dataset: str) -> str:
  """'folder:NAME' -> 'NAME', or a ValueError saying which names are allowed."""
  name = dataset[len(PREFIX) :] if is_folder(dataset) else ''
  if not _NAME.match(name):
    raise ValueError(
        f'{dataset!r}: a folder dataset is named folder:NAME, NAME of letters, digits, '
        "'_' and '-' (e.g. folder:my_photos)"
    )
  return name


def tfds_name(dataset: str) -> str:
  return f'{BUILDER}/{short_name(dataset)}:{VERSION}'


def images_tfds_name(dataset: str) -> str:
  return f'{IMAGES_BUILDER}/{short_name(dataset)}:{VERSION}'


def default_data_dir() -> str:
  """TFDS's default data_dir, found as TFDS finds it (without importing TF)."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets'
  )


def builder_dirs(dataset: str, data_dir: str | None) -> list[str]:
  """Every directory a preparation of `dataset` writes (its decoded copies included),
  the labelled builder's first: a new preparation removes them all."""
  root, name = os.fspath(storage.path(data_dir or default_data_dir())), short_name(dataset)
  bases = (BUILDER, IMAGES_BUILDER, f'{BUILDER}_decoded', f'{IMAGES_BUILDER}_decoded')
  return [posixpath.join(root, base, name) for base in bases]


def metadata_path(dataset: str, data_dir: str | None) -> str:
  return posixpath.join(builder_dirs(dataset, data_dir)[0], VERSION, METADATA_FILE)


def prepare_command(dataset: str, *, data_dir: str | None = None, decoded_copy=False) -> str:
  parts = ['python -m ddep.prepare', f'--dataset={dataset}', PREPARE_ARGS]
  if decoded_copy:
    parts.append('--decoded_copy')
  if data_dir:
    parts.append(f'--data_dir={data_dir}')
  return ' '.join(parts)


def in_validation(image_id: str, fraction: float) -> bool:
  """Whether `--val_fraction` puts this image (its relative path) in validation.

  A hash of the name, not a draw: the same images validate on every machine, in any
  listing order, and adding images moves none of the others.
  """
  digest = hashlib.sha256(image_id.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') < fraction * 2**64


def read_metadata(dataset: str, data_dir: str | None) -> dict | None:
  """The prepared dataset's metadata, or None where there is none (not prepared)."""
  path = storage.path(metadata_path(dataset, data_dir))
  if not path.exists():
    return None
  return json.loads(path.read_text())


def spec_from_metadata(dataset: str, meta: dict) -> specs.DatasetSpec:
  num_classes = len(meta['class_names'])
  return specs.DatasetSpec(
      name=dataset,
      tfds_name=tfds_name(dataset),
      num_classes=num_classes,
      train_split='train',
      eval_split='validation',
      pretrain_splits=tuple(meta['pretrain_splits']),
      class_names=tuple(meta['class_names']),
      palette=None if meta['palette'] is None else np.asarray(meta['palette'], np.uint8),
      # Masks are stored as train ids already (ddep.datasets.folder_labels).
      label_map=specs.identity_label_map(num_classes),
      image_labels_key='labels',
      pretrain_tfds_name=images_tfds_name(dataset) if meta['images_builder'] else None,
  )


def load_spec(dataset: str, data_dir: str | None = None) -> specs.DatasetSpec:
  """The spec of a prepared `folder:NAME` under `data_dir` (None: TFDS's default)."""
  short_name(dataset)
  meta = read_metadata(dataset, data_dir)
  if meta is None or meta.get('format') != FORMAT:
    where = data_dir or default_data_dir()
    state = 'is not prepared' if meta is None else 'was prepared by another version of ddep'
    raise NotPreparedError(
        f'{dataset} {state} under data_dir={where} (no {METADATA_FILE}); prepare it with: '
        f'{prepare_command(dataset, data_dir=data_dir)}'
    )
  return spec_from_metadata(dataset, meta)


specs.register_family(PREFIX, load_spec)
