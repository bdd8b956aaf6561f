"""What the builders of downloaded archives share: the checks of their images and labels,
the error for a missing archive, and the `ddep.prepare` command line errors point to.
(The build itself is `ddep.data.preparation.prepare_archives`.)"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from ddep.datasets import folder
from ddep.datasets import specs

# Where each builder's archives come from and where they go.
DOCS = 'docs/datasets.md'


def prepare_command(
    dataset: str | specs.DatasetSpec, *, data_dir: str | None = None, decoded_copy: bool = False
) -> str:
  """The `ddep.prepare` command line that builds `dataset`, for errors that ask for it.

  `dataset` may be a spec's pretraining view (`spec.pretrain_view()`), whose builder is
  prepared with `--pretrain`; `decoded_copy` asks for its decoded copy too
  (`--decoded_copy`, which implies `--pretrain`).
  """
  spec = specs.get(dataset)
  if folder.is_folder(spec.name):  # Built from the user's folders, both its builders at once.
    return folder.prepare_command(spec.name, data_dir=data_dir, decoded_copy=decoded_copy)
  try:
    registered = specs.get(spec.name)
  except ValueError:  # A spec of its own that was never registered (as tests make).
    registered = spec
  parts = ['python -m ddep.prepare', f'--dataset={spec.name}']
  if decoded_copy:
    parts.append('--decoded_copy')
  elif spec.tfds_name != registered.tfds_name:
    parts.append('--pretrain')
  if not spec.name.startswith('demo'):  # The demo scenes are generated, not read.
    parts.append('--manual_dir=DIR_WITH_THE_ARCHIVES')
  if data_dir:
    parts.append(f'--data_dir={data_dir}')
  return ' '.join(parts)


def require_manual_file(dl_manager, filename: str, instructions: str):
  """The path of `filename` in the manual directory, or an error naming both."""
  # `dl_manager.manual_dir` itself fails with a generic message on an empty
  # directory; the user needs to know which file is missing.
  manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
  path = manual_dir / filename
  if not path.exists():
    raise FileNotFoundError(
        f'Missing manual file {filename!r}: put it in the manual directory {os.fspath(manual_dir)}.\n'
        f"{instructions}\nSee {DOCS} for every dataset's files."
    )
  return path


class BadExampleError(ValueError):
  """An archive member that cannot be stored; the message names it and its image id."""


def _open(data: bytes, name: str, image_id: str, what: str) -> Image.Image:
  try:
    return Image.open(io.BytesIO(data))
  except (OSError, SyntaxError, ValueError):
    # PIL's own message names only a BytesIO; the user needs the file and the example.
    raise BadExampleError(
        f'{name} (image_id {image_id}): {what} is not a file PIL can read (corrupt or truncated?)'
    ) from None


def check_image(image_bytes: bytes, *, name: str, image_id: str) -> tuple[int, int]:
  """The (width, height) of an image file, or an error naming the file and the example."""
  # The header only: decoding every image would double the time a build takes. A file cut
  # short (an interrupted download or extraction) is found by its missing end marker,
  # which costs nothing; otherwise it would pass here and stop training later.
  missing_end = _missing_end_marker(image_bytes)
  with _open(image_bytes, name, image_id, 'the image') as image:
    if missing_end:  # Or data after the end (some cameras): decoding tells which.
      try:
        image.load()
      except (OSError, SyntaxError, ValueError):
        raise BadExampleError(
            f'{name} (image_id {image_id}): the image is truncated (no {missing_end} at '
            'its end, and it does not decode)'
        ) from None
    return image.size


def _missing_end_marker(data: bytes) -> str | None:
  """'JPEG end marker' / 'PNG IEND chunk' if a JPEG or PNG lacks it, else None."""
  tail = data[-1024:]
  if data[:2] == b'\xff\xd8' and b'\xff\xd9' not in tail:
    return 'JPEG end marker'
  if data[:8] == b'\x89PNG\r\n\x1a\n' and b'IEND' not in tail:
    return 'PNG IEND chunk'
  return None


def _id_ranges(ids) -> str:
  """[0, 1, 2, 5, 255] -> '0..2, 5, 255'."""
  ids, parts, start = sorted(int(i) for i in ids), [], None
  for i, value in enumerate(ids):
    start = value if start is None else start
    if i + 1 == len(ids) or ids[i + 1] != value + 1:
      parts.append(f'{start}..{value}' if value > start else f'{value}')
      start = None
  return ', '.join(parts)


def check_label(
    label_bytes: bytes,
    image_bytes: bytes,
    *,
    label_name: str,
    image_name: str,
    image_id: str,
    valid_ids: np.ndarray,
):
  """Fails on an example the stored-raw-ids convention cannot carry, naming its file,
  its image id and, for a label value the dataset does not define, that raw value."""
  # A colour, resized or out-of-range label would otherwise be stored silently and
  # decode into wrong ids, found (if at all) as 254 after the label map while training.
  image_size = check_image(image_bytes, name=image_name, image_id=image_id)
  with _open(label_bytes, label_name, image_id, 'the label PNG') as label:
    if label.mode != 'L':
      raise BadExampleError(
          f'{label_name} (image_id {image_id}): label PNG has mode {label.mode}, expected 8-bit '
          "grayscale ids ('L')"
      )
    if label.size != image_size:
      raise BadExampleError(
          f'{label_name} (image_id {image_id}): label size {label.size} != image size {image_size} '
          f'of {image_name}'
      )
    try:
      values = np.unique(np.asarray(label))
    except OSError:
      raise BadExampleError(
          f'{label_name} (image_id {image_id}): the label PNG is truncated or corrupt'
      ) from None
  unknown = np.setdiff1d(values, valid_ids)
  if unknown.size:
    raise BadExampleError(
        f'{label_name} (image_id {image_id}): raw label values {unknown.tolist()} are not ids of '
        f'this dataset ({_id_ranges(valid_ids)})'
    )
