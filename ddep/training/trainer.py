"""The train loop: one function that reads top to bottom (big_vision style).

validate config -> mesh -> data -> model and params -> optimizer -> state
-> restore if a checkpoint exists -> loop (step, log, eval, checkpoint) -> final eval.
"""

import contextlib
import dataclasses
import functools
import json
import signal
import threading
import time
from typing import Optional

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ddep.runs import checkpointing
from ddep.config import validation as config_validation
from ddep.evaluators import denoise as denoise_eval
from ddep.models import initialization
from ddep.data import pipelines as input_pipeline
from ddep.evaluators import metrics as metrics_lib
from ddep.training import optimizer as optimizer_lib
from ddep.runs import progress
from ddep.evaluators import protocol as protocol_eval
from ddep import report
from ddep.training import sharding
from ddep.training import steps as steps_lib
from ddep.runs import storage
from ddep.runs import summaries
from ddep.datasets import specs
from ddep.models import presets
from ddep.data import preparation


class NonFiniteLossError(FloatingPointError):
  pass


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


def host_params(state) -> dict:
  """The full parameters as numpy on every process, whatever their sharding."""

  def one(x):
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, optimizer_lib.merge(state['params'], state['frozen']))


def build_model(config, *, num_outputs: int, num_image_classes: int = 0):
  m = config.model
  return presets.create_model(
      m.preset,
      decoder_width_multiplier=int(m.decoder_width_multiplier),
      num_outputs=num_outputs,
      dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32,
      # σ conditioning (Sec. 3.2) only exists while denoising; fine-tuning drops it.
      noise_conditioning=bool(m.noise_conditioning) and config.task == 'denoise',
      remat=tuple(m.remat),
      attention_impl=m.attention_impl or None,
      dropout_rate=float(m.dropout_rate),
      num_image_classes=num_image_classes,
  )


def _num_image_classes(config, spec) -> int:
  if config.classify.num_classes:
    return int(config.classify.num_classes)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  info = tfds.builder(spec.tfds_name, data_dir=config.data.data_dir or None).info
  if not spec.image_labels_key:
    raise ValueError(f'config.task=classify: dataset {spec.name!r} has no image-level labels')
  return int(info.features[spec.image_labels_key].shape[-1])


def make_train_iterator(config, *, local_batch: int, state: Optional[dict] = None):
  d = config.data
  common = dict(
      batch_size=local_batch,
      seed=int(config.seed),
      data_dir=d.data_dir or None,
      state=state,
      skip_bad_examples=bool(d.skip_bad_examples),
  )
  area_range = tuple(d.area_range)
  if config.task == 'denoise':
    return input_pipeline.pretrain_dataset(
        d.dataset,
        image_size=tuple(d.image_size),
        area_range=area_range,
        images=d.get('pretrain_images', 'original'),
        **common,
    )
  if config.task == 'classify':
    return input_pipeline.supervised_dataset(
        d.dataset,
        image_size=tuple(d.image_size),
        split=d.get('train_split') or None,
        area_range=area_range,
        **common,
    )
  subset = None
  if int(d.label_count):
    subset = int(d.label_count)
  elif float(d.label_fraction) < 1.0:
    subset = float(d.label_fraction)
  return input_pipeline.finetune_dataset(
      d.dataset,
      crop_size=tuple(d.image_size),
      scale_range=tuple(d.scale_range) or None,
      subset=subset,
      subset_seed=int(d.subset_seed),
      split=d.get('train_split') or None,
      **common,
  )


def _to_global(tree, shardings):
  """Host values (identical on every process) -> global arrays with `shardings`."""

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


class _JsonlWriter:
  """Appends metric rows to workdir/metrics.jsonl (the report's training curves)."""

  def __init__(self, workdir):
    self._path = storage.path(workdir) / report.CURVES_FILE
    self._on = jax.process_index() == 0

  def write(self, step: int, scalars: dict) -> None:
    if self._on:
      row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
      storage.append_text(self._path, json.dumps(row) + '\n')

  def keep_until(self, step: int) -> None:
    """Drops the rows after `step`, the restored checkpoint, so a resumed run's curves
    do not double back; a line torn by a kill mid-write is dropped too."""
    if not self._on or not self._path.exists():
      return
    kept, dropped = [], 0
    for line in self._path.read_text().splitlines():
      try:
        row_step = json.loads(line)['step']
      except (json.JSONDecodeError, KeyError, TypeError):
        row_step = None
      if isinstance(row_step, (int, float)) and row_step <= step:
        kept.append(line + '\n')
      elif line.strip():
        dropped += 1
    if dropped:
      logging.info('%s: dropped %d rows after the restored step %d', self._path, dropped, step)
      storage.write_text_atomic(self._path, ''.join(kept))


def evaluate_segmentation(config, model, state, mesh, spec, *, eval_iter) -> dict:
  """Dataset-level confusion matrix over every eval example once, across all hosts."""
  num_classes = spec.num_classes
  acc = metrics_lib.ConfusionMatrixAccumulator(num_classes)
  if config.eval.protocol == 'whole':
    eval_step = jax.jit(
        steps_lib.make_segmentation_eval_step(
            model, num_classes, spec.ignore_label, flip=bool(config.eval.flip)
        ),
        out_shardings=sharding.replicated(mesh),
    )
    for batch in progress.track(eval_iter, desc='eval whole', unit='batches'):
      batch = sharding.global_batch({k: batch[k] for k in ('image', 'label', '_mask')}, mesh)
      acc.update(_fetch(eval_step(state['params'], state['frozen'], batch)))
  else:
    # Protocols (halves, sliding windows): window batches over all devices of all processes,
    # on the state's own (possibly FSDP) parameters.
    acc.update(
        protocol_eval.confusion_matrix(
            model,
            state,
            mesh,
            eval_iter,
            protocol=protocol_eval.protocol_from_config(config.eval),
            num_classes=num_classes,
            ignore_label=spec.ignore_label,
            batch_size=int(config.eval.batch_size),
        )
    )
  return metrics_lib.segmentation_metrics(acc.result(), class_names=spec.class_names)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, train_iter=None
) -> TrainResult:
  """Trains (or resumes) `config` in `workdir`.

  `train_iter` replaces the config's input pipeline with any iterator of
  process-local batches that has `get_state()`/`set_state()` and `num_examples`,
  the examples per epoch over all processes (the same number on every process:
  run lengths and schedules are computed from it).
  """
  config_validation.validate(config, num_devices=jax.device_count())
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
  jsonl = _JsonlWriter(workdir)
  if is_main:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh()
  spec = specs.get(config.data.dataset)
  if config.data.prepare and spec.name.startswith('demo'):
    preparation.prepare_once(
        spec.name,
        config.data.data_dir or None,
        decoded=config.data.get('pretrain_images', 'original') == 'decoded',
    )

  # Data.
  global_batch = int(config.data.batch_size)
  local_batch = global_batch // jax.process_count()
  if train_iter is None:
    train_iter = make_train_iterator(config, local_batch=local_batch)
  # Global: every process plans the same number of steps and the same schedule.
  num_train_examples = int(train_iter.num_examples)
  if is_main and getattr(train_iter, 'subset_ids', None) is not None:
    input_pipeline.write_subset_ids(str(workdir / 'subset_ids.txt'), train_iter.subset_ids)
  total_steps = optimizer_lib.steps_from(
      steps=int(config.total_steps) or None,
      epochs=float(config.total_epochs) or None,
      num_examples=num_train_examples,
      batch_size=global_batch,
      name='total',
  )

  # Model and parameters.
  num_outputs = {'denoise': 3, 'segment': spec.num_classes, 'classify': 3}[config.task]
  num_image_classes = _num_image_classes(config, spec) if config.task == 'classify' else 0
  model = build_model(config, num_outputs=num_outputs, num_image_classes=num_image_classes)
  h, w = config.data.image_size
  sample = jnp.zeros((1, h, w, 3), jnp.float32)
  rng = jax.random.key(int(config.seed))
  init_rng, train_rng = jax.random.split(rng)

  def init_params(key):
    if config.task == 'classify':
      return model.init(key, sample, method=type(model).classify)['params']
    if model.noise_conditioning:
      return model.init(key, sample, jnp.ones((1,)))['params']
    return model.init(key, sample)['params']

  params = jax.jit(init_params)(init_rng)
  params = initialization.initial_params(config, jax.device_get(params))
  mask = optimizer_lib.trainable_mask(params, tuple(config.frozen))
  trainable, frozen = optimizer_lib.split_trainable(params, mask)

  # Optimizer: Adam + warm-up + cosine (paper Sec. 4.3).
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

  # Train state with explicit shardings.
  make_state = functools.partial(steps_lib.init_train_state, tx)

  # Raw uint32 key data: checkpointable as a plain array.
  train_rng = jax.random.key_data(train_rng)
  abstract_state = jax.eval_shape(make_state, trainable, frozen, train_rng)
  state_shardings = sharding.state_shardings(abstract_state, mesh, fsdp=bool(config.mesh.fsdp))
  state = jax.jit(make_state, out_shardings=state_shardings)(
      _to_global(trainable, state_shardings['params']),
      _to_global(frozen, state_shardings['frozen']),
      _to_global(np.asarray(train_rng), state_shardings['rng']),
  )
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
  logging.info(
      'params: %d trainable, %d frozen; %d steps of global batch %d (%d examples)',
      n_train,
      n_frozen,
      total_steps,
      global_batch,
      num_train_examples,
  )

  # Resume.
  ckpt = checkpointing.Checkpointer(
      workdir,
      keep=int(config.keep_checkpoints),
      async_save=bool(config.get('checkpoint_async', True)),
      best_metric='psnr' if config.task == 'denoise' else 'miou',
  )
  start_step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state,
        state_shardings,
    )
    state, data_state = ckpt.restore(latest, abstract)
    start_step = int(_fetch(state['step']))
    if data_state is None:
      raise FileNotFoundError(
          f'checkpoint step {start_step} in {ckpt.directory} has no input '
          f'pipeline state for process {jax.process_index()}'
      )
    try:
      train_iter.set_state(data_state)
    except ValueError as e:
      raise ValueError(
          f'cannot resume from checkpoint step {start_step} in {ckpt.directory}: ' f'{e}'
      ) from e
    logging.info('resumed from step %d', start_step)
    if is_main:
      print(f'[ddep] resumed {workdir} at step {start_step}/{total_steps}', flush=True)
  jsonl.keep_until(start_step)  # Rows a killed run logged after its last checkpoint.
  if start_step == 0:
    summaries.write_start(writer, config, model, num_trainable=n_train, num_frozen=n_frozen)

  train_step = jax.jit(
      steps_lib.make_train_step(steps_lib.make_loss_fn(model, config), tx, schedule, accum),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )

  eval_iter = None
  if config.task == 'segment':
    pad_to = tuple(config.data.eval_pad_to) or None
    eval_iter = input_pipeline.eval_dataset(
        spec.name,
        batch_size=int(config.data.eval_batch_size) // jax.process_count(),
        split=config.data.eval_split or None,
        data_dir=config.data.data_dir or None,
        pad_to=pad_to,
    )
  num_pictures = int(config.eval.get('summary_images', 0))
  previews = (
      summaries.first_examples(eval_iter, num_pictures)
      if eval_iter is not None and is_main
      else None
  )
  denoise_val = None
  if config.task == 'denoise' and int(config.eval.get('denoise_images', 0)):
    denoise_val = denoise_eval.Evaluator(
        model,
        config.denoise,
        denoise_eval.load_heldout(
            spec.name,
            num_images=int(config.eval.denoise_images),
            image_size=(h, w),
            split=config.eval.get('denoise_split', ''),
            data_dir=config.data.data_dir or None,
        ),
        mesh,
        batch_size=int(config.data.eval_batch_size),
    )
  has_eval = eval_iter is not None or denoise_val is not None

  def check_finite(step: int):
    bad = int(_fetch(state['first_nonfinite']))
    if bad >= 0:
      ckpt.wait()  # Let the good checkpoints already queued finish; nothing new is saved.
      last = ckpt.latest_step()
      raise NonFiniteLossError(
          f'non-finite loss or gradient at step {bad}; stopping. The last good checkpoint '
          f'(step {last}) in {ckpt.directory} was left untouched.'
      )

  def run_denoise_eval(step: int) -> dict:
    scalars, pictures = denoise_val.run(state['params'], state['frozen'], pictures=num_pictures)
    writer.write_scalars(step, scalars)
    jsonl.write(step, scalars)
    if pictures:
      summaries.write_denoising(writer, step, pictures)
    if is_main:
      print(
          f'[ddep] step {step}: held-out eps-MSE {scalars["val/eps_mse"]:.4f} '
          f'PSNR {scalars["val/psnr"]:.2f} dB',
          flush=True,
      )
    ckpt.save_best(step, state, scalars['val/psnr'])
    return scalars

  def run_eval(step: int) -> Optional[dict]:
    if denoise_val is not None:
      return run_denoise_eval(step)
    if eval_iter is None:
      return None
    result = evaluate_segmentation(config, model, state, mesh, spec, eval_iter=eval_iter)
    scalars = {'val/miou': result['miou'], 'val/pixel_accuracy': result['pixel_accuracy']}
    writer.write_scalars(step, scalars)
    jsonl.write(step, scalars)
    panels = None
    if num_pictures:
      params = host_params(state)  # Every process: a gather when the params are sharded.
      panels = summaries.preview_panels(config, model, params, spec, previews)
    summaries.write_segmentation(writer, step, result, panels)
    if is_main:
      print(f'[ddep] step {step}: val mIoU {100 * result["miou"]:.2f}', flush=True)
    ckpt.save_best(step, state, result['miou'])
    return result

  hooks = [
      periodic_actions.ReportProgress(
          num_train_steps=total_steps, writer=writer, every_steps=int(config.log_every)
      )
  ]
  if config.profile and is_main:
    hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5))

  pending = []
  t0, step = time.time(), start_step
  preemption = _PreemptionWatch(ckpt)
  with metric_writers.ensure_flushes(writer), _closing(preemption):
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.global_batch(next(train_iter), mesh)
        state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      for hook in hooks:
        hook(step)
      if step % int(config.log_every) == 0 or step == total_steps:
        check_finite(step)
        scalars = {k: float(np.mean([_fetch(m[k]) for m in pending])) for k in pending[0]}
        pending = []
        writer.write_scalars(step, scalars)
        jsonl.write(step, scalars)
        if is_main:
          rate = (step - start_step) / max(time.time() - t0, 1e-9)
          eta = (total_steps - step) / max(rate, 1e-9)
          print(
              f'[ddep] {config.task} step {step}/{total_steps} loss {scalars["train/loss"]:.4f} '
              f'lr {scalars["train/lr"]:.2e} {rate:.2f} steps/s ETA {eta:.0f}s',
              flush=True,
          )
      saved = step % int(config.checkpoint_every) == 0 or step == total_steps
      if saved:
        check_finite(step)
        ckpt.save(step, state, data_state=train_iter.get_state())
      if preemption.reached(step):
        check_finite(step)
        if not saved:
          ckpt.save(step, state, data_state=train_iter.get_state())
        ckpt.wait()
        ckpt.close()
        raise Preempted(
            f'preempted (SIGTERM) at step {step}/{total_steps}: every process saved step {step} '
            f'to {ckpt.directory}; rerun the same command to resume there'
        )
      if (
          has_eval
          and config.eval_every
          and step % int(config.eval_every) == 0
          and step != total_steps
      ):
        run_eval(step)

  check_finite(step)
  if ckpt.latest_step() != total_steps:
    ckpt.save(total_steps, state, data_state=train_iter.get_state())
  result = {}
  if denoise_val is not None and start_step != total_steps:
    run_denoise_eval(total_steps)
  if eval_iter is not None:
    done = workdir / report.RESULTS_FILE
    if done.exists() and start_step == total_steps:
      result = json.loads(done.read_text())
    else:
      result = run_eval(total_steps)
      skipped = skipped_examples(train_iter, eval_iter)  # A collective: every process.
      if is_main:
        print(metrics_lib.format_table(result), flush=True)
        report.write_results(
            workdir,
            method=config.method,
            dataset=spec.name,
            label_fraction=_label_fraction(config, train_iter),
            label_count=_label_count(config, train_iter),
            subset_seed=int(config.data.subset_seed),
            decoder_width=int(config.model.decoder_width_multiplier),
            metrics=result,
            model=config.model.preset,
            pretraining=report.pretraining_record(config.init_from),
            skipped_examples=skipped,
        )
  ckpt.wait()
  ckpt.close()
  writer.flush()
  logging.info(
      'process %d/%d finished at step %d', jax.process_index(), jax.process_count(), total_steps
  )
  return TrainResult(metrics=result or {}, params=host_params(state), step=total_steps)


@contextlib.contextmanager
def _closing(preemption):
  try:
    yield preemption
  finally:
    preemption.close()


def skipped_examples(train_iter, eval_iter) -> dict:
  """The bad examples dropped by every process (`data.skip_bad_examples`), for results.json:
  counts, and ids up to input_pipeline.MAX_LISTED_BAD_EXAMPLES per process and pipeline."""
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
