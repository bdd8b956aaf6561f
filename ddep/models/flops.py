"""Analytic FLOP count of the TransUNet: forward pass and train step, part by part.

Pure Python (no JAX), so it runs anywhere and checks XLA's own count
(`compiled.cost_analysis()['flops']`), which `ddep.tools.benchmark` compares it with.

Conventions (those of XLA's HloCostAnalysis, so the two can be compared):
  * a multiply-add is 2 FLOPs; convolutions count only the taps that fall inside
    the (SAME-padded) input, as XLA does; at 512x512 this is < 1% below the
    nominal out_pixels * k*k * c_in * c_out;
  * norms, activations, softmax, residual and bias adds, max pooling, weight
    standardization, the loss and the optimizer are not counted: they are
    elementwise or per-parameter work, a few percent of XLA's total (see
    docs/performance.md), and bound by memory bandwidth rather than FLOPs;
  * bilinear x2 upsampling is not counted either: the decoder uses a 2-tap stencil
    (`ddep.models.decoder.upsample2x`), elementwise work. `resize2x_flops` gives
    what `jax.image.resize` would cost instead (two dense contractions, ~10% of the
    decoder's work at full resolution), which is why the model does not use it.

Train step (backward of y = f(x, W) costs one forward for dW and one for dx):
  * a layer's weight gradient is computed iff its module is trained;
  * its input gradient iff a trained parameter lies upstream of its input
    (none for the image, so the root conv costs 2x forward, not 3x);
  * so DeP costs ~3x forward, and DDeP's frozen encoder (Sec. 3.1) costs 1x forward:
    no backward pass at all, not even into its skip maps (the decoder convolves
    concat([upsampled, skip]) as two convolutions, see `decoder.ConcatConv`).
"""

import dataclasses
from typing import Iterable, Sequence

# Where each activation's gradient could come from: the top-level parameter scopes
# upstream of it. 'image' and 'sigma' are inputs, never differentiated.
_UPSTREAM = {
    'image': (),
    'sigma': (),
    'encoder': ('encoder',),
    'noise_embedding': ('noise_embedding',),
    'decoder': ('encoder', 'decoder', 'noise_embedding'),
}
ALL_MODULES = ('encoder', 'decoder', 'head', 'noise_embedding')
# DDeP trains everything but the encoder (configs freeze 'encoder/.*').
DDEP_TRAINED = ('decoder', 'head', 'noise_embedding')
NOISE_EMBEDDING_FEATURES = 256  # decoder.NoiseEmbedding.features


@dataclasses.dataclass(frozen=True)
class Op:
  """One contraction of the network (conv, dense, attention matmul, resize).

  `part` is the row of the summary table; `module` the top-level parameter scope
  whose freezing removes its weight gradient (None: no parameters); `inputs` the
  source of each differentiable activation operand (2 for attention matmuls).
  """

  name: str
  part: str
  flops: int
  module: str | None
  inputs: tuple[str, ...]

  def backward_flops(self, trained: Iterable[str]) -> int:
    trained = set(trained)
    grads = int(self.module is not None and self.module in trained)
    grads += sum(any(m in trained for m in _UPSTREAM[src]) for src in self.inputs)
    return grads * self.flops


def same_conv_taps(n: int, k: int, s: int) -> tuple[int, int]:
  """(output size, kernel taps inside the input summed over outputs) along one axis
  of a 'SAME' convolution, with XLA's padding (the extra pixel goes after)."""
  out = -(-n // s)
  lo = max((out - 1) * s + k - n, 0) // 2
  taps = sum(max(0, min(k, n + lo - i * s) - max(0, lo - i * s)) for i in range(out))
  return out, taps


def _conv(name, part, module, src, hw, cin, cout, k, s, batch):
  (oh, th), (ow, tw) = same_conv_taps(hw[0], k, s), same_conv_taps(hw[1], k, s)
  return Op(name, part, 2 * batch * th * tw * cin * cout, module, (src,)), (oh, ow)


def resize2x_flops(batch: int, hw: tuple[int, int], channels: int) -> int:
  """`jax.image.resize` x2 as the einsum it is: x (h, w) with dense (2h x h) and
  (2w x w) interpolation matrices, in the cheaper of the two orders."""
  h, w = hw
  h_first = 2 * h * h * w + 2 * h * 2 * w * w
  w_first = h * 2 * w * w + 2 * h * 2 * w * h
  return 2 * batch * channels * min(h_first, w_first)


def transunet_ops(
    image_hw: Sequence[int],
    batch: int = 1,
    *,
    backbone: str = 'r50_vit',
    resnet_layers: Sequence[int] = (3, 4, 9),
    resnet_width: int = 64,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    decoder_widths: Sequence[int] = (1024, 512, 256, 128, 64),
    num_outputs: int = 3,
    noise_conditioning: bool = False,
) -> list[Op]:
  """Every contraction of one forward pass, in execution order (mirrors ddep.models)."""
  del num_heads  # Attention FLOPs depend on hidden_size only: heads x head_dim = D.
  ops = []
  hw = tuple(image_hw)

  # ResNet root: 7x7/2 conv (then GroupNorm, ReLU and a 3x3/2 max pool, uncounted).
  op, hw = _conv(
      'encoder/conv_root', 'resnet stem', 'encoder', 'image', hw, 3, resnet_width, 7, 2, batch
  )
  ops.append(op)
  skips = {hw: resnet_width}  # 'root'
  hw = tuple(-(-n // 2) for n in hw)  # max pool, SAME, stride 2
  c = resnet_width
  for i, units in enumerate(resnet_layers):
    feat, part = resnet_width * 2**i, f'resnet stage {i + 1}'
    for j in range(units):
      s = 2 if (i > 0 and j == 0) else 1
      pre = f'encoder/block{i + 1}/unit{j + 1}'
      if c != 4 * feat or s != 1:
        ops.append(
            _conv(f'{pre}/conv_proj', part, 'encoder', 'encoder', hw, c, 4 * feat, 1, s, batch)[0]
        )
      ops.append(_conv(f'{pre}/conv1', part, 'encoder', 'encoder', hw, c, feat, 1, 1, batch)[0])
      op, out_hw = _conv(f'{pre}/conv2', part, 'encoder', 'encoder', hw, feat, feat, 3, s, batch)
      ops.append(op)
      ops.append(
          _conv(f'{pre}/conv3', part, 'encoder', 'encoder', out_hw, feat, 4 * feat, 1, 1, batch)[0]
      )
      hw, c = out_hw, 4 * feat
    if i + 1 < len(resnet_layers):
      skips[hw] = c

  if backbone == 'r50_vit':
    # 1x1 "patch" embedding of the 1/16 map, then the pre-LN Transformer.
    ops.append(
        _conv(
            'encoder/embedding', 'embedding', 'encoder', 'encoder', hw, c, hidden_size, 1, 1, batch
        )[0]
    )
    t, d = hw[0] * hw[1], hidden_size
    for layer in range(num_layers):
      pre = f'encoder/Transformer/encoderblock_{layer}'
      for proj in ('query', 'key', 'value', 'out'):
        ops.append(
            Op(
                f'{pre}/{proj}',
                'transformer: qkv + out projections',
                2 * batch * t * d * d,
                'encoder',
                ('encoder',),
            )
        )
      # Q K^T and the weighted sum of V: 2 T^2 D each, summed over heads.
      for what in ('scores', 'weighted_sum'):
        ops.append(
            Op(
                f'{pre}/attention_{what}',
                'transformer: attention',
                2 * batch * t * t * d,
                None,
                ('encoder', 'encoder'),
            )
        )
      ops.append(
          Op(
              f'{pre}/MlpBlock_3/Dense_0',
              'transformer: mlp',
              2 * batch * t * d * mlp_dim,
              'encoder',
              ('encoder',),
          )
      )
      ops.append(
          Op(
              f'{pre}/MlpBlock_3/Dense_1',
              'transformer: mlp',
              2 * batch * t * mlp_dim * d,
              'encoder',
              ('encoder',),
          )
      )
    c = hidden_size
  elif backbone != 'r50':
    raise ValueError(f'unknown backbone {backbone!r}')

  if noise_conditioning:
    e = NOISE_EMBEDDING_FEATURES
    for name in ('dense1', 'dense2'):
      ops.append(
          Op(
              f'noise_embedding/{name}',
              'noise embedding',
              2 * batch * e * e,
              'noise_embedding',
              ('sigma' if name == 'dense1' else 'noise_embedding',),
          )
      )

  # UNet decoder: the last log2(image / map) blocks upsample x2 first.
  num_up = (image_hw[0] // hw[0]).bit_length() - 1
  src = 'encoder'
  for i, width in enumerate(decoder_widths):
    part, pre = f'decoder block{i}', f'decoder/block{i}'
    skip_c = 0
    if i >= len(decoder_widths) - num_up:
      hw = (2 * hw[0], 2 * hw[1])  # 2-tap bilinear stencil: elementwise, not counted.
      skip_c = skips.get(hw, 0)
    # conv1 of concat([x, skip]) is computed as two convolutions by kernel slices
    # (decoder.ConcatConv), so the skip's input gradient follows the encoder alone.
    ops.append(_conv(f'{pre}/conv1', part, 'decoder', src, hw, c, width, 3, 1, batch)[0])
    if skip_c:
      ops.append(
          _conv(
              f'{pre}/conv1 (skip channels)',
              part,
              'decoder',
              'encoder',
              hw,
              skip_c,
              width,
              3,
              1,
              batch,
          )[0]
      )
    ops.append(_conv(f'{pre}/conv2', part, 'decoder', 'decoder', hw, width, width, 3, 1, batch)[0])
    if noise_conditioning:
      for n in (1, 2):
        ops.append(
            Op(
                f'{pre}/film{n}',
                part,
                2 * batch * NOISE_EMBEDDING_FEATURES * 2 * width,
                'decoder',
                ('noise_embedding',),
            )
        )
    c, src = width, 'decoder'

  ops.append(_conv('head', 'head', 'head', 'decoder', hw, c, num_outputs, 1, 1, batch)[0])
  return ops


def model_ops(model, image_hw: Sequence[int], batch: int = 1) -> list[Op]:
  """`transunet_ops` for a (flax, unbound) `ddep.models.TransUNet`'s fields."""
  return transunet_ops(
      image_hw,
      batch,
      backbone=model.backbone,
      resnet_layers=tuple(model.resnet_layers),
      resnet_width=model.resnet_width,
      hidden_size=model.hidden_size,
      num_layers=model.num_layers,
      num_heads=model.num_heads,
      mlp_dim=model.mlp_dim,
      decoder_widths=tuple(model.decoder_widths),
      num_outputs=model.num_outputs,
      noise_conditioning=model.noise_conditioning,
  )


def forward_flops(ops: Sequence[Op]) -> int:
  return sum(op.flops for op in ops)


def train_step_flops(ops: Sequence[Op], trained: Iterable[str] = ALL_MODULES) -> int:
  """Forward of everything (frozen parts too) plus the backward of what needs it."""
  trained = tuple(trained)
  return sum(op.flops + op.backward_flops(trained) for op in ops)


def encoder_flops(ops: Sequence[Op]) -> int:
  return sum(op.flops for op in ops if op.name.startswith('encoder/'))


def by_part(ops: Sequence[Op], trained: Iterable[str] = ALL_MODULES) -> dict[str, dict[str, int]]:
  """{part: {'forward', 'train'}} in execution order."""
  trained = tuple(trained)
  out: dict[str, dict[str, int]] = {}
  for op in ops:
    row = out.setdefault(op.part, {'forward': 0, 'train': 0})
    row['forward'] += op.flops
    row['train'] += op.flops + op.backward_flops(trained)
  return out


def format_table(ops: Sequence[Op], *, per: str = 'image') -> str:
  """Markdown table in GFLOPs: forward, DeP train step, DDeP train step, per part."""
  dep, ddep = by_part(ops, ALL_MODULES), by_part(ops, DDEP_TRAINED)
  total_fwd = forward_flops(ops)
  # Small models (tests, CPU runs) need more decimals to show anything.
  g = (lambda v: f'{v / 1e9:,.1f}') if total_fwd >= 1e10 else (lambda v: f'{v / 1e9:.4f}')
  lines = [
      f'| part | forward GFLOPs/{per} | share | DeP step | DDeP step |',
      '|---|---:|---:|---:|---:|',
  ]
  for part, row in dep.items():
    lines.append(
        f'| {part} | {g(row["forward"])} | {row["forward"] / total_fwd:.1%} | '
        f'{g(row["train"])} | {g(ddep[part]["train"])} |'
    )
  lines.append(
      f'| **total** | **{g(total_fwd)}** | 100% | **{g(train_step_flops(ops))}** | '
      f'**{g(train_step_flops(ops, DDEP_TRAINED))}** |'
  )
  return '\n'.join(lines)
