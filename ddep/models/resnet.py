"""ResNet building blocks of the R50 hybrid encoder, as the original ViT code defines them.

Module names (`conv1`, `gn1`, `conv_proj`, `gn_proj`, `unit{j}`) follow the published
checkpoints so that importing them is a key mapping.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def weight_standardize(w: jnp.ndarray, axis: Sequence[int], eps: float) -> jnp.ndarray:
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


class StdConv(nn.Conv):
  """Weight-standardized convolution (BiT).

  Standardizing inside `param()` keeps the stored kernel raw, which is the
  layout of the published checkpoints. Standardization runs in float32 even
  under a bfloat16 compute dtype, since the kernel is float32 until promoted.
  """

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = weight_standardize(value, axis=(0, 1, 2), eps=1e-5)
    return value


class ResidualUnit(nn.Module):
  """Post-activation bottleneck unit; the stride sits on the 3x3 conv (`conv2`)."""
  features: int
  strides: tuple[int, int] = (1, 1)
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(  # noqa: E731
        f, k, strides=s, use_bias=False, dtype=self.dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(  # noqa: E731
        num_groups=self.num_groups, dtype=self.dtype, name=name, **kw)
    out_features = 4 * self.features

    residual = x
    if x.shape[-1] != out_features or self.strides != (1, 1):
      residual = conv(out_features, (1, 1), self.strides, 'conv_proj')(residual)
      residual = norm('gn_proj')(residual)

    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = conv(out_features, (1, 1), (1, 1), 'conv3')(y)
    # Zero-initialized last norm: each unit starts as the identity (projected).
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units; only the first one strides."""
  block_size: int
  features: int
  first_stride: tuple[int, int]
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    unit_cls = nn.remat(ResidualUnit) if self.remat else ResidualUnit
    for j in range(self.block_size):
      x = unit_cls(self.features, strides=self.first_stride if j == 0 else (1, 1),
                   num_groups=self.num_groups, dtype=self.dtype, name=f'unit{j + 1}')(x)
    return x


def resnet_features(x, *, layers: Sequence[int], width: int, num_groups: int, dtype: Dtype,
                    remat: bool = False):
  """Root block and stages, in the calling module's scope (names `conv_root`, `gn_root`,
  `block{i}`); returns the last stage's map and the earlier maps the decoder may use:
  {'root': 1/2 (before max-pool), 'block1': 1/4, 'block2': 1/8, ...}."""
  root, x = resnet_root(x, width=width, num_groups=num_groups, dtype=dtype)
  skips = {'root': root}
  for i, block_size in enumerate(layers):
    x = ResNetStage(block_size, width * 2**i, first_stride=(1, 1) if i == 0 else (2, 2),
                    num_groups=num_groups, dtype=dtype, remat=remat, name=f'block{i + 1}')(x)
    if i + 1 < len(layers):
      skips[f'block{i + 1}'] = x
  return x, skips


def resnet_root(x, *, width: int, num_groups: int, dtype: Dtype):
  """Root block inside the calling module's scope; returns (1/2 map, 1/4 map).

  Must be called from within a compact method so that `conv_root` and `gn_root`
  land directly under the encoder, as in the checkpoints.
  """
  x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, dtype=dtype, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(num_groups=num_groups, dtype=dtype, name='gn_root')(x))
  pooled = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  return x, pooled
