"""Inference protocols: how full-size evaluation images become full-size logits.

Every protocol wraps a `predict_fn(images) -> logits` that maps a float batch
(N, h, w, 3) to (N, h, w, C) and is typically jitted. Protocols only ever call
it on crops of one fixed window shape, and with `batch_size` set, on batches of
one fixed size, so a jitted `predict_fn` compiles once per protocol.

  cityscapes_halves       full 1024x2048 image as two 1024x1024 halves, each
                          averaged with its horizontal flip (paper Sec. 4.3);
  ade20k_sliding          short side resized to 512, 512x512 windows, stride 341;
  pascal_context_sliding  long side resized to 520, 480x480 windows, stride 320;
  whole                   the whole image at once (optionally resized).

Whatever the protocol, the logits are resized (bilinear) back to the label's
original resolution before any argmax, so metrics are always computed on the
original labels. This module imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PredictFn = Callable[[jax.Array], jax.Array]


def _pair(value) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  height, width = value
  return int(height), int(width)


def window_starts(length: int, window: int, stride: int) -> list[int]:
  """Offsets of windows covering [0, length); the last one ends at the border."""
  if not 0 < stride <= window:
    raise ValueError(f'stride must lie in (0, window={window}] to cover every pixel, got {stride}')
  if length <= window:
    return [0]
  count = math.ceil((length - window) / stride) + 1
  return [min(i * stride, length - window) for i in range(count)]


def _batch_shape(images) -> tuple[int, int, int, int]:
  """(N, H, W, C) of an (H, W, C) image or an (N, H, W, C) batch."""
  shape = tuple(np.shape(images))
  if len(shape) == 3:
    return (1,) + shape
  if len(shape) != 4:
    raise ValueError(f'expected (H, W, C) or (N, H, W, C) images, got shape {shape}')
  return shape


@functools.partial(jax.jit, static_argnames=('padded_hw', 'window', 'flip', 'batch_size'))
def _extract_windows(images, ys, xs, *, padded_hw, window, flip, batch_size):
  """(K, wh, ww, c) crops, window-major then image, flipped copies appended."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim == 3:
    images = images[None]
  n, height, width, channels = images.shape
  images = jnp.pad(images, ((0, 0), (0, padded_hw[0] - height), (0, padded_hw[1] - width), (0, 0)))
  crop = lambda y, x: jax.lax.dynamic_slice(images, (0, y, x, 0), (n,) + window + (channels,))
  crops = jax.vmap(crop)(ys, xs).reshape((-1,) + window + (channels,))
  if flip:
    crops = jnp.concatenate([crops, crops[:, :, ::-1]])
  if batch_size is not None and crops.shape[0] % batch_size:
    # Pad to whole batches so a jitted predict_fn sees one batch shape only.
    extra = batch_size - crops.shape[0] % batch_size
    crops = jnp.concatenate([crops, jnp.zeros((extra,) + crops.shape[1:], crops.dtype)])
  return crops


@functools.partial(
    jax.jit, static_argnames=('num_images', 'image_hw', 'padded_hw', 'flip', 'single')
)
def _stitch(logits_batches, ys, xs, *, num_images, image_hw, padded_hw, flip, single):
  """Average window logits into (N, H, W, C): sum of windows / count map."""
  num_windows = ys.shape[0]
  logits = jnp.concatenate(logits_batches).astype(jnp.float32)
  logits = logits[: num_windows * num_images * (2 if flip else 1)]  # Drop batch padding.
  if flip:
    direct, flipped = jnp.split(logits, 2)
    logits = 0.5 * (direct + flipped[:, :, ::-1])
  logits = logits.reshape((num_windows, num_images) + logits.shape[1:])
  window_hw = logits.shape[2:4]
  total = jnp.zeros((num_images,) + padded_hw + logits.shape[-1:], jnp.float32)
  count = jnp.zeros(padded_hw, jnp.float32)

  def add_window(i, carry):
    total, count = carry
    start = (0, ys[i], xs[i], 0)
    total = jax.lax.dynamic_update_slice(
        total, jax.lax.dynamic_slice(total, start, logits.shape[1:]) + logits[i], start
    )
    count = jax.lax.dynamic_update_slice(
        count, jax.lax.dynamic_slice(count, start[1:3], window_hw) + 1, start[1:3]
    )
    return total, count

  total, count = jax.lax.fori_loop(0, num_windows, add_window, (total, count))
  out = (total / count[None, :, :, None])[:, : image_hw[0], : image_hw[1]]
  return out[0] if single else out


def sliding_window(
    predict_fn: PredictFn,
    images,
    *,
    window,
    stride,
    num_classes: int | None = None,
    flip: bool = False,
    batch_size: int | None = None,
) -> jax.Array:
  """Logits for whole images from overlapping fixed-size windows.

  Windows start every `stride` pixels and the last one in each direction is
  flush with the border, so every pixel is covered. An image smaller than the
  window is zero-padded at the bottom/right and the padded region is cropped
  from the result. Overlapping logits are averaged (sum / count map).

  Args:
    predict_fn: (K, wh, ww, 3) -> (K, wh, ww, C) logits.
    images: (H, W, 3) or (N, H, W, 3).
    window, stride: int or (height, width).
    num_classes: if given, checked against the logits' last dimension.
    flip: also predict each window flipped left-right and average the
      un-flipped logits with the direct ones.
    batch_size: call predict_fn on exactly this many windows at a time
      (the last batch zero-padded); None = all windows in one call.

  Returns:
    float32 logits (N, H, W, C), or (H, W, C) for a single image.
  """
  n, height, width, _ = _batch_shape(images)
  window = _pair(window)
  stride_h, stride_w = _pair(stride)
  padded_hw = (max(height, window[0]), max(width, window[1]))
  offsets = [
      (y, x)
      for y in window_starts(padded_hw[0], window[0], stride_h)
      for x in window_starts(padded_hw[1], window[1], stride_w)
  ]
  ys = jnp.asarray([y for y, _ in offsets], jnp.int32)
  xs = jnp.asarray([x for _, x in offsets], jnp.int32)

  crops = _extract_windows(
      images, ys, xs, padded_hw=padded_hw, window=window, flip=flip, batch_size=batch_size
  )
  step = crops.shape[0] if batch_size is None else batch_size
  logits = [
      jnp.asarray(predict_fn(jax.lax.dynamic_slice_in_dim(crops, start, step)))
      for start in range(0, crops.shape[0], step)
  ]
  if logits[0].ndim != 4 or logits[0].shape[:3] != (step,) + window:
    raise ValueError(
        f'predict_fn returned {logits[0].shape} for windows of shape {(step,) + window}; '
        'it must keep the batch and spatial shape'
    )
  if num_classes is not None and logits[0].shape[-1] != num_classes:
    raise ValueError(f'predict_fn returned {logits[0].shape[-1]} classes, expected {num_classes}')
  return _stitch(
      logits,
      ys,
      xs,
      num_images=n,
      image_hw=(height, width),
      padded_hw=padded_hw,
      flip=flip,
      single=np.ndim(images) == 3,
  )


def cityscapes_halves(
    predict_fn: PredictFn, images, *, flip: bool = True, batch_size: int | None = None
) -> jax.Array:
  """Paper Sec. 4.3: left and right HxH halves of an Hx2H image, each averaged
  with its horizontal flip, concatenated back to full-resolution logits."""
  _, height, width, _ = _batch_shape(images)
  if width != 2 * height:
    raise ValueError(f'cityscapes_halves needs width == 2 * height, got {height}x{width}')
  # Two non-overlapping HxH windows are exactly the two halves.
  return sliding_window(
      predict_fn, images, window=height, stride=height, flip=flip, batch_size=batch_size
  )


def resized_shape(
    height: int, width: int, *, short_side: int | None = None, long_side: int | None = None
) -> tuple[int, int]:
  """Aspect-preserving size whose short (or long) side has the given length."""
  if (short_side is None) == (long_side is None):
    raise ValueError('give exactly one of short_side and long_side')
  if short_side is not None:
    target, side = short_side, min(height, width)
  else:
    target, side = long_side, max(height, width)
  scale = target / side
  # Round half up, as mmseg/cv2 do, so 683 = 1024 * 512 / 768 + 0.5 rounds consistently.
  return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_images(images, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (N, H, W, C) or (H, W, C), half-pixel centres (as
  tf.image.resize), without antialiasing, so logits are interpolated only."""
  shape = tuple(np.shape(images))
  if shape[-3:-1] == tuple(size):
    return jnp.asarray(images, jnp.float32)
  return _resize(images, shape[:-3] + tuple(size) + shape[-1:])


@functools.partial(jax.jit, static_argnames='shape')
def _resize(images, shape):
  # Jitted so eager dispatch does not compile each of resize's ops separately.
  return jax.image.resize(jnp.asarray(images, jnp.float32), shape, method='linear', antialias=False)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One evaluation protocol; see the module docstring.

  kind: 'halves', 'sliding' or 'whole'.
  short_side / long_side: aspect-preserving resize before windowing.
  size: fixed (h, w) resize ('whole' only).
  window, stride: sliding windows ('sliding' only).
  flip: average with the horizontally flipped prediction.
  """

  name: str
  kind: str
  short_side: int | None = None
  long_side: int | None = None
  size: tuple[int, int] | None = None
  window: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  flip: bool = False

  def __post_init__(self):
    if self.kind not in ('halves', 'sliding', 'whole'):
      raise ValueError(f'unknown protocol kind {self.kind!r}')
    if self.kind == 'sliding' and (self.window is None or self.stride is None):
      raise ValueError(f'{self.name}: sliding protocols need window and stride')
    if self.short_side is not None and self.long_side is not None:
      raise ValueError(f'{self.name}: resize by short_side or long_side, not both')

  def input_size(self, height: int, width: int) -> tuple[int, int]:
    """The resolution the model sees for an image of the given size."""
    if self.size is not None:
      return tuple(self.size)
    if self.short_side is not None or self.long_side is not None:
      return resized_shape(height, width, short_side=self.short_side, long_side=self.long_side)
    return height, width


PROTOCOLS: dict[str, Protocol] = {
    'cityscapes_halves': Protocol('cityscapes_halves', 'halves', flip=True),
    'ade20k_sliding': Protocol(
        'ade20k_sliding', 'sliding', short_side=512, window=(512, 512), stride=(341, 341)
    ),
    'pascal_context_sliding': Protocol(
        'pascal_context_sliding', 'sliding', long_side=520, window=(480, 480), stride=(320, 320)
    ),
    'whole': Protocol('whole', 'whole'),
}


def resize_for_protocol(images, protocol: Protocol | str) -> jax.Array:
  """Images resized to what `protocol` feeds the model (no-op if none)."""
  protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
  _, height, width, _ = _batch_shape(images)
  return resize_images(images, protocol.input_size(height, width))


def _window_and_stride(protocol: Protocol, input_hw: tuple[int, int]):
  """The windows `protocol` cuts a model input of size `input_hw` into."""
  if protocol.kind == 'halves':
    height, width = input_hw
    if width != 2 * height:
      raise ValueError(f'cityscapes_halves needs width == 2 * height, got {height}x{width}')
    # Two non-overlapping HxH windows are exactly the two halves.
    return (height, height), (height, height)
  if protocol.kind == 'sliding':
    return tuple(protocol.window), tuple(protocol.stride)
  return tuple(input_hw), tuple(input_hw)  # 'whole': one window the size of the image.


def protocol_windows(protocol: Protocol | str, height: int, width: int):
  """(window shape, number of windows) that `run_protocol` predicts for one image of
  this (original) size, before flips and batch padding."""
  protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
  input_hw = protocol.input_size(height, width)
  window, stride = _window_and_stride(protocol, input_hw)
  padded = [max(n, k) for n, k in zip(input_hw, window)]
  count = len(window_starts(padded[0], window[0], stride[0])) * len(
      window_starts(padded[1], window[1], stride[1])
  )
  return window, count


def run_protocol(
    protocol: Protocol | str,
    predict_fn: PredictFn,
    images,
    *,
    output_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> jax.Array:
  """Logits at `output_size` (default: the images' own, i.e. original, size).

  Images are resized per the protocol, predicted, and the logits resized
  back bilinearly; pass the label's shape as `output_size` when it differs.
  """
  protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
  original = tuple(_batch_shape(images)[1:3]) if output_size is None else tuple(output_size)
  model_input = resize_for_protocol(images, protocol)
  window, stride = _window_and_stride(protocol, tuple(model_input.shape[-3:-1]))
  logits = sliding_window(
      predict_fn,
      model_input,
      window=window,
      stride=stride,
      flip=protocol.flip,
      batch_size=batch_size,
  )
  return resize_images(logits, original)


def make_protocol(name: str, predict_fn: PredictFn, *, batch_size: int | None = None, **overrides):
  """`fn(images, output_size=None) -> logits` for protocol `name`.

  `overrides` replace Protocol fields, e.g. flip=True or window=(768, 768).
  """
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
  protocol = dataclasses.replace(PROTOCOLS[name], **overrides)
  return functools.partial(run_protocol, protocol, predict_fn, batch_size=batch_size)


def predict_labels(protocol_fn, images, *, output_size: tuple[int, int] | None = None) -> jax.Array:
  """Argmax train ids at the original resolution, from `make_protocol`'s fn."""
  return jnp.argmax(protocol_fn(images, output_size=output_size), axis=-1).astype(jnp.int32)
