r"""Step time, FLOPs, MFU and memory of the train and eval steps on synthetic batches.

  python -m ddep.tools.benchmark --preset r50_vit_b16 --image_size 512 --batch_size 8 \
      --dtype bfloat16 --task denoise,ddep --eval_size 1024x2048 --output bench.jsonl
  python -m ddep.tools.benchmark --config=configs/pretrain_cityscapes.py:method=ddep \
      --find_max_batch

With `--config`, the model, task, frozen parameters, loss, crop, dtype, remat,
attention, batch (global, and its accumulation) and eval protocol come from an
experiment config, and the config's input pipeline is timed too (`input` phase,
images/s on this host; needs TensorFlow and the prepared dataset, `--input_batches 0`
skips it). Flags given explicitly override the config.

Each phase (a train step per `--task`, then the eval step at `--eval_size`) is
compiled, warmed up and timed: `--trials` runs of `--steps` back-to-back steps,
each run ending in a single `block_until_ready`, and the step time is the median
over runs of run time / steps. FLOPs come from XLA (`cost_analysis()`) and from
`ddep.models.flops`; MFU uses the analytic (model) count, HFU XLA's (which includes
remat's recomputation). With several phases, each runs in its own process so
that `peak_bytes_in_use` is that phase's own peak.

Tasks: `denoise` = DeP (everything trained), `ddep` = DDeP (encoder frozen, Sec. 3.1),
`segment` = fine-tuning with pixelwise cross-entropy, `classify` = the encoder alone with a
`--num_classes` linear head on pooled features and softmax cross-entropy (supervised encoder
pretraining; the size of timm's `vit_base_r50_s16_224` train step, docs/performance_cpu.md).

Flags are absl's (`--flag value` or `--flag=value`); `--config` is ml_collections'
config file flag, as in `ddep.main`, so `--config.key=value` overrides the config.
Without `--config` it needs no TensorFlow, TFDS, clu or ml_collections: it runs on
a bare JAX + flax + optax + absl install (`ddep.tools.benchmark_input` times the input
pipelines on a synthetic dataset).
"""

import dataclasses
import datetime
import functools
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags

from ddep.runs import process

TASKS = ('denoise', 'ddep', 'segment', 'classify')
# DDeP freezes the encoder (configs: frozen=('encoder/.*',)).
DDEP_FROZEN = ('encoder/.*',)

# Per chip, from the vendors' datasheets: dense (no sparsity) bf16 peak, TFLOP/s, and
# HBM bandwidth, bytes/s (for the roofline of GPU programs; None where not needed).
# First match of the regex on `device.device_kind` wins, so variants come first.
DEVICES = (
    (r'TPU v4', 'TPU v4', 275.0, None),
    (r'TPU v5 ?lite|TPU v5e', 'TPU v5e', 197.0, None),
    (r'TPU v5p?$', 'TPU v5p', 459.0, None),  # JAX reports v5p as 'TPU v5'.
    (r'TPU v6 ?lite|TPU v6e', 'TPU v6e', 918.0, None),
    (r'H100.*PCIe', 'H100 PCIe', 756.0, 2.0e12),
    # NVL cards have rates of their own, not double-checked here: no MFU rather
    # than a guessed one.
    (r'NVL', None, None, None),
    (r'H100', 'H100 SXM', 989.0, 3.35e12),
    (r'H200', 'H200 SXM', 989.0, 4.8e12),
    (r'A100.*80', 'A100', 312.0, 2.039e12),
    (r'A100', 'A100', 312.0, 1.555e12),
)


def _device_row(device_kind: str) -> tuple:
  for row in DEVICES:
    if re.search(row[0], device_kind):
      return row
  return None, None, None, None


def peak_bf16_tflops(device_kind: str) -> tuple[Optional[str], Optional[float]]:
  """(table name, dense bf16 TFLOP/s) of a device kind, or (None, None) if unknown."""
  return _device_row(device_kind)[1:3]


def hbm_bytes_per_s(device_kind: str) -> Optional[float]:
  return _device_row(device_kind)[3]


def parse_size(text: str) -> tuple[int, int]:
  """'512' -> (512, 512); '1024x2048' -> (1024, 2048)."""
  try:
    parts = [int(p) for p in re.split(r'[x,]', text.strip())]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts *= 2
  if len(parts) != 2 or min(parts) <= 0:
    raise ValueError(f'size must be N or HxW, got {text!r}')
  return tuple(parts)


_REMAT_SUFFIX = r'\.remat\d*'  # XLA's names for its rematerialised clones.


def count_auto_remat(hlo_text: str) -> int:
  """Instructions XLA rematerialised on its own in an optimized HLO module.

  XLA recomputes when a program would exceed the device's memory, naming each
  clone '<name>.remat' (.remat2, ...): a batch that "fits" that way pays in FLOPs.
  """
  return len(re.findall(rf'^\s*(?:ROOT\s+)?%?[\w.\-]+{_REMAT_SUFFIX}\s*=', hlo_text, re.M))


def is_oom(exc: BaseException) -> bool:
  """Whether an XLA error is an out-of-memory (compile-time or at run time)."""
  text = str(exc)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def largest_fitting_batch(fits: Callable[[int], bool], start: int, limit: int) -> Optional[int]:
  """Doubles the per-device batch from `start` while `fits(batch)`; the last that fit."""
  best, b = None, start
  while b <= limit:
    if not fits(b):
      break
    best, b = b, 2 * b
  return best


def accumulation_plan(max_per_device: int, global_batch: int, num_devices: int) -> tuple[int, int]:
  """(per-device micro-batch, accumulation steps) reaching `global_batch` exactly,
  with the largest micro-batch not above `max_per_device`."""
  if global_batch % num_devices:
    raise ValueError(f'global batch {global_batch} is not divisible by {num_devices} devices')
  per_device = global_batch // num_devices
  micro = max(d for d in range(1, min(max_per_device, per_device) + 1) if per_device % d == 0)
  return micro, per_device // micro


def loss_config(task: str, *, noise_conditioning: bool = False) -> types.SimpleNamespace:
  """The fields of a ddep config that a task's `loss_fn` reads, without ml_collections."""
  ns = types.SimpleNamespace
  return ns(
      task=task if task in ('segment', 'classify') else 'denoise',
      # Sec. 3.3: sigma 0.8 for DeP, 0.1 for DDeP; the value does not change the cost.
      denoise=ns(
          sigma=0.1 if task == 'ddep' else 0.8, sigma_range=(), form='additive', target='eps'
      ),
      model=ns(noise_conditioning=noise_conditioning),
      # Single-label softmax cross-entropy, as timm's ImageNet training.
      classify=ns(loss='softmax'),
  )


# Cityscapes images: the 'halves' protocol runs HxH windows of HxW = 1024x2048 ones.
_CITYSCAPES_HW = (1024, 2048)


def protocol_input(name: str, default: tuple[int, int]) -> tuple[int, int]:
  """The model input of one eval call of a `ddep.evaluators.inference` protocol."""
  from ddep.evaluators import inference  # pylint: disable=g-import-not-at-top

  protocol = inference.PROTOCOLS.get(name)
  if protocol is None:
    return default
  if protocol.kind == 'halves':
    return (_CITYSCAPES_HW[0], _CITYSCAPES_HW[0])
  if protocol.kind == 'sliding':
    return tuple(protocol.window)
  return tuple(protocol.size) if protocol.size else default


def apply_config(args: types.SimpleNamespace, config, explicit: set[str]) -> list[str]:
  """Sets the flags not given in `explicit` from an experiment config; returns notes."""
  from ddep.config import validation as config_validation  # pylint: disable=g-import-not-at-top

  config_validation.validate(config)
  task, frozen = config.task, tuple(config.frozen)
  if task not in ('denoise', 'segment'):
    raise SystemExit(f'--config: task {task!r} is not benchmarked; only denoise and segment')
  notes = []
  m, d, e = config.model, config.data, config.eval
  num_classes = args.num_classes
  if task == 'segment':
    try:
      from ddep.datasets import specs  # pylint: disable=g-import-not-at-top

      num_classes = specs.get(d.dataset).num_classes
    except ImportError as err:  # The spec's module needs TFDS.
      notes.append(f'dataset {d.dataset!r} unreadable ({err}); --num_classes {num_classes}')
  if e.protocol == 'whole':
    eval_size = tuple(d.eval_pad_to) or tuple(d.image_size)
    eval_batch = None  # The global eval batch over the devices, in run_phase.
    args.global_eval_batch = int(d.eval_batch_size)
  else:
    eval_size = protocol_input(e.protocol, tuple(d.image_size))
    eval_batch = int(e.batch_size) or 1  # windows per call, on one device
  from_config = dict(
      preset=m.preset,
      decoder_width=int(m.decoder_width_multiplier),
      dtype=m.dtype,
      remat=tuple(m.remat),
      attention_impl=m.attention_impl or '',
      state_layouts=config.mesh.state_layouts,
      noise_conditioning=bool(m.noise_conditioning) and task == 'denoise',
      task=('ddep' if task == 'denoise' and frozen else task,),
      image_size=tuple(d.image_size),
      global_batch=int(d.batch_size),
      accumulation_steps=int(config.optim.accumulation_steps),
      num_classes=num_classes,
      eval_size=eval_size if task == 'segment' else None,
      eval_batch_size=eval_batch,
      eval_flip=bool(e.flip),
  )
  for key, value in from_config.items():
    if key not in explicit:
      setattr(args, key, value)
  if 'batch_size' not in explicit:
    args.batch_size = None  # The config's global batch, split over the devices.
  args.frozen = frozen
  args.loss = config
  return notes


def time_steps(
    run_once: Callable[[], Any], *, warmup: int, steps: int, trials: int, block: Callable[[], None]
) -> list[float]:
  """Per-step times of `trials` runs of `steps` asynchronously dispatched steps.

  Nothing syncs with the host inside a run but the final `block()`.
  """
  for _ in range(warmup):
    run_once()
  block()
  per_step = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(steps):
      run_once()
    block()
    per_step.append((time.perf_counter() - t0) / steps)
  return per_step


def _cost(obj) -> dict:
  try:
    cost = obj.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # e.g. deviceless GPU executables.
    return {}
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per partition.
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _memory(compiled) -> dict:
  """XLA's static buffer assignment of the executable (per device)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return {}
  if m is None:
    return {}
  out = {
      k: int(getattr(m, k))
      for k in (
          'argument_size_in_bytes',
          'output_size_in_bytes',
          'temp_size_in_bytes',
          'alias_size_in_bytes',
          'generated_code_size_in_bytes',
      )
      if hasattr(m, k)
  }
  if 'temp_size_in_bytes' in out:
    out['total_bytes'] = (
        out['argument_size_in_bytes']
        + out['output_size_in_bytes']
        + out['temp_size_in_bytes']
        - out['alias_size_in_bytes']
    )
  return out


def _device_memory(device) -> dict:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # No stats (CPU) or no device (--target).
    stats = None
  if not stats:
    return {'peak_bytes_in_use': None, 'bytes_limit': None}
  return {
      'peak_bytes_in_use': stats.get('peak_bytes_in_use'),
      'bytes_limit': stats.get('bytes_limit'),
  }


def build_model(args, *, num_outputs: int, num_image_classes: int = 0, noise_conditioning=None):
  """The trainer's model builder (ddep.models.build) on the benchmark's flags."""
  from ddep.models import build  # pylint: disable=g-import-not-at-top

  return build.create(
      args.preset,
      decoder_width=args.decoder_width,
      dtype=args.dtype,
      remat=args.remat,
      attention_impl=args.attention_impl,
      noise_conditioning=(
          args.noise_conditioning if noise_conditioning is None else noise_conditioning
      ),
      num_outputs=num_outputs,
      num_image_classes=num_image_classes,
  )


def _synthetic_batch(task: str, hw, batch_size: int, num_classes: int, with_mask: bool):
  """Random images in [-1, 1] (and labels with some ignored pixels), on the host."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (batch_size, *hw, 3)).astype(np.float32)}
  if task == 'segment':
    labels = rng.integers(0, num_classes, (batch_size, *hw)).astype(np.int32)
    labels[:, : hw[0] // 8] = 255
    batch['label'] = labels
  if task == 'classify':  # One-hot image labels.
    batch['labels'] = np.eye(num_classes, dtype=np.float32)[
        rng.integers(0, num_classes, batch_size)
    ]
  if with_mask:
    batch['_mask'] = np.ones((batch_size,), bool)
  return batch


def _abstract(tree, sharding):
  """Shapes only, for --compile_only."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _optimizer_flops(tx, state) -> float:
  """XLA's count of the optimizer update alone (Adam + the gradient norm the step logs):
  ~15 FLOPs per trained parameter, which the analytic count of the network omits."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def update(grads, opt, params):
    updates, opt = tx.update(grads, opt, params)
    return (
        optax.apply_updates(params, updates),
        opt,
        optax.tree.norm(grads),
    )

  # Counted in the lowered program, never compiled: the count of the compiled one is the
  # same (15.00005 against 15.00007 FLOPs per parameter on the CPU), and compiling it
  # took seconds per phase.
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  p = state['params']
  return float(_cost(jax.jit(update).lower(p, state['opt'], p)).get('flops', 0.0))


@dataclasses.dataclass
class Program:
  """One phase's step, built and ready to compile, and what its row says about it."""

  phase: str
  is_eval: bool
  task: str  # 'segment' for the eval phase.
  accum: int
  mesh: Any
  per_device_batch: int
  batch_size: int  # Global: over the mesh's devices.
  hw: tuple[int, int]
  noise_cond: bool
  frozen_patterns: tuple[str, ...]
  param_counts: tuple[int, int, int]  # (all, trainable, frozen)
  ops: list  # ddep.models.flops' per-device ops of one call.
  trained: tuple[str, ...]  # Top-level modules the analytic count trains.
  analytic: float
  optimizer_flops: float
  jitted: Any
  call_args: tuple
  batch: Any
  notes: list[str]


def _phase_mesh(args):
  from ddep.training import sharding  # pylint: disable=g-import-not-at-top

  if args.target:  # Described, not present: compiled for, never run.
    from ddep.tools import gpu_targets  # pylint: disable=g-import-not-at-top

    return gpu_targets.mesh(args.target, sharding.DATA)
  return sharding.make_mesh()


def _per_device_batch(
    args, *, is_eval: bool, accum: int, n_dev: int, per_device_batch: Optional[int]
) -> int:
  """The flag's (or the find_max_batch plan's) batch, else --config's global one split."""
  per_device_batch = per_device_batch or (args.eval_batch_size if is_eval else args.batch_size)
  if per_device_batch is not None:
    return per_device_batch
  global_batch = args.global_eval_batch if is_eval else args.global_batch
  if global_batch % (n_dev * accum):
    raise SystemExit(
        f'--config: global batch {global_batch} does not split over {n_dev} '
        f'devices x {accum} accumulation steps'
    )
  return global_batch // (n_dev * accum)


def _init_params(args, model, *, classify: bool = False):
  """Parameters initialised at the train size, as in training (shapes only if compile_only).

  The eval step then resizes the position embeddings as a real evaluation at another
  size does; --compile_only never runs the model (e.g. on a CPU). `classify`: the
  encoder and classifier only (no decoder parameters for Adam to update).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ddep.models import build  # pylint: disable=g-import-not-at-top

  hw = tuple(args.image_size)
  if args.compile_only:
    return build.abstract_params(model, hw, classify=classify)
  return jax.jit(lambda k: build.init_params(model, k, hw, classify=classify))(jax.random.key(0))


def _trained_modules(mask) -> dict[str, set[bool]]:
  """Top-level module -> whether its leaves are trained ({True}, {False} or both)."""
  import jax  # pylint: disable=g-import-not-at-top

  by_module = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
    by_module.setdefault(path[0].key, set()).add(bool(leaf))
  return by_module


def _count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _phase_batch(args, task: str, hw, batch_size: int, mesh, *, is_eval: bool):
  """The synthetic global batch, on the mesh (or its shapes for --compile_only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddep.training import sharding  # pylint: disable=g-import-not-at-top

  batch = _synthetic_batch(task, hw, batch_size, args.num_classes, with_mask=is_eval)
  if args.compile_only:
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in batch.items()
    }
  return sharding.global_batch(batch, mesh)


def _eval_program(args, model, trainable, frozen, batch, mesh):
  """(jitted eval step, its arguments)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddep.training import sharding  # pylint: disable=g-import-not-at-top
  from ddep.training import steps as steps_lib  # pylint: disable=g-import-not-at-top

  replicated = sharding.replicated(mesh)
  eval_step = steps_lib.make_segmentation_eval_step(model, args.num_classes, flip=args.eval_flip)
  jitted = jax.jit(eval_step, out_shardings=replicated)
  put = _abstract if args.compile_only else jax.device_put
  return jitted, (put(trainable, replicated), put(frozen, replicated), batch)


def _train_program(
    args, phase: str, model, trainable, frozen, batch, mesh, *, accum: int, noise_cond: bool
):
  """(jitted train step, its arguments, XLA's FLOPs of the optimizer update alone)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddep.training import layouts  # pylint: disable=g-import-not-at-top
  from ddep.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from ddep.training import sharding  # pylint: disable=g-import-not-at-top
  from ddep.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from ddep.training import tasks  # pylint: disable=g-import-not-at-top

  replicated = sharding.replicated(mesh)
  schedule = optimizer_lib.make_schedule(base_lr=1e-4, total_steps=1000)
  tx = optimizer_lib.make_optimizer(name='adam', learning_rate=schedule, accumulation_steps=accum)
  config = args.loss or loss_config(phase, noise_conditioning=noise_cond)
  loss_fn = tasks.get(config.task).loss_fn(model, config)
  train_step = steps_lib.make_train_step(loss_fn, tx, schedule, accum)

  make_state = functools.partial(steps_lib.init_train_state, tx)

  train_rng = jax.random.key_data(jax.random.key(1))
  state_shardings = jax.tree.map(
      lambda _: replicated, jax.eval_shape(make_state, trainable, frozen, train_rng)
  )
  if args.compile_only:
    state = _abstract(jax.eval_shape(make_state, trainable, frozen, train_rng), replicated)
  else:
    state = jax.jit(make_state, out_shardings=state_shardings)(trainable, frozen, train_rng)
  optimizer_flops = _optimizer_flops(tx, state)
  # As ddep.training.trainer compiles it: the state donated, in the layouts XLA picks.
  step = layouts.DonatingStep(
      train_step,
      state_shardings,
      sharding.batch_sharding(mesh),
      replicated,
      layouts=args.state_layouts,
  )
  return step, (state, batch), optimizer_flops


def build_phase(
    args,
    phase: str,
    *,
    per_device_batch: Optional[int] = None,
    accumulation_steps: Optional[int] = None,
) -> Program:
  """The model, parameters, synthetic batch and jitted step of one phase."""
  from ddep.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from ddep.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  is_eval = phase == 'eval'
  task = 'segment' if is_eval else phase
  accum = 1 if is_eval else (accumulation_steps or args.accumulation_steps)
  mesh = _phase_mesh(args)
  per_device_batch = _per_device_batch(
      args, is_eval=is_eval, accum=accum, n_dev=mesh.devices.size, per_device_batch=per_device_batch
  )
  batch_size = per_device_batch * mesh.devices.size
  classify = task == 'classify'
  noise_cond = args.noise_conditioning and task == 'denoise'
  model = build_model(
      args,
      num_outputs=args.num_classes if task == 'segment' else 3,
      num_image_classes=args.num_classes if classify else 0,
      noise_conditioning=noise_cond,
  )
  hw = tuple(args.eval_size) if is_eval else tuple(args.image_size)
  notes = list(args.config_notes)

  params = _init_params(args, model, classify=classify)
  frozen_patterns = (
      args.frozen if args.frozen is not None else DDEP_FROZEN if phase == 'ddep' else ()
  )
  mask = optimizer_lib.trainable_mask(params, () if is_eval else frozen_patterns)
  trainable, frozen = optimizer_lib.split_trainable(params, mask)
  # The analytic count knows top-level modules: trained if any of their leaves is.
  by_module = _trained_modules(mask)
  partial = sorted(k for k, v in by_module.items() if v == {True, False})
  if partial:
    notes.append(f'partly frozen {partial}: the analytic count trains all of them')
  param_counts = (_count(params), _count(trainable), _count(frozen))
  del params
  batch = _phase_batch(args, task, hw, batch_size, mesh, is_eval=is_eval)

  # Per device; a flipped eval runs the forward twice (the image and its mirror).
  passes = 2 if is_eval and args.eval_flip else 1
  ops = flops_lib.model_ops(model, hw, passes * per_device_batch)
  if classify:  # The encoder's ops and the linear head on its pooled features.
    features, classes = trainable['classifier']['kernel'].shape
    ops = [op for op in ops if op.module == 'encoder' or op.name.startswith('encoder/')]
    ops.append(
        flops_lib.Op(
            'classifier',
            'classifier',
            2 * per_device_batch * features * classes,
            'classifier',
            ('encoder',),
        )
    )
  trained = tuple(sorted(k for k, v in by_module.items() if True in v and not is_eval))
  analytic = flops_lib.train_step_flops(ops, trained)  # = forward_flops when nothing trains
  optimizer_flops = 0.0
  if is_eval:
    jitted, call_args = _eval_program(args, model, trainable, frozen, batch, mesh)
  else:
    jitted, call_args, optimizer_flops = _train_program(
        args, phase, model, trainable, frozen, batch, mesh, accum=accum, noise_cond=noise_cond
    )
  # trainable and frozen go out of scope here: the (donated) state holds the only copy.
  return Program(
      phase=phase,
      is_eval=is_eval,
      task=task,
      accum=accum,
      mesh=mesh,
      per_device_batch=per_device_batch,
      batch_size=batch_size,
      hw=hw,
      noise_cond=noise_cond,
      frozen_patterns=tuple(frozen_patterns),
      param_counts=param_counts,
      ops=ops,
      trained=trained,
      analytic=analytic,
      optimizer_flops=optimizer_flops,
      jitted=jitted,
      call_args=call_args,
      batch=batch,
      notes=notes,
  )


def compile_program(program: Program) -> tuple[Any, float, dict, dict]:
  """(executable, compile seconds, XLA's cost analysis compiled and as lowered).

  A train program's state is then moved into the layouts its step was compiled for.
  """
  t0 = time.perf_counter()
  lowered = program.jitted.lower(*program.call_args)
  if program.is_eval:
    compiled = lowered.compile()
  else:
    compiled, _ = program.jitted.compile(*program.call_args, lowered=lowered)
  compile_s = time.perf_counter() - t0
  if not program.is_eval and not _is_abstract(program.call_args[0]):
    program.call_args = (program.jitted.place(*program.call_args), program.call_args[1])
  return compiled, compile_s, _cost(compiled), _cost(lowered)


def _is_abstract(tree) -> bool:
  """Whether `tree` holds shapes only (--compile_only, --target), not arrays."""
  import jax  # pylint: disable=g-import-not-at-top

  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def hlo_facts(compiled, device) -> dict:
  """What the compiled HLO shows: fused attention, XLA's own remat, a GPU roofline."""
  _, peak = peak_bf16_tflops(device.device_kind)
  hlo_text = compiled.as_text()
  fused_attention = '__cudnn$fmha' in hlo_text  # What the per-backend default chose, too.
  # A GPU program's kernels, bounded by peak FLOP/s and HBM bandwidth one by one.
  roofline = None
  bandwidth = hbm_bytes_per_s(device.device_kind)
  if device.platform in ('gpu', 'cuda') and peak and bandwidth:
    from ddep.tools import hlo_roofline  # pylint: disable=g-import-not-at-top

    roofline = hlo_roofline.analyze(
        hlo_text, peak_flops=peak * 1e12, hbm_bytes_per_s=bandwidth, top=None
    )
  auto_remat = count_auto_remat(hlo_text)
  # The recomputed kernels' share of the bound (None without a roofline).
  auto_remat_share = (
      roofline
      and roofline['lower_bound_s']
      and sum(
          k['seconds'] for k in roofline['top_kernels'] if re.search(_REMAT_SUFFIX + '$', k['name'])
      )
      / roofline['lower_bound_s']
  )
  return {
      'fused_attention': fused_attention,
      'roofline': roofline,
      'auto_remat': auto_remat,
      'auto_remat_share': auto_remat_share,
  }


def make_runner(program: Program, compiled) -> tuple[Callable[[], None], Callable[[], None], dict]:
  """(run one step, block until it is done, the holder of the last args and output).

  A train step's donated state is fed back in, as in the training loop.
  """
  import jax  # pylint: disable=g-import-not-at-top

  holder = {'args': program.call_args, 'out': None}

  def run_once():
    if program.is_eval:
      holder['out'] = compiled(*holder['args'])
    else:
      new_state, holder['out'] = compiled(*holder['args'])
      holder['args'] = (new_state, program.batch)

  def block():
    jax.block_until_ready((holder['args'][0], holder['out']))

  return run_once, block, holder


def time_program(
    args, program: Program, compiled
) -> tuple[Optional[float], Optional[list[float]], Optional[bool], Optional[float]]:
  """(median step time, per-trial step times, whether the last loss is finite, this
  process's CPU seconds per timed step); all None for --compile_only (the finite flag
  also for eval steps)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if args.compile_only:
    return None, None, None, None
  run_once, block, holder = make_runner(program, compiled)
  time_steps(run_once, warmup=args.warmup, steps=0, trials=0, block=block)
  # CPU time of all threads: on a shared CPU it moves less with others' load than wall
  # time does (docs/performance_cpu.md).
  cpu0 = time.process_time()
  trial_times = time_steps(run_once, warmup=0, steps=args.steps, trials=args.trials, block=block)
  cpu_per_step = (time.process_time() - cpu0) / (args.steps * args.trials)
  finite = None
  if not program.is_eval:
    finite = bool(np.isfinite(float(jax.device_get(holder['out']['train/loss']))))
  return statistics.median(trial_times), trial_times, finite, cpu_per_step


GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')


def xla_flops_against_analytic(
    program: Program,
    xla: dict,
    facts: dict,
    notes: list[str],
    *,
    xla_lowered: Optional[dict] = None,
    platform: str = 'cpu',
) -> tuple[Optional[float], str, float]:
  """(XLA's FLOPs or None, where they come from, the analytic count of the same work).

  XLA's count, less the optimizer, is compared against the analytic one; `notes`
  gets why the two may differ. On a GPU the compiled program's cost analysis counts the
  cuDNN convolutions and cuBLAS GEMMs it was rewritten into (custom calls) as 0 (measured
  on an H200: 0.85 TFLOP of the DeP step's 27.1), so the count is taken from the lowered,
  unoptimised HLO, and is None where there is neither that nor the compiled HLO.
  """
  comparable = program.analytic
  xla_flops = float(xla.get('flops', 0.0))
  flops_source = 'xla_cost_analysis'
  roofline = facts['roofline']
  lowered = float((xla_lowered or {}).get('flops', 0.0))
  on_gpu = platform in GPU_PLATFORMS
  if on_gpu and lowered:
    xla_flops, flops_source = lowered, 'xla_lowered_cost_analysis'
    notes.append(
        "on GPU the compiled program's cost analysis counts cuDNN convolutions and cuBLAS "
        'GEMMs (custom calls) as 0 FLOPs: xla_flops and HFU are from the lowered HLO'
    )
  elif roofline and (on_gpu or not xla_flops):
    # Deviceless GPU executables have no cost analysis: count the compiled HLO.
    xla_flops, flops_source = float(roofline['flops']), 'hlo_roofline'
    notes.append(
        'no XLA cost analysis for this executable: XLA FLOPs are counted from '
        'its HLO (ddep.tools.hlo_roofline; cuDNN attention backward taken as 2.5x '
        'its forward)'
    )
  elif on_gpu:
    notes.append(
        'no FLOP count: on GPU the compiled cost analysis misses custom calls, and there '
        'is no lowered count or compiled HLO: xla_flops and HFU unavailable'
    )
    return None, 'unavailable', comparable
  if flops_source != 'hlo_roofline' and facts['fused_attention']:
    # A cuDNN attention kernel is a custom call, which XLA counts as 0 FLOPs, lowered too.
    comparable -= sum(
        op.flops + op.backward_flops(program.trained)
        for op in program.ops
        if op.part == 'transformer: attention'
    )
    notes.append(
        'cuDNN fused attention: XLA counts its calls as 0 FLOPs; '
        'xla_over_analytic compares against the count without attention'
    )
  return xla_flops, flops_source, comparable


def _note_peak(args, peak: Optional[float], device_kind: str, notes: list[str]) -> None:
  if peak is None:
    notes.append(f'unknown device kind {device_kind!r}: no peak, MFU omitted')
  elif args.dtype != 'bfloat16':
    notes.append('MFU is against the bf16 peak; this run computes in float32')


def _note_remat(args, program: Program, facts: dict, notes: list[str]) -> None:
  if args.remat and not program.is_eval:
    notes.append(f'remat {list(args.remat)}: XLA counts the recomputed forward too (HFU > MFU)')
  if facts['auto_remat']:
    share = facts['auto_remat_share']
    share = '' if share is None else f', {share:.1%} of the roofline'
    notes.append(
        f'XLA rematerialised {facts["auto_remat"]} instructions to fit the device '
        f'memory{share}: a smaller batch may be faster'
    )


def report_row(
    args,
    program: Program,
    *,
    device,
    compiled,
    compile_s: float,
    xla: dict,
    xla_lowered: dict,
    facts: dict,
    timing: tuple,
    notes: list[str],
) -> dict:
  """The JSON row of a timed (or only compiled) phase."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddep.models import flops as flops_lib  # pylint: disable=g-import-not-at-top

  step_time, trial_times, finite, cpu_per_step = timing
  per_s = lambda x: x / step_time if step_time else None  # noqa: E731
  peak_name, peak = peak_bf16_tflops(device.device_kind)
  _note_peak(args, peak, device.device_kind, notes)
  xla_flops, flops_source, comparable = xla_flops_against_analytic(
      program, xla, facts, notes, xla_lowered=xla_lowered, platform=device.platform
  )
  _note_remat(args, program, facts, notes)
  is_eval, analytic, optimizer_flops = program.is_eval, program.analytic, program.optimizer_flops
  roofline = facts['roofline']
  n_params, n_trainable, n_frozen = program.param_counts
  xla_flops_unoptimized = float(xla_lowered.get('flops', 0.0))
  model_tflops = per_s(analytic / 1e12)
  xla_tflops = per_s(xla_flops / 1e12) if xla_flops else None
  mem = _device_memory(device)
  row = {
      'tool': 'ddep.tools.benchmark',
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'phase': program.phase,
      'config': args.config or None,
      'config_overrides': args.config_overrides or None,
      'frozen': list(program.frozen_patterns) if not is_eval else [],
      'preset': args.preset,
      'decoder_width': args.decoder_width,
      'image_size': list(program.hw),
      'per_device_batch': program.per_device_batch,
      'global_batch': program.batch_size,
      'accumulation_steps': program.accum,
      'dtype': args.dtype,
      'remat': list(args.remat),
      'attention_impl': args.attention_impl or None,
      'state_layouts': args.state_layouts,
      'fused_attention': facts['fused_attention'],
      'noise_conditioning': program.noise_cond,
      'num_classes': args.num_classes if program.task in ('segment', 'classify') else None,
      'params': n_params,
      'trainable_params': None if is_eval else n_trainable,
      'frozen_params': None if is_eval else n_frozen,
      'platform': device.platform,
      'device_kind': device.device_kind,
      'num_devices': program.mesh.devices.size,
      'jax_version': jax.__version__,
      'compile_s': round(compile_s, 3),
      # With a persistent cache, compile_s may be a cache hit.
      'compilation_cache': jax.config.jax_compilation_cache_dir,
      'warmup': args.warmup,
      'steps': args.steps,
      'trials': args.trials,
      'step_time_s': step_time,
      'trial_step_times_s': trial_times,
      # All of this process's threads, over the timed steps.
      'process_cpu_s_per_step': cpu_per_step,
      # With accumulation, one call is one micro-batch.
      'images_per_s': per_s(program.batch_size),
      # FLOPs are per device: XLA's counts are of the partitioned (per-device) program.
      'xla_flops': xla_flops,
      'xla_flops_source': flops_source,
      'xla_flops_unoptimized': xla_flops_unoptimized,
      'xla_bytes_accessed': float(xla.get('bytes accessed', 0.0)),
      'xla_optimizer_flops': optimizer_flops,
      'analytic_flops': float(analytic),
      'analytic_forward_flops': float(flops_lib.forward_flops(program.ops)),
      'xla_over_analytic': (xla_flops - optimizer_flops) / comparable if xla_flops else None,
      # Before XLA's rewrites (e.g. into cuDNN/cuBLAS calls), in case a backend's
      # compiled count misses some of them.
      'xla_unoptimized_over_analytic': (
          (xla_flops_unoptimized - optimizer_flops) / comparable if xla_flops_unoptimized else None
      ),
      'achieved_tflops': model_tflops,
      'xla_tflops': xla_tflops,
      'peak_device': peak_name,
      'peak_bf16_tflops': peak,
      # MFU counts model FLOPs (analytic); HFU what the hardware ran (XLA's, with remat).
      'mfu': model_tflops / peak if peak and step_time else None,
      'hfu': xla_tflops / peak if peak and xla_tflops else None,
      # The sum over kernels of max(FLOPs / peak, bytes / HBM bandwidth): no step can be
      # faster, so analytic FLOPs over it at peak bound the MFU (GPU programs only).
      'roofline_lower_bound_s': roofline and roofline['lower_bound_s'],
      'roofline_bytes': roofline and roofline['bytes'],
      'roofline_memory_bound_s': roofline and roofline['memory_bound_s'],
      'roofline_mfu_ceiling': (
          roofline
          and roofline['lower_bound_s']
          and analytic / (roofline['lower_bound_s'] * peak * 1e12)
      ),
      'roofline_by_category': roofline
      and {k: round(v['seconds'], 6) for k, v in roofline['by_category'].items()},
      'peak_bytes_in_use': mem['peak_bytes_in_use'],
      'bytes_limit': mem['bytes_limit'],
      'xla_memory': _memory(compiled),
      'xla_auto_remat': facts['auto_remat'],
      'xla_auto_remat_share': facts['auto_remat_share'],
      'loss_finite': finite,
      'notes': notes,
  }
  if program.accum > 1 and step_time:
    row['update_time_s'] = program.accum * step_time
  return row


def run_phase(
    args,
    phase: str,
    *,
    per_device_batch: Optional[int] = None,
    accumulation_steps: Optional[int] = None,
    probe: bool = False,
) -> dict:
  """Compiles and times one phase ('denoise', 'ddep', 'segment' or 'eval'); returns its row.

  `probe=True` only compiles and runs two steps (for --find_max_batch).
  """
  program = build_phase(
      args, phase, per_device_batch=per_device_batch, accumulation_steps=accumulation_steps
  )
  compiled, compile_s, xla, xla_lowered = compile_program(program)
  device = program.mesh.devices.flat[0]
  facts = hlo_facts(compiled, device)
  if probe:
    if not args.target:
      run_once, block, _ = make_runner(program, compiled)
      time_steps(run_once, warmup=2, steps=1, trials=0, block=block)
    return {
        'fits': True,
        'xla_auto_remat': facts['auto_remat'],
        'xla_auto_remat_share': facts['auto_remat_share'],
    }
  timing = time_program(args, program, compiled)
  return report_row(
      args,
      program,
      device=device,
      compiled=compiled,
      compile_s=compile_s,
      xla=xla,
      xla_lowered=xla_lowered,
      facts=facts,
      timing=timing,
      notes=program.notes,
  )


def run_input_phase(args) -> dict:
  """Images/s of the config's own train input pipeline on this host (tf.data, CPU),
  built as `ddep.training.trainer` builds it, one host's share of the global batch."""
  from ddep.data import preparation  # pylint: disable=g-import-not-at-top
  from ddep.training import tasks  # pylint: disable=g-import-not-at-top
  from ddep.datasets import specs  # pylint: disable=g-import-not-at-top

  config = args.config_dict
  d = config.data
  if d.prepare and specs.get(d.dataset).name.startswith('demo'):
    preparation.prepare_generated(d.dataset, d.data_dir or None)
  local_batch = int(d.batch_size) // args.input_hosts
  iterator = tasks.get(config.task).train_data(
      config, specs.get(d.dataset), local_batch=local_batch
  )
  for _ in range(args.warmup):
    next(iterator)
  t0 = time.perf_counter()
  for _ in range(args.input_batches):
    next(iterator)
  seconds = time.perf_counter() - t0
  cores = len(os.sched_getaffinity(0))
  rate = args.input_batches * local_batch / seconds
  return {
      'tool': 'ddep.tools.benchmark',
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'phase': 'input',
      'config': args.config,
      'config_overrides': args.config_overrides or None,
      'dataset': d.dataset,
      'task': config.task,
      'image_size': list(d.image_size),
      'per_host_batch': local_batch,
      'hosts': args.input_hosts,
      'batches': args.input_batches,
      'seconds': seconds,
      'images_per_s': rate,
      'cpu_cores': cores,
      'images_per_s_per_core': rate / cores,
      'notes': [],
  }


# --target --find_max_batch: the share of the GPU's memory a step's buffers may take.
# Headroom for what deviceless compilation cannot see: cuDNN workspaces (chosen
# by autotuning on a device), the CUDA context and allocator fragmentation.
TARGET_MEMORY_FRACTION = 0.85


# A batch fits if XLA's own rematerialisation costs less than this share of the
# step's roofline (a handful of clones is common near the limit, and harmless).
AUTO_REMAT_TOLERANCE = 0.02


def recomputes_little(row: dict) -> bool:
  """Whether XLA's rematerialisation, if any, is negligible (without a roofline: none)."""
  if not row['xla_auto_remat']:
    return True
  share = row.get('xla_auto_remat_share')
  return share is not None and share < AUTO_REMAT_TOLERANCE


def find_max_batch(args, phase: str) -> dict:
  """Largest per-device batch (powers of two) that compiles and runs without XLA
  rematerialising, and the micro-batch x accumulation that reaches `--global_batch`."""
  import jax  # pylint: disable=g-import-not-at-top

  def fits(b: int) -> bool:
    # Fitting means without XLA's own rematerialisation, which trades FLOPs for memory.
    if args.target:  # XLA's buffer assignment against the described memory.
      from ddep.tools import gpu_targets  # pylint: disable=g-import-not-at-top

      row = run_phase(args, phase, per_device_batch=b, accumulation_steps=1)
      limit = TARGET_MEMORY_FRACTION * gpu_targets.memory_bytes(args.target)
      return row['xla_memory'].get('total_bytes', float('inf')) <= limit and recomputes_little(row)
    try:
      return recomputes_little(
          run_phase(args, phase, per_device_batch=b, accumulation_steps=1, probe=True)
      )
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      return False
    finally:
      # Drop the failed attempt's buffers and executables before the next size.
      gc.collect()
      jax.clear_caches()

  best = largest_fitting_batch(fits, args.batch_size or 8, args.max_batch)
  if best is None:
    raise SystemExit(f'{phase}: even a per-device batch of {args.batch_size} does not fit')
  micro, accum = accumulation_plan(
      best, args.global_batch, 1 if args.target else jax.device_count()
  )
  return {
      'max_per_device_batch': best,
      'per_device_batch': micro,
      'accumulation_steps': accum,
      'hit_limit': best * 2 > args.max_batch,
  }


def phases_of(args) -> list[str]:
  phases = list(args.task)
  if args.eval_size:
    phases.append('eval')
  if args.config and args.input_batches:
    phases.append('input')
  return phases


def run_isolated(
    argv: Sequence[str], phases: Sequence[str], run: Callable[..., Any] = subprocess.run
) -> list[dict]:
  """Runs each phase in a child process (so each peak memory is its own); returns rows.

  The child gets the same flags, then overrides (absl keeps the last value of a flag).
  """
  rows = []
  for phase in phases:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'row.jsonl')
      cmd = [
          sys.executable,
          '-m',
          'ddep.tools.benchmark',
          *argv,
          '--only_phase',
          phase,
          '--output',
          out,
          '--quiet',
      ]
      proc = run(cmd, check=False)
      if proc.returncode:
        raise SystemExit(f'phase {phase} failed (exit {proc.returncode}): {" ".join(cmd)}')
      with open(out) as f:
        rows.extend(json.loads(line) for line in f if line.strip())
  return rows


def format_rows(rows: Sequence[dict]) -> str:
  gib = lambda b: f'{b / 2**30:.2f}' if b else '-'  # noqa: E731
  pct = lambda x: f'{100 * x:.1f}%' if x is not None else '-'  # noqa: E731
  header = (
      'phase',
      'batch',
      'accum',
      'step ms',
      'img/s',
      'XLA GFLOP',
      'model GFLOP',
      'XLA/model',
      'TFLOP/s',
      'MFU',
      'HFU',
      'roofline ms',
      'MFU ceiling',
      'peak GiB',
      'XLA GiB',
  )
  lines = [' | '.join(header), ' | '.join('-' * len(h) for h in header)]
  num = lambda x, f='.2f': '-' if x is None else format(x, f)  # noqa: E731
  inputs = [r for r in rows if r['phase'] == 'input']
  rows = [r for r in rows if r['phase'] != 'input']
  for r in rows:
    step_ms = None if r['step_time_s'] is None else 1e3 * r['step_time_s']
    lines.append(
        ' | '.join(
            [
                r['phase'],
                str(r['per_device_batch']),
                str(r['accumulation_steps']),
                num(step_ms),
                num(r['images_per_s']),
                num(r['xla_flops'] and r['xla_flops'] / 1e9, '.2f'),
                f'{r["analytic_flops"] / 1e9:.2f}',
                num(r['xla_over_analytic'], '.3f'),
                num(r['achieved_tflops']),
                pct(r['mfu']),
                pct(r['hfu']),
                num(r.get('roofline_lower_bound_s') and 1e3 * r['roofline_lower_bound_s']),
                pct(r.get('roofline_mfu_ceiling')),
                gib(r['peak_bytes_in_use']),
                gib(r['xla_memory'].get('total_bytes')),
            ]
        )
    )
  by_phase = {r['phase']: r for r in rows}
  if 'denoise' in by_phase and 'ddep' in by_phase:
    dep, ddep = by_phase['denoise'], by_phase['ddep']
    # Per image: the two phases may run different batches (--find_max_batch).
    per_image = lambda r, key: r[key] / r['per_device_batch']  # noqa: E731
    time_ratio = (
        f'time {per_image(ddep, "step_time_s") / per_image(dep, "step_time_s"):.3f}, '
        if dep['step_time_s'] and ddep['step_time_s']
        else ''
    )
    flops_ratio = per_image(ddep, 'analytic_flops') / per_image(dep, 'analytic_flops')
    lines.append(f'DDeP/DeP per image: {time_ratio}model FLOPs {flops_ratio:.3f}')
  for r in inputs:
    lines.append(
        f'input pipeline ({r["dataset"]}, {r["task"]}, '
        f'{"x".join(map(str, r["image_size"]))}, batch {r["per_host_batch"]}): '
        f'{r["images_per_s"]:.1f} images/s per host, '
        f'{r["images_per_s_per_core"]:.1f} per core ({r["cpu_cores"]} cores)'
    )
  notes = sorted({n for r in rows for n in r['notes']})
  lines += [f'note: {n}' for n in notes]
  if rows:
    r = rows[0]
    lines.append(
        f'device: {r["device_kind"]} x{r["num_devices"]} ({r["platform"]}), '
        f'jax {r["jax_version"]}; per-device numbers'
    )
  return '\n'.join(lines)


def flops_table(args) -> str:
  from ddep.models import flops as flops_lib  # pylint: disable=g-import-not-at-top

  model = build_model(args, num_outputs=args.num_classes if 'segment' in args.task else 3)
  ops = flops_lib.model_ops(model, tuple(args.image_size), 1)
  h, w = args.image_size
  return (
      f'{args.preset}, decoder {args.decoder_width}x, {h}x{w}, per image\n'
      + flops_lib.format_table(ops)
  )


class SizeParser(flags.ArgumentParser):
  """'512' -> (512, 512), '1024x2048' -> (1024, 2048); with `allow_none`, '' or '0' -> None."""

  def __init__(self, allow_none: bool = False):
    super().__init__()
    self.allow_none = allow_none

  def parse(self, argument):
    if argument is None or isinstance(argument, tuple):
      return argument
    if self.allow_none and argument.strip() in ('', '0'):
      return None
    return parse_size(argument)  # A ValueError: absl names the flag and the value.

  def flag_type(self) -> str:
    return 'size (N or HxW)'


# The flags read into the run's `args`, each as the attribute of the same name.
_FLAG_NAMES = (
    'preset',
    'task',
    'batch_size',
    'accumulation_steps',
    'image_size',
    'dtype',
    'remat',
    'attention_impl',
    'state_layouts',
    'decoder_width',
    'num_classes',
    'noise_conditioning',
    'eval_size',
    'eval_batch_size',
    'eval_flip',
    'input_batches',
    'input_hosts',
    'steps',
    'trials',
    'warmup',
    'find_max_batch',
    'max_batch',
    'global_batch',
    'output',
    'target',
    'compile_only',
    'flops_only',
    'no_isolate',
    'only_phase',
    'quiet',
)
_CHILD_ONLY = ' (set by the tool for the process that runs one phase)'


def _define_config_flag(flag_values: flags.FlagValues, sys_argv) -> None:
  """`--config` through ml_collections where it is installed; else a flag that says so."""
  help_ = (
      'Experiment config, path[:args] as for ddep.main (with --config.key=value '
      'overrides); sets the other flags that are not given explicitly.'
  )
  try:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  except ImportError:  # The bare GPU image: everything but --config still works.
    flags.DEFINE_string(
        'config', '', help_ + ' Needs ml_collections, not installed here.', flag_values=flag_values
    )
    return
  config_flags.DEFINE_config_file('config', None, help_, flag_values=flag_values, sys_argv=sys_argv)


def define_flags(
    flag_values: flags.FlagValues = flags.FLAGS, sys_argv: Optional[Sequence[str]] = None
) -> None:
  """The command's flags; `sys_argv` is the command line `--config.key=` overrides are
  read from (ml_collections reads them from sys.argv by default)."""
  fv = {'flag_values': flag_values}
  _define_config_flag(flag_values, None if sys_argv is None else list(sys_argv))
  flags.DEFINE_string('preset', 'r50_vit_b16', 'Model preset (ddep.models.presets).', **fv)
  flags.DEFINE_list(
      'task',
      ['denoise', 'ddep'],
      f'Comma-separated train steps to time, of {", ".join(TASKS)}.',
      **fv,
  )
  flags.DEFINE_integer('batch_size', 8, 'Per device (micro-batch).', **fv)
  flags.DEFINE_integer('accumulation_steps', 1, 'Gradient accumulation steps.', **fv)
  flags.DEFINE(SizeParser(), 'image_size', '512', 'Train crop, N or HxW.', **fv)
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype.', **fv)
  flags.DEFINE_list('remat', [], 'Comma-separated parts: resnet,transformer,decoder.', **fv)
  flags.DEFINE_enum(
      'attention_impl',
      '',
      ['', 'auto', 'xla', 'cudnn'],
      "'' or auto: cuDNN flash attention on GPUs in bf16, else XLA.",
      **fv,
  )
  flags.DEFINE_enum(
      'state_layouts',
      'auto',
      ['auto', 'default'],
      "The train state's memory layouts: XLA's choice (as the trainer) or row-major.",
      **fv,
  )
  flags.DEFINE_integer('decoder_width', 1, '1x, 2x or 3x decoder.', **fv)
  flags.DEFINE_integer('num_classes', 19, 'For segment, classify and eval.', **fv)
  flags.DEFINE_bool('noise_conditioning', False, 'Condition the model on the noise level.', **fv)
  flags.DEFINE(
      SizeParser(allow_none=True),
      'eval_size',
      '1024x2048',
      "Eval step input HxW; '' or 0 skips it.",
      **fv,
  )
  flags.DEFINE_integer('eval_batch_size', 1, 'Per device.', **fv)
  flags.DEFINE_bool(
      'eval_flip', False, 'Average with the mirrored prediction (doubles the eval forward).', **fv
  )
  flags.DEFINE_integer(
      'input_batches', 20, '--config: batches of its input pipeline to time (0 skips it).', **fv
  )
  flags.DEFINE_integer(
      'input_hosts', 1, '--config: hosts sharing the global batch (per-host input batch).', **fv
  )
  flags.DEFINE_integer('steps', 20, 'Steps per timed trial.', **fv)
  flags.DEFINE_integer('trials', 3, 'Timed trials; the step time is their median.', **fv)
  flags.DEFINE_integer('warmup', 3, 'Steps before timing starts.', **fv)
  flags.DEFINE_bool(
      'find_max_batch',
      False,
      'Double the per-device batch from --batch_size until out of memory, then '
      'time the micro-batch x accumulation giving --global_batch.',
      **fv,
  )
  flags.DEFINE_integer('max_batch', 256, 'Upper limit for --find_max_batch.', **fv)
  flags.DEFINE_integer('global_batch', 128, 'Paper Sec. 4.3.', **fv)
  flags.DEFINE_string('output', '', 'Append one JSON line per phase here.', **fv)
  flags.DEFINE_enum(
      'target',
      '',
      ['', 'h100', 'h200'],
      'Compile for this GPU without one (needs the jax CUDA plugin; implies '
      '--compile_only; --find_max_batch then fits by XLA memory).',
      **fv,
  )
  flags.DEFINE_bool(
      'compile_only',
      False,
      'Compile and report XLA FLOPs and memory, run nothing (plans GPU runs from ' 'a CPU).',
      **fv,
  )
  flags.DEFINE_bool(
      'flops_only', False, 'Print the analytic FLOP table and exit (compiles nothing).', **fv
  )
  flags.DEFINE_bool(
      'no_isolate', False, 'Run all phases in this process (peak memory is then cumulative).', **fv
  )
  flags.DEFINE_string('only_phase', '', 'The one phase to run' + _CHILD_ONLY, **fv)
  flags.DEFINE_bool('quiet', False, 'Print no table' + _CHILD_ONLY, **fv)


def _config_from_flag(flag_values: flags.FlagValues) -> tuple[str, Any, dict]:
  """(the --config spec 'path[:args]' or '', its ConfigDict, its --config.* overrides)."""
  flag = flag_values['config']
  if not flag.present:
    return '', None, {}
  if isinstance(flag.value, str):  # The plain flag: ml_collections is not installed.
    raise app.UsageError(
        '--config needs ml_collections (pip install ml_collections); '
        'without it, give the model and batch as flags'
    )
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  spec = config_flags.get_config_filename(flag)
  path = spec.partition(':')[0]
  if not os.path.isfile(path):  # ml_collections would fail later, on first use.
    raise app.UsageError(f'--config: no such file {path!r}')
  return spec, flag.value, dict(config_flags.get_override_values(flag))


def args_from_flags(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """The run's settings from parsed flags (and --config), checked; UsageError if bad."""
  args = types.SimpleNamespace(**{name: flag_values[name].value for name in _FLAG_NAMES})
  args.task, args.remat = tuple(args.task), tuple(args.remat)
  args.config, args.config_dict, args.config_overrides = _config_from_flag(flag_values)
  args.frozen, args.loss, args.config_notes = None, None, []
  if args.config:
    explicit = {name for name in _FLAG_NAMES if flag_values[name].present}
    args.config_notes = apply_config(args, args.config_dict, explicit)
  bad = set(args.task) - set(TASKS)
  if bad:
    raise app.UsageError(f'unknown --task {sorted(bad)}; choose from {TASKS}')
  if args.steps < 1 or args.trials < 1 or args.warmup < 0:
    raise app.UsageError('need --steps >= 1, --trials >= 1, --warmup >= 0')
  if args.target:
    args.compile_only = True  # A described GPU runs nothing.
    if args.dtype == 'bfloat16' and args.attention_impl in ('', 'auto'):
      # What the per-backend choice makes on a GPU; tracing here sees the host backend.
      args.attention_impl = 'cudnn'
  elif args.find_max_batch and args.compile_only:
    raise app.UsageError(
        '--find_max_batch runs steps; it cannot be --compile_only (except with --target)'
    )
  if min(args.image_size) % 16 or (args.eval_size and min(args.eval_size) % 16):
    raise app.UsageError('image sizes must be divisible by 16 (the encoder output stride)')
  return args


def parse_fresh_flags(program: str, argv: Sequence[str], define: Callable) -> flags.FlagValues:
  """`argv` (no program name) parsed as `program`'s command line would be, into fresh
  flags that `define(flag_values, sys_argv=...)` defines; UsageError if bad."""
  command = [program, *argv]
  flag_values = flags.FlagValues()
  define(flag_values, sys_argv=command)
  try:
    rest = flag_values(command)
  except flags.Error as e:
    raise app.UsageError(str(e)) from e
  if len(rest) > 1:
    raise app.UsageError(f'unexpected arguments: {rest[1:]}')
  return flag_values


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """`argv` (no program name) parsed as the command line would be, into fresh flags."""
  return args_from_flags(parse_fresh_flags('ddep.tools.benchmark', argv, define_flags))


def run(args: types.SimpleNamespace, argv: Sequence[str]) -> list[dict]:
  """Runs the phases of `args`; `argv` (the command line) is what each child re-runs."""
  if args.flops_only:
    print(flops_table(args))
    return []
  if args.find_max_batch:
    # Search up to (nearly) all of the GPU's memory, not JAX's default 75% share.
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  phases = [args.only_phase] if args.only_phase else phases_of(args)

  def record(new_rows):
    # Appended as each phase finishes, so a later failure (say, an eval step out of
    # memory) keeps the earlier results.
    rows.extend(new_rows)
    if args.output:
      with open(args.output, 'a') as f:
        f.writelines(json.dumps(row) + '\n' for row in new_rows)

  rows, failed = [], []
  for phase in phases:
    if len(phases) > 1 and not args.no_isolate:
      try:
        record(run_isolated(argv, [phase]))
      except SystemExit as e:
        failed.append(str(e))
      continue
    if phase == 'input':
      record([run_input_phase(args)])
      continue
    plan = find_max_batch(args, phase) if args.find_max_batch and phase != 'eval' else {}
    row = run_phase(
        args,
        phase,
        per_device_batch=plan.get('per_device_batch'),
        accumulation_steps=plan.get('accumulation_steps'),
    )
    record([{**row, **plan}])
    gc.collect()
  if not args.quiet:
    print(format_rows(rows), flush=True)
  if failed:
    raise SystemExit('\n'.join(failed))
  return rows


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  """The tool in-process: `argv` without the program name (default: sys.argv[1:])."""
  argv = list(sys.argv[1:] if argv is None else argv)
  return run(parse_args(argv), argv)


def _app_main(argv: Sequence[str]) -> None:
  """app.run's main: flags.FLAGS is parsed; children re-run this process's command line."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  process.configure_gc()
  run(args_from_flags(flags.FLAGS), sys.argv[1:])  # Returns None: exit status 0.


if __name__ == '__main__':
  define_flags()
  app.run(_app_main)
