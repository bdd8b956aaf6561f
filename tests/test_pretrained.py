"""Pretrained-encoder import: both published layouts, resizing, and clear errors."""

import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
import tensorflow as tf

from ddep.models import pretrained
from ddep.models import TransUNet, create_model, load_pretrained_encoder
import tiny_runs


def _flat(tree):
  return {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


@pytest.fixture(scope='module')
def source():
  """A 'published' encoder: a tiny model with random (non-init) weights at a 4x4 grid."""
  model = create_model('tiny', num_outputs=3)
  params = tiny_runs.init_params(model, (1, 64, 64, 3))
  return tiny_runs.normal_like(params, 42)['encoder']


def _published_npz(encoder, path, *, linen_names=False):
  """The original ViT npz: pre-Linen names, (1,1,1,C) GroupNorm, class token row, heads."""
  flat = pretrained.encoder_to_vit_layout(encoder)
  d = flat['embedding/bias'].shape[0]
  flat['Transformer/posembed_input/pos_embedding'][:, 0] = 7.0  # The class-token row.
  flat['cls'] = np.ones((1, 1, d), np.float32)
  flat['head/kernel'] = np.zeros((d, 1000), np.float32)
  flat['head/bias'] = np.zeros((1000,), np.float32)
  flat['pre_logits/kernel'] = np.zeros((d, d), np.float32)
  if linen_names:
    ren = {
        'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
        'LayerNorm_2': 'LayerNorm_1',
        'MlpBlock_3': 'MlpBlock_0',
    }
    flat = {'/'.join(ren.get(p, p) for p in k.split('/')): v for k, v in flat.items()}
  np.savez(path, **flat)
  return flat


def _timm_safetensors(encoder, path):
  """The same weights under timm's names and PyTorch layouts, written independently of
  the loader's own mapping."""
  f = _flat(encoder)
  out = {}
  conv = lambda w: np.ascontiguousarray(w.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  out['patch_embed.backbone.stem.conv.weight'] = conv(f['conv_root/kernel'])
  out['patch_embed.backbone.stem.norm.weight'] = f['gn_root/scale']
  out['patch_embed.backbone.stem.norm.bias'] = f['gn_root/bias']
  for key, w in f.items():
    parts = key.split('/')
    if parts[0].startswith('block') and parts[0] != 'block':
      s, u = int(parts[0][5:]) - 1, int(parts[1][4:]) - 1
      pre = f'patch_embed.backbone.stages.{s}.blocks.{u}.'
      layer, leaf = parts[2], parts[3]
      if layer == 'conv_proj':
        out[pre + 'downsample.conv.weight'] = conv(w)
      elif layer == 'gn_proj':
        out[pre + 'downsample.norm.' + ('weight' if leaf == 'scale' else 'bias')] = w
      elif layer.startswith('conv'):
        out[pre + layer + '.weight'] = conv(w)
      else:
        out[pre + 'norm' + layer[2:] + '.' + ('weight' if leaf == 'scale' else 'bias')] = w
  out['patch_embed.proj.weight'] = conv(f['embedding/kernel'])
  out['patch_embed.proj.bias'] = f['embedding/bias']
  pos = f['Transformer/posembed_input/pos_embedding']
  d = pos.shape[-1]
  out['pos_embed'] = np.concatenate(
      [np.full((1, 1, d), 7.0, np.float32), pos.reshape(1, -1, d)], axis=1
  )
  out['cls_token'] = np.ones((1, 1, d), np.float32)
  out['norm.weight'] = f['Transformer/encoder_norm/scale']
  out['norm.bias'] = f['Transformer/encoder_norm/bias']
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in f:
    b = f'Transformer/encoderblock_{i}/'
    a = b + 'MultiHeadDotProductAttention_1/'
    t = f'blocks.{i}.'
    out[t + 'norm1.weight'], out[t + 'norm1.bias'] = (
        f[b + 'LayerNorm_0/scale'],
        f[b + 'LayerNorm_0/bias'],
    )
    out[t + 'norm2.weight'], out[t + 'norm2.bias'] = (
        f[b + 'LayerNorm_2/scale'],
        f[b + 'LayerNorm_2/bias'],
    )
    out[t + 'attn.qkv.weight'] = np.concatenate(
        [f[a + n + '/kernel'].reshape(d, d).T for n in ('query', 'key', 'value')], axis=0
    )
    out[t + 'attn.qkv.bias'] = np.concatenate(
        [f[a + n + '/bias'].reshape(d) for n in ('query', 'key', 'value')]
    )
    out[t + 'attn.proj.weight'] = np.ascontiguousarray(f[a + 'out/kernel'].reshape(d, d).T)
    out[t + 'attn.proj.bias'] = f[a + 'out/bias']
    for j, fc in ((0, 'fc1'), (1, 'fc2')):
      out[t + f'mlp.{fc}.weight'] = np.ascontiguousarray(f[b + f'MlpBlock_3/Dense_{j}/kernel'].T)
      out[t + f'mlp.{fc}.bias'] = f[b + f'MlpBlock_3/Dense_{j}/bias']
    i += 1
  out['head.weight'] = np.zeros((1000, d), np.float32)
  out['head.bias'] = np.zeros((1000,), np.float32)
  save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}, str(path))


@pytest.fixture(scope='module')
def target():
  return tiny_runs.init_params(create_model('tiny', num_outputs=3), (1, 64, 64, 3), seed=1)


def test_npz_round_trip_is_exact_and_leaves_decoder_untouched(source, target, tmp_path):
  path = str(tmp_path / 'R50+ViT-B_16.npz')
  _published_npz(source, path)
  loaded = load_pretrained_encoder(target, path)
  want = _flat(source)
  got = _flat(loaded['encoder'])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  for part in ('decoder', 'head'):
    jax.tree.map(np.testing.assert_array_equal, loaded[part], target[part])
  # The input tree is not modified.
  assert not np.array_equal(_flat(target['encoder'])['conv_root/kernel'], want['conv_root/kernel'])


def test_linen_named_checkpoints_load_too(source, target, tmp_path):
  path = str(tmp_path / 'linen.npz')
  _published_npz(source, path, linen_names=True)
  got = _flat(load_pretrained_encoder(target, path)['encoder'])
  for k, v in _flat(source).items():
    np.testing.assert_array_equal(got[k], v)


def test_safetensors_route_agrees_with_npz_route(source, target, tmp_path):
  npz, st = str(tmp_path / 'a.npz'), str(tmp_path / 'b.safetensors')
  _published_npz(source, npz)
  _timm_safetensors(source, st)
  a = _flat(load_pretrained_encoder(target, npz)['encoder'])
  b = _flat(load_pretrained_encoder(target, st)['encoder'])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_converter_writes_the_npz_layout(source, tmp_path):
  st, out = str(tmp_path / 'timm.safetensors'), str(tmp_path / 'converted.npz')
  _timm_safetensors(source, st)
  subprocess.run(
      [
          sys.executable,
          '-m',
          'ddep.tools.convert_checkpoint',
          f'--input={st}',
          f'--output={out}',
          '--head_dim=32',
      ],
      check=True,
      capture_output=True,
  )
  want = _published_npz(source, str(tmp_path / 'published.npz'))
  with np.load(out) as got:
    assert set(got.files) == set(want) - {'pre_logits/kernel'}
    for k in got.files:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_position_embeddings_drop_class_row_and_resize_bilinearly(source, tmp_path):
  path = str(tmp_path / 'ckpt.npz')
  _published_npz(source, path)
  model = create_model('tiny', num_outputs=3)
  target = tiny_runs.init_params(model, (1, 48, 112, 3), seed=1)  # 3x7 grid
  got = load_pretrained_encoder(target, path)
  pos = got['encoder']['Transformer']['posembed_input']['pos_embedding']
  assert pos.shape == (1, 3, 7, 64)
  src = source['Transformer']['posembed_input']['pos_embedding']  # (1, 4, 4, 64)
  want = tf.image.resize(np.asarray(src), (3, 7), method='bilinear', antialias=False)
  np.testing.assert_allclose(pos, want.numpy(), atol=1e-5)
  # The loaded model runs at that size.
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=TransUNet.encode))
  y = encode(got, jnp.zeros((1, 48, 112, 3)))[0]
  assert y.shape == (1, 3, 7, 64)


def test_mismatches_are_reported_together(source, target, tmp_path):
  flat = pretrained.encoder_to_vit_layout(source)
  del flat['block2/unit1/conv2/kernel']
  flat['block9/unit1/conv1/kernel'] = np.zeros((1, 1, 3, 3), np.float32)
  flat['embedding/bias'] = np.zeros((65,), np.float32)
  path = str(tmp_path / 'bad.npz')
  np.savez(path, **flat)
  with pytest.raises(pretrained.CheckpointError) as e:
    load_pretrained_encoder(target, path)
  msg = str(e.value)
  assert 'bad.npz' in msg
  assert 'missing from checkpoint (1)' in msg and 'block2/unit1/conv2/kernel' in msg
  assert 'unexpected in checkpoint (1)' in msg and 'block9/unit1/conv1/kernel' in msg
  assert 'embedding/bias: checkpoint (65,) vs model (64,)' in msg


def test_a_different_model_size_is_rejected(source, tmp_path):
  path = str(tmp_path / 'tiny.npz')
  _published_npz(source, path)
  full = jax.eval_shape(
      lambda: TransUNet().init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), method=TransUNet.encode
      )
  )['params']
  with pytest.raises(pretrained.CheckpointError, match=r'wrong shape \(\d+\)'):
    load_pretrained_encoder(full, path)


def test_truncated_and_garbage_files_fail_clearly(source, target, tmp_path):
  good = str(tmp_path / 'good.npz')
  _published_npz(source, good)
  data = open(good, 'rb').read()
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(pretrained.CheckpointError, match='truncated.npz: not a readable .npz'):
    load_pretrained_encoder(target, str(truncated))
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(b'\x00' * 100)
  with pytest.raises(pretrained.CheckpointError, match='garbage.safetensors: not a readable'):
    load_pretrained_encoder(target, str(garbage))
  with pytest.raises(pretrained.CheckpointError, match='does not exist'):
    load_pretrained_encoder(target, str(tmp_path / 'nope.npz'))
  pth = tmp_path / 'model.pth'
  pth.write_bytes(data)
  with pytest.raises(pretrained.CheckpointError, match='model.pth: unknown checkpoint format'):
    load_pretrained_encoder(target, str(pth))


def test_unknown_timm_keys_are_listed(source, target, tmp_path):
  path = tmp_path / 'odd.safetensors'
  _timm_safetensors(source, path)
  from safetensors.numpy import load_file

  t = load_file(str(path))
  t['blocks.0.attn.q_norm.weight'] = np.zeros(4, np.float32)
  save_file(t, str(path))
  with pytest.raises(pretrained.CheckpointError, match=r'blocks\.0\.attn\.q_norm\.weight'):
    load_pretrained_encoder(target, str(path))
