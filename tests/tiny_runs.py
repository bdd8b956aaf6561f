"""A tiny denoise config, deterministic batches and jitted initialisation, for tests."""

import functools
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ddep import demo


class Batches:
  """Deterministic synthetic batches with the iterator interface the trainer needs."""

  def __init__(self, batch_size=4, hw=(32, 32), nan_at_step=None, labels=None):
    self._step, self._b, self._hw = 0, batch_size, hw
    self._nan_at = nan_at_step
    self._labels = labels
    self.num_examples = 64

  def get_state(self):
    return {'step': self._step}

  def set_state(self, state):
    self._step = int(state['step'])

  def __next__(self):
    rng = np.random.default_rng(self._step)
    self._step += 1
    image = rng.uniform(-1, 1, (self._b, *self._hw, 3)).astype(np.float32)
    if self._nan_at == self._step:
      image[0, 0, 0, 0] = np.nan
    batch = {'image': image}
    if self._labels:
      batch['label'] = rng.integers(0, self._labels, (self._b, *self._hw)).astype(np.int32)
    return batch


def config(**kw):
  """The tiny denoise config; keyword 'a.b' sets config.a.b."""
  c = common.base_config()
  c.task = 'denoise'
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny'
  c.data.prepare = False
  c.data.batch_size = 4
  c.data.image_size = (32, 32)
  c.total_steps = 2
  c.log_every = 1
  c.checkpoint_every = 1
  c.optim.lr = 1e-3
  # A constant rate keeps total_steps out of the compiled step: the tests' runs of 2 to 8
  # steps share one train step program. Schedules have their own tests (test_optimizer),
  # and the CLI tests' tiny_denoise.py keeps a warm-up through the SIGKILL resume.
  c.optim.decay = 'constant'
  for k, v in kw.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def cli_config(name: str, data_dir: str):
  """tests/configs/<name>.py's config, as `--config=` gives it to ddep.main, on `data_dir`:
  for running in-process what a launched test runs through the CLI."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', f'{name}.py')
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config()
  c.data.data_dir = data_dir
  return c


def init_params(model, shape, seed=0, **init_kw):
  """model.init's params at a zero batch of `shape`, compiled as one program: run eagerly,
  every op of init compiles on its own (measured: 9.1 s against 2.9 s for the tiny model)."""
  init = jax.jit(functools.partial(model.init, **init_kw))
  return init(jax.random.key(seed), jnp.zeros(shape))['params']


def normal_like(tree, seed):
  """A tree of standard normal float32 values shaped like `tree`, drawn by numpy: as one
  jitted program of jax.random.normal it took 2.5-4.4 s to compile, per shape of tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), tree)


def stub_stage(name, workdir, config):
  """A demo stage that only records when and where it ran (ddep.demo.run_stages' `run_one`),
  in the DONE marker a real stage writes."""
  started = time.time()
  time.sleep(0.3)
  ended = time.time()
  os.makedirs(workdir, exist_ok=True)
  summary = {'seconds': ended - started, 'pid': os.getpid(), 'started': started, 'ended': ended}
  with open(demo._done_marker(workdir), 'w') as f:  # pylint: disable=protected-access
    json.dump(summary, f)
  del name, config
  return summary
