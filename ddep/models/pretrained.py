"""Import of ImageNet-21k encoders into a TransUNet's params: R50+ViT-B/16 and BiT-M-R50x1.

R50+ViT-B/16: two sources hold the same weights:
- the original `R50+ViT-B_16.npz` (flat '/'-joined keys, pre-Linen module
  names, GroupNorm params as (1, 1, 1, C), a class-token row in the position
  embeddings, and `cls`/`pre_logits`/`head` entries);
- timm's `vit_base_r50_s16_224.orig_in21k` safetensors (PyTorch names/layouts).

Both are first brought to the npz layout (`read_checkpoint`), then mapped onto
the model's `encoder` subtree (`load_pretrained_encoder`).

BiT-M-R50x1 (the `bit_r50` backbone, `ddep.models.bit`), also from two sources:
- the published `BiT-M-R50x1.npz` (TF names under `resnet/`: `root_block/
  standardized_conv2d/kernel`, `block1/unit01/a/group_norm/gamma`, `.../a/proj/...`,
  `group_norm/beta`, and the classifier `head/conv2d`);
- timm's `resnetv2_50x1_bit.goog_in21k` safetensors (`stem.conv.weight`,
  `stages.0.blocks.0.norm1.weight`, `...downsample.conv.weight`, `norm.*`, `head.fc.*`).
Both are read straight into the model's names (they are BiT's, less `resnet/`).
"""

import os
import re
import zipfile
from typing import Any, Mapping

import flax
import jax.numpy as jnp
import numpy as np

from ddep.models import vit

# Entries of the classifier checkpoints that segmentation does not use.
_UNUSED_PREFIXES = ('cls', 'head/', 'pre_logits/')
_POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
# Linen-numbered names (checkpoints re-saved by Linen code) -> our pre-Linen names.
_LINEN_TO_PRE_LINEN = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
_GROUPNORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read or does not fit the model."""


# ---------------------------------------------------------------------------
# Reading either source into the npz layout.
# ---------------------------------------------------------------------------


def read_checkpoint(path: str, *, head_dim: int = 64) -> dict[str, np.ndarray]:
  """Reads `.npz` (original ViT layout) or timm `.safetensors` into the npz layout.

  `head_dim` splits timm's fused attention weights into heads (64 for ViT-B/16).
  """
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: checkpoint file does not exist')
  if path.endswith('.npz'):
    flat = _read_npz(path)
    return bit_npz_to_layout(flat, source=path) if _is_bit_npz(flat) else flat
  if path.endswith('.safetensors'):
    tensors = _read_safetensors(path)
    if _is_timm_bit(tensors):
      return timm_bit_to_layout(tensors, source=path)
    return timm_to_vit_layout(tensors, source=path, head_dim=head_dim)
  raise CheckpointError(f'{path}: unknown checkpoint format; expected .npz or .safetensors')


def check_file(path: str) -> None:
  """Raises CheckpointError unless `path` opens as a checkpoint and lists its arrays.

  Cheap (the array index, not the arrays), so that a run can refuse a bad file before it
  creates or touches its workdir.
  """
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: checkpoint file does not exist')
  if path.endswith('.npz'):
    _read_npz(path, keys_only=True)
  elif path.endswith('.safetensors'):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    try:
      with safe_open(path, framework='numpy') as f:
        f.keys()
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(
          f'{path}: not a readable .safetensors checkpoint (truncated or '
          f'corrupt?): {type(e).__name__}: {e}'
      ) from e
  else:
    raise CheckpointError(f'{path}: unknown checkpoint format; expected .npz or .safetensors')


def _read_npz(path: str, *, keys_only: bool = False) -> dict[str, np.ndarray]:
  try:
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
      # np.load reads a lone array (.npy) whatever the file's name.
      raise ValueError(f'holds one {type(f).__name__}, not an archive of named arrays')
    with f:
      return {k: None for k in f.files} if keys_only else {k: np.asarray(f[k]) for k in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise CheckpointError(
        f'{path}: not a readable .npz checkpoint (truncated or corrupt?): '
        f'{type(e).__name__}: {e}'
    ) from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  try:
    return dict(st_numpy.load_file(path))
  except Exception as e:  # safetensors raises its own error types.
    raise CheckpointError(
        f'{path}: not a readable .safetensors checkpoint (truncated or '
        f'corrupt?): {type(e).__name__}: {e}'
    ) from e


def _conv(w):  # PyTorch OIHW -> Flax HWIO.
  return np.transpose(w, (2, 3, 1, 0))


def _gn(w):  # The npz stores GroupNorm params as (1, 1, 1, C).
  return w.reshape(1, 1, 1, -1)


def timm_to_vit_layout(
    tensors: Mapping[str, np.ndarray], *, source: str = 'timm checkpoint', head_dim: int = 64
) -> dict[str, np.ndarray]:
  """Maps timm's R50+ViT hybrid state dict to the original npz layout.

  timm does not store the number of heads; ViT-B (like every ViT size) uses
  64-dimensional heads, hence the `head_dim` default.
  """
  out: dict[str, np.ndarray] = {}
  unknown = []
  stage_re = re.compile(r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$')
  block_re = re.compile(r'blocks\.(\d+)\.(.+)$')
  for name, w in tensors.items():
    w = np.asarray(w)
    if m := stage_re.match(name):
      unit = f'block{int(m[1]) + 1}/unit{int(m[2]) + 1}'
      leaf = m[3]
      if mm := re.fullmatch(r'conv(\d)\.weight', leaf):
        out[f'{unit}/conv{mm[1]}/kernel'] = _conv(w)
      elif mm := re.fullmatch(r'norm(\d)\.(weight|bias)', leaf):
        out[f'{unit}/gn{mm[1]}/{"scale" if mm[2] == "weight" else "bias"}'] = _gn(w)
      elif leaf == 'downsample.conv.weight':
        out[f'{unit}/conv_proj/kernel'] = _conv(w)
      elif mm := re.fullmatch(r'downsample\.norm\.(weight|bias)', leaf):
        out[f'{unit}/gn_proj/{"scale" if mm[1] == "weight" else "bias"}'] = _gn(w)
      else:
        unknown.append(name)
    elif name == 'patch_embed.backbone.stem.conv.weight':
      out['conv_root/kernel'] = _conv(w)
    elif name in ('patch_embed.backbone.stem.norm.weight', 'patch_embed.backbone.stem.norm.bias'):
      out[f'gn_root/{"scale" if name.endswith("weight") else "bias"}'] = _gn(w)
    elif name == 'patch_embed.proj.weight':
      out['embedding/kernel'] = _conv(w)
    elif name == 'patch_embed.proj.bias':
      out['embedding/bias'] = w
    elif name == 'cls_token':
      out['cls'] = w
    elif name == 'pos_embed':
      out[_POSEMB_KEY] = w
    elif name in ('norm.weight', 'norm.bias'):
      out[f'Transformer/encoder_norm/{"scale" if name.endswith("weight") else "bias"}'] = w
    elif name in ('head.weight', 'head.bias'):
      out['head/kernel' if name.endswith('weight') else 'head/bias'] = (
          w.T if name.endswith('weight') else w
      )
    elif name.startswith('pre_logits.') or name.startswith('fc_norm.'):
      continue  # Classifier parts; unused by segmentation.
    elif m := block_re.match(name):
      out.update(_timm_block(int(m[1]), m[2], w, name, unknown, head_dim))
    else:
      unknown.append(name)
  if unknown:
    raise CheckpointError(
        f'{source}: unexpected keys for a timm R50+ViT hybrid checkpoint: ' f'{sorted(unknown)}'
    )
  return out


def _timm_block(i: int, leaf: str, w: np.ndarray, name: str, unknown: list, head_dim: int) -> dict:
  p = f'Transformer/encoderblock_{i}'
  attn = f'{p}/MultiHeadDotProductAttention_1'
  simple = {
      'norm1.weight': f'{p}/LayerNorm_0/scale',
      'norm1.bias': f'{p}/LayerNorm_0/bias',
      'norm2.weight': f'{p}/LayerNorm_2/scale',
      'norm2.bias': f'{p}/LayerNorm_2/bias',
      'mlp.fc1.bias': f'{p}/MlpBlock_3/Dense_0/bias',
      'mlp.fc2.bias': f'{p}/MlpBlock_3/Dense_1/bias',
      'attn.proj.bias': f'{attn}/out/bias',
  }
  if leaf in simple:
    return {simple[leaf]: w}
  if leaf == 'mlp.fc1.weight':
    return {f'{p}/MlpBlock_3/Dense_0/kernel': w.T}
  if leaf == 'mlp.fc2.weight':
    return {f'{p}/MlpBlock_3/Dense_1/kernel': w.T}
  if leaf in ('attn.qkv.weight', 'attn.qkv.bias'):
    # timm fuses q, k, v along the output dim; heads are contiguous within each.
    d = w.shape[0] // 3
    heads = d // head_dim
    out = {}
    for part, qkv in zip(np.split(w, 3, axis=0), ('query', 'key', 'value')):
      if leaf.endswith('weight'):
        out[f'{attn}/{qkv}/kernel'] = part.T.reshape(-1, heads, head_dim)
      else:
        out[f'{attn}/{qkv}/bias'] = part.reshape(heads, head_dim)
    return out
  if leaf == 'attn.proj.weight':
    d = w.shape[1]
    return {f'{attn}/out/kernel': w.T.reshape(d // head_dim, head_dim, -1)}
  unknown.append(name)
  return {}


# ---------------------------------------------------------------------------
# BiT ResNet v2: the published npz and timm's safetensors <-> the model's names.
# ---------------------------------------------------------------------------

_BIT_PREFIX = 'resnet/'
_BIT_NORM = {'gamma': 'scale', 'beta': 'bias'}
_BIT_PART = {'1': 'a', '2': 'b', '3': 'c'}  # timm's norm{k}/conv{k} are BiT's parts a, b, c.
_TIMM_BIT_UNIT = re.compile(
    r'stages\.(\d+)\.blocks\.(\d+)\.(?:(norm|conv)([123])\.(weight|bias)|downsample\.conv\.weight)$'
)


def _is_bit_npz(flat: Mapping[str, Any]) -> bool:
  return any(k.startswith(_BIT_PREFIX) for k in flat)


def _is_timm_bit(tensors: Mapping[str, Any]) -> bool:
  return 'stem.conv.weight' in tensors


def bit_npz_to_layout(
    flat: Mapping[str, np.ndarray], *, source: str = 'BiT checkpoint'
) -> dict[str, np.ndarray]:
  """BiT's npz (`resnet/...`, GroupNorm `gamma`/`beta`) -> the `bit_r50` encoder's names.

  The classifier (`resnet/head/...`) is dropped; anything outside `resnet/` is an error.
  """
  out, unknown = {}, []
  for key, value in flat.items():
    if not key.startswith(_BIT_PREFIX):
      unknown.append(key)
      continue
    key = key[len(_BIT_PREFIX) :]
    if key.startswith('head/'):
      continue  # The 21k-class classifier; segmentation has its own head.
    parts = key.split('/')
    if len(parts) >= 2 and parts[-2] == 'group_norm' and parts[-1] in _BIT_NORM:
      parts[-1] = _BIT_NORM[parts[-1]]
      value = np.asarray(value).reshape(-1)  # TF stores (C,); some exports (1, 1, 1, C).
    out['/'.join(parts)] = np.asarray(value)
  if unknown:
    raise CheckpointError(
        f'{source}: keys outside {_BIT_PREFIX!r} in a BiT checkpoint: ' f'{sorted(unknown)}'
    )
  return out


def timm_bit_to_layout(
    tensors: Mapping[str, np.ndarray], *, source: str = 'timm checkpoint'
) -> dict[str, np.ndarray]:
  """timm's `resnetv2_50x1_bit` state dict -> the `bit_r50` encoder's names (OIHW -> HWIO)."""
  out, unknown = {}, []
  for name, w in tensors.items():
    w = np.asarray(w)
    if name == 'stem.conv.weight':
      out['root_block/standardized_conv2d/kernel'] = _conv(w)
    elif name in ('norm.weight', 'norm.bias'):
      out[f'group_norm/{"scale" if name.endswith("weight") else "bias"}'] = w
    elif name.startswith('head.'):
      continue  # The classifier.
    elif m := _TIMM_BIT_UNIT.match(name):
      unit = f'block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}'
      if m[3] is None:
        out[f'{unit}/a/proj/standardized_conv2d/kernel'] = _conv(w)
      elif m[3] == 'conv' and m[5] == 'weight':
        out[f'{unit}/{_BIT_PART[m[4]]}/standardized_conv2d/kernel'] = _conv(w)
      elif m[3] == 'norm':
        out[f'{unit}/{_BIT_PART[m[4]]}/group_norm/{"scale" if m[5] == "weight" else "bias"}'] = w
      else:
        unknown.append(name)
    else:
      unknown.append(name)
  if unknown:
    raise CheckpointError(
        f'{source}: unexpected keys for a timm BiT ResNet v2 checkpoint: ' f'{sorted(unknown)}'
    )
  return out


def encoder_to_bit_checkpoint(
    encoder_params: Mapping[str, Any], *, fmt: str = 'npz'
) -> dict[str, np.ndarray]:
  """Our `bit_r50` encoder -> BiT's npz names (`fmt='npz'`) or timm's (`fmt='timm'`).

  The inverse of the readers, to write checkpoints of our own encoders in either
  published layout (and for round-trip tests).
  """
  flat = {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(encoder_params)).items()
  }
  if fmt == 'npz':
    inverse = {v: k for k, v in _BIT_NORM.items()}
    return {
        _BIT_PREFIX
        + re.sub(r'group_norm/(scale|bias)$', lambda m: f'group_norm/{inverse[m[1]]}', k): v
        for k, v in flat.items()
    }
  if fmt != 'timm':
    raise ValueError(f"fmt must be 'npz' or 'timm', got {fmt!r}")
  part_index = {v: k for k, v in _BIT_PART.items()}
  out = {}
  for key, value in flat.items():
    if key == 'root_block/standardized_conv2d/kernel':
      name = 'stem.conv.weight'
    elif key.startswith('group_norm/'):
      name = 'norm.weight' if key.endswith('scale') else 'norm.bias'
    else:
      m = re.fullmatch(
          r'block(\d+)/unit(\d+)/([abc])/(proj/)?(group_norm|standardized_conv2d)/'
          r'(kernel|scale|bias)',
          key,
      )
      if m is None:
        raise ValueError(f'not a bit_r50 encoder parameter: {key}')
      unit = f'stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}'
      if m[4]:
        name = f'{unit}.downsample.conv.weight'
      elif m[5] == 'standardized_conv2d':
        name = f'{unit}.conv{part_index[m[3]]}.weight'
      else:
        name = f'{unit}.norm{part_index[m[3]]}.{"weight" if m[6] == "scale" else "bias"}'
    out[name] = (
        np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1))) if value.ndim == 4 else value
    )
  return out


def _family(keys) -> str:
  """What a set of encoder keys (model or checkpoint, our names) is, for error hints."""
  keys = list(keys)
  if any(k.startswith('root_block/') for k in keys):
    return "BiT ResNet v2 (preset 'bit_r50_unet')"
  if any(k.startswith('Transformer/') for k in keys):
    return "R50+ViT-B/16 hybrid (preset 'r50_vit_b16')"
  if any(k.startswith('conv_root/') for k in keys):
    return "post-activation ResNet (preset 'r50_unet'; no published weights fit it)"
  return 'unknown'


# ---------------------------------------------------------------------------
# Mapping the npz layout onto the model.
# ---------------------------------------------------------------------------


def _rename_linen(key: str) -> str:
  parts = key.split('/')
  return '/'.join(_LINEN_TO_PRE_LINEN.get(p, p) if 'encoderblock_' in key else p for p in parts)


def _posemb_grid(posemb: np.ndarray, key: str) -> np.ndarray:
  """(1, [1 +] g*g, D) -> (1, g, g, D), dropping a class-token row if there is one."""
  if posemb.ndim == 4:
    return posemb
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise CheckpointError(f'{key}: expected shape (1, tokens, D), got {posemb.shape}')
  n = posemb.shape[1]
  for skip in (0, 1):
    g = int(round(np.sqrt(n - skip)))
    if g * g == n - skip:
      return posemb[:, skip:].reshape(1, g, g, posemb.shape[2])
  raise CheckpointError(
      f'{key}: {n} tokens are neither a square grid nor a square grid ' 'plus a class token'
  )


def _fit_to(key: str, value: np.ndarray, target: Any) -> np.ndarray:
  """Brings a checkpoint array to the model's layout where the layouts legitimately differ."""
  if _GROUPNORM.search(key) and value.ndim == 4:
    value = value.reshape(-1)
  elif key.endswith(_POSEMB_KEY):
    grid = _posemb_grid(value, key)
    if grid.shape[-1] == target.shape[-1]:
      value = np.asarray(vit.resize_posemb(jnp.asarray(grid, jnp.float32), target.shape[1:3]))
    else:
      value = grid
  elif (
      _ATTENTION.search(key)
      and value.shape != tuple(target.shape)
      and value.size == np.prod(target.shape)
      and _heads_refactored(key, value.shape, tuple(target.shape))
  ):
    # timm does not record the head count, so its split into heads is a guess
    # (64-dim heads); re-split to the model's heads.
    value = value.reshape(target.shape)
  return value


_ATTENTION = re.compile(r'MultiHeadDotProductAttention_1/(query|key|value|out)/(kernel|bias)$')


def _heads_refactored(key: str, src: tuple, dst: tuple) -> bool:
  """Whether two attention shapes differ only in how D splits into (heads, head_dim)."""
  if len(src) != len(dst):
    return False
  if key.endswith('out/kernel'):
    return src[-1] == dst[-1]
  if key.endswith('kernel'):
    return src[0] == dst[0]
  return True  # (heads, head_dim) bias


def load_pretrained_encoder(params: Mapping[str, Any], path_or_weights) -> dict[str, Any]:
  """Returns a copy of `params` with its `encoder` subtree read from a checkpoint.

  `path_or_weights` is a `.npz`/`.safetensors` path or an already-read flat dict in
  the npz layout. The class-token row is dropped and the position embeddings are
  resized bilinearly to the model's grid; the decoder and `head` are untouched.
  Every missing, unexpected or misshapen key is reported in one error.
  """
  if 'encoder' not in params:
    raise CheckpointError("params have no 'encoder' subtree; pass model.init(...)['params']")
  source = path_or_weights if isinstance(path_or_weights, str) else 'weights'
  flat = (
      read_checkpoint(path_or_weights)
      if isinstance(path_or_weights, str)
      else dict(path_or_weights)
  )
  flat = {
      _rename_linen(k): v
      for k, v in flat.items()
      if not any(k == p or k.startswith(p) for p in _UNUSED_PREFIXES)
  }

  target = {
      '/'.join(k): v
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params['encoder'])).items()
  }
  missing = sorted(set(target) - set(flat))
  unexpected = sorted(set(flat) - set(target))
  loaded, wrong_shape = {}, []
  for key in sorted(set(target) & set(flat)):
    value = _fit_to(key, np.asarray(flat[key]), target[key])
    if value.shape != tuple(target[key].shape):
      wrong_shape.append(f'{key}: checkpoint {value.shape} vs model {tuple(target[key].shape)}')
    else:
      loaded[key] = jnp.asarray(value, dtype=target[key].dtype)
  if missing or unexpected or wrong_shape:
    lines = [f'{source}: checkpoint does not fit the model encoder.']
    ours, theirs = _family(target), _family(flat)
    if ours != theirs:
      lines.append(f"  the checkpoint is a {theirs} encoder; the model's is a {ours}")
    if missing:
      lines.append(f'  missing from checkpoint ({len(missing)}): {missing}')
    if unexpected:
      lines.append(f'  unexpected in checkpoint ({len(unexpected)}): {unexpected}')
    if wrong_shape:
      lines.append(f'  wrong shape ({len(wrong_shape)}): {wrong_shape}')
    raise CheckpointError('\n'.join(lines))

  new_params = dict(flax.core.unfreeze(params))
  new_params['encoder'] = flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in loaded.items()}
  )
  return new_params


def encoder_to_vit_layout(
    encoder_params: Mapping[str, Any], *, class_token: bool = True
) -> dict[str, np.ndarray]:
  """Our `encoder` subtree -> the published npz layout (inverse of the loader).

  Used to write checkpoints of our own supervised encoders, and by tests to make
  checkpoints in the published layout.
  """
  flat = {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(encoder_params)).items()
  }
  out = {}
  for key, value in flat.items():
    if _GROUPNORM.search(key):
      value = _gn(value)
    elif key == _POSEMB_KEY:
      _, h, w, d = value.shape
      value = value.reshape(1, h * w, d)
      if class_token:
        value = np.concatenate([np.zeros((1, 1, d), value.dtype), value], axis=1)
    out[key] = value
  return out
