"""The Transformer of the hybrid ViT encoder (pre-LayerNorm, no class token).

Submodule names are those of the published `R50+ViT-B_16.npz` (pre-Linen
numbering: `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`), so the checkpoint loads by key, without renaming.
"""

import math
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def resize_posemb(posemb: jnp.ndarray, grid_hw: tuple[int, int]) -> jnp.ndarray:
  """Bilinearly resizes a (1, h, w, D) position-embedding grid to `grid_hw`.

  Half-pixel-centred bilinear (as `tf.image.resize`), with no antialiasing so
  that downsizing stays an interpolation of the learned values.
  """
  if posemb.shape[1:3] == tuple(grid_hw):
    return posemb
  shape = (posemb.shape[0], *grid_hw, posemb.shape[-1])
  return jax.image.resize(posemb, shape, method='bilinear', antialias=False)


class AddPositionEmbs(nn.Module):
  """Learned position embeddings on a 2-D grid.

  Stored as (1, h, w, D) rather than the checkpoint's (1, h*w, D) so that a
  non-square grid is unambiguous; inputs of another grid size get a resized copy.
  """

  posemb_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x):
    _, h, w, d = x.shape
    if self.is_initializing() or not self.has_variable('params', 'pos_embedding'):
      posemb = self.param('pos_embedding', self.posemb_init, (1, h, w, d))
    else:
      # Read without flax's shape check: the stored grid may differ from this input's.
      posemb = self.get_variable('params', 'pos_embedding')
    return x + resize_posemb(posemb, (h, w)).astype(x.dtype)


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """`jax.lax.dot_general` with `nn.DenseGeneral`'s contraction as one matrix product.

  DenseGeneral contracts the trailing axes of its input with the leading axes of a
  kernel of shape (*in, *out), e.g. attention's (768, 12, 64) query kernel. Flattened to
  (prod(in), prod(out)) it is the product `nn.Dense` computes, with the same result;
  given the 3-D kernels, XLA:CPU copied each into another layout every step (~80 ms of
  the f32 encoder step, docs/performance_cpu.md). Anything else goes to lax.dot_general.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  trailing = tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
  if lhs_batch or rhs_batch or not trailing or tuple(rhs_contract) != tuple(range(n)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
  k = math.prod(rhs.shape[:n])
  out = rhs.shape[n:]
  y = jax.lax.dot_general(
      lhs.reshape(*lhs.shape[: lhs.ndim - n], k),
      rhs.reshape(k, math.prod(out)),
      (((lhs.ndim - n,), (0,)), ((), ())),
      precision=precision,
      **kwargs,
  )
  return y.reshape(*lhs.shape[: lhs.ndim - n], *out)


ATTENTION_IMPLS = ('', 'auto', 'xla', 'cudnn')


def dot_product_attention(q, k, v, implementation: Optional[str] = None) -> jnp.ndarray:
  """`jax.nn.dot_product_attention`, its implementation chosen per backend.

  None, '' or 'auto': cuDNN's fused flash attention on GPUs for bf16/fp16 inputs
  when JAX accepts them there (cuDNN present, supported head dim), else XLA's. JAX's
  own default (None) is XLA everywhere, which on GPUs materialises the T x T scores
  of every head. 'xla' or 'cudnn' force one.
  """
  if implementation is not None and implementation not in ATTENTION_IMPLS:
    raise ValueError(
        f'attention implementation {implementation!r}: choose from ' f'{ATTENTION_IMPLS[1:]}'
    )
  if implementation in (None, '', 'auto'):
    if jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
      try:
        # JAX checks the cuDNN version, layout and shapes while tracing, so an
        # unsupported case raises here, before anything is built.
        return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
      except (NotImplementedError, ValueError, RuntimeError) as e:
        logging.warning('cuDNN attention unavailable (%s); using XLA attention', e)
    implementation = 'xla'
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the checkpoint's query/key/value/out parameter layout.

  `implementation`: see `dot_product_attention` (None = per backend).
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden_size {d} is not divisible by num_heads {self.num_heads}')
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, d // self.num_heads),
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        dot_general=matmul_dot_general,
        name=name,
    )
    q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)
    y = dot_product_attention(q, k, v, self.implementation)
    return nn.DenseGeneral(
        d,
        axis=(-2, -1),
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        dot_general=matmul_dot_general,
        name='out',
    )(y)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def bias_gelu(h: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """`nn.gelu(h + bias)` (tanh approximation) that keeps only h for its backward.

  Autodiff of the bias add and GELU keeps h + bias (and XLA:GPU a second
  intermediate) beside h, the matmul's output: for ViT-B/16 at 512x512 and batch
  16, two more (16, 1024, 3072) tensors per block written in the forward and read in
  the backward. Here the backward recomputes the derivative from h (in float32), so
  the forward writes only the activation: 100 MB less per block written and read
  (docs/performance.md), and as much less memory kept for the backward.
  """
  return nn.gelu(h + bias)


def _bias_gelu_fwd(h, bias):
  return bias_gelu(h, bias), (h, bias)


def _bias_gelu_bwd(saved, g):
  h, bias = saved
  u = h.astype(jnp.float32) + bias.astype(jnp.float32)
  # gelu(u) = u / 2 * (1 + tanh(k * (u + c * u^3))), k = sqrt(2 / pi), c = 0.044715.
  t = jnp.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u * u * u))
  slope = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * u * u)
  dh = (g.astype(jnp.float32) * slope).astype(h.dtype)
  # The bias gradient sums the rounded dh, which the weight gradients also read. Without
  # the barrier XLA folds the rounding away and writes a float32 dh for the sum, twice
  # the bytes of the bfloat16 one it writes anyway.
  dh = jax.lax.optimization_barrier(dh)
  d_bias = jnp.sum(dh.astype(jnp.float32), axis=tuple(range(dh.ndim - 1)))
  return dh, d_bias.astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


class DenseGelu(nn.Module):
  """`nn.gelu(nn.Dense(features)(x))`, with the same parameters ('kernel', 'bias'), the
  same forward values, and the bias add and GELU differentiated by `bias_gelu`."""

  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    h = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return bias_gelu(h, bias)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    inits = dict(
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6),
    )
    y = DenseGelu(self.mlp_dim, dtype=self.dtype, name='Dense_0', **inits)(x)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name='Dense_1', **inits)(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm Transformer block."""

  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  deterministic: bool = True
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        self.num_heads,
        dtype=self.dtype,
        implementation=self.attention_impl,
        name='MultiHeadDotProductAttention_1',
    )(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(
        self.mlp_dim,
        dtype=self.dtype,
        dropout_rate=self.dropout_rate,
        deterministic=self.deterministic,
        name='MlpBlock_3',
    )(y)
    return x + y


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final `encoder_norm`.

  Takes and returns the token grid (N, h, w, D); flattening happens inside.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_impl: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    n, h, w, d = x.shape
    x = AddPositionEmbs(name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = x.reshape(n, h * w, d)
    block_cls = nn.remat(Encoder1DBlock) if self.remat else Encoder1DBlock
    for i in range(self.num_layers):
      x = block_cls(
          self.mlp_dim,
          self.num_heads,
          dtype=self.dtype,
          dropout_rate=self.dropout_rate,
          deterministic=not train,
          attention_impl=self.attention_impl,
          name=f'encoderblock_{i}',
      )(x)
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
    return x.reshape(n, h, w, d)
