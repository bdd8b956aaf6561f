"""Compiled steps shared by the runs of one process (ddep.training.compiled)."""

import jax
import numpy as np
import pytest

from ddep.training import compiled
from ddep.training import trainer as train
import tiny_runs


def _config(**kw):
  return tiny_runs.config(**{'checkpoint_every': 2, 'checkpoint_async': False, **kw})


def test_the_key_ignores_value_only_fields_and_nothing_else():
  base = compiled.config_key(_config())
  assert compiled.config_key(_config(seed=3, **{'data.subset_seed': 2})) == base
  assert compiled.config_key(_config(log_every=7, init_from='/elsewhere')) == base
  assert compiled.config_key(_config(**{'data.label_fraction': 0.1})) == base
  assert compiled.config_key(_config(**{'optim.lr': 2e-3})) != base
  assert compiled.config_key(_config(**{'denoise.sigma': 0.2})) != base
  assert compiled.config_key(_config(frozen=('encoder/.*',))) != base
  # Every VALUE_ONLY field names a field the schema has.
  tree = _config().to_dict()
  for dotted in compiled.VALUE_ONLY_FIELDS:
    node = tree
    for name in dotted.split('.'):
      assert name in node, dotted
      node = node[name]


def test_cached_builds_once_per_key_and_forgets_the_least_recent():
  compiled.clear()
  built = []

  def build(i):
    built.append(i)
    return i

  for i in range(compiled.MAX_ENTRIES):
    assert compiled.cached(('k', i), lambda i=i: build(i)) == i
  compiled.cached(('k', 0), lambda: build('again'))  # a hit; ('k', 1) is now the oldest
  compiled.cached(('k', 'new'), lambda: build('new'))
  compiled.cached(('k', 1), lambda: build('1 again'))
  assert built == list(range(compiled.MAX_ENTRIES)) + ['new', '1 again']
  compiled.clear()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Seed 1 after seed 0 in one process (sharing steps), and seed 1 compiled afresh."""
  compiled.clear()
  traced = []
  real = train.steps_lib.make_train_step

  def counting(*a, **k):
    traced.append(1)
    return real(*a, **k)

  train.steps_lib.make_train_step = counting
  try:
    out = {}
    for name, seed in (('first', 0), ('shared', 1)):
      out[name] = train.train_and_evaluate(
          _config(seed=seed), str(tmp_path_factory.mktemp(name)), train_iter=tiny_runs.Batches()
      )
    out['shared_builds'] = len(traced)
    out['other_lr'] = train.train_and_evaluate(
        _config(seed=1, **{'optim.lr': 2e-3}),
        str(tmp_path_factory.mktemp('lr')),
        train_iter=tiny_runs.Batches(),
    )
    out['other_lr_builds'] = len(traced)
    compiled.clear()
    out['fresh'] = train.train_and_evaluate(
        _config(seed=1), str(tmp_path_factory.mktemp('fresh')), train_iter=tiny_runs.Batches()
    )
  finally:
    train.steps_lib.make_train_step = real
  return out


def test_runs_that_differ_only_in_seed_share_one_train_step(runs):
  assert runs['shared_builds'] == 1
  assert runs['other_lr_builds'] == 2  # another learning rate: its own step


def test_a_shared_step_trains_exactly_like_a_fresh_one(runs):
  shared, fresh = runs['shared'].params, runs['fresh'].params
  jax.tree.map(np.testing.assert_array_equal, shared, fresh)
  # ...and the seed still matters: it lives in the state, not in the step.
  first = jax.tree.leaves(runs['first'].params)
  assert any(not np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(shared)))
