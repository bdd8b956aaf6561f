"""Tests for ddep.training.optimizer: schedules, Adam(W) against a numpy Adam, freezing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddep.training import optimizer

# ---------------------------------------------------------------- schedules


def _schedule_np(t, base, total, warmup, end_factor, decay):
  end = base * end_factor
  p = np.clip((t - warmup) / max(total - warmup, 1), 0, 1)
  shape = {'cosine': 0.5 * (1 + np.cos(np.pi * p)), 'linear': 1 - p, 'constant': np.ones_like(p)}[
      decay
  ]
  lr = end + (base - end) * shape
  return lr * np.minimum(1, t / warmup) if warmup else lr


def test_cosine_schedule_key_points():
  sched = optimizer.make_schedule(base_lr=1e-3, total_steps=110, warmup_steps=10, end_lr_factor=0.1)
  at = lambda t: float(jax.jit(sched)(jnp.int32(t)))
  assert at(0) == 0.0
  np.testing.assert_allclose(at(5), 0.5e-3, rtol=1e-6)  # Half-way through warm-up.
  np.testing.assert_allclose(at(10), 1e-3, rtol=1e-6)  # Warm-up end: the peak.
  np.testing.assert_allclose(at(60), (1e-3 + 1e-4) / 2, rtol=1e-6)  # Cosine mid-point.
  np.testing.assert_allclose(at(35), 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)
  np.testing.assert_allclose(at(110), 1e-4, rtol=1e-6)  # End value ...
  np.testing.assert_allclose(at(500), 1e-4, rtol=1e-6)  # ... held afterwards.


@pytest.mark.parametrize('decay', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('warmup', [0, 7])
def test_schedule_matches_closed_form(decay, warmup):
  kw = dict(base_lr=3e-4, total_steps=50, warmup_steps=warmup, end_lr_factor=0.2)
  sched = optimizer.make_schedule(decay=decay, **kw)
  t = np.arange(0, 60)
  want = _schedule_np(t.astype(np.float64), 3e-4, 50, warmup, 0.2, decay)
  np.testing.assert_allclose(jax.vmap(sched)(t), want, rtol=1e-5, atol=1e-10)


def test_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match='decay'):
    optimizer.make_schedule(base_lr=1.0, total_steps=10, decay='step')
  with pytest.raises(ValueError, match='warmup_steps'):
    optimizer.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=11)
  with pytest.raises(ValueError, match='total_steps'):
    optimizer.make_schedule(base_lr=1.0, total_steps=0)


def test_steps_from():
  assert optimizer.steps_from(steps=123) == 123
  # The paper's 6000 epochs at batch 128 on Cityscapes' 2975 images.
  assert optimizer.steps_from(epochs=6000, num_examples=2975, batch_size=128) == 139454
  assert optimizer.steps_from(epochs=1, num_examples=10, batch_size=4) == 3  # ceil(2.5)
  assert (
      optimizer.steps_from(epochs=0.1, num_examples=30, batch_size=3) == 1
  )  # not ceil(1.0000000000000002)
  assert optimizer.steps_from(epochs=0, num_examples=30, batch_size=3) == 0


@pytest.mark.parametrize(
    'kwargs, word',
    [
        (dict(), 'warmup_steps'),
        (dict(steps=3, epochs=1), 'warmup_epochs'),
        (dict(epochs=1), 'warmup_epochs'),
        (dict(epochs=1, num_examples=10, batch_size=0), 'batch_size'),
        (dict(steps=2.5), 'warmup_steps'),
        (dict(steps=-1), 'warmup_steps'),
    ],
)
def test_steps_from_errors_name_the_config_field(kwargs, word):
  with pytest.raises(ValueError, match=word):
    optimizer.steps_from(name='warmup', **kwargs)


# ---------------------------------------------------------------- Adam / AdamW


def _adam_np(
    params, grads_fn, steps, *, lr, wd, decoupled, mask, b1=0.9, b2=0.999, eps=1e-8, clip=None
):
  """Textbook Adam (Kingma & Ba) on dicts of numpy arrays, float64."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t in range(1, steps + 1):
    g = grads_fn(p)
    if clip is not None:
      norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
      g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    if not decoupled:
      g = {k: g[k] + wd * mask.get(k, 0.0) * p[k] for k in p}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      if decoupled:
        u = u + wd * mask.get(k, 0.0) * p[k]
      p[k] = p[k] - lr * u
  return p


def _quadratic():
  rng = np.random.default_rng(0)
  params = {
      'kernel': rng.standard_normal((3, 2)).astype(np.float32),
      'bias': rng.standard_normal((2,)).astype(np.float32),
  }
  scale = {'kernel': np.array([[1.0, 4.0], [0.5, 2.0], [3.0, 0.1]]), 'bias': np.array([2.0, 0.3])}
  centre = {'kernel': np.full((3, 2), 0.5), 'bias': np.full((2,), -1.0)}
  loss = lambda p: sum(0.5 * jnp.sum(scale[k] * (p[k] - centre[k]) ** 2) for k in p)
  grads_np = lambda p: {k: scale[k] * (p[k] - centre[k]) for k in p}
  return params, loss, grads_np


def _run(tx, params, loss, steps):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('name', ['adam', 'adamw'])
def test_adam_and_adamw_match_numpy(name):
  params, loss, grads_np = _quadratic()
  tx = optimizer.make_optimizer(name=name, learning_rate=0.1, weight_decay=0.5)
  got, _ = _run(tx, params, loss, 2)
  mask = {'kernel': 1.0, 'bias': 0.0}  # Default: kernels only.
  want = _adam_np(params, grads_np, 2, lr=0.1, wd=0.5, decoupled=(name == 'adamw'), mask=mask)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  # The other form of decay gives a visibly different kernel: the test tells them apart.
  other = _adam_np(params, grads_np, 2, lr=0.1, wd=0.5, decoupled=(name != 'adamw'), mask=mask)
  assert np.abs(other['kernel'] - want['kernel']).max() > 1e-3


def test_clipping_clips_global_norm_first():
  params, loss, grads_np = _quadratic()
  norm0 = np.sqrt(sum(np.sum(g**2) for g in grads_np(params).values()))
  assert norm0 > 1.0  # The first gradient is clipped, later ones may not be.
  tx = optimizer.make_optimizer(learning_rate=0.1, grad_clip_norm=1.0)
  got, state = _run(tx, params, loss, 1)
  mu = optax.tree_utils.tree_get(state, 'mu')
  g0 = grads_np(params)
  for k in params:  # mu after one step = (1 - b1) * clipped gradient.
    np.testing.assert_allclose(mu[k], 0.1 * g0[k] / norm0, rtol=1e-5)
  got, _ = _run(tx, params, loss, 3)
  want = _adam_np(params, grads_np, 3, lr=0.1, wd=0.0, decoupled=True, mask={}, clip=1.0)
  unclipped = _adam_np(params, grads_np, 3, lr=0.1, wd=0.0, decoupled=True, mask={})
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  assert np.abs(want['kernel'] - unclipped['kernel']).max() > 1e-4


def test_accumulation_equals_one_step_on_mean_gradient():
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros((2,))}
  rng = np.random.default_rng(1)
  grads = [
      {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
      for _ in range(6)
  ]
  sched = lambda t: 0.1 / (1.0 + t)  # Distinct per optimizer step: checks the count too.
  kw = dict(name='adamw', learning_rate=sched, weight_decay=0.1, grad_clip_norm=0.5)
  accum = optimizer.make_optimizer(accumulation_steps=3, **kw)
  base = optimizer.make_optimizer(**kw)
  p_acc, s_acc = params, accum.init(params)
  p_base, s_base = params, base.init(params)
  accum_update, base_update = jax.jit(accum.update), jax.jit(base.update)
  for i, g in enumerate(grads):
    updates, s_acc = accum_update(g, s_acc, p_acc)
    if i % 3 != 2:
      assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
    p_acc = optax.apply_updates(p_acc, updates)
  for j in range(2):
    mean = jax.tree.map(lambda *x: sum(x) / 3, *grads[3 * j : 3 * j + 3])
    updates, s_base = base_update(mean, s_base, p_base)
    p_base = optax.apply_updates(p_base, updates)
  for k in params:
    np.testing.assert_allclose(p_acc[k], p_base[k], rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(p_acc['kernel']) - 1).max() > 1e-2  # It did move.


def test_optimizer_rejects_bad_arguments():
  for kwargs, word in [
      (dict(name='sgd'), 'name'),
      (dict(weight_decay=-1.0), 'weight_decay'),
      (dict(grad_clip_norm=0.0), 'grad_clip_norm'),
      (dict(accumulation_steps=0), 'accumulation_steps'),
  ]:
    with pytest.raises(ValueError, match=word):
      optimizer.make_optimizer(learning_rate=0.1, **kwargs)


# ---------------------------------------------------------------- a model's params


@pytest.fixture(scope='module')
def tiny_params():
  """Nested params named as flax names them, all leaves nonzero (decay shows)."""
  rng = np.random.default_rng(0)
  shapes = {
      'Encoder': {
          'conv_root': {'kernel': (1, 1, 3, 4), 'bias': (4,)},
          'gn_root': {'scale': (4,), 'bias': (4,)},
          'pos_embedding': (1, 4, 4, 4),
      },  # 4-D, yet not a kernel.
      'Decoder_conv': {'kernel': (1, 1, 4, 4), 'bias': (4,)},
      'head': {'kernel': (4, 3), 'bias': (3,)},
  }
  return jax.tree.map(
      lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32),
      shapes,
      is_leaf=lambda s: isinstance(s, tuple),
  )


def _tiny_apply(p, x):
  """A pointwise encoder-decoder over (B, H, W, 3) images using every leaf."""
  e = p['Encoder']
  h = x @ e['conv_root']['kernel'][0, 0] + e['conv_root']['bias']
  h = jnp.tanh(h * e['gn_root']['scale'] + e['gn_root']['bias'] + e['pos_embedding'])
  h = jnp.tanh(h @ p['Decoder_conv']['kernel'][0, 0] + p['Decoder_conv']['bias'])
  return h @ p['head']['kernel'] + p['head']['bias']


def test_default_weight_decay_mask_decays_kernels_only(tiny_params):
  # Zero gradients: Adam's direction is 0, so only the decoupled decay moves params.
  tx = optimizer.make_optimizer(name='adamw', learning_rate=0.5, weight_decay=0.1)
  zeros = jax.tree.map(jnp.zeros_like, tiny_params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(tiny_params), tiny_params)
  paths = optimizer.tree_paths(tiny_params)
  decayed = {p for p, u in zip(jax.tree.leaves(paths), jax.tree.leaves(updates)) if np.any(u != 0)}
  assert decayed == {'Encoder/conv_root/kernel', 'Decoder_conv/kernel', 'head/kernel'}
  k = tiny_params['head']['kernel']
  np.testing.assert_allclose(updates['head']['kernel'], -0.5 * 0.1 * k, rtol=1e-6)


def test_weight_decay_mask_overrides(tiny_params):
  zeros = jax.tree.map(jnp.zeros_like, tiny_params)

  def decayed_paths(mask):
    tx = optimizer.make_optimizer(
        name='adamw', learning_rate=1.0, weight_decay=0.1, weight_decay_mask=mask
    )
    updates, _ = jax.jit(tx.update)(zeros, tx.init(tiny_params), tiny_params)
    paths = jax.tree.leaves(optimizer.tree_paths(tiny_params))
    return {p for p, u in zip(paths, jax.tree.leaves(updates)) if np.any(u != 0)}

  assert decayed_paths(lambda path, leaf: path.startswith('head/')) == {'head/kernel', 'head/bias'}
  tree_mask = jax.tree.map(
      lambda p: p == 'Encoder/pos_embedding', optimizer.tree_paths(tiny_params)
  )
  assert decayed_paths(tree_mask) == {'Encoder/pos_embedding'}


# ---------------------------------------------------------------- freezing


def test_trainable_mask_and_typo_guard(tiny_params):
  mask = optimizer.trainable_mask(tiny_params, ['Encoder/.*'])
  assert jax.tree.structure(mask) == jax.tree.structure(tiny_params)
  flat = dict(zip(jax.tree.leaves(optimizer.tree_paths(tiny_params)), jax.tree.leaves(mask)))
  assert {p for p, t in flat.items() if not t} == {
      'Encoder/conv_root/kernel',
      'Encoder/conv_root/bias',
      'Encoder/gn_root/scale',
      'Encoder/gn_root/bias',
      'Encoder/pos_embedding',
  }
  # fullmatch: 'Encoder' alone is a typo, and the error lists it and real paths.
  with pytest.raises(ValueError, match=r"\['Encoder'\].*Encoder/conv_root/bias"):
    optimizer.trainable_mask(tiny_params, ['Encoder', '.*/bias'])
  assert all(jax.tree.leaves(optimizer.trainable_mask(tiny_params, [])))


def test_split_merge_round_trip_and_optimizer_state_only_for_trainable(tiny_params):
  mask = optimizer.trainable_mask(tiny_params, ['Encoder/.*', 'head/bias'])
  trainable, frozen = optimizer.split_trainable(tiny_params, mask)
  t_paths = jax.tree.leaves(optimizer.tree_paths(trainable))
  f_paths = jax.tree.leaves(optimizer.tree_paths(frozen))
  assert sorted(t_paths) == ['Decoder_conv/bias', 'Decoder_conv/kernel', 'head/kernel']
  assert len(f_paths) == 6 and all(p.startswith('Encoder/') or p == 'head/bias' for p in f_paths)

  merged = optimizer.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(tiny_params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(tiny_params)):
    assert a is b  # Exact: the very same arrays.
  with pytest.raises(ValueError, match='both'):
    optimizer.merge(trainable, trainable)

  # Adam holds count + mu + nu: 1 + 2 leaves per *trainable* parameter only.
  tx = optimizer.make_optimizer(
      name='adamw', learning_rate=1e-3, weight_decay=1e-4, grad_clip_norm=1.0
  )
  state = tx.init(trainable)
  assert len(jax.tree.leaves(state)) == 1 + 2 * len(t_paths)
  assert len(jax.tree.leaves(tx.init(tiny_params))) == 1 + 2 * len(jax.tree.leaves(tiny_params))

  # One train step: gradients w.r.t. the trainable tree equal the full gradient's
  # trainable part; the frozen leaves are untouched.
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  loss = lambda p: jnp.mean(_tiny_apply(p, x) ** 2)

  @jax.jit
  def step(trainable, state):
    grads = jax.grad(lambda t: loss(optimizer.merge(t, frozen)))(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), grads

  new_trainable, grads = step(trainable, state)
  full, _ = optimizer.split_trainable(jax.jit(jax.grad(loss))(tiny_params), mask)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # jit vs eager rounding.
  assert np.abs(new_trainable['head']['kernel'] - trainable['head']['kernel']).max() > 0
