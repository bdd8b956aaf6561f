"""BiT ResNet v2 (`bit_r50` backbone): forward pass against an independent reference that
reads the published BiT-M-R50x1.npz names, both file formats, and the loader's errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from ddep.models import pretrained
from ddep.models import TransUNet, create_model, load_pretrained_encoder

PRESET = 'tiny_bit_r50_unet'  # 1 unit per stage, width 16, 8 groups
LAYERS, WIDTH, GROUPS = (1, 1, 1, 1), 16, 8
IMAGE = (2, 64, 64, 3)


def _flat(tree):
  return {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


@pytest.fixture(scope='module')
def model_and_params():
  model = create_model(PRESET, num_outputs=5)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  return model, jax.device_get(params)


def published_layout(rng, layers=LAYERS, width=WIDTH):
  """Random weights under the names of the published BiT-M-R50x1.npz, written from BiT's
  layout (TF names, HWIO kernels, GroupNorm gamma/beta as (C,)), not from our mapping."""
  w = {'resnet/root_block/standardized_conv2d/kernel': rng.normal(size=(7, 7, 3, width))}

  def norm(prefix, c):
    w[f'{prefix}/group_norm/gamma'] = 1 + 0.2 * rng.normal(size=c)
    w[f'{prefix}/group_norm/beta'] = 0.2 * rng.normal(size=c)

  cin = width
  for i, n in enumerate(layers):
    mid = width * 2**i
    for j in range(n):
      p = f'resnet/block{i + 1}/unit{j + 1:02d}'
      norm(f'{p}/a', cin)
      w[f'{p}/a/standardized_conv2d/kernel'] = rng.normal(size=(1, 1, cin, mid))
      if j == 0:
        w[f'{p}/a/proj/standardized_conv2d/kernel'] = rng.normal(size=(1, 1, cin, 4 * mid))
      norm(f'{p}/b', mid)
      w[f'{p}/b/standardized_conv2d/kernel'] = rng.normal(size=(3, 3, mid, mid))
      norm(f'{p}/c', mid)
      w[f'{p}/c/standardized_conv2d/kernel'] = rng.normal(size=(1, 1, mid, 4 * mid))
      cin = 4 * mid
  norm('resnet', cin)
  w['resnet/head/conv2d/kernel'] = rng.normal(size=(1, 1, cin, 10))  # the classifier
  w['resnet/head/conv2d/bias'] = rng.normal(size=10)
  return {k: v.astype(np.float32) for k, v in w.items()}


def reference_features(w, x, layers=LAYERS, groups=GROUPS):
  """ResNet v2 as BiT's papers and code describe it, from the npz names directly."""
  hi = jax.lax.Precision.HIGHEST

  def conv(x, kernel, stride, pad):
    k = w[kernel]
    k = k - k.mean(axis=(0, 1, 2), keepdims=True)
    k = k / jnp.sqrt(jnp.mean(k * k, axis=(0, 1, 2), keepdims=True) + 1e-10)
    return jax.lax.conv_general_dilated(
        x,
        k,
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=hi,
    )

  def norm_relu(x, prefix):
    n, h, wd, c = x.shape
    g = x.reshape(n, h, wd, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    g = ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
    return jax.nn.relu(g * w[f'{prefix}/group_norm/gamma'] + w[f'{prefix}/group_norm/beta'])

  x = conv(x, 'resnet/root_block/standardized_conv2d/kernel', 2, 3)
  skips = {'root': x}
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, then a VALID 3x3/2 max-pool
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'VALID')
  for i, n in enumerate(layers):
    for j in range(n):
      p = f'resnet/block{i + 1}/unit{j + 1:02d}'
      stride = 2 if i > 0 and j == 0 else 1
      pre = norm_relu(x, f'{p}/a')
      proj = f'{p}/a/proj/standardized_conv2d/kernel'
      shortcut = conv(pre, proj, stride, 0) if proj in w else x
      y = conv(pre, f'{p}/a/standardized_conv2d/kernel', 1, 0)
      y = conv(norm_relu(y, f'{p}/b'), f'{p}/b/standardized_conv2d/kernel', stride, 1)
      y = conv(norm_relu(y, f'{p}/c'), f'{p}/c/standardized_conv2d/kernel', 1, 0)
      x = y + shortcut
    if i + 1 < len(layers):
      skips[f'block{i + 1}'] = x
  return norm_relu(x, 'resnet'), skips


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_encoder_matches_an_independent_resnet_v2_on_the_published_names(
    model_and_params, tmp_path
):
  model, params = model_and_params
  weights = published_layout(np.random.default_rng(0))
  path = str(tmp_path / 'BiT-M-R50x1.npz')
  np.savez(path, **weights)
  loaded = load_pretrained_encoder(params, path)
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, IMAGE), jnp.float32)

  features, skips = jax.jit(lambda p, x: model.apply({'params': p}, x, method=TransUNet.encode))(
      loaded, images
  )
  ref_features, ref_skips = jax.jit(reference_features)(
      {k: jnp.asarray(v) for k, v in weights.items()}, images
  )
  # The 1/32 map after the final GroupNorm + ReLU, and the skips at 1/2, 1/4, 1/8, 1/16.
  assert features.shape == (2, 2, 2, 4 * 8 * WIDTH)
  assert _rel(features, ref_features) < 2e-3
  # (jit returns dicts sorted by key; the model's own order is root, block1, ...)
  assert {k: s.shape[1] for k, s in skips.items()} == {
      'root': 32,
      'block1': 16,
      'block2': 8,
      'block3': 4,
  }
  for name, want in ref_skips.items():
    assert _rel(skips[name], want) < 2e-3, name
  # The decoder takes them as it takes r50_unet's: the whole UNet runs at full size.
  out = jax.jit(lambda p, x: model.apply({'params': p}, x))(loaded, images)
  assert out.shape == (2, 64, 64, 5) and np.all(np.isfinite(out))


def test_round_trip_of_both_file_formats(model_and_params, tmp_path):
  model, params = model_and_params
  source = jax.device_get(jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 64, 64, 3))))
  encoder = source['params']['encoder']
  npz = pretrained.encoder_to_bit_checkpoint(encoder, fmt='npz')
  timm = pretrained.encoder_to_bit_checkpoint(encoder, fmt='timm')
  # The published names of each format (BiT's npz; timm's resnetv2_50x1_bit).
  assert {
      'resnet/root_block/standardized_conv2d/kernel',
      'resnet/block1/unit01/a/standardized_conv2d/kernel',
      'resnet/block1/unit01/a/group_norm/gamma',
      'resnet/block2/unit01/a/proj/' 'standardized_conv2d/kernel',
      'resnet/group_norm/beta',
  } <= set(npz)
  assert {
      'stem.conv.weight',
      'stages.0.blocks.0.norm1.weight',
      'stages.0.blocks.0.conv2.weight',
      'stages.1.blocks.0.downsample.conv.weight',
      'norm.bias',
  } <= set(timm)
  assert timm['stages.0.blocks.0.conv2.weight'].shape == (WIDTH, WIDTH, 3, 3)  # OIHW
  np.savez(tmp_path / 'bit.npz', **npz)
  st_numpy.save_file(
      dict(timm, **{'head.fc.weight': np.zeros((3, 4 * 8 * WIDTH, 1, 1), np.float32)}),
      str(tmp_path / 'bit.safetensors'),
  )
  want = _flat(encoder)
  for name in ('bit.npz', 'bit.safetensors'):
    got = _flat(load_pretrained_encoder(params, str(tmp_path / name))['encoder'])
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{name}: {k}')


def test_wrong_files_fail_with_every_mismatch_in_one_error(model_and_params, tmp_path):
  _, params = model_and_params
  weights = published_layout(np.random.default_rng(2))
  del weights['resnet/block3/unit01/b/group_norm/beta']
  weights['resnet/block2/unit01/c/standardized_conv2d/kernel'] = np.zeros((1, 1, 32, 7), np.float32)
  weights['resnet/block5/unit01/a/group_norm/gamma'] = np.ones(4, np.float32)
  np.savez(tmp_path / 'broken.npz', **weights)
  with pytest.raises(pretrained.CheckpointError) as e:
    load_pretrained_encoder(params, str(tmp_path / 'broken.npz'))
  message = str(e.value)
  assert 'missing from checkpoint (1)' in message and 'block3/unit01/b/group_norm/bias' in message
  assert 'unexpected in checkpoint (1)' in message and 'block5/unit01' in message
  assert 'wrong shape (1)' in message and 'block2/unit01/c/standardized_conv2d/kernel' in message

  # An R50+ViT checkpoint for the BiT model, and BiT weights for the post-activation r50_unet.
  hybrid = create_model('tiny', num_outputs=3)
  vit_params = jax.device_get(jax.jit(hybrid.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  np.savez(
      tmp_path / 'vit.npz', **pretrained.encoder_to_vit_layout(vit_params['params']['encoder'])
  )
  with pytest.raises(
      pretrained.CheckpointError,
      match=r'is a R50\+ViT-B/16 hybrid .* the '
      r"model's is a BiT ResNet v2 \(preset 'bit_r50_unet'\)",
  ):
    load_pretrained_encoder(params, str(tmp_path / 'vit.npz'))
  r50 = create_model('tiny_r50_unet', num_outputs=3)
  r50_params = jax.device_get(jax.jit(r50.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  np.savez(tmp_path / 'bit.npz', **published_layout(np.random.default_rng(3)))
  with pytest.raises(pretrained.CheckpointError, match=r'is a BiT ResNet v2 .*post-activation'):
    load_pretrained_encoder(r50_params['params'], str(tmp_path / 'bit.npz'))

  # Keys that belong to neither layout are named, in both formats.
  np.savez(tmp_path / 'mixed.npz', **{'resnet/group_norm/gamma': np.ones(4), 'cls': np.ones(1)})
  with pytest.raises(pretrained.CheckpointError, match=r"keys outside 'resnet/'.*'cls'"):
    load_pretrained_encoder(params, str(tmp_path / 'mixed.npz'))
  st_numpy.save_file(
      {
          'stem.conv.weight': np.ones((2, 3, 7, 7), np.float32),
          'stages.0.blocks.0.se.fc.weight': np.ones(2, np.float32),
      },
      str(tmp_path / 'odd.safetensors'),
  )
  with pytest.raises(pretrained.CheckpointError, match=r'timm BiT ResNet v2.*se\.fc\.weight'):
    load_pretrained_encoder(params, str(tmp_path / 'odd.safetensors'))
