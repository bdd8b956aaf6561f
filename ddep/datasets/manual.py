"""Helpers shared by the builders over manually downloaded archives."""

from __future__ import annotations

import io
import os

from PIL import Image


def require_manual_file(dl_manager, filename: str, instructions: str):
  """The path of `filename` in the manual directory, or an error naming both."""
  # `dl_manager.manual_dir` itself fails with a generic message on an empty
  # directory; the user needs to know which file is missing.
  manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
  path = manual_dir / filename
  if not path.exists():
    raise FileNotFoundError(
      f"Missing manual file {filename!r}: put it in the manual directory {os.fspath(manual_dir)}.\n{instructions}"
    )
  return path


def check_label(label_bytes: bytes, image_bytes: bytes, name: str):
  """Fails on labels the stored-raw-ids convention cannot carry."""
  # Both opens parse headers only; a colour or resized label would otherwise
  # be stored silently and decode into wrong ids.
  with Image.open(io.BytesIO(label_bytes)) as label, Image.open(io.BytesIO(image_bytes)) as image:
    if label.mode != "L":
      raise ValueError(
        f"{name}: label PNG has mode {label.mode}, expected 8-bit grayscale ids ('L')"
      )
    if label.size != image.size:
      raise ValueError(f"{name}: label size {label.size} != image size {image.size}")
