"""The train loop (flax examples / big_vision style): `train_and_evaluate` reads top to
bottom as named steps, each a module-level function:

  validate -> task and dataset -> workdir -> input -> model -> optimizer -> train state
  -> restore -> compile the step -> loop (step, log, checkpoint, evaluate) -> finish.

What differs between denoise, segment and classify runs lives in `ddep.training.tasks`.
"""

import contextlib
import dataclasses
import functools
import signal
import threading
import time
from typing import Optional

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from ddep.config import validation as config_validation
from ddep.data import pipelines
from ddep.data import preparation
from ddep.datasets import specs
from ddep.evaluators import metrics as metrics_lib
from ddep.models import initialization
from ddep.runs import checkpointing
from ddep.runs import lock as lock_lib
from ddep.runs import storage
from ddep.runs import summaries
from ddep.runs import workdir as workdir_lib
from ddep.training import compiled
from ddep.training import layouts
from ddep.training import optimizer as optimizer_lib
from ddep.training import sharding
from ddep.training import steps as steps_lib
from ddep.training import tasks


class NonFiniteLossError(FloatingPointError):
  pass


class ResumeError(ValueError):
  """The workdir's saved run does not fit this config (e.g. it is past total_steps)."""


class Preempted(RuntimeError):
  """SIGTERM: every process saved the same step and stopped; rerunning resumes it."""


# What ddep.main exits with after a preemption (EX_TEMPFAIL: try again).
PREEMPTED_EXIT_CODE = 75


class _PreemptionWatch:
  """Tells, at every step, whether to save and stop because of a SIGTERM.

  Multi-process: the preemption sync manager that jax.distributed.initialize starts
  catches SIGTERM on any process and makes all of them agree on one step, which
  orbax's `reached_preemption` reports. One process without that runtime: our own
  handler, so that the step is simply the next one.
  """

  def __init__(self, ckpt):
    self._ckpt = ckpt
    self._signalled = False
    self._previous = None
    if (
        not jax.distributed.is_initialized()
        and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    # Every process calls this at every step: the sync point protocol needs it.
    return self._ckpt.reached_preemption(step) or self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


@dataclasses.dataclass
class TrainResult:
  metrics: dict  # final evaluation (segmentation) or {}
  params: dict  # host copy of the final parameters (trainable and frozen merged)
  step: int


def _fetch(x) -> np.ndarray:
  """A replicated array's value; works when the array spans other processes' devices."""
  return np.asarray(x.addressable_data(0))


def _to_global(tree, shardings):
  """Host values (identical on every process) -> global arrays with `shardings`."""

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, train_iter=None
) -> TrainResult:
  """Trains (or resumes) `config` in `workdir`.

  `train_iter` replaces the task's input pipeline with any iterator of process-local
  batches that has `get_state()`/`set_state()` and `num_examples`, the examples per
  epoch over all processes (the same number on every process: run lengths and
  schedules are computed from it).
  """
  config_validation.validate(config, num_devices=jax.device_count())
  task, spec = tasks.get(config.task), specs.get(config.data.dataset)
  initialization.check_sources(config)  # Before the workdir is created or touched.
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with hold_workdir(workdir):
    return _train_and_evaluate(config, task, spec, workdir, train_iter)


def _train_and_evaluate(config, task, spec, workdir, train_iter) -> TrainResult:
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
  log = workdir_lib.MetricsLog(workdir)
  mesh = sharding.make_mesh()
  prepare_data(config, spec)

  global_batch = int(config.data.batch_size)
  if train_iter is None:
    train_iter = task.train_data(config, spec, local_batch=global_batch // jax.process_count())
  total_steps = plan_steps(config, train_iter)
  if is_main and getattr(train_iter, 'subset_ids', None) is not None:
    workdir_lib.write_subset_ids(str(workdir / workdir_lib.SUBSET_IDS_FILE), train_iter.subset_ids)

  model = task.build_model(config, spec)
  schedule, tx = create_optimizer(config, total_steps)
  # Another run of this process with an equal key reuses its compiled steps.
  steps_key = (task.name, model, compiled.config_key(config), total_steps, mesh)
  abstract, shardings, counts = abstract_train_state(config, task, model, tx, mesh, key=steps_key)
  logging.info(
      'params: %d trainable, %d frozen; %d steps of global batch %d (%d examples)',
      *counts,
      total_steps,
      global_batch,
      train_iter.num_examples,
  )

  ckpt = checkpointing.Checkpointer(
      workdir,
      keep=int(config.keep_checkpoints),
      async_save=bool(config.get('checkpoint_async', True)),
      best_metric=task.best_metric,
  )
  # A resumed run takes its whole state from the checkpoint: it neither initialises nor
  # reads init_from (on a pod restarted after preemption, a compile and a read saved).
  state, start_step = restore(ckpt, abstract, shardings, train_iter)
  if state is None:
    state = create_train_state(config, task, model, tx, abstract, shardings, key=steps_key)
  if start_step > total_steps:
    raise ResumeError(
        f'{ckpt.directory} holds step {start_step}, past config.total_steps={total_steps} '
        '(or total_epochs): raise it to at least the saved step, or use a new workdir'
    )
  workdir_lib.write_config(workdir, config)  # Only once the saved run is known to fit it.
  if start_step and is_main:
    print(f'[ddep] resumed {workdir} at step {start_step}/{total_steps}', flush=True)
  log.keep_until(start_step)  # Rows a killed run logged after its last checkpoint.
  if start_step == 0:
    summaries.write_start(writer, config, model, num_trainable=counts[0], num_frozen=counts[1])

  train_step = compile_train_step(config, task, model, tx, schedule, shardings, mesh, key=steps_key)
  evaluators = task.evaluators(config, spec, model, mesh, writer)

  def evaluate(step):
    run_evaluators(evaluators, state, step, writer=writer, log=log, ckpt=ckpt)

  if evaluators and evaluation_interrupted(config, log, start_step, total_steps):
    print(f'[ddep] evaluating step {start_step} again: its best/ save did not finish', flush=True)
    log.drop_evaluations(start_step)
    evaluate(start_step)

  hooks = [
      periodic_actions.ReportProgress(
          num_train_steps=total_steps, writer=writer, every_steps=int(config.log_every)
      )
  ]
  if config.profile and is_main:
    hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5))
  pending, step = [], start_step
  rate = _Rate(start_step)
  preemption = _PreemptionWatch(ckpt)
  with metric_writers.ensure_flushes(writer), _closing(preemption):
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.global_batch(next(train_iter), mesh)
        if step == start_step + 1:  # Compiles the step; the state moves into its layouts.
          state = train_step.place(state, batch)
        state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      for hook in hooks:
        hook(step)
      if step % int(config.log_every) == 0 or step == total_steps:
        check_finite(state, ckpt)
        log_train_metrics(
            config,
            pending,
            step,
            total_steps,
            rate,
            writer=writer,
            log=log,
            latest={'train/param_norm': steps_lib.param_norm(state['params'])},
        )
        pending = []
      saved = step % int(config.checkpoint_every) == 0 or step == total_steps
      if saved:
        check_finite(state, ckpt)
        ckpt.save(step, state, data_state=train_iter.get_state())
      if preemption.reached(step):
        stop_preempted(state, ckpt, train_iter, step, total_steps, saved=saved)
      if evaluators and config.eval_every and step % int(config.eval_every) == 0:
        if step != total_steps:
          check_finite(state, ckpt)  # Never evaluate, nor keep as best/, NaN weights.
          evaluate(step)

  check_finite(state, ckpt)
  if ckpt.latest_step() != total_steps:
    ckpt.save(total_steps, state, data_state=train_iter.get_state())
  result = finish(
      config, task, spec, workdir, evaluate, evaluators, train_iter, start_step, total_steps
  )
  ckpt.wait()
  ckpt.close()
  writer.flush()
  logging.info(
      'process %d/%d finished at step %d', jax.process_index(), jax.process_count(), total_steps
  )
  return TrainResult(metrics=result or {}, params=steps_lib.host_params(state), step=total_steps)


@contextlib.contextmanager
def hold_workdir(workdir):
  """One run per workdir (ddep.runs.lock) while the block runs.

  Process 0 takes the lock; every process learns its outcome, so that a second start
  stops on all of its processes with the same one-line error, having changed nothing.
  """
  lock = lock_lib.WorkdirLock(workdir)
  refused = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except lock_lib.WorkdirLockedError as e:
      refused = str(e)
  refused = sharding.allgather_json(refused)[0]
  if refused:
    raise lock_lib.WorkdirLockedError(refused)
  if lock.took_over:
    print(f'[ddep] {lock.took_over}', flush=True)
  try:
    yield
  finally:
    if jax.process_index() == 0:
      lock.release()


def evaluation_interrupted(config, log, step: int, total_steps: int) -> bool:
  """Whether the evaluation due at the resumed `step` has no logged result (a kill came
  before its best/ save finished); process 0's metrics log decides for every process."""
  if not step or step == total_steps:  # finish() owns the final evaluation.
    return False
  due = bool(config.eval_every) and step % int(config.eval_every) == 0
  return bool(sharding.allgather_json(due and not log.evaluated(step))[0])


def prepare_data(config, spec: specs.DatasetSpec) -> None:
  """Generated datasets (the demo scenes) are built on first use; others by ddep.prepare."""
  if config.data.prepare and spec.name.startswith('demo'):
    preparation.prepare_once(
        spec.name,
        config.data.data_dir or None,
        decoded=config.data.get('pretrain_images', 'original') == 'decoded',
    )


def plan_steps(config, train_iter) -> int:
  """Total steps from config.total_steps or total_epochs over the global epoch size (the
  same on every process, so every process plans the same steps and schedule)."""
  return optimizer_lib.steps_from(
      steps=int(config.total_steps) or None,
      epochs=float(config.total_epochs) or None,
      num_examples=int(train_iter.num_examples),
      batch_size=int(config.data.batch_size),
      name='total',
  )


def create_optimizer(config, total_steps: int):
  """(schedule, tx): Adam + warm-up + cosine (paper Sec. 4.3), per config.optim."""
  o = config.optim
  accum = int(o.accumulation_steps)
  schedule = optimizer_lib.make_schedule(
      base_lr=float(o.lr),
      total_steps=max(total_steps // accum, 1),
      warmup_steps=int(o.warmup_steps),
      decay=o.decay,
      end_lr_factor=float(o.end_lr_factor),
  )
  tx = optimizer_lib.make_optimizer(
      name=o.name,
      learning_rate=schedule,
      weight_decay=float(o.weight_decay),
      b1=float(o.b1),
      b2=float(o.b2),
      grad_clip_norm=float(o.grad_clip_norm) or None,
      accumulation_steps=accum,
  )
  return schedule, tx


def _memo(key, build):
  return build() if key is None else compiled.cached(key, build)


def _tree_key(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


def _init_params_fn(config, task: tasks.Task, model, key):
  image_hw = tuple(config.data.image_size)
  return _memo(
      key and ('init', task.name, model, image_hw),
      lambda: jax.jit(lambda k: task.init_params(model, k, image_hw)),
  )


def _split(config, params):
  return optimizer_lib.split_trainable(
      params, optimizer_lib.trainable_mask(params, tuple(config.frozen))
  )


def abstract_train_state(config, task: tasks.Task, model, tx, mesh, *, key=None):
  """(the state's shapes and dtypes, their shardings, (trainable, frozen) parameter
  counts), traced but not computed: what a checkpoint is restored into, or a fresh state
  is made like (create_train_state, whose init reuses this trace)."""
  params = jax.eval_shape(_init_params_fn(config, task, model, key), jax.random.key(0))
  trainable, frozen = _split(config, params)
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  abstract = jax.eval_shape(
      functools.partial(steps_lib.init_train_state, tx), trainable, frozen, rng
  )
  shardings = sharding.state_shardings(abstract, mesh, fsdp=bool(config.mesh.fsdp))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
  return abstract, shardings, (count(trainable), count(frozen))


def create_train_state(config, task: tasks.Task, model, tx, abstract, shardings, *, key=None):
  """A fresh state at step 0, like `abstract` and placed with `shardings`.

  Parameters are initialised, then replaced by pretrained or `init_from` ones
  (ddep.models.initialization), split into trainable and frozen by `config.frozen`, and
  placed with explicit shardings (data parallel, or FSDP with config.mesh.fsdp). `key`
  (see ddep.training.compiled) lets runs of one process share the compiled init.
  """
  init_rng, train_rng = jax.random.split(jax.random.key(int(config.seed)))
  params = _init_params_fn(config, task, model, key)(init_rng)
  params = initialization.initial_params(config, jax.device_get(params))
  trainable, frozen = _split(config, params)
  make_state = functools.partial(steps_lib.init_train_state, tx)
  place = _memo(
      key and ('state', key, _tree_key(shardings), _tree_key(abstract)),
      lambda: jax.jit(make_state, out_shardings=shardings),
  )
  # Raw uint32 key data: checkpointable as a plain array.
  train_rng = np.asarray(jax.random.key_data(train_rng))
  return place(
      _to_global(trainable, shardings['params']),
      _to_global(frozen, shardings['frozen']),
      _to_global(train_rng, shardings['rng']),
  )


def restore(ckpt, abstract, shardings, train_iter) -> tuple[Optional[dict], int]:
  """(state, step) from the latest checkpoint with the input position it saved, or
  (None, 0) when there is none."""
  latest = ckpt.latest_step()
  if latest is None:
    return None, 0
  state, data_state = ckpt.restore(latest, sharding.abstract(abstract, shardings))
  step = int(_fetch(state['step']))
  where = ckpt.directory / str(latest) / 'data'
  if data_state is None:
    raise ckpt.resume_error(
        latest, f'{where}: missing (the input pipeline position of process {jax.process_index()})'
    )
  try:
    if not isinstance(data_state, dict):
      raise pipelines.StateError(f'a JSON {type(data_state).__name__}, not an object')
    if data_state.get('step', step) != step:
      raise pipelines.StateError(
          f"its step {data_state.get('step')!r} is not the checkpoint's {step}"
      )
    train_iter.set_state(data_state)
  except pipelines.StateError as e:
    raise ckpt.resume_error(latest, f'{where}: bad input pipeline position: {e}') from e
  except ValueError as e:  # Another batch size, dataset or process count than the run's.
    raise ResumeError(f'cannot resume from {ckpt.directory}/{latest}: {e}') from e
  logging.info('resumed from step %d', step)
  return state, step


def compile_train_step(config, task: tasks.Task, model, tx, schedule, shardings, mesh, *, key=None):
  """The task's loss in one sharded step that donates the old state, its state in the
  layouts XLA picks (ddep.training.layouts); runs of one process with an equal `key`
  (ddep.training.compiled) share it."""
  accum = int(config.optim.accumulation_steps)
  return _memo(
      key and ('train', key, _tree_key(shardings)),
      lambda: layouts.DonatingStep(
          steps_lib.make_train_step(task.loss_fn(model, config), tx, schedule, accum),
          shardings,
          sharding.batch_sharding(mesh),
          sharding.replicated(mesh),
          layouts=config.mesh.state_layouts,
      ),
  )


def check_finite(state, ckpt) -> None:
  """Raises NonFiniteLossError if any step so far had a non-finite loss or gradient."""
  bad = int(_fetch(state['first_nonfinite']))
  if bad >= 0:
    ckpt.wait()  # Let the good checkpoints already queued finish; nothing new is saved.
    raise NonFiniteLossError(
        f'non-finite loss or gradient at step {bad}; stopping. The last good checkpoint '
        f'(step {ckpt.latest_step()}) in {ckpt.directory} was left untouched.'
    )


class _Rate:
  """Steps per second since the loop (re)started, for the progress line."""

  def __init__(self, start_step: int):
    self._start, self._t0 = start_step, time.time()

  def __call__(self, step: int) -> float:
    return (step - self._start) / max(time.time() - self._t0, 1e-9)


def log_train_metrics(
    config, pending, step, total_steps, rate, *, writer, log, latest=None
) -> None:
  """The means of the steps since the last log and the `latest` values (those of this
  step alone), to TensorBoard and metrics.jsonl, and a line."""
  scalars = {k: float(np.mean([_fetch(m[k]) for m in pending])) for k in pending[0]}
  scalars.update({k: float(_fetch(v)) for k, v in (latest or {}).items()})
  writer.write_scalars(step, scalars)
  log.write(step, scalars)
  if jax.process_index() == 0:
    per_second = rate(step)
    eta = (total_steps - step) / max(per_second, 1e-9)
    print(
        f'[ddep] {config.task} step {step}/{total_steps} loss {scalars["train/loss"]:.4f} '
        f'lr {scalars["train/lr"]:.2e} {per_second:.2f} steps/s ETA {eta:.0f}s',
        flush=True,
    )


def run_evaluators(evaluators, state, step: int, *, writer, log, ckpt) -> None:
  """Each evaluator's scalars to TensorBoard and metrics.jsonl; best/ follows its metric.

  The rows are written after the best/ save has finished: their presence tells a resumed
  run that this evaluation is complete (evaluation_interrupted).
  """
  for evaluator in evaluators:
    scalars = evaluator.run(state, step)
    if evaluator.best_key:
      ckpt.save_best(step, state, scalars[evaluator.best_key])
    writer.write_scalars(step, scalars)
    log.write(step, scalars)


def stop_preempted(state, ckpt, train_iter, step: int, total_steps: int, *, saved: bool):
  """SIGTERM: save this step (if not saved already) on every process, then stop."""
  check_finite(state, ckpt)
  if not saved:
    ckpt.save(step, state, data_state=train_iter.get_state())
  ckpt.wait()
  ckpt.close()
  raise Preempted(
      f'preempted (SIGTERM) at step {step}/{total_steps}: every process saved step {step} '
      f'to {ckpt.directory}; rerun the same command to resume there'
  )


def finish(config, task, spec, workdir, evaluate, evaluators, train_iter, start_step, total_steps):
  """The final evaluation and, for a segment run, results.json; {} without one.

  A run restarted after it finished evaluates again only if its results are missing.
  """
  done = workdir / workdir_lib.RESULTS_FILE
  if not evaluators:
    return {}
  if start_step == total_steps:
    log = workdir_lib.MetricsLog(workdir)
    evaluated = sharding.allgather_json(log.evaluated(total_steps))[0]
    if evaluated and (not task.writes_results or done.exists()):
      return workdir_lib.read_results(done) if task.writes_results else {}
    # Killed during the final evaluation, its best/ save or results.json: do it again.
    log.drop_evaluations(total_steps)
  evaluate(total_steps)
  if not task.writes_results:
    return {}
  [validation] = evaluators
  result = validation.result
  skipped = skipped_examples(train_iter, validation.eval_iter)  # A collective: every process.
  if jax.process_index() == 0:
    print(metrics_lib.format_table(result), flush=True)
    workdir_lib.write_results(
        workdir,
        method=config.method,
        dataset=spec.name,
        label_fraction=_label_fraction(config, train_iter),
        label_count=_label_count(config, train_iter),
        subset_seed=int(config.data.subset_seed),
        decoder_width=int(config.model.decoder_width_multiplier),
        metrics=result,
        model=config.model.preset,
        pretraining=workdir_lib.pretraining_record(config.init_from),
        skipped_examples=skipped,
    )
  return result


@contextlib.contextmanager
def _closing(preemption):
  try:
    yield preemption
  finally:
    preemption.close()


def skipped_examples(train_iter, eval_iter) -> dict:
  """The bad examples dropped by every process (`data.skip_bad_examples`), for results.json:
  counts, and ids up to ddep.data.examples.MAX_LISTED_BAD_EXAMPLES per process and pipeline."""
  mine = {
      'train': list(getattr(train_iter, 'bad_example_ids', [])),
      'num_train': int(getattr(train_iter, 'num_bad_examples', 0)),
      'eval': list(getattr(eval_iter, 'bad_example_ids', [])),
      'num_eval': int(getattr(eval_iter, 'num_bad_examples', 0)),
  }
  everyone = sharding.allgather_json(mine)
  return {
      'num_train': sum(p['num_train'] for p in everyone),
      'train_ids': sorted({i for p in everyone for i in p['train']}),
      'num_eval': sum(p['num_eval'] for p in everyone),
      'eval_ids': sorted({i for p in everyone for i in p['eval']}),
  }


def _label_fraction(config, train_iter) -> float:
  """The fraction of the split that was labelled: for `label_count=N`, N / split size."""
  ids = getattr(train_iter, 'subset_ids', None)
  total = getattr(train_iter, 'split_num_examples', None)
  if int(config.data.label_count) and ids is not None and total:
    return len(ids) / total
  return float(config.data.label_fraction)


def _label_count(config, train_iter) -> Optional[int]:
  """The labelled images of a `label_count=` run (the subset drawn), else None."""
  if not int(config.data.label_count):
    return None
  ids = getattr(train_iter, 'subset_ids', None)
  return len(ids) if ids is not None else int(config.data.label_count)
