"""One process of a protocol evaluation run: `python tests/protocol_eval_worker.py OUT.npy`.

With JAX_NUM_PROCESSES=2 each process evaluates its own images, whose sizes (so
window counts) differ from the other's; alone, one process evaluates them all.
The confusion matrix must be the same either way.
"""

import sys

import flax.linen as nn
import jax
import numpy as np

from ddep.evaluators import inference
from ddep.evaluators import protocol as protocol_eval
from ddep.training import sharding

NUM_CLASSES = 3
PROTOCOL = inference.Protocol(
    'test_sliding', 'sliding', window=(16, 16), stride=(12, 12), flip=True
)
# Per image: (height, width) inside a 40x40 pad; 4, 1, 6 and 2 windows of 16x16.
SIZES = [(28, 28), (16, 12), (40, 24), (20, 16)]


class Head(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(NUM_CLASSES, (3, 3))(x)


def batches(indices, batch_size=2):
  """EvalDataset-like batches of the given images, padded to 40x40 and to whole batches."""
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, (*hw, 3)).astype(np.float32) for hw in SIZES]
  labels = [rng.integers(0, NUM_CLASSES, hw).astype(np.int32) for hw in SIZES]
  for start in range(0, 4, batch_size):
    b = {
        'image': np.zeros((batch_size, 40, 40, 3), np.float32),
        'label': np.full((batch_size, 40, 40), 255, np.int32),
        'orig_hw': np.zeros((batch_size, 2), np.int32),
        '_mask': np.zeros(batch_size, bool),
    }
    for row, i in enumerate(j for j in indices if start <= j < start + batch_size):
      h, w = SIZES[i]
      b['image'][row, :h, :w], b['label'][row, :h, :w] = images[i], labels[i]
      b['orig_hw'][row], b['_mask'][row] = (h, w), True
    yield b


def main(out):
  sharding.maybe_initialize_distributed()
  model = Head()
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  mesh = sharding.make_mesh()
  state = {'params': jax.device_put(params, sharding.replicated(mesh)), 'frozen': {}}
  # Process p of n takes images p, p + n, ...: with 2 processes, 4 + 6 windows against 1 + 2.
  mine = list(range(jax.process_index(), 4, jax.process_count()))
  matrix = protocol_eval.confusion_matrix(
      model,
      state,
      mesh,
      batches(mine),
      protocol=PROTOCOL,
      num_classes=NUM_CLASSES,
      ignore_label=255,
  )
  if jax.process_index() == 0:
    np.save(out, matrix)


if __name__ == '__main__':
  main(sys.argv[1])
