"""Preprocessing ops: values, determinism, and image/label agreement."""

import numpy as np
import pytest
import tensorflow as tf

from ddep.data import preprocess as pp

# Distinct colours per class so a pixel's class can be read back off the image.
_COLOURS = np.array(
    [[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250]], np.float32
)


def _seed(a, b=0):
  return tf.constant([a, b], tf.int64)


def _blocky_label(h, w, block=8, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, len(_COLOURS), size=(-(-h // block), -(-w // block)))
  return np.kron(coarse, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def _classes_from_colours(image):
  dist = np.linalg.norm(image[..., None, :] - _COLOURS, axis=-1)
  return np.argmin(dist, axis=-1)


def test_scale_to_minus1_1_endpoints():
  out = pp.scale_to_minus1_1(tf.constant([0, 255, 51], tf.uint8)).numpy()
  np.testing.assert_allclose(out, [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-6)
  assert out.dtype == np.float32


def test_random_flip_is_a_function_of_the_seed():
  image = tf.constant(np.arange(2 * 5 * 1).reshape(2, 5, 1))
  outs = [pp.random_flip(image, _seed(s)).numpy() for s in range(20)]
  flipped = [np.array_equal(o, image.numpy()[:, ::-1]) for o in outs]
  kept = [np.array_equal(o, image.numpy()) for o in outs]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 3 <= sum(flipped) <= 17
  np.testing.assert_array_equal(pp.random_flip(image, _seed(7)), outs[7])


def test_inception_crop_full_area_square_is_identity():
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (16, 16, 3)), tf.uint8)
  out = pp.inception_crop(image, _seed(1), (16, 16), area_range=(1.0, 1.0), aspect_range=(1.0, 1.0))
  np.testing.assert_allclose(out.numpy(), image.numpy().astype(np.float32), atol=1e-4)


def test_inception_crop_takes_a_sub_window():
  # Pixel value = column index: a crop with nearest resizing shows a contiguous range of columns.
  cols = np.tile(np.arange(64, dtype=np.float32)[None, :, None], (48, 1, 1))
  a = pp.inception_crop(cols, _seed(3), (20, 20), area_range=(0.1, 0.3), method='nearest').numpy()
  b = pp.inception_crop(cols, _seed(3), (20, 20), area_range=(0.1, 0.3), method='nearest').numpy()
  c = pp.inception_crop(cols, _seed(4), (20, 20), area_range=(0.1, 0.3), method='nearest').numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  span = a.max() - a.min() + 1
  # Area <= 0.3 of 48x64 with aspect <= 4/3 bounds the width of the window.
  assert a.shape == (20, 20, 1) and span < 64 * 0.75
  assert np.all(np.diff(a[0, :, 0]) >= 0)


@pytest.mark.parametrize('crop_hw', [(20, 30), (30, 30), (40, 16), (50, 64)])
def test_resize_crop_is_the_antialiased_resize(crop_hw):
  # Enlarged crops take the cheaper bilinear kernel; any reduction keeps the antialiasing filter.
  crop = tf.constant(np.random.default_rng(1).integers(0, 256, (*crop_hw, 3)), tf.uint8)
  expected = tf.image.resize(crop, (30, 30), antialias=True).numpy()
  got = pp.resize_crop(crop, (30, 30)).numpy()
  assert got.shape == (30, 30, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=0.02)  # Of 255: float rounding only.
  if max(crop_hw) > 30:  # A reduction: plain bilinear would alias, far from the result.
    plain = tf.image.resize(crop, (30, 30), antialias=False).numpy()
    assert np.abs(plain - got).max() > 1


@pytest.mark.parametrize('crop_hw', [(16, 20), (30, 12), (44, 44)])
def test_joint_crop_maps_the_crop_as_the_whole_image(crop_hw):
  # Without scaling, image_fn runs on the crop only; padding (crops larger than the 24 x 36
  # image) and the offsets must come out as when the whole image was mapped first.
  image = tf.constant(np.random.default_rng(2).integers(0, 256, (24, 36, 3)), tf.uint8)
  label = _blocky_label(24, 36)
  for s in range(4):
    whole = pp.joint_random_scale_crop_flip(pp.scale_to_minus1_1(image), label, _seed(s), crop_hw)
    crop = pp.joint_random_scale_crop_flip(
        image, label, _seed(s), crop_hw, image_fn=pp.scale_to_minus1_1
    )
    for a, b in zip(whole, crop):
      np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize('scale_range', [None, (0.75, 1.5)])
def test_joint_crop_flip_keeps_image_and_label_aligned(scale_range):
  label = _blocky_label(40, 56)
  image = _COLOURS[label]
  flips = 0
  for s in range(8):
    out_img, out_lab = pp.joint_random_scale_crop_flip(
        image, label, _seed(s), (32, 32), scale_range=scale_range
    )
    out_img, out_lab = out_img.numpy(), out_lab.numpy()
    assert out_img.shape == (32, 32, 3) and out_lab.shape == (32, 32) and out_lab.dtype == np.uint8
    valid = out_lab != 255
    agree = (_classes_from_colours(out_img) == out_lab)[valid].mean()
    # Bilinear image vs nearest label disagree only along block edges when rescaled.
    assert agree > (0.999 if scale_range is None else 0.9), agree
    if scale_range is None:
      # Without rescaling the crop is an exact window of the (possibly flipped) input.
      windows = [label, label[:, ::-1]]
      found = any(
          np.array_equal(w[y : y + 32, x : x + 32], out_lab)
          for w in windows
          for y in range(40 - 31)
          for x in range(56 - 31)
      )
      assert found
      flips += int(
          not any(
              np.array_equal(label[y : y + 32, x : x + 32], out_lab)
              for y in range(9)
              for x in range(25)
          )
      )
  if scale_range is None:
    assert 0 < flips < 8


def test_joint_crop_pads_label_with_ignore_and_image_with_zero():
  label = np.ones((10, 12, 1), np.uint8) * 3
  image = np.full((10, 12, 3), 0.5, np.float32)
  out_img, out_lab = pp.joint_random_scale_crop_flip(image, label, _seed(0), (16, 20))
  out_img, out_lab = out_img.numpy(), out_lab.numpy()[..., 0]
  assert out_lab.shape == (16, 20)
  assert (out_lab == 255).sum() == 16 * 20 - 10 * 12
  assert (out_lab == 3).sum() == 10 * 12
  np.testing.assert_array_equal(out_img[out_lab == 255], 0.0)
  np.testing.assert_array_equal(out_img[out_lab == 3], 0.5)


def test_joint_crop_is_stateless():
  label = _blocky_label(48, 48, seed=1)
  image = _COLOURS[label]
  a = pp.joint_random_scale_crop_flip(image, label, _seed(5, 9), (24, 24), scale_range=(0.5, 2.0))
  b = pp.joint_random_scale_crop_flip(image, label, _seed(5, 9), (24, 24), scale_range=(0.5, 2.0))
  c = pp.joint_random_scale_crop_flip(image, label, _seed(6, 9), (24, 24), scale_range=(0.5, 2.0))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_joint_crop_scales_the_label_with_nearest():
  label = _blocky_label(32, 32, seed=2)
  image = _COLOURS[label]
  # With scale exactly 2 (range of width 0) and a crop the full scaled size, only a flip remains.
  out_img, out_lab = pp.joint_random_scale_crop_flip(
      image, label, _seed(0), (64, 64), scale_range=(2.0, 2.0)
  )
  up = np.kron(label, np.ones((2, 2), np.uint8))
  assert np.array_equal(out_lab.numpy(), up) or np.array_equal(out_lab.numpy(), up[:, ::-1])
  assert set(np.unique(out_lab.numpy())) <= set(range(len(_COLOURS)))


def test_resize_long_and_short_side():
  image = tf.zeros((30, 60, 3), tf.uint8)
  assert pp.resize_long_side(image, 120).shape == (60, 120, 3)
  assert pp.resize_short_side(image, 15).shape == (15, 30, 3)
  label = tf.constant(_blocky_label(30, 60))[..., None]
  small = pp.resize_short_side(label, 45, method='nearest')
  assert small.dtype == tf.uint8 and small.shape == (45, 90, 1)
  assert set(np.unique(small.numpy())) <= set(np.unique(label.numpy()))


def test_pad_to_pads_bottom_right_only():
  x = tf.ones((2, 3), tf.int32)
  out = pp.pad_to(x, (4, 3), 255).numpy()
  np.testing.assert_array_equal(out, [[1, 1, 1], [1, 1, 1], [255, 255, 255], [255, 255, 255]])
