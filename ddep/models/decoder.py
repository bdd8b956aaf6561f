"""The UNet decoder of the TransUNet (paper Fig. 3, Sec. 4.2), with optional σ conditioning."""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddep.models import resnet

Dtype = Any

DECODER_WIDTHS_1X = (1024, 512, 256, 128, 64)


def _upsample2x_axis(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  # With half-pixel centres, output 2i sits at input i - 1/4 and 2i+1 at i + 1/4:
  # two taps (3/4, 1/4), with edges clamped, as jax.image.resize renormalises them.
  n = x.shape[axis]
  prev = jnp.concatenate(
      [jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)],
      axis=axis,
  )
  nxt = jnp.concatenate(
      [jax.lax.slice_in_dim(x, 1, n, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)],
      axis=axis,
  )
  even = 0.75 * x + 0.25 * prev
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = 2 * n
  return out.reshape(shape)


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """Bilinear x2 with half-pixel centres (align_corners=False).

  Equal to `jax.image.resize(..., 'bilinear')`, which lowers to dense resize
  matrices (34 GFLOPs per 512x512 image in the 1x decoder); two taps per axis
  cost a few elementwise ops instead.
  """
  return _upsample2x_axis(_upsample2x_axis(x, 1), 2)


class NoiseEmbedding(nn.Module):
  """Embeds each example's noise level σ (paper Sec. 3.2, conditioning on noise level).

  Sinusoidal features of log σ followed by a small MLP, as diffusion models embed
  their noise level.
  """

  features: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sigma: jnp.ndarray) -> jnp.ndarray:
    half = self.features // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    # log σ spans a few units; the 1000x lets the fastest frequencies resolve small σ steps.
    angles = 1000.0 * jnp.log(sigma.astype(jnp.float32))[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    emb = nn.silu(nn.Dense(self.features, dtype=self.dtype, name='dense1')(emb))
    return nn.Dense(self.features, dtype=self.dtype, name='dense2')(emb)


class ConcatConv(nn.Module):
  """A 3x3 'SAME' conv (no bias) of the channel concatenation of its inputs (of its
  one input: a plain conv).

  The same function and parameter ('kernel', HWIO over all input channels, with
  nn.Conv's initialiser) as `nn.Conv` on `concatenate(inputs, -1)`, computed as a
  sum of convolutions by kernel slices. Then autodiff differentiates each input
  on its own: when a skip comes from a frozen encoder (DDeP), nothing computes
  its input gradient, which one convolution of the concatenation would
  (47.7 GFLOPs per 512x512 image, see docs/performance.md).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, *inputs: jnp.ndarray) -> jnp.ndarray:
    channels = [x.shape[-1] for x in inputs]
    kernel = self.param(
        'kernel', self.kernel_init, (*self.kernel_size, sum(channels), self.features), jnp.float32
    )
    out, start = None, 0
    for x, c in zip(inputs, channels):
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype),
          kernel[:, :, start : start + c].astype(self.dtype),
          window_strides=(1, 1),
          padding='SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
      out, start = y if out is None else out + y, start + c
    return out


class DecoderBlock(nn.Module):
  """Two 3x3 conv -> norm -> ReLU layers (paper Sec. 3).

  The block's input is `x` and, optionally, an encoder skip of the same
  resolution, concatenated along channels (by `ConcatConv`).
  With a conditioning vector, each norm's output is scaled and shifted by a
  zero-initialised projection of it, so conditioning starts as the identity.
  """

  features: int
  norm: str = 'group'
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skip: Optional[jnp.ndarray] = None, cond: Optional[jnp.ndarray] = None):
    for i in (1, 2):
      inputs = (x, skip) if i == 1 and skip is not None else (x,)
      x = ConcatConv(self.features, dtype=self.dtype, name=f'conv{i}')(*inputs)
      if self.norm == 'group':
        x = resnet.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name=f'norm{i}')(x)
      elif self.norm == 'layer':
        x = nn.LayerNorm(dtype=self.dtype, name=f'norm{i}')(x)
      else:
        raise ValueError(f"decoder norm must be 'group' or 'layer', got {self.norm!r}")
      if cond is not None:
        film = nn.Dense(
            2 * self.features, dtype=self.dtype, kernel_init=nn.initializers.zeros, name=f'film{i}'
        )(cond)
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        x = x * (1 + scale) + shift
      x = nn.relu(x)
    return x


class UNetDecoder(nn.Module):
  """Decoder blocks from the coarsest encoder map up to the input resolution.

  The last `num_upsamplings` blocks first upsample x2; after upsampling, a block
  concatenates the encoder skip of the same resolution if there is one. For the
  TransUNet (features at 1/16, five blocks) this gives: block0 at 1/16, then
  1/8 + `block2`, 1/4 + `block1`, 1/2 + root, and full resolution without skip.
  """

  widths: Sequence[int] = DECODER_WIDTHS_1X
  norm: str = 'group'
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(
      self,
      x,
      skips: Sequence[jnp.ndarray],
      output_hw: tuple[int, int],
      cond: Optional[jnp.ndarray] = None,
  ):
    factor = output_hw[0] // x.shape[1]
    num_up = int(round(math.log2(factor)))
    if 2**num_up != factor or num_up > len(self.widths):
      raise ValueError(
          f'cannot decode a {x.shape[1:3]} map to {output_hw} with '
          f'{len(self.widths)} blocks that upsample x2'
      )
    by_hw = {s.shape[1:3]: s for s in skips}
    block_cls = nn.remat(DecoderBlock) if self.remat else DecoderBlock
    for i, width in enumerate(self.widths):
      skip = None
      if i >= len(self.widths) - num_up:
        x = upsample2x(x)
        skip = by_hw.get(x.shape[1:3])
      x = block_cls(
          width, norm=self.norm, num_groups=self.num_groups, dtype=self.dtype, name=f'block{i}'
      )(x, skip, cond)
    return x
