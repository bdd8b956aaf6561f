"""ResNet building blocks of the R50 hybrid encoder, as the original ViT code defines them.

Module names (`conv1`, `gn1`, `conv_proj`, `gn_proj`, `unit{j}`) follow the published
checkpoints so that importing them is a key mapping.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _nhwc_hwio(dimension_numbers, ndim: int) -> bool:
  nhwc = jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, ('NHWC', 'HWIO', 'NHWC'))
  return dimension_numbers is None or jax.lax.ConvDimensionNumbers(*dimension_numbers) == nhwc


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
  """`jax.lax.conv_general_dilated`, with 1x1 NHWC convolutions on CPUs as a strided slice
  and a dot.

  The same contraction, but XLA:CPU computes a 1x1 convolution's kernel gradient as a
  convolution over transposed activations (a window of the whole feature map), several
  times slower than the matrix product a dot's gradient is (docs/performance_cpu.md).
  A 1x1 kernel with 'SAME' or 'VALID' padding and stride s reads input pixel s*i for
  output i, hence the slice. Other platforms keep the convolution: cuDNN takes 1x1
  convolutions as they are, and XLA:GPU's Triton GEMM rewriter aborts the process on
  these dots (jax 0.10.2, compiled for an H100: 'Check failed: subdim_size_accumulator
  == dim_size (4096 vs. 128)' in the DeP and DDeP train steps). The choice is by the
  platform lowered for (`lax.platform_dependent`), so a GPU program compiled on a CPU
  host (`ddep.tools.benchmark --target`) is the one a GPU would run.
  """
  pointwise = (
      lhs.ndim == 4
      and rhs.shape[:2] == (1, 1)
      and feature_group_count == 1
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
      and (
          padding in ('SAME', 'VALID')
          or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
      )
      and _nhwc_hwio(dimension_numbers, lhs.ndim)
  )

  def as_convolution(lhs, rhs):
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )

  def as_dot(lhs, rhs):
    sh, sw = window_strides
    x = lhs if (sh, sw) == (1, 1) else lhs[:, ::sh, ::sw, :]
    return jax.lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)

  if not pointwise:
    return as_convolution(lhs, rhs)
  return jax.lax.platform_dependent(lhs, rhs, cpu=as_dot, default=as_convolution)


def weight_standardize(w: jnp.ndarray, axis: Sequence[int], eps: float) -> jnp.ndarray:
  """(w - mean) / (std + eps) over `axis`, the standard deviation taken of the centred w
  directly (`jnp.std` would centre it again: one reduction and its gradient more)."""
  centred = w - jnp.mean(w, axis=axis, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=axis, keepdims=True))
  return centred * (1.0 / (std + eps))


class GroupNorm(nn.Module):
  """`nn.GroupNorm` (same parameters, statistics in float32), applied as one affine map.

  Mean and mean of squares in one pass (as flax's default), then y = x * a + b with
  a = scale / sqrt(var + eps) and b = bias - mean * a per (example, channel): one
  multiply-add per element instead of flax's subtract, multiply and add, and a smaller
  backward (~30% less CPU time for GroupNorm + ReLU, docs/performance_cpu.md).
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'{c} channels are not divisible into {self.num_groups} groups')
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', self.bias_init, (c,), jnp.float32)
    n, g = x.shape[0], self.num_groups
    xf = x.astype(jnp.float32)
    # Sums per (example, channel) first, then per group: the full-size tensor is only
    # reduced over its spatial axes and scaled, never regrouped. Its reshape to
    # (N, HW, G, C/G) was a layout copy in XLA:CPU's backward (~78 ms of the f32 encoder
    # step, docs/performance_cpu.md).
    spatial = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (c // g)
    group_sum = lambda v: jnp.sum(v, axis=spatial).reshape(n, g, c // g).sum(-1)  # noqa: E731
    mean = group_sum(xf) / count
    # Clipped: the one-pass variance can round below zero for near-constant groups.
    var = jnp.maximum(group_sum(jnp.square(xf)) / count - jnp.square(mean), 0.0)
    per_channel = lambda v: jnp.repeat(v, c // g, axis=1)  # noqa: E731  (n, g) -> (n, c)
    a = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale
    b = bias - per_channel(mean) * a
    shape = (n,) + (1,) * len(spatial) + (c,)
    return (xf * a.reshape(shape) + b.reshape(shape)).astype(self.dtype)


class StdConv(nn.Conv):
  """Weight-standardized convolution (BiT).

  Standardizing inside `param()` keeps the stored kernel raw, which is the
  layout of the published checkpoints. Standardization runs in float32 even
  under a bfloat16 compute dtype, since the kernel is float32 until promoted.
  """

  conv_general_dilated: Any = conv_general_dilated

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
        f, k, strides=s, use_bias=False, dtype=self.dtype, name=name
    )
    norm = lambda name, **kw: GroupNorm(  # noqa: E731
        num_groups=self.num_groups, dtype=self.dtype, name=name, **kw
    )
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
      x = unit_cls(
          self.features,
          strides=self.first_stride if j == 0 else (1, 1),
          num_groups=self.num_groups,
          dtype=self.dtype,
          name=f'unit{j + 1}',
      )(x)
    return x


def resnet_features(
    x, *, layers: Sequence[int], width: int, num_groups: int, dtype: Dtype, remat: bool = False
):
  """Root block and stages, in the calling module's scope (names `conv_root`, `gn_root`,
  `block{i}`); returns the last stage's map and the earlier maps the decoder may use:
  {'root': 1/2 (before max-pool), 'block1': 1/4, 'block2': 1/8, ...}."""
  root, x = resnet_root(x, width=width, num_groups=num_groups, dtype=dtype)
  skips = {'root': root}
  for i, block_size in enumerate(layers):
    x = ResNetStage(
        block_size,
        width * 2**i,
        first_stride=(1, 1) if i == 0 else (2, 2),
        num_groups=num_groups,
        dtype=dtype,
        remat=remat,
        name=f'block{i + 1}',
    )(x)
    if i + 1 < len(layers):
      skips[f'block{i + 1}'] = x
  return x, skips


def max_pool_same(x, window: int = 3, stride: int = 2):
  """`nn.max_pool(x, (window,) * 2, (stride,) * 2, 'SAME')` as a maximum of shifted slices.

  Equal outputs. The gradient differs only where maxima tie (`jnp.maximum` splits it,
  `reduce_window` gives it to one): after the root's ReLU that is at zeros, whose
  gradient the ReLU drops anyway. The reason: XLA:CPU's `reduce_window` gradient (an
  argmax over iotas, then a scatter) costs ~5x the slices' (docs/performance_cpu.md).
  """
  pads, sizes = [], []
  for n in x.shape[1:3]:
    out = -(-n // stride)
    total = max((out - 1) * stride + window - n, 0)  # XLA's SAME: the extra pixel after.
    pads.append((total // 2, total - total // 2))
    sizes.append(out)
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  (oh, ow), y = sizes, None
  for i in range(window):
    for j in range(window):
      tap = x[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride, :]
      y = tap if y is None else jnp.maximum(y, tap)
  return y


def resnet_root(x, *, width: int, num_groups: int, dtype: Dtype):
  """Root block inside the calling module's scope; returns (1/2 map, 1/4 map).

  Must be called from within a compact method so that `conv_root` and `gn_root`
  land directly under the encoder, as in the checkpoints.
  """
  x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, dtype=dtype, name='conv_root')(x)
  x = nn.relu(GroupNorm(num_groups=num_groups, dtype=dtype, name='gn_root')(x))
  pooled = max_pool_same(x, 3, 2)
  return x, pooled
