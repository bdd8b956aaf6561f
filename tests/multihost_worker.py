"""One process of the multi-host test: trains a tiny model and dumps its final params.

Run as `python tests/multihost_worker.py WORKDIR OUT.npz` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or none of them, for the 1-process reference),
and XLA_FLAGS forcing the number of CPU devices.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)

from ddep import sharding  # noqa: E402

sharding.maybe_initialize_distributed()

import flax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from ddep import train  # noqa: E402

GLOBAL_BATCH = 8


class ShardedBatches:
  """Deterministic global batches; each process yields only its own rows.

  `rows` selects which rows of the global batch this process owns, so a
  1-process run can consume exactly the batches a 2-process run sees.
  """

  def __init__(self, rows: slice):
    self._rows = rows
    self._step = 0
    self.num_examples = 64 if rows == slice(None) else 32

  def get_state(self):
    return {'step': self._step}

  def set_state(self, state):
    self._step = int(state['step'])

  def __next__(self):
    rng = np.random.default_rng(self._step)
    self._step += 1
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 32, 32, 3)).astype(np.float32)
    return {'image': images[self._rows]}


def main(workdir, out):
  config = common.base_config()
  config.task = 'denoise'
  config.model.preset = 'tiny'
  config.data.dataset = 'demo_tiny'
  config.data.prepare = False
  config.data.batch_size = GLOBAL_BATCH
  config.data.image_size = (32, 32)
  config.denoise.sigma = 0.8
  config.total_steps = 3
  config.log_every = 1
  config.checkpoint_every = 3
  config.optim.lr = 1e-3
  n, p = jax.process_count(), jax.process_index()
  per = GLOBAL_BATCH // n
  rows = slice(None) if n == 1 else slice(p * per, (p + 1) * per)
  result = train.train_and_evaluate(config, workdir, train_iter=ShardedBatches(rows))
  flat = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(result.params).items()}
  np.savez(out, **flat)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
