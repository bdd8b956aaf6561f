"""BiT's ResNet v2 (Kolesnikov et al., 2020): the supervised ResNet-50 of Table 5.

Pre-activation bottlenecks (He et al., 2016): GroupNorm + ReLU come *before* each
weight-standardised conv, the shortcut is projected from the pre-activated input, and
one GroupNorm + ReLU follows the last stage. The post-activation units of
`ddep.models.resnet` (the ViT hybrid's) compute something else with the same weights.

Module names are the published BiT-M-R50x1.npz names without its `resnet/` prefix
(`root_block/standardized_conv2d`, `block1/unit01/a/group_norm`, `.../a/proj/...`,
`group_norm`), so that importing it is a key mapping (`ddep.models.pretrained`).
Padding is BiT's: symmetric (k - 1) / 2 before each VALID conv, and a zero pad of 1
before the root's 3x3 max-pool (not -inf: the root conv's outputs may be negative).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# BiT's TF code: kernel standardised with tf.nn.moments, / sqrt(var + 1e-10).
STD_CONV_EPS = 1e-10
# BiT's GroupNormalization (and timm's GroupNormAct): 32 groups, epsilon 1e-5.
GROUP_NORM_EPS = 1e-5


class StdConv(nn.Conv):
  """Weight-standardised conv as BiT defines it: (w - mean) / sqrt(var + 1e-10) over
  (H, W, in); the stored kernel stays raw (the checkpoints' layout), standardised in
  float32 on every call."""

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = value - jnp.mean(value, axis=(0, 1, 2), keepdims=True)
      value = value * jnp.reciprocal(
          jnp.sqrt(jnp.mean(jnp.square(value), axis=(0, 1, 2), keepdims=True) + STD_CONV_EPS)
      )
    return value


def _std_conv(features: int, kernel: int, strides: int, dtype: Dtype) -> StdConv:
  pad = (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2  # BiT's fixed padding.
  return StdConv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=(pad, pad),
      use_bias=False,
      dtype=dtype,
      name='standardized_conv2d',
  )


def _norm_relu(x, num_groups: int, dtype: Dtype):
  return nn.relu(
      nn.GroupNorm(num_groups=num_groups, epsilon=GROUP_NORM_EPS, dtype=dtype, name='group_norm')(x)
  )


class Proj(nn.Module):
  """`a/proj`: the 1x1 (strided) projection of the shortcut."""

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _std_conv(self.features, 1, self.strides, self.dtype)(x)


class PartA(nn.Module):
  """`a`: norm -> ReLU -> 1x1 conv; the shortcut's projection reads the same
  pre-activated input (BiT's v2 unit). Returns (conv output, projected shortcut or None)."""

  features: int
  out_features: int
  strides: int = 1
  project: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _norm_relu(x, self.num_groups, self.dtype)
    shortcut = None
    if self.project:
      shortcut = Proj(self.out_features, self.strides, self.dtype, name='proj')(y)
    return _std_conv(self.features, 1, 1, self.dtype)(y), shortcut


class Part(nn.Module):
  """`b` (3x3, carries the stride) or `c` (1x1 to 4x width): norm -> ReLU -> conv."""

  features: int
  kernel: int = 1
  strides: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _norm_relu(x, self.num_groups, self.dtype)
    return _std_conv(self.features, self.kernel, self.strides, self.dtype)(y)


class PreActUnit(nn.Module):
  """Bottleneck v2: y = c(b(a(x))) + shortcut, the shortcut x or `a/proj` of a's
  pre-activation when the width or resolution changes. No norm after the sum."""

  features: int
  strides: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = 4 * self.features
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    project = x.shape[-1] != out or self.strides != 1
    y, shortcut = PartA(self.features, out, self.strides, project, name='a', **kw)(x)
    y = Part(self.features, 3, self.strides, name='b', **kw)(y)
    y = Part(out, 1, 1, name='c', **kw)(y)
    return y + (x if shortcut is None else shortcut)


class Stage(nn.Module):
  """`block{i}`: `block_size` units `unit01`, `unit02`, ...; only the first one strides."""

  block_size: int
  features: int
  first_stride: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    unit_cls = nn.remat(PreActUnit) if self.remat else PreActUnit
    for j in range(self.block_size):
      x = unit_cls(
          self.features,
          self.first_stride if j == 0 else 1,
          self.num_groups,
          self.dtype,
          name=f'unit{j + 1:02d}',
      )(x)
    return x


class RootBlock(nn.Module):
  """`root_block`: 7x7/2 conv (no norm in v2), returned before and after BiT's zero-padded
  3x3/2 max-pool: (the 1/2 map, the 1/4 map)."""

  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _std_conv(self.width, 7, 2, self.dtype)(x)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return x, nn.max_pool(padded, (3, 3), strides=(2, 2), padding='VALID')


class ResNetV2(nn.Module):
  """BiT ResNet v2 without its head: stages `block{i}` of units `unit{j:02d}`, then
  `group_norm` + ReLU (timm's `forward_features`).

  Returns (features, skips): the final map (1/32 for 4 stages) and the decoder's maps
  at the strides `r50_unet` gives it: {'root': 1/2, 'block1': 1/4, 'block2': 1/8,
  'block3': 1/16}, each the raw (not normalised) output there, as in v2 the next
  layer normalises it first.
  """

  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout.
    root, x = RootBlock(self.width, self.dtype, name='root_block')(images.astype(self.dtype))
    skips = {'root': root}
    for i, block_size in enumerate(self.layers):
      x = Stage(
          block_size,
          self.width * 2**i,
          1 if i == 0 else 2,
          self.num_groups,
          self.dtype,
          self.remat,
          name=f'block{i + 1}',
      )(x)
      if i + 1 < len(self.layers):
        skips[f'block{i + 1}'] = x
    return _norm_relu(x, self.num_groups, self.dtype), skips
