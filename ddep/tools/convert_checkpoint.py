r"""Converts an R50+ViT-B/16 checkpoint (original .npz or timm .safetensors) to the npz layout.

  python -m ddep.tools.convert_checkpoint --input vit_base_r50_s16_224.safetensors \
      --output R50+ViT-B_16.npz
"""

import os

from absl import app
from absl import flags
import numpy as np

from ddep.models import pretrained

_INPUT = flags.DEFINE_string('input', None, 'Source checkpoint (.npz or .safetensors).')
_OUTPUT = flags.DEFINE_string('output', None, 'Destination .npz path.')
_HEAD_DIM = flags.DEFINE_integer(
    'head_dim', 64, "Attention head size, to split timm's fused weights into heads."
)


def convert(input_path: str, output_path: str, *, head_dim: int = 64) -> int:
  """Writes the npz layout of `input_path` to `output_path`; returns the number of arrays."""
  if not output_path.endswith('.npz'):
    raise pretrained.CheckpointError(f'{output_path}: output must end in .npz')
  flat = pretrained.read_checkpoint(input_path, head_dim=head_dim)
  # Write to a temporary name first so a failure never leaves a half-written file.
  tmp = output_path + '.tmp.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, output_path)
  return len(flat)


def main(argv):
  del argv
  n = convert(_INPUT.value, _OUTPUT.value, head_dim=_HEAD_DIM.value)
  print(f'wrote {n} arrays to {_OUTPUT.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
