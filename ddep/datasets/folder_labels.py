"""A folder dataset's labels: its classes file, and what the pixels of its masks mean.

Pure functions (text, numpy arrays and PIL images in; train ids out), so that every
convention of user masks is tested without a build (ddep.datasets.folder_builder
applies them to the files).

The classes file has one class a line, in train-id order, with an optional colour:

  road 128 64 128
  sidewalk #f423e8
  building

Blank lines and lines starting with '#' are skipped. A line named `ignore` is not a
class: its colour marks the unlabelled pixels of colour masks. Either every class has
a colour or none has.

A mask is read by its PNG mode:

  * ids: 8-bit greyscale ('L'), 16-bit ('I;16', 'I'), bilevel ('1'), or a palette PNG
    ('P') when the classes file lists no colours (its indices are the ids, as in VOC).
    Id k is the class on line k (from 0), 255 is ignored; with `reduce_zero_label`,
    0 is ignored and id k is the class on line k - 1 (mmsegmentation's convention, for
    datasets such as ADE20K whose 0 means "other");
  * colours: RGB, RGBA (alpha not read), or a palette PNG when the classes file lists
    colours; each pixel must be a class's colour or the `ignore` colour.

Either way the stored label holds train ids, 255 for ignored pixels.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

IGNORE_ID = 255
IGNORE_NAME = 'ignore'
# A train id must stay below ddep.datasets.specs.INVALID_LABEL (254).
MAX_CLASSES = 253
_ID_MODES = ('L', 'I;16', 'I;16B', 'I;16L', 'I', '1')
_COLOUR_MODES = ('RGB', 'RGBA')
_COLOUR = re.compile(
    r'^(?P<name>.+?)\s+(?:(?P<r>\d+)[\s,]+(?P<g>\d+)[\s,]+(?P<b>\d+)|#(?P<hex>[0-9a-fA-F]{6}))$'
)


class LabelError(ValueError):
  """A classes file or a mask that cannot be read as labels; the caller adds the file name."""


@dataclasses.dataclass(frozen=True, eq=False)
class Classes:
  """What a classes file says: names in train-id order, their colours, the ignore colour."""

  names: tuple[str, ...]
  colours: np.ndarray | None = None  # (K, 3) uint8, or None when the file lists none
  ignore_colour: tuple[int, int, int] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.names)


def _parse_line(line: str) -> tuple[str, tuple[int, int, int] | None]:
  match = _COLOUR.match(line)
  if not match:
    return line, None
  if match['hex']:
    value = int(match['hex'], 16)
    return match['name'], (value >> 16, (value >> 8) & 255, value & 255)
  rgb = tuple(int(match[k]) for k in 'rgb')
  if max(rgb) > 255:
    raise LabelError(f'colour {rgb} has a value above 255')
  return match['name'], rgb


def parse_classes(text: str) -> Classes:
  """The classes file's text as Classes; errors name the line (from 1)."""
  names, colours, where = [], [], {}
  ignore = None
  for number, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if not line or line.startswith('#'):
      continue
    try:
      name, colour = _parse_line(line)
    except LabelError as e:
      raise LabelError(f'line {number} ({line!r}): {e}') from None
    if name in where:
      raise LabelError(f'line {number}: class {name!r} is on line {where[name]} already')
    where[name] = number
    if colour is not None and colour in where:
      raise LabelError(
          f'line {number}: colour {colour} is the colour of line {where[colour]} already '
          '(a colour must name one class)'
      )
    if colour is not None:
      where[colour] = number
    if name == IGNORE_NAME:
      if colour is None:
        raise LabelError(
            f"line {number}: the '{IGNORE_NAME}' line gives the colour of unlabelled pixels; "
            'it needs one'
        )
      ignore = colour
      continue
    names.append(name)
    colours.append(colour)
  if not names:
    raise LabelError('no classes (one class a line, e.g. "road 128 64 128")')
  if len(names) > MAX_CLASSES:
    raise LabelError(f'{len(names)} classes; at most {MAX_CLASSES} fit the uint8 train ids')
  given = [c is not None for c in colours]
  if any(given) and not all(given):
    missing = names[given.index(False)]
    raise LabelError(
        f'class {missing!r} (line {where[missing]}) has no colour, but others have: give every '
        'class a colour, or none'
    )
  palette = np.asarray(colours, np.uint8) if all(given) else None
  return Classes(names=tuple(names), colours=palette, ignore_colour=ignore)


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.int64)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _colour_ids(rgb: np.ndarray, classes: Classes, mode: str) -> np.ndarray:
  if classes.colours is None:
    raise LabelError(
        f'a colour mask (PNG mode {mode}), but the classes file lists no colours: add each '
        "class's colour to its line, e.g. 'road 128 64 128'"
    )
  known = [_rgb_codes(classes.colours)]
  ids = [np.arange(classes.num_classes)]
  if classes.ignore_colour is not None:
    known.append(_rgb_codes(np.asarray([classes.ignore_colour])))
    ids.append(np.asarray([IGNORE_ID]))
  known, ids = np.concatenate(known), np.concatenate(ids)
  order = np.argsort(known)
  known, ids = known[order], ids[order]
  codes = _rgb_codes(rgb)
  # A sorted lookup rather than np.unique: one pass over the pixels, however many colours.
  where = np.minimum(np.searchsorted(known, codes), len(known) - 1)
  unknown = known[where] != codes
  if unknown.any():
    bad = np.unique(codes[unknown])
    listed = ', '.join(str((c >> 16, (c >> 8) & 255, c & 255)) for c in bad[:5].tolist())
    more = f' and {bad.size - 5} more' if bad.size > 5 else ''
    raise LabelError(
        f'colour(s) {listed}{more} ({int(unknown.sum())} pixels) are not in the classes file '
        "(a class's colour, or the 'ignore' line's)"
    )
  return ids[where].astype(np.uint8)


def _id_ids(values: np.ndarray, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
  values = values.astype(np.int64)
  ids = values
  if reduce_zero_label:
    ids = np.where(values == 0, IGNORE_ID, np.where(values == IGNORE_ID, IGNORE_ID, values - 1))
  bad = (ids != IGNORE_ID) & ((ids < 0) | (ids >= num_classes))
  if bad.any():
    raw = np.unique(values[bad])
    valid = f'1..{num_classes}, 0 and 255 ignored' if reduce_zero_label else f'0..{num_classes - 1}'
    valid += '' if reduce_zero_label else ', 255 ignored'
    listed = ', '.join(str(v) for v in raw[:10].tolist()) + (
        f' and {raw.size - 10} more' if raw.size > 10 else ''
    )
    raise LabelError(
        f'class id(s) {listed} ({int(bad.sum())} pixels) are outside the classes file '
        f'({num_classes} classes: ids {valid})'
    )
  return ids.astype(np.uint8)


def mask_ids(mask: Image.Image, classes: Classes, *, reduce_zero_label: bool = False) -> np.ndarray:
  """The train ids (uint8 (H, W), 255 = ignore) of a decoded mask; see the module docstring."""
  mode = mask.mode
  if mode == 'P' and classes.colours is not None:
    # Palette PNGs (VOC's, Cityscapes' colour files) carry their colours: read those.
    return _colour_ids(np.asarray(mask.convert('RGB')), classes, mode)
  if mode in _COLOUR_MODES:
    return _colour_ids(np.asarray(mask)[..., :3], classes, mode)
  if mode == 'P' or mode in _ID_MODES:
    return _id_ids(np.asarray(mask), classes.num_classes, reduce_zero_label)
  raise LabelError(
      f'PNG mode {mode} is neither ids (L, I;16, P without colours in the classes file) '
      'nor colours (RGB, RGBA, P)'
  )


def image_labels(ids: np.ndarray, num_classes: int) -> np.ndarray:
  """Multi-hot uint8 (num_classes,): which classes a mask shows, for image-level
  supervision (task='classify'); ignored pixels name no class."""
  present = np.unique(ids)
  labels = np.zeros((num_classes,), np.uint8)
  labels[present[present < num_classes]] = 1
  return labels


def class_pixels(ids: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 (num_classes,) pixel counts, to tell a user which classes no mask shows."""
  return np.bincount(ids.ravel(), minlength=256)[:num_classes].astype(np.int64)
