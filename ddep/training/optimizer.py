"""Learning-rate schedules, the Adam(W) optimizer, and parameter freezing.

The paper trains with Adam and a cosine learning-rate decay (Sec. 4.3):
lr 1e-4, batch 128 for denoising pretraining; a sweep of weight decay and lr
in [1e-5, 3e-4] for fine-tuning.

Freezing (DDeP, Sec. 3.1: the encoder keeps its supervised weights and only the
decoder is denoising-pretrained) works by splitting the parameters into two
trees and differentiating with respect to the trainable one only:

    mask = trainable_mask(params, config.frozen)    # e.g. ["Encoder/.*"]
    trainable, frozen = split_trainable(params, mask)
    tx = make_optimizer(learning_rate=make_schedule(...), ...)
    opt_state = tx.init(trainable)                   # no state for `frozen`

    def loss_fn(trainable):
        return loss(model.apply({"params": merge(trainable, frozen)}, ...))
    grads = jax.grad(loss_fn)(trainable)             # no grads for `frozen`
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

Because `frozen` is a constant of `loss_fn`, JAX builds no backward pass for
it at all (unlike zeroing its updates, which still computes and stores them).
"""

from __future__ import annotations

import fractions
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]

DECAYS = ('cosine', 'constant', 'linear')
OPTIMIZERS = ('adam', 'adamw')


# ----------------------------------------------------------------------------
# Durations and schedules.
# ----------------------------------------------------------------------------


def steps_from(
    *,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    num_examples: Optional[int] = None,
    batch_size: Optional[int] = None,
    name: str = 'train',
) -> int:
  """A duration in steps, from `<name>_steps` or `<name>_epochs` of a config.

  Exactly one of `steps` and `epochs` must be given. Epochs become
  ceil(epochs * num_examples / batch_size) steps, so a fraction of an epoch
  still trains on at least that fraction of the data (the paper states its
  durations in epochs: 6000 for pretraining, Sec. 4.3).
  """
  if (steps is None) == (epochs is None):
    raise ValueError(
        f'Give exactly one of `{name}_steps` and `{name}_epochs`; got '
        f'{name}_steps={steps!r}, {name}_epochs={epochs!r}.'
    )
  if steps is not None:
    if int(steps) != steps or steps < 0:
      raise ValueError(f'`{name}_steps` must be an integer >= 0, got {steps!r}.')
    return int(steps)
  if epochs < 0:
    raise ValueError(f'`{name}_epochs` must be >= 0, got {epochs!r}.')
  if not num_examples or not batch_size or num_examples < 0 or batch_size < 0:
    raise ValueError(
        f'`{name}_epochs` needs num_examples > 0 and batch_size > 0, got '
        f'num_examples={num_examples!r}, batch_size={batch_size!r}.'
    )
  # Exact decimal arithmetic: 0.1 epochs of 30 examples at batch 3 is 1 step,
  # where floats give ceil(1.0000000000000002) = 2.
  exact = fractions.Fraction(str(epochs)) * num_examples / batch_size
  return math.ceil(exact)


def make_schedule(
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = 'cosine',
    end_lr_factor: float = 0.0,
) -> Schedule:
  """Learning rate as a function of the optimizer step: warm-up, then decay.

  lr(t) = base_lr * t / warmup_steps                       for t < warmup_steps
        = end + (base_lr - end) * shape(p),  p = (t - warmup) / (total - warmup)
  with end = base_lr * end_lr_factor and shape(p) = (1 + cos(pi p)) / 2 for
  'cosine' (Sec. 4.3), 1 - p for 'linear', and 1 for 'constant'; p is
  clipped to [0, 1], so steps past `total_steps` stay at `end`.

  Warm-up starts at 0, so the first update is a no-op, as in big_vision; it
  keeps Adam's first steps, whose second-moment estimate rests on one
  gradient, from taking full-size steps.
  """
  if decay not in DECAYS:
    raise ValueError(f'`decay` must be one of {DECAYS}, got {decay!r}.')
  if total_steps <= 0:
    raise ValueError(f'`total_steps` must be > 0, got {total_steps!r}.')
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f'`warmup_steps` must lie in [0, total_steps={total_steps}], got {warmup_steps!r}.'
    )
  end_lr = base_lr * end_lr_factor
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if decay == 'constant':
      # No progress term: the compiled step then does not depend on total_steps, so runs
      # of other lengths share one program (and its persistent-cache entry).
      shape = jnp.ones_like(step)
    else:
      progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
      if decay == 'cosine':
        shape = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
      else:
        shape = 1.0 - progress
    lr = end_lr + (base_lr - end_lr) * shape
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return lr

  return schedule


# ----------------------------------------------------------------------------
# Parameter paths and masks.
# ----------------------------------------------------------------------------


def _key_name(key) -> str:
  """One path component: the dict key, attribute or index as a string."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      value = getattr(key, attr)
      return '/'.join(map(str, value)) if isinstance(value, tuple) else str(value)
  return str(key)


def path_str(keypath) -> str:
  """'/'-joined path of a leaf, e.g. 'Encoder/block1/unit1/conv1/kernel'."""
  return '/'.join(_key_name(k) for k in keypath)


def tree_paths(tree: PyTree) -> PyTree:
  """A pytree like `tree` whose leaves are the leaves' '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp), tree)


def decay_kernels_only(path: str, leaf) -> bool:
  """Default weight-decay rule: only Dense/Conv `kernel`s (ndim > 1).

  Biases, norm scales, the ViT position embeddings and class token are left
  alone: decaying them towards 0 is not regularisation but a bias (the
  position embedding is 3-D, so ndim alone would not exclude it).
  """
  return path.split('/')[-1] == 'kernel' and jnp.ndim(leaf) > 1


WeightDecayMask = Union[None, PyTree, Callable[[str, Any], bool]]


def _decay_mask_fn(weight_decay_mask: WeightDecayMask):
  """Turns our mask argument into what optax accepts (a tree or params -> tree)."""
  rule = decay_kernels_only if weight_decay_mask is None else weight_decay_mask
  if not callable(rule):
    return rule  # Already a pytree of bools.
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda kp, leaf: bool(rule(path_str(kp), leaf)), params
  )


# ----------------------------------------------------------------------------
# Optimizer.
# ----------------------------------------------------------------------------


def make_optimizer(
    *,
    name: str = 'adam',
    learning_rate: Union[float, Schedule],
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: Optional[float] = None,
    accumulation_steps: int = 1,
    weight_decay_mask: WeightDecayMask = None,
) -> optax.GradientTransformation:
  """Adam or AdamW (Sec. 4.3) with optional clipping, decay and accumulation.

  The chain, in order:
    1. clip the gradient to global norm `grad_clip_norm` (if given), first, so
       the clipped gradient is what every later statistic sees;
    2. weight decay, which differs between the two names:
       * 'adam': L2 regularisation, g += wd * theta *before* Adam. The decay
         is then divided by sqrt(v) like the gradient, so weights with large
         gradients are barely decayed.
       * 'adamw': decoupled decay (Loshchilov & Hutter), the update is
         -lr * (adam(g) + wd * theta), added *after* Adam so every decayed
         weight shrinks by the same factor lr * wd per step. As in optax and
         PyTorch, the decay follows the learning-rate schedule.
    3. Adam's moment estimates (b1, b2, eps);
    4. scaling by -learning_rate (a float or a schedule of the optimizer step).

  `weight_decay_mask` picks the decayed leaves: None decays kernels only
  (`decay_kernels_only`); a callable (path: str, leaf) -> bool replaces that
  rule; a pytree of bools shaped like the parameters is used as is.

  With `accumulation_steps` = k > 1 the gradients of k consecutive calls are
  averaged and applied once (optax.MultiSteps); the k - 1 calls in between
  return zero updates. The effective batch is then k * batch_size, and the
  schedule advances once per k calls, so count `total_steps` in applied
  updates.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'`name` must be one of {OPTIMIZERS}, got {name!r}.')
  if weight_decay < 0:
    raise ValueError(f'`weight_decay` must be >= 0, got {weight_decay!r}.')
  if grad_clip_norm is not None and not grad_clip_norm > 0:
    raise ValueError(f'`grad_clip_norm` must be > 0 or None, got {grad_clip_norm!r}.')
  if int(accumulation_steps) != accumulation_steps or accumulation_steps < 1:
    raise ValueError(f'`accumulation_steps` must be an integer >= 1, got {accumulation_steps!r}.')

  mask = _decay_mask_fn(weight_decay_mask)
  parts = []
  if grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if name == 'adam' and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if name == 'adamw' and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  tx = optax.chain(*parts)
  if accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(accumulation_steps)).gradient_transformation()
  return tx


# ----------------------------------------------------------------------------
# Freezing (DDeP).
# ----------------------------------------------------------------------------


def trainable_mask(params: PyTree, frozen_patterns: Sequence[str]) -> PyTree:
  """Pytree of bools like `params`: False where a frozen pattern matches.

  Each pattern is a regex matched with `re.fullmatch` against the leaf's
  '/'-joined path, e.g. 'Encoder/.*' freezes the whole encoder and
  '.*/(bias|scale)' all biases and norm scales. Full matches, so 'Encoder'
  alone matches nothing instead of silently freezing 'Encoder*' and
  '*Encoder*' alike.

  Raises ValueError if a pattern matches no parameter (a typo would
  otherwise leave everything trainable without a word).
  """
  if isinstance(frozen_patterns, str):
    frozen_patterns = [frozen_patterns]  # A lone string is one pattern, not characters.
  compiled = [re.compile(p) for p in frozen_patterns]
  paths = jax.tree_util.tree_leaves(tree_paths(params))
  unmatched = [p.pattern for p in compiled if not any(p.fullmatch(x) for x in paths)]
  if unmatched:
    examples = ', '.join(repr(x) for x in paths[:6])
    raise ValueError(
        f'Frozen patterns {unmatched} match no parameter (patterns are '
        f"re.fullmatch'ed against '/'-joined paths; all patterns: "
        f'{list(frozen_patterns)}). {len(paths)} paths, e.g. {examples}.'
    )
  return jax.tree_util.tree_map(
      lambda path: not any(p.fullmatch(path) for p in compiled), tree_paths(params)
  )


def _flat(tree: Mapping) -> dict:
  return flax.traverse_util.flatten_dict(tree)


def split_trainable(params: Mapping, mask: Mapping) -> Tuple[dict, dict]:
  """Splits nested-dict `params` into (trainable, frozen) by `mask`.

  Both are nested dicts holding only their own leaves (a branch with none
  is absent), so the weight-decay mask and checkpoints still see the usual
  paths. `merge(trainable, frozen)` restores `params` exactly.
  """
  flat_params, flat_mask = _flat(params), _flat(mask)
  if flat_params.keys() != flat_mask.keys():
    raise ValueError(
        f'mask and params differ in paths: {sorted(set(flat_params) ^ set(flat_mask))[:6]}'
    )
  trainable = {k: v for k, v in flat_params.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat_params.items() if not flat_mask[k]}
  unflatten = flax.traverse_util.unflatten_dict
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of `split_trainable`: the full nested parameter dict."""
  flat_trainable, flat_frozen = _flat(trainable), _flat(frozen)
  overlap = flat_trainable.keys() & flat_frozen.keys()
  if overlap:
    raise ValueError(f'Paths both trainable and frozen: {sorted(overlap)[:6]}')
  return flax.traverse_util.unflatten_dict({**flat_trainable, **flat_frozen})
