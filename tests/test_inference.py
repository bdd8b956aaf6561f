"""Tests for ddep.evaluators.inference with fake predict_fns whose exact output is known.

Two kinds of fake model:
  * per-pixel functions of the input: any correct tiling, flipping and
    stitching reproduces f(image) exactly;
  * window-coordinate encoders (each output pixel holds its row/column inside
    the window it was predicted in): the stitched result exposes every window
    offset and every overlap count, which we recompute by brute force.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep.evaluators import inference


@jax.jit  # As a real predict_fn would be; also keeps the tests' compiles few.
def per_pixel(images):
  """A per-pixel, non-linear map of 3 input channels to 4 logits."""
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  return jnp.stack([r, 2 * g - b, r * g, jnp.ones_like(r)], axis=-1)


@jax.jit
def window_coords(images):
  """Logits = (row in window, column in window, 1)."""
  k, h, w, _ = images.shape
  rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[None, :, None], (k, h, w))
  cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, None, :], (k, h, w))
  return jnp.stack([rows, cols, jnp.ones_like(rows)], axis=-1)


def brute_force_window_coords(height, width, offsets_y, offsets_x, win_h, win_w):
  """Average of window coordinates over every window covering each pixel."""
  total = np.zeros((height, width, 3))
  count = np.zeros((height, width))
  for y0 in offsets_y:
    for x0 in offsets_x:
      for y in range(y0, min(y0 + win_h, height)):
        for x in range(x0, min(x0 + win_w, width)):
          total[y, x] += (y - y0, x - x0, 1)
          count[y, x] += 1
  assert count.min() >= 1
  return total / count[..., None], count


def random_images(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


@pytest.mark.parametrize(
    'length,window,stride,expected',
    [
        (10, 4, 3, [0, 3, 6]),  # exact fit.
        (11, 4, 3, [0, 3, 6, 7]),  # last window pulled back flush with the border.
        (4, 4, 2, [0]),
        (3, 4, 2, [0]),  # smaller than the window: one (padded) window.
        (2048, 1024, 1024, [0, 1024]),
        (683, 512, 341, [0, 171]),  # ADE20K 512x683 after resize.
    ],
)
def test_window_starts(length, window, stride, expected):
  assert inference.window_starts(length, window, stride) == expected


def test_stride_larger_than_window_is_rejected():
  with pytest.raises(ValueError, match='stride'):
    inference.window_starts(10, 4, 5)


def test_sliding_window_overlap_average_matches_brute_force():
  image = random_images((11, 10, 3))
  out = np.asarray(
      inference.sliding_window(window_coords, image, window=4, stride=3, num_classes=3)
  )
  expected, count = brute_force_window_coords(11, 10, [0, 3, 6, 7], [0, 3, 6], 4, 4)
  # Sanity of the independent count map: row 7 lies in windows 6 and 7 (and not 3).
  assert count[7, 0] == 2 and count[6, 3] == 4 and count[0, 0] == 1
  assert out.shape == (11, 10, 3)
  np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    'shape,window,stride',
    [
        ((2, 37, 53, 3), 16, 11),  # odd sizes, batch of 2.
        ((1, 16, 16, 3), 16, 16),  # one window.
        ((1, 5, 7, 3), 8, 4),  # smaller than the window: padded.
        ((1, 9, 30, 3), (12, 10), (6, 7)),  # rectangular window, padded in height only.
    ],
)
def test_sliding_window_reproduces_per_pixel_function(shape, window, stride):
  images = random_images(shape)
  for flip in (False, True):
    out = inference.sliding_window(per_pixel, images, window=window, stride=stride, flip=flip)
    assert out.shape == shape[:3] + (4,)
    np.testing.assert_allclose(out, per_pixel(images), atol=1e-6)


def test_padded_region_is_excluded():
  # 5x7 image, 8x8 window: one window; coordinates must be the unpadded ones
  # and the output cropped back to 5x7 (the pad contributes no pixel).
  out = np.asarray(
      inference.sliding_window(window_coords, random_images((5, 7, 3)), window=8, stride=4)
  )
  expected, _ = brute_force_window_coords(5, 7, [0], [0], 8, 8)
  np.testing.assert_array_equal(out, expected)


def test_flip_averages_unflipped_logits():
  # Direct column c and un-flipped column (w-1-c) average to (w-1)/2; rows unchanged.
  image = random_images((6, 8, 3))
  out = np.asarray(
      inference.sliding_window(window_coords, image, window=(6, 8), stride=(6, 8), flip=True)
  )
  np.testing.assert_allclose(out[..., 1], 3.5)
  np.testing.assert_allclose(out[..., 0], np.broadcast_to(np.arange(6.0)[:, None], (6, 8)))


class Recorder:
  """Wraps a predict_fn and keeps every batch it was called with."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, images):
    self.calls.append(np.asarray(images))
    return self.fn(images)


def test_cityscapes_halves_exact():
  h = 8
  image = random_images((h, 2 * h, 3))
  recorder = Recorder(per_pixel)
  out = np.asarray(inference.cityscapes_halves(recorder, image))
  np.testing.assert_allclose(out, per_pixel(image), atol=1e-6)
  # One call: left, right, flipped left, flipped right.
  (crops,) = recorder.calls
  np.testing.assert_array_equal(crops[0], image[:, :h])
  np.testing.assert_array_equal(crops[1], image[:, h:])
  np.testing.assert_array_equal(crops[2], image[:, :h][:, ::-1])
  np.testing.assert_array_equal(crops[3], image[:, h:][:, ::-1])
  # Position encoding: halves concatenated (column restarts at h), flip averaged.
  coords = np.asarray(inference.cityscapes_halves(window_coords, image, flip=False))
  np.testing.assert_array_equal(coords[0, :, 1], np.concatenate([np.arange(h), np.arange(h)]))
  flipped = np.asarray(inference.cityscapes_halves(window_coords, image, flip=True))
  np.testing.assert_allclose(flipped[..., 1], (h - 1) / 2)


def test_cityscapes_halves_rejects_other_aspect_ratios():
  with pytest.raises(ValueError, match='width == 2 \\* height'):
    inference.cityscapes_halves(per_pixel, random_images((8, 15, 3)))


def test_fixed_batch_size_pads_last_batch_and_keeps_results():
  images = random_images((1, 11, 10, 3))
  recorder = Recorder(per_pixel)
  # 4 x 3 = 12 windows, flipped: 24 crops in batches of 5 -> 5 calls, last padded.
  out = inference.sliding_window(recorder, images, window=4, stride=3, flip=True, batch_size=5)
  assert [c.shape for c in recorder.calls] == [(5, 4, 4, 3)] * 5
  np.testing.assert_allclose(out, per_pixel(images), atol=1e-6)


def test_resized_shape_rounding():
  assert inference.resized_shape(768, 1024, short_side=512) == (512, 683)
  assert inference.resized_shape(375, 500, long_side=520) == (390, 520)
  assert inference.resized_shape(500, 333, long_side=520) == (520, 346)


def _reference_bilinear(image, out_h, out_w):
  """Half-pixel-centre bilinear upsampling with edge clamping, by loops."""
  in_h, in_w = image.shape[:2]
  out = np.zeros((out_h, out_w) + image.shape[2:])
  for i in range(out_h):
    for j in range(out_w):
      y = min(max((i + 0.5) * in_h / out_h - 0.5, 0), in_h - 1)
      x = min(max((j + 0.5) * in_w / out_w - 0.5, 0), in_w - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
      dy, dx = y - y0, x - x0
      out[i, j] = (
          (1 - dy) * (1 - dx) * image[y0, x0]
          + (1 - dy) * dx * image[y0, x1]
          + dy * (1 - dx) * image[y1, x0]
          + dy * dx * image[y1, x1]
      )
  return out


def test_resize_images_is_half_pixel_bilinear():
  image = random_images((5, 7, 2))
  out = np.asarray(inference.resize_images(image, (11, 13)))
  np.testing.assert_allclose(out, _reference_bilinear(image, 11, 13), atol=1e-5)


@pytest.mark.parametrize(
    'name,image_shape,model_shape',
    [
        ('ade20k_sliding', (30, 45), (512, 768)),
        ('pascal_context_sliding', (30, 50), (312, 520)),
        ('cityscapes_halves', (16, 32), (16, 32)),
        ('whole', (9, 13), (9, 13)),
    ],
)
def test_protocols_return_original_resolution(name, image_shape, model_shape):
  protocol = inference.PROTOCOLS[name]
  assert protocol.input_size(*image_shape) == model_shape
  recorder = Recorder(per_pixel)
  # A constant image makes any resize exact, so values are checkable too.
  images = np.full((2,) + image_shape + (3,), 0.25, np.float32)
  fn = inference.make_protocol(name, recorder, batch_size=2)
  logits = fn(images)
  assert logits.shape == (2,) + image_shape + (4,)
  np.testing.assert_allclose(logits, per_pixel(images), atol=1e-6)
  # Each call sees exactly the protocol's window (or the whole model input).
  window = protocol.window or (
      model_shape[0],
      model_shape[0] if protocol.kind == 'halves' else model_shape[1],
  )
  assert {c.shape for c in recorder.calls} == {(2,) + tuple(window) + (3,)}
  # Labels stored at another resolution get logits at that resolution.
  labels = inference.predict_labels(fn, images, output_size=(7, 11))
  assert labels.shape == (2, 7, 11) and labels.dtype == jnp.int32


def test_whole_protocol_with_resize_override_returns_original_size():
  ramp = np.linspace(-1, 1, 12 * 20, dtype=np.float32).reshape(1, 12, 20, 1).repeat(3, -1)
  recorder = Recorder(per_pixel)
  logits = inference.make_protocol('whole', recorder, size=(6, 10))(ramp)
  assert recorder.calls[0].shape == (1, 6, 10, 3)
  assert logits.shape == (1, 12, 20, 4)
  # Halving then doubling a linear ramp is exact away from the clamped borders.
  np.testing.assert_allclose(logits[0, 2:-2, 2:-2, 0], ramp[0, 2:-2, 2:-2, 0], atol=1e-5)


def test_num_classes_mismatch_is_reported():
  with pytest.raises(ValueError, match='classes'):
    inference.sliding_window(
        per_pixel, random_images((8, 8, 3)), window=8, stride=8, num_classes=19
    )


def test_metrics_and_inference_import_without_tensorflow():
  # They run on accelerator hosts that have no TF installed.
  import subprocess
  import sys

  code = (
      'import sys, ddep.evaluators.metrics, ddep.evaluators.inference; '
      "assert not any(m.startswith('tensorflow') for m in sys.modules), 'TF imported'"
  )
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
