"""TransUNet: shapes, parameter counts, options."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep.models import resnet
from ddep.models import TransUNet, create_model
from ddep.models import vit

# R50+ViT-B_16 as a 1000-class classifier without pre-logits has 98,659,112 params
# (vit_jax models_test). The encoder alone drops the head (768*1000 + 1000), the
# class token (768) and the class token's position-embedding row (768).
R50_VIT_B16_CLASSIFIER = 98_659_112
R50_VIT_B16_ENCODER = R50_VIT_B16_CLASSIFIER - (768 * 1000 + 1000) - 768 - 768


def _jit(fn, **static):
  """`fn` compiled: op by op, one tiny TransUNet forward pass takes ~20 s on CPU."""
  return jax.jit(functools.partial(fn, **static))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_encoder_parameter_count():
  model = TransUNet()
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), method=TransUNet.encode)
  )
  assert set(shapes['params']) == {'encoder'}
  assert _count(shapes['params']) == R50_VIT_B16_ENCODER == 97_888_576


def test_full_size_names_follow_the_checkpoint():
  shapes = jax.eval_shape(
      lambda: TransUNet().init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method=TransUNet.encode
      )
  )
  flat = {'/'.join(k) for k in flax.traverse_util.flatten_dict(shapes['params']['encoder'])}
  for key in [
      'conv_root/kernel',
      'gn_root/scale',
      'block1/unit1/conv_proj/kernel',
      'block1/unit1/gn_proj/bias',
      'block3/unit9/conv3/kernel',
      'block3/unit9/gn3/scale',
      'embedding/kernel',
      'embedding/bias',
      'Transformer/posembed_input/pos_embedding',
      'Transformer/encoderblock_11/MultiHeadDotProductAttention_1/query/kernel',
      'Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias',
      'Transformer/encoderblock_0/LayerNorm_2/scale',
      'Transformer/encoder_norm/bias',
  ]:
    assert key in flat, key
  assert 'block1/unit2/conv_proj/kernel' not in flat  # Projection only where shapes change.


@pytest.mark.parametrize('decoder_multiplier,expected_head_in', [(1, 64), (2, 128)])
def test_decoder_widths(decoder_multiplier, expected_head_in):
  model = create_model('r50_vit_b16', decoder_width_multiplier=decoder_multiplier, num_outputs=19)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  dec = shapes['params']['decoder']
  assert [dec[f'block{i}']['conv2']['kernel'].shape[-1] for i in range(5)] == [
      decoder_multiplier * w for w in (1024, 512, 256, 128, 64)
  ]
  # block1 sees the 1/8 skip (block2: 512 ch) next to the upsampled block0 output.
  assert dec['block1']['conv1']['kernel'].shape[2] == decoder_multiplier * 1024 + 512
  assert dec['block3']['conv1']['kernel'].shape[2] == decoder_multiplier * 256 + 64  # root
  assert dec['block4']['conv1']['kernel'].shape[2] == decoder_multiplier * 128  # no skip
  assert shapes['params']['head']['kernel'].shape == (1, 1, expected_head_in, 19)


@pytest.fixture(scope='module')
def tiny():
  model = create_model('tiny', num_outputs=3)
  variables = _jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return model, variables


@pytest.mark.parametrize('hw', [(64, 64), (48, 96), (96, 32)])
def test_output_shapes_square_and_not(tiny, hw):
  model, variables = tiny
  x = jax.random.uniform(jax.random.key(1), (2, *hw, 3), minval=-1, maxval=1)
  y = _jit(model.apply)(variables, x)
  assert y.shape == (2, *hw, 3) and y.dtype == jnp.float32
  feats, skips = _jit(model.apply, method=TransUNet.encode)(variables, x)
  h, w = hw
  assert feats.shape == (2, h // 16, w // 16, 64)
  assert skips['root'].shape[1:3] == (h // 2, w // 2)
  assert skips['block1'].shape[1:3] == (h // 4, w // 4)
  assert skips['block2'].shape[1:3] == (h // 8, w // 8)
  assert np.all(np.isfinite(y))


def test_encoder_output_is_layer_normed(tiny):
  model, variables = tiny
  x = jax.random.normal(jax.random.key(2), (1, 64, 64, 3))
  feats, _ = _jit(model.apply, method=TransUNet.encode)(variables, x)
  # encoder_norm starts at scale 1, bias 0: each token has mean 0, var 1.
  np.testing.assert_allclose(feats.mean(-1), 0, atol=1e-4)
  np.testing.assert_allclose(feats.var(-1), 1, atol=1e-2)


def test_position_embeddings_follow_the_grid(tiny):
  model, variables = tiny
  posemb = variables['params']['encoder']['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 4, 4, 64)
  # A different grid at apply time uses a resized copy: a constant embedding stays
  # constant, so the output equals that of a model initialised at the new size.
  const = jax.tree.map(lambda x: x, variables)
  const['params']['encoder']['Transformer']['posembed_input']['pos_embedding'] = jnp.full(
      (1, 4, 4, 64), 0.3
  )
  big = jax.tree.map(lambda x: x, const)
  big['params']['encoder']['Transformer']['posembed_input']['pos_embedding'] = jnp.full(
      (1, 3, 6, 64), 0.3
  )
  x = jax.random.normal(jax.random.key(3), (1, 48, 96, 3))
  np.testing.assert_allclose(_jit(model.apply)(const, x), _jit(model.apply)(big, x), atol=1e-5)


@pytest.mark.parametrize('hw', [(1, 1), (2, 3), (5, 4)])
def test_upsample2x_equals_bilinear_resize(hw):
  from ddep.models import decoder

  x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
  want = jax.image.resize(x, (2, 2 * hw[0], 2 * hw[1], 3), method='bilinear')
  np.testing.assert_allclose(decoder.upsample2x(x), want, atol=1e-6)


def test_rejects_sizes_not_divisible_by_16(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match='divisible by 16'):
    model.apply(variables, jnp.zeros((1, 40, 64, 3)))


def test_weight_standardization_keeps_raw_kernel_and_is_scale_invariant():
  conv = resnet.StdConv(4, (3, 3), use_bias=False)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  v = conv.init(jax.random.key(1), x)
  raw = v['params']['kernel']
  assert abs(float(raw.std()) - 1.0) > 0.05  # Stored kernel is not standardized.
  scaled = {'params': {'kernel': 3.0 * raw + 0.5}}
  # Equal up to the eps in the std denominator.
  np.testing.assert_allclose(conv.apply(v, x), conv.apply(scaled, x), rtol=1e-3, atol=1e-3)


def test_last_norm_of_each_unit_starts_at_zero(tiny):
  _, variables = tiny
  enc = variables['params']['encoder']
  for stage in ('block1', 'block2', 'block3'):
    np.testing.assert_array_equal(enc[stage]['unit1']['gn3']['scale'], 0.0)
    assert np.all(enc[stage]['unit1']['gn2']['scale'] == 1.0)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model('tiny', num_outputs=3)
  model_bf16 = create_model('tiny', num_outputs=3, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(4), (1, 64, 64, 3), minval=-1, maxval=1)
  v = _jit(model_bf16.init)(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  y16, y32 = _jit(model_bf16.apply)(v, x), _jit(model.apply)(v, x)
  assert y16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y16 - y32))) < 0.1 * float(jnp.max(jnp.abs(y32))) + 0.05
  assert float(jnp.max(jnp.abs(y16 - y32))) > 0  # really computed in bf16


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_gelu_is_dense_then_gelu_with_a_float32_backward(dtype):
  """Same parameters and forward values as nn.Dense + nn.gelu; gradients equal in float32
  and, in bfloat16, nearer the float32 model's gradient than autodiff's bfloat16 one is."""
  dense = nn.Dense(48, dtype=dtype, name='d')
  fused = vit.DenseGelu(48, dtype=dtype, name='d')
  x = jax.random.normal(jax.random.key(0), (2, 5, 16), dtype)
  params = dense.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), params)
  assert jax.tree.structure(params) == jax.tree.structure(fused.init(jax.random.key(1), x))
  reference = lambda p, x: nn.gelu(dense.apply(p, x))  # noqa: E731
  np.testing.assert_array_equal(fused.apply(params, x), reference(params, x))
  w = jax.random.normal(jax.random.key(2), (2, 5, 48))
  grad = lambda f: jax.grad(lambda p, x: jnp.sum(f(p, x).astype(jnp.float32) * w), (0, 1))  # noqa: E731
  ours, autodiff = grad(fused.apply)(params, x), grad(reference)(params, x)
  if dtype == jnp.float32:
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6), ours, autodiff
    )
    return
  dense32 = nn.Dense(48, dtype=jnp.float32)
  exact = grad(lambda p, x: nn.gelu(dense32.apply(p, x)))(params, x.astype(jnp.float32))
  err = lambda g: jax.tree.map(  # noqa: E731
      lambda a, e: float(jnp.mean(jnp.abs(a.astype(jnp.float32) - e))), g, exact
  )
  for ours_err, autodiff_err in zip(jax.tree.leaves(err(ours)), jax.tree.leaves(err(autodiff))):
    assert ours_err < autodiff_err


def test_remat_does_not_change_outputs_or_grads(tiny):
  model, variables = tiny
  remat = create_model('tiny', num_outputs=3, remat=('resnet', 'transformer', 'decoder'))
  x = jax.random.normal(jax.random.key(5), (1, 32, 32, 3))
  loss = lambda m: lambda p: jnp.mean(m.apply({'params': p}, x) ** 2)  # noqa: E731
  # Jitted, as in training (remat is meant for compiled steps); op by op, the remat
  # gradient alone took minutes on CPU.
  g1 = jax.jit(jax.grad(loss(model)))(variables['params'])
  g2 = jax.jit(jax.grad(loss(remat)))(variables['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_noise_conditioning_starts_as_identity_then_depends_on_sigma():
  model = create_model('tiny', num_outputs=3, noise_conditioning=True)
  x = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))
  sig = jnp.array([0.1, 0.8])
  v = _jit(model.init)(jax.random.key(0), x, sig)
  apply = _jit(model.apply)
  y_a = apply(v, x, sig)
  y_b = apply(v, x, sig[::-1])
  np.testing.assert_allclose(y_a, y_b, atol=1e-6)  # FiLM projections start at zero.
  p = flax.core.unfreeze(v['params'])
  film = p['decoder']['block0']['film1']['kernel']
  p['decoder']['block0']['film1']['kernel'] = 0.1 * jax.random.normal(jax.random.key(7), film.shape)
  y_c = apply({'params': p}, x, sig)
  y_d = apply({'params': p}, x, sig[::-1])
  assert float(jnp.max(jnp.abs(y_c - y_d))) > 1e-4
  with pytest.raises(ValueError, match='sigma'):
    model.apply(v, x)


def test_plain_resnet_unet():
  model = create_model('tiny_r50_unet', num_outputs=5)
  x = jnp.zeros((1, 64, 96, 3))
  v = _jit(model.init)(jax.random.key(0), x)
  assert 'Transformer' not in v['params']['encoder']
  assert set(v['params']['encoder']) >= {'conv_root', 'block4'}
  assert _jit(model.apply)(v, x).shape == (1, 64, 96, 5)
  feats, skips = _jit(model.apply, method=TransUNet.encode)(v, x)
  assert feats.shape == (1, 2, 3, 16 * 8 * 4)
  assert set(skips) == {'root', 'block1', 'block2', 'block3'}
  with pytest.raises(ValueError, match='divisible by 32'):
    model.apply(v, jnp.zeros((1, 48, 48, 3)))


def test_classify_head_for_supervised_pretraining():
  model = create_model('tiny', num_outputs=3, num_image_classes=5)
  x = jnp.zeros((2, 32, 32, 3))
  v = _jit(model.init, method=TransUNet.classify)(jax.random.key(0), x)
  assert set(v['params']) == {'encoder', 'classifier'}
  assert _jit(model.apply, method=TransUNet.classify)(v, x).shape == (2, 5)


def test_attention_implementation_per_backend(monkeypatch):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8), jnp.bfloat16) for i in range(3))
  want = jax.nn.dot_product_attention(q, k, v, implementation='xla')
  tried = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    tried.append(implementation)
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  # On a CPU, the default is XLA's attention, without trying cuDNN.
  assert jnp.array_equal(vit.dot_product_attention(q, k, v), want) and tried == ['xla']
  # On a GPU, cuDNN's in bf16; where JAX refuses it (here: no cuDNN), XLA's.
  tried.clear()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert jnp.array_equal(vit.dot_product_attention(q, k, v, 'auto'), want)
  assert tried == ['cudnn', 'xla']
  tried.clear()
  vit.dot_product_attention(*(t.astype(jnp.float32) for t in (q, k, v)))  # XLA only.
  assert tried == ['xla']
  with pytest.raises(ValueError, match='choose from'):
    vit.dot_product_attention(q, k, v, 'flash')


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_convolutions_are_dots_on_cpus_and_convolutions_elsewhere(stride):
  """The 1x1 rewrite is for XLA:CPU only: XLA:GPU's Triton GEMM rewriter aborts on these
  dots (jax 0.10.2, H100), and GPUs and TPUs take the convolution as it is. The choice
  follows the platform lowered for, so a program exported for CUDA here is a GPU's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 1, 4, 6)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  conv = lambda x, w: resnet.conv_general_dilated(x, w, (stride,) * 2, 'SAME', dimension_numbers=dn)  # noqa: E731
  want = jax.lax.conv_general_dilated(x, w, (stride,) * 2, 'SAME', dimension_numbers=dn)
  np.testing.assert_allclose(conv(x, w), want, atol=1e-5)
  train = jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1))  # noqa: E731
  for platform, op, not_op in [('cpu', 'dot_general', 'convolution'), ('cuda', 'convolution', 'dot_general'), ('tpu', 'convolution', 'dot_general')]:  # fmt: skip
    for fn in (conv, train):
      text = jax.export.export(jax.jit(fn), platforms=[platform])(x, w).mlir_module()
      assert f'stablehlo.{op}' in text and f'stablehlo.{not_op}' not in text, (platform, fn)
