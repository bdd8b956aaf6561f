"""Analytic FLOP count: closed forms, the train-step rules, and XLA's own count."""

import jax
import jax.numpy as jnp
import pytest

from ddep.models import flops
from ddep.models import TransUNet, create_model
from ddep.training import optimizer


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize('n', [1, 2, 5, 7, 8, 32, 33])
@pytest.mark.parametrize('k,s', [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)])
def test_same_conv_taps_match_brute_force(n, k, s):
  out = -(-n // s)
  lo = max((out - 1) * s + k - n, 0) // 2
  brute = sum(0 <= i * s - lo + j < n for i in range(out) for j in range(k))
  assert flops.same_conv_taps(n, k, s) == (out, brute)


def test_conv_flops_count_valid_taps_like_xla():
  x, w = jnp.zeros((2, 12, 20, 5)), jnp.zeros((3, 3, 5, 7))
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  (oh, th), (ow, tw) = flops.same_conv_taps(12, 3, 2), flops.same_conv_taps(20, 3, 2)
  assert (oh, ow) == (6, 10)
  assert _xla_flops(conv, x, w) == 2 * 2 * th * tw * 5 * 7


@pytest.mark.parametrize('hw', [(4, 4), (3, 6)])
def test_resize_flops_are_xla_einsum_flops(hw):
  x = jnp.zeros((2, *hw, 256))
  up = lambda x: jax.image.resize(x, (2, 2 * hw[0], 2 * hw[1], 256), 'bilinear')  # noqa: E731
  ratio = _xla_flops(up, x) / flops.resize2x_flops(2, hw, 256)
  # The rest is building the small interpolation matrices (unless constant-folded).
  assert 1.0 <= ratio < 1.01


def test_paper_model_at_512_closed_forms():
  ops = flops.model_ops(create_model('r50_vit_b16'), (512, 512), batch=1)
  parts = flops.by_part(ops)
  t, d, m, layers = 32 * 32, 768, 3072, 12
  assert parts['transformer: qkv + out projections']['forward'] == layers * 4 * 2 * t * d * d
  assert parts['transformer: attention']['forward'] == layers * 2 * 2 * t * t * d
  assert parts['transformer: mlp']['forward'] == layers * 2 * 2 * t * d * m
  assert parts['embedding']['forward'] == 2 * t * 1024 * d
  # A 3x3 stride-1 SAME conv sees 3n - 2 taps per axis of length n.
  conv3 = lambda n, cin, cout: 2 * (3 * n - 2) ** 2 * cin * cout  # noqa: E731
  # The x2 upsampling is a 2-tap stencil: elementwise, not counted.
  assert parts['decoder block0']['forward'] == conv3(32, 768, 1024) + conv3(32, 1024, 1024)
  assert parts['decoder block1']['forward'] == (conv3(64, 1024 + 512, 512) + conv3(64, 512, 512))
  assert parts['decoder block4']['forward'] == conv3(512, 128, 64) + conv3(512, 64, 64)
  assert parts['head']['forward'] == 2 * 512 * 512 * 64 * 3
  # Linear in the batch.
  assert flops.forward_flops(flops.model_ops(create_model('r50_vit_b16'), (512, 512), 4)) == (
      4 * flops.forward_flops(ops)
  )


def test_train_step_rules():
  ops = flops.model_ops(create_model('r50_vit_b16'), (256, 256), batch=2)
  fwd = {op.name: op.flops for op in ops}
  total = flops.forward_flops(ops)
  assert not any(n.endswith('/upsample') for n in fwd)  # Elementwise: not counted.
  # DeP: 3x everything, but the root conv has no input gradient (the image).
  assert flops.train_step_flops(ops) == 3 * total - fwd['encoder/conv_root']
  # DDeP: the frozen encoder runs forward only; decoder block0's input is the frozen
  # Transformer's output, so its first conv needs no input gradient either, and
  # neither do the skip channels of the concatenating convs (decoder.ConcatConv).
  enc = flops.encoder_flops(ops)
  dec = total - enc
  skips = sum(fwd[f'decoder/block{i}/conv1 (skip channels)'] for i in (1, 2, 3))
  assert flops.train_step_flops(ops, flops.DDEP_TRAINED) == (
      enc + 3 * dec - fwd['decoder/block0/conv1'] - skips
  )


@pytest.mark.parametrize(
    'preset,hw,kwargs',
    [
        ('tiny', (64, 64), {}),
        ('tiny', (64, 128), dict(noise_conditioning=True)),
        ('tiny_r50_unet', (64, 64), {}),
    ],
)
def test_forward_matches_xla(preset, hw, kwargs):
  model = create_model(preset, **kwargs)
  x = jnp.zeros((2, *hw, 3))
  sigma = (jnp.ones((2,)),) if model.noise_conditioning else ()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], *(s[:1] for s in sigma)))[
      'params'
  ]
  xla = _xla_flops(lambda p, x, *s: model.apply({'params': p}, x, *s), params, x, *sigma)
  analytic = flops.forward_flops(flops.model_ops(model, hw, 2))
  # XLA also counts norms, ReLUs, residual and bias adds and softmax, which the
  # analytic count leaves out: 2.7-3.7% of models this narrow (jax 0.10, CPU).
  assert 1.0 < xla / analytic < 1.05


def test_full_size_encoder_matches_xla():
  """R50+ViT-B/16 encoder at 64x64: compiled only, never run."""
  model = TransUNet()
  x = jnp.zeros((2, 64, 64, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], method=TransUNet.encode))[
      'params'
  ]
  xla = _xla_flops(lambda p, x: model.apply({'params': p}, x, method=TransUNet.encode), params, x)
  analytic = flops.encoder_flops(flops.model_ops(model, (64, 64), 2))
  assert 1.0 < xla / analytic < 1.03


@pytest.mark.parametrize('preset', ['tiny', 'tiny_r50_unet'])
def test_ddep_gradient_matches_xla(preset):
  """DDeP's gradient (encoder frozen) does no backward work in the encoder, not even
  for the skip maps: 6.6-7.3% of these models' step if it did (XLA/analytic ~1.10)."""
  model = create_model(preset)
  x = jnp.zeros((2, 64, 64, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))['params']
  trainable, frozen = optimizer.split_trainable(
      params, optimizer.trainable_mask(params, ('encoder/.*',))
  )

  def loss(trainable, frozen, x):
    return jnp.mean(model.apply({'params': optimizer.merge(trainable, frozen)}, x) ** 2)

  xla = _xla_flops(jax.grad(loss), trainable, frozen, x)
  analytic = flops.train_step_flops(flops.model_ops(model, (64, 64), 2), flops.DDEP_TRAINED)
  # XLA also counts elementwise work (norms, the root pool's 9-slice maximum) that the
  # analytic model leaves out: 4.9-5.1% here. Encoder backward work would add ~10% more.
  assert 1.0 < xla / analytic < 1.07
