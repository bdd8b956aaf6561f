"""The process settings of the programs: the garbage collector while tracing."""

import ast
import gc
import os

import jax
import numpy as np
import pytest

from ddep.models import presets
from ddep.runs import process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The programs that trace JAX programs, each with the function its process starts in.
PROGRAMS = {
    'ddep/main.py': 'main',
    'ddep/evaluate.py': 'main',
    'ddep/predict.py': 'main',
    'ddep/demo.py': 'main',
    'ddep/tools/benchmark.py': '_app_main',
    'ddep/tools/profile_step.py': '_app_main',
}


@pytest.fixture
def default_gc():
  """CPython's thresholds for the test, then whatever this process had."""
  before = gc.get_threshold()
  gc.set_threshold(700, 10, 10)
  yield
  gc.set_threshold(*before)


def _young_collections_while_tracing() -> int:
  model = presets.create_model('tiny', num_outputs=3)
  image = np.zeros((2, 32, 32, 3), np.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), image))

  def loss(p):
    return model.apply(p, image).sum()

  counts = [0]

  def count(phase, info):
    counts[0] += phase == 'start' and info['generation'] == 0

  gc.collect()
  gc.callbacks.append(count)
  try:
    jax.make_jaxpr(jax.grad(loss))(params)
  finally:
    gc.callbacks.remove(count)
  return counts[0]


def test_configure_gc_collects_the_young_generation_less_often_while_tracing(default_gc):
  before = _young_collections_while_tracing()
  process.configure_gc()
  assert gc.get_threshold() == (process.GEN0_THRESHOLD, 10, 10)  # Older ones untouched.
  after = _young_collections_while_tracing()
  assert before > 50 and after < before / 5, (before, after)


@pytest.mark.parametrize('path', sorted(PROGRAMS))
def test_every_tracing_program_configures_gc_in_its_main(path):
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == PROGRAMS[path])
  calls = [
      n
      for n in ast.walk(main)
      if isinstance(n, ast.Call) and ast.unparse(n.func) == 'process.configure_gc'
  ]
  assert calls, f'{path}: {PROGRAMS[path]}() does not call process.configure_gc()'
