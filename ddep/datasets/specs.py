"""What the pipelines need to know about each segmentation dataset.

Every builder stores raw dataset ids in `segmentation`; a spec's `label_map`
turns them into train ids. This module imports no TensorFlow so that configs
and the trainer can look datasets up without starting TF.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Mapping, Sequence

import numpy as np

IGNORE_LABEL = 255
# Raw ids a dataset does not define map here, so the pipeline can tell a corrupt
# label (a bad example) from a deliberately ignored one (255).
INVALID_LABEL = 254

# Which module registers each spec; `get` imports it on first use so that
# specs.py (and ddep.datasets) stay free of TF until a dataset is requested.
_MODULES = {
    'demo': 'ddep.datasets.demo_scenes',
    'demo_tiny': 'ddep.datasets.demo_scenes',
    'cityscapes': 'ddep.datasets.cityscapes',
    'ade20k': 'ddep.datasets.ade20k',
    'pascal_context_60': 'ddep.datasets.pascal_context',
    'pascal_context_59': 'ddep.datasets.pascal_context',
}
# Families of datasets named 'prefix:NAME' whose specs live with their prepared files
# (a user's folders: 'folder:NAME'); the module registers the family's loader.
_FAMILY_MODULES = {'folder:': 'ddep.datasets.folder'}
_FAMILIES: dict[str, Callable[[str, str | None], 'DatasetSpec']] = {}

_REGISTRY: dict[str, 'DatasetSpec'] = {}


def make_label_map(
    mapping: Mapping[int, int] | Sequence[int] | Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
  """A 256-entry uint8 lookup table raw id -> train id.

  `mapping` is a dict {raw: train}, a sequence whose i-th entry is raw id i's
  train id, or a vectorised callable. Raw ids not covered map to INVALID_LABEL.
  """
  table = np.full((256,), INVALID_LABEL, np.int64)
  if callable(mapping):
    table[:] = np.asarray(mapping(np.arange(256)), np.int64)
  elif isinstance(mapping, Mapping):
    for raw, train in mapping.items():
      table[int(raw)] = int(train)
  else:
    values = np.asarray(mapping, np.int64)
    table[: len(values)] = values
  if table.min() < 0 or table.max() > 255:
    raise ValueError(f'label map values must lie in [0, 255], got [{table.min()}, {table.max()}]')
  return table.astype(np.uint8)


def identity_label_map(num_classes: int, ignore_raw: Sequence[int] = (IGNORE_LABEL,)) -> np.ndarray:
  """Raw ids 0..num_classes-1 are train ids; `ignore_raw` ids map to 255."""
  mapping = {i: i for i in range(num_classes)}
  mapping.update({r: IGNORE_LABEL for r in ignore_raw})
  return make_label_map(mapping)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSpec:
  """One segmentation dataset as the input pipelines see it.

  Attributes:
    name: registry name, e.g. 'cityscapes'.
    tfds_name: name passed to tfds.builder, 'builder' or 'builder/config'.
    num_classes: number of train ids (ignore excluded).
    train_split, eval_split: tfds split names for fine-tuning and evaluation.
    pretrain_splits: splits whose images are used for denoising pretraining
      (paper Sec. 5.2: e.g. Cityscapes train_fine + train_coarse).
    ignore_label: train id that losses and metrics skip.
    class_names: one name per train id.
    palette: optional (num_classes, 3) uint8 colours for visualisation.
    label_map: raw stored id -> train id; a 256-entry lookup table, or
      anything make_label_map accepts. None means raw ids are train ids.
    image_key, label_key: feature names in the tfds builder.
    image_labels_key: feature with multi-hot image-level labels, if any
      (used by the supervised encoder-pretraining stand-in).
    pretrain_tfds_name: builder that holds `pretrain_splits` when it is not
      `tfds_name` (e.g. Cityscapes' extra images, all of Pascal VOC).
    pretrain_image_key: image feature in that builder (default `image_key`).
  """

  name: str
  tfds_name: str
  num_classes: int
  train_split: str = 'train'
  eval_split: str = 'validation'
  pretrain_splits: tuple[str, ...] = ('train',)
  ignore_label: int = IGNORE_LABEL
  class_names: tuple[str, ...] = ()
  palette: np.ndarray | None = None
  label_map: np.ndarray | Mapping[int, int] | Callable | None = None
  image_key: str = 'image'
  label_key: str = 'segmentation'
  image_labels_key: str | None = None
  pretrain_tfds_name: str | None = None
  pretrain_image_key: str | None = None

  def __post_init__(self):
    if not 0 < self.num_classes < INVALID_LABEL:
      raise ValueError(
          f'{self.name}: num_classes must lie in [1, {INVALID_LABEL}), got {self.num_classes}'
      )
    if self.class_names and len(self.class_names) != self.num_classes:
      raise ValueError(
          f'{self.name}: {len(self.class_names)} class_names for num_classes={self.num_classes}'
      )
    if isinstance(self.pretrain_splits, str):
      object.__setattr__(self, 'pretrain_splits', (self.pretrain_splits,))
    else:
      object.__setattr__(self, 'pretrain_splits', tuple(self.pretrain_splits))
    if self.label_map is None:
      table = identity_label_map(self.num_classes, ignore_raw=(self.ignore_label,))
    elif isinstance(self.label_map, np.ndarray) and self.label_map.shape == (256,):
      table = self.label_map.astype(np.uint8)
    else:
      table = make_label_map(self.label_map)
    bad = (table >= self.num_classes) & (table != self.ignore_label) & (table != INVALID_LABEL)
    if bad.any():
      raise ValueError(
          f'{self.name}: label_map sends raw ids {np.flatnonzero(bad).tolist()} outside '
          f'[0, {self.num_classes}) ∪ {{{self.ignore_label}}}'
      )
    table = table.copy()
    table.flags.writeable = False
    object.__setattr__(self, 'label_map', table)
    if self.palette is not None:
      palette = np.asarray(self.palette, np.uint8)
      if palette.shape != (self.num_classes, 3):
        raise ValueError(f'{self.name}: palette shape {palette.shape} != ({self.num_classes}, 3)')
      object.__setattr__(self, 'palette', palette)

  def pretrain_view(self) -> 'DatasetSpec':
    """This spec as seen by denoising pretraining: its builder and image key."""
    return dataclasses.replace(
        self,
        tfds_name=self.pretrain_tfds_name or self.tfds_name,
        image_key=self.pretrain_image_key or self.image_key,
        pretrain_tfds_name=None,
        pretrain_image_key=None,
    )

  @property
  def valid_raw_ids(self) -> np.ndarray:
    """Raw ids that may legitimately appear in a stored label."""
    return np.flatnonzero(self.label_map != INVALID_LABEL)


def register(spec: DatasetSpec) -> DatasetSpec:
  """Adds `spec` to the registry; re-registering an equal name replaces it."""
  _REGISTRY[spec.name] = spec
  return spec


def register_family(prefix: str, load: Callable[[str, str | None], DatasetSpec]) -> None:
  """`load(name, data_dir)` makes the spec of every dataset named `prefix` + NAME."""
  _FAMILIES[prefix] = load


def names() -> list[str]:
  """Every dataset name `get` can resolve, except families' ('folder:NAME')."""
  return sorted(set(_MODULES) | {n for n in _REGISTRY if family(n) is None})


def family(name: str) -> str | None:
  """The family prefix of `name` ('folder:' for 'folder:NAME'), or None."""
  prefix = name.partition(':')[0] + ':'
  return prefix if ':' in name and prefix in _FAMILY_MODULES else None


def get(name: str | DatasetSpec, *, data_dir: str | None = None) -> DatasetSpec:
  """The spec called `name`, importing the module that registers it if needed.

  A family's dataset ('folder:NAME') is read from its prepared files under `data_dir`
  (None: TFDS's default) and registered; without `data_dir`, the spec registered
  last is reused, so that the spec config validation read (under the run's
  config.data.data_dir) is the one the rest of the run gets.
  """
  if isinstance(name, DatasetSpec):
    return name
  prefix = family(name)
  if prefix is not None and (data_dir is not None or name not in _REGISTRY):
    importlib.import_module(_FAMILY_MODULES[prefix])
    return register(_FAMILIES[prefix](name, data_dir))
  if name not in _REGISTRY and name in _MODULES:
    importlib.import_module(_MODULES[name])
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown dataset {name!r}; known datasets: {', '.join(names())}, or folder:NAME "
        '(your own images, prepared by ddep.prepare)'
    )
  return _REGISTRY[name]
