"""Pure TensorFlow preprocessing ops for images and segmentation labels.

Every random op is stateless: its output is a function of the inputs and a
`seed` of shape [2] (int32/int64), which is what lets the input pipeline resume
bit-exactly (it derives the seed from the example's position in the stream).
Images are HxWxC, labels HxW or HxWx1. Ops work inside tf.data maps.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

# TF runs only on the host CPU here (ddep.data.stream hides accelerators), where
# 'auto_select' is Philox; it builds half the graph ops of naming 'philox'.
ALG = 'auto_select'


def split_seed(seed, num: int):
  """`num` independent [2] seeds derived from `seed`."""
  seed = tf.cast(seed, tf.int64)
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num, alg=ALG))


def _uniform(seed, shape=(), minval=0.0, maxval=1.0, dtype=tf.float32):
  return tf.random.stateless_uniform(
      shape, seed=seed, minval=minval, maxval=maxval, dtype=dtype, alg=ALG
  )


def scale_to_minus1_1(image):
  """uint8 [0, 255] -> float32 [-1, 1] (paper Sec. 3: data lives in [-1, 1] for the noise scale)."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def _as_hwc(label):
  """(label HxWx1, whether the input was HxW)."""
  label = tf.convert_to_tensor(label)
  squeeze = label.shape.rank == 2
  return (label[..., None] if squeeze else label), squeeze


def _flip_if(x, do_flip):
  return tf.cond(do_flip, lambda: tf.reverse(x, axis=[1]), lambda: x)


def random_flip(image, seed):
  """Left-right flip with probability 1/2."""
  return _flip_if(image, _uniform(seed) < 0.5)


def inception_crop_window(
    image_shape,
    seed,
    area_range: Sequence[float] = (0.05, 1.0),
    aspect_range: Sequence[float] = (3 / 4, 4 / 3),
):
  """(begin [y, x, 0], size [h, w, -1]) of a random inception crop of an image of `image_shape`.

  The window alone, so that a JPEG can be decoded only inside it
  (tf.image.decode_and_crop_jpeg); only the height and width of `image_shape`
  ([H, W, C]) matter.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=tuple(aspect_range),
      area_range=tuple(area_range),
      max_attempts=20,
      use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def resize_crop(crop, out_hw: Sequence[int], method: str = 'bilinear'):
  """The inception crop's resize: antialiased unless nearest; float32 out.

  Antialiased bilinear is a triangle filter as wide as the reduction. A crop
  enlarged in both dimensions gets the filter's narrowest width, which is plain
  bilinear interpolation: that is ResizeBilinear, ~2x cheaper than the general
  ScaleAndTranslate (equal up to float rounding of the sample positions).
  """
  if method != 'bilinear':
    return tf.image.resize(crop, out_hw, method=method, antialias=method != 'nearest')
  enlarged = tf.reduce_all(tf.shape(crop)[:2] <= tf.constant(out_hw, tf.int32))
  return tf.cond(
      enlarged,
      lambda: tf.image.resize(crop, out_hw, antialias=False),
      lambda: tf.image.resize(crop, out_hw, antialias=True),
  )


def inception_crop(
    image,
    seed,
    out_hw: Sequence[int],
    area_range: Sequence[float] = (0.05, 1.0),
    aspect_range: Sequence[float] = (3 / 4, 4 / 3),
    method: str = 'bilinear',
):
  """Random crop of a random area fraction and aspect ratio, resized to `out_hw`.

  The "inception-style" crop of Szegedy et al. the paper uses for augmentation
  (Sec. 2); returns float32 (resizing interpolates). Crops in the input dtype
  first, so a uint8 image is converted to float only at the crop's size.
  """
  image = tf.convert_to_tensor(image)
  begin, size = inception_crop_window(tf.shape(image), seed, area_range, aspect_range)
  return resize_crop(tf.slice(image, begin, size), out_hw, method)


def inception_window(area_range):
  """window(image_shape, seed): the crop, drawn from the first of the seed's two parts.

  The inception crop in two parts (inception_augment is the second), so that the
  decoder decodes only the crop's window.
  """

  def window(image_shape, seed):
    s_crop, _ = split_seed(seed, 2)
    return inception_crop_window(image_shape, s_crop, area_range=area_range)

  return window


def inception_augment(crop, seed, out_hw):
  """The decoded window flipped by the seed's second part, then resized to `out_hw`."""
  _, s_flip = split_seed(seed, 2)
  # Flipping commutes with the (mirror-symmetric) resize: flip the uint8 crop, 1 byte per
  # value and on average smaller than the float32 output.
  image = resize_crop(random_flip(crop, s_flip), out_hw)
  return tf.clip_by_value(scale_to_minus1_1(image), -1.0, 1.0)


def _resize_hw(image, hw, method):
  out = tf.image.resize(image, hw, method=method, antialias=method not in ('nearest',))
  return out if method == 'nearest' else tf.cast(out, tf.float32)


def resize_long_side(image, long_side: int, method: str = 'bilinear'):
  """Resizes so that max(H, W) == long_side, keeping the aspect ratio."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  new_hw = tf.cast(tf.round(hw * (long_side / tf.reduce_max(hw))), tf.int32)
  return _resize_hw(image, tf.maximum(new_hw, 1), method)


def resize_short_side(image, short_side: int, method: str = 'bilinear'):
  """Resizes so that min(H, W) == short_side, keeping the aspect ratio."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  new_hw = tf.cast(tf.round(hw * (short_side / tf.reduce_min(hw))), tf.int32)
  return _resize_hw(image, tf.maximum(new_hw, 1), method)


def pad_to(image, hw: Sequence[int], value=0):
  """Pads at the bottom/right up to `hw` (no-op on sides already as large)."""
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  pad_h = tf.maximum(hw[0] - shape[0], 0)
  pad_w = tf.maximum(hw[1] - shape[1], 0)
  paddings = [[0, pad_h], [0, pad_w]] + [[0, 0]] * (image.shape.rank - 2)
  return tf.pad(image, paddings, constant_values=tf.cast(value, image.dtype))


def joint_random_scale_crop_flip(
    image,
    label,
    seed,
    crop_hw: Sequence[int],
    scale_range: Sequence[float] | None = None,
    ignore_label: int = 255,
    image_pad_value: float = 0.0,
    image_fn=None,
):
  """Random scale, crop and flip with ONE draw shared by image and label.

  The image is resized bilinearly, the label with nearest neighbour. Where the
  (scaled) image is smaller than `crop_hw` both are padded at the bottom/right
  first: the label with `ignore_label` so the loss skips it, the image with
  `image_pad_value` (0 = mid-grey for images already in [-1, 1]).
  `image_fn`, an elementwise map to float32 (default: the cast; e.g.
  scale_to_minus1_1 for uint8 images, then `image_pad_value` is in its units),
  runs before the resize, or without `scale_range` on the crop only: the same
  values without converting the whole image.
  Returns (float32 image crop_hw x C, label crop_hw in the input's layout and dtype).
  """
  image_fn = image_fn or (lambda x: tf.cast(x, tf.float32))
  label3, squeeze = _as_hwc(label)
  s_scale, s_y, s_x, s_flip = split_seed(seed, 4)
  if scale_range is not None:
    image = image_fn(image)
    scale = _uniform(s_scale, minval=scale_range[0], maxval=scale_range[1])
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    image = tf.image.resize(image, new_hw, method='bilinear', antialias=True)
    label3 = tf.image.resize(label3, new_hw, method='nearest')
  # The offsets are drawn over the padded size; cropping first and padding the crop
  # at the bottom/right gives the same pixels (an axis that needs padding has offset 0).
  padded = tf.maximum(tf.shape(image)[:2], tf.constant(crop_hw, tf.int32))
  y0 = _uniform(s_y, minval=0, maxval=padded[0] - crop_hw[0] + 1, dtype=tf.int32)
  x0 = _uniform(s_x, minval=0, maxval=padded[1] - crop_hw[1] + 1, dtype=tf.int32)
  image = image[y0 : y0 + crop_hw[0], x0 : x0 + crop_hw[1]]
  label3 = label3[y0 : y0 + crop_hw[0], x0 : x0 + crop_hw[1]]
  if scale_range is None:
    image = image_fn(image)
  image = pad_to(image, crop_hw, image_pad_value)
  label3 = pad_to(label3, crop_hw, ignore_label)
  do_flip = _uniform(s_flip) < 0.5
  image, label3 = _flip_if(image, do_flip), _flip_if(label3, do_flip)
  image = tf.ensure_shape(image, [crop_hw[0], crop_hw[1], None])
  label3 = tf.ensure_shape(label3, [crop_hw[0], crop_hw[1], 1])
  return image, (label3[..., 0] if squeeze else label3)
