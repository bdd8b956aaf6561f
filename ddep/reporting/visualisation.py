"""Pictures of images, labels and predictions as uint8 arrays: the colour overlays and
panels that TensorBoard, `ddep.predict` and the reports show. Pure numpy, no plotting."""

import numpy as np

from ddep.datasets import specs

OVERLAY_ALPHA = 0.5


def palette(spec: specs.DatasetSpec) -> np.ndarray:
  if spec.palette is not None:
    return np.asarray(spec.palette, np.uint8)
  # Fixed colours for datasets without a palette: the same on every run.
  return np.random.default_rng(0).integers(0, 256, (spec.num_classes, 3)).astype(np.uint8)


def overlay(
    image: np.ndarray, train_ids: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
  """The image with each pixel blended towards its class colour."""
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colours[train_ids].astype(np.float32)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def to_display(image, scale: float = 1.0) -> np.ndarray:
  """[-scale, scale] -> [0, 1], clipped (Figure 4 clips noisy pixels too)."""
  return np.clip((np.asarray(image, np.float32) / scale + 1) / 2, 0, 1)


# ±3 standard deviations of ε ~ N(0, I) fill the display range (as Figure 4 does).
NOISE_DISPLAY_SCALE = 3.0


# Pictures are subsampled to at most this many pixels a side per panel: a 512x512 noise
# grid or a 1024x2048 Cityscapes overlay at full size would be megabytes per evaluation.
MAX_PANEL_SIDE = 256


def _to_uint8(image01: np.ndarray) -> np.ndarray:
  return np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)


def _stride(height: int, width: int, max_side: int) -> int:
  """The integer subsampling that brings the longer side to at most `max_side`."""
  return max(1, -(-max(height, width) // max_side))


def denoising_grid(
    clean,
    noisy,
    eps_hat,
    x_hat,
    noise_scale: float = NOISE_DISPLAY_SCALE,
    max_side: int = MAX_PANEL_SIDE,
) -> np.ndarray:
  """(N, H, 4W, 3) uint8: clean | noisy | predicted ε | denoised, side by side per image.

  Subsampled (every k-th pixel, no smoothing: the noise stays noise) to `max_side`.
  """
  s = _stride(*np.shape(clean)[1:3], max_side)
  panels = [
      to_display(clean),
      to_display(noisy),
      to_display(eps_hat, noise_scale),
      to_display(x_hat),
  ]
  return _to_uint8(np.concatenate([p[:, ::s, ::s] for p in panels], axis=2))


def segmentation_panels(
    images, labels, predictions, colours, *, ignore_label: int, max_side: int = MAX_PANEL_SIDE
) -> list[np.ndarray]:
  """Per image, (H, 3W, 3) uint8: image | ground truth | prediction, as colour overlays.

  `images` are in [-1, 1]; ignored ground-truth pixels show the plain image. Each is
  subsampled (every k-th pixel, so labels stay labels) to `max_side`.
  """
  rows = []
  for image, label, pred in zip(images, labels, predictions):
    s = _stride(*label.shape, max_side)
    image, label, pred = image[::s, ::s], label[::s, ::s], pred[::s, ::s]
    rgb = _to_uint8(to_display(image))
    valid = label != ignore_label
    truth = np.where(valid[..., None], overlay(rgb, np.where(valid, label, 0), colours), rgb)
    rows.append(np.concatenate([rgb, truth, overlay(rgb, pred, colours)], axis=1))
  return rows
