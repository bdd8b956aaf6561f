"""The jit-able train and eval steps (each task's loss is in ddep.training.tasks).

The train state is a plain dict (big_vision style):
  params           trainable parameters (the optimizer sees only these)
  frozen           frozen parameters (DDeP's encoder): no gradients, no optimizer state
  opt              optimizer state
  step             int32 scalar
  rng              the run's base PRNG key data (uint32); each step uses fold_in(rng, step). Kept in the
                   state, not closed over, so runs that differ only in seed share one
                   compiled step (and one persistent-cache entry).
  first_nonfinite  int32 scalar: first step whose loss or gradient was not finite, or -1.
                   Kept on device so checking it costs no host sync per step.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from ddep.evaluators import metrics as metrics_lib
from ddep.models import TransUNet
from ddep.training import optimizer as optimizer_lib


def init_train_state(tx: optax.GradientTransformation, trainable, frozen, rng) -> dict:
  """The train state above at step 0 (jit it with out_shardings to place it)."""
  return dict(
      params=trainable,
      frozen=frozen,
      opt=tx.init(trainable),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
      first_nonfinite=jnp.full((), -1, jnp.int32),
  )


def host_params(state) -> dict:
  """The full parameters as numpy on every process, whatever their sharding."""

  def one(x):
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, optimizer_lib.merge(state['params'], state['frozen']))


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable,
    accumulation_steps: int = 1,
) -> Callable:
  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    step = state['step']
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)

    def loss_of_trainable(trainable):
      # `frozen` is closed over: JAX differentiates w.r.t. `trainable` only.
      return loss_fn(optimizer_lib.merge(trainable, state['frozen']), batch, rng)

    (loss, aux), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(state['params'])
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Recorded 1-based, like checkpoint and log step numbers (steps completed).
    first_bad = jnp.where(
        (state['first_nonfinite'] < 0) & ~finite, step + 1, state['first_nonfinite']
    )
    new_state = dict(
        params=params,
        frozen=state['frozen'],
        opt=opt,
        step=step + 1,
        rng=state['rng'],
        first_nonfinite=first_bad.astype(jnp.int32),
    )
    # Only the gradient's norm, which the finiteness check needs anyway. The norms of the
    # parameters and of the update were reductions over the old parameters and moments
    # that XLA:GPU computes beside the update that overwrites them: it copied every
    # donated buffer first, and launched per-parameter reductions: 3,986 kernels per DeP
    # step against 2,780 without them (docs/performance.md). The trainer logs
    # `param_norm` of the state at each logging step instead.
    out = {
        'train/loss': loss,
        'train/grad_norm': grad_norm,
        'train/lr': schedule(step // accumulation_steps),
        **aux,
    }
    return new_state, out

  return train_step


@jax.jit
def param_norm(params) -> jax.Array:
  """The global L2 norm of the (trainable) parameters, logged as `train/param_norm`."""
  return optax.tree.norm(params)


def make_segmentation_eval_step(
    model: TransUNet, num_classes: int, ignore_label: int = 255, flip: bool = False
):
  """(params, frozen, batch) -> confusion matrix of this (global) batch.

  With `flip`, logits are averaged with those of the mirrored image (Sec. 4.3).
  """

  def eval_step(params, frozen, batch):
    variables = {'params': optimizer_lib.merge(params, frozen)}
    logits = model.apply(variables, batch['image'])
    if flip:
      mirrored = model.apply(variables, batch['image'][:, :, ::-1])[:, :, ::-1]
      logits = (logits + mirrored) / 2
    return metrics_lib.confusion_matrix(
        batch['label'],
        jnp.argmax(logits, -1),
        num_classes,
        ignore_label=ignore_label,
        mask=batch['_mask'],
    )

  return eval_step
