r"""The main job: a small label-efficiency experiment on the generated demo scenes, on CPU.

  python -m ddep.demo --output=out/demo

It mirrors the paper's Table 1 / Figure 2 at toy scale:
  1. supervised: the encoder is trained on image-level labels (the ImageNet-21k stand-in)
  2. DeP:  the whole TransUNet denoises, σ = 0.2, predicting the clean image (Table 7)
  3. DDeP: the supervised encoder is frozen and the decoder denoises, σ = 0.1
  4. fine-tuning of each initialisation (none / supervised / DeP / DDeP) at several
     label fractions and subset seeds, evaluated by mIoU on the validation split; for a
     given subset seed every method fine-tunes on the same labelled images
  5. a table (mean ± std), the paper's claims as paired differences with 95% t-intervals
     (ddep.reporting.paired_stats), results.json (one entry per fine-tune), the mIoU-vs-fraction
     plot, Figure-4 denoising grids and a segmentation figure.
Every stage is an ordinary `ddep.training.trainer` run of an ordinary config in its own workdir,
run by a pool of worker processes (one core each: two 1-thread processes train 1.45x
the steps of one 2-thread process on this model, docs/demo_study.md); a stage starts once
the pretraining it needs is done. A rerun skips the stages whose workdir says DONE.
Compiled programs go to a persistent cache, `<output>/.jax_cache`, unless
JAX_COMPILATION_CACHE_DIR names another.
"""

import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from ddep.config import schema as config_schema
from ddep.reporting import paired_stats
from ddep.reporting import records
from ddep.reporting import tables
from ddep.reporting import visualisation
from ddep.runs import process

FLAGS = flags.FLAGS
_OUTPUT = flags.DEFINE_string('output', 'out/demo', 'Where runs, tables and figures go.')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny dataset and few steps (for tests).')
_BUDGET = flags.DEFINE_enum(
    'budget',
    'default',
    ['default', 'long'],
    "'default' fits 20 minutes on 2 CPU cores; 'long' is ~5x that.",
)
_PRETRAIN_STEPS = flags.DEFINE_integer(
    'pretrain_steps', 0, "Steps of each pretraining stage (0: the budget's)."
)
_FINETUNE_STEPS = flags.DEFINE_integer(
    'finetune_steps', 0, "Steps of each fine-tuning run (0: the budget's)."
)
_FRACTIONS = flags.DEFINE_list('fractions', [], "Label fractions (empty: the budget's).")
_SEEDS = flags.DEFINE_integer(
    'seeds',
    0,
    "Runs per method at the lowest fraction (subset seeds 0..n-1); 0: the budget's.",
)
_FULL_SEEDS = flags.DEFINE_integer(
    'full_seeds',
    0,
    'Runs per method at 100% of the labels, where the seed varies initialisation and data '
    "order only (0: the budget's).",
)
_MIDDLE_SEEDS = flags.DEFINE_integer(
    'middle_seeds', 0, "Runs per method at the fractions in between (0: the budget's)."
)
_FINETUNE_LR = flags.DEFINE_float(
    'finetune_lr',
    0.0,
    "Peak fine-tuning learning rate of every method (0: each method's own, FINETUNE_LRS).",
)
_SEED = flags.DEFINE_integer(
    'seed',
    0,
    'Base seed: initialisation and data order of every stage (the labelled subsets are '
    'drawn by subset seed and stay the same).',
)
_WORKERS = flags.DEFINE_integer(
    'workers',
    0,
    'Worker processes, one core each (0: one per core this process may use). 1 runs the '
    'stages in this process on every core.',
)
_METHODS = flags.DEFINE_list(
    'methods',
    [],
    'Initialisations to fine-tune (empty: all); only the pretraining stages they need run.',
)
_EVAL_SPLIT = flags.DEFINE_enum(
    'eval_split',
    'validation',
    ['validation', 'holdout'],
    "Where fine-tunes are scored: 'holdout' (part of the labelled data, not the validation "
    'split) is for choosing hyper-parameters, as docs/demo_study.md did.',
)

# The demo scenes are 32x32 (ddep.datasets.demo_scenes); every stage trains on whole
# images with left-right flips and fine-tunes are scored on the whole validation images.
# Settings chosen on the holdout split (docs/demo_study.md).
BUDGETS = {
    'default': dict(
        pretrain_steps=2000,
        finetune_steps=200,
        fractions=['0.005', '0.1', '1.0'],
        seeds=20,
        middle_seeds=3,
        full_seeds=5,
    ),
    'long': dict(
        pretrain_steps=12000,
        finetune_steps=1200,
        fractions=['0.02', '0.05', '0.1', '0.25', '1.0'],
        seeds=10,
        middle_seeds=5,
        full_seeds=10,
    ),
    'quick': dict(
        pretrain_steps=6,
        finetune_steps=4,
        fractions=['0.5'],
        seeds=2,
        middle_seeds=1,
        full_seeds=2,
    ),
}
# Supervised pretraining (the ImageNet-21k stand-in) learns its image labels in a fraction
# of the denoising steps; the rest of its time goes to DDeP, which starts from it.
SUPERVISED_STEPS_FACTOR = 0.5

METHODS = ('none', 'supervised', 'dep', 'ddep')
METHOD_TITLES = {'none': 'no pretraining', 'supervised': 'supervised', 'dep': 'DeP', 'ddep': 'DDeP'}
# The pretraining stages each initialisation needs, in run order.
_NEEDS = {
    'none': (),
    'supervised': ('supervised',),
    'dep': ('dep',),
    'ddep': ('supervised', 'ddep'),
}

# Each method's peak fine-tuning learning rate, the best of {3e-3, 1e-2} on the holdout
# split at 2% labels (the paper's rule, Sec. 4.3: the best lr per method;
# docs/demo_study.md).
FINETUNE_LRS = {'none': 1e-2, 'supervised': 3e-3, 'dep': 1e-2, 'ddep': 3e-3}

# Denoising. DDeP keeps the paper's sigma 0.1 and eps target (Sec. 3.3). DeP predicts the
# clean image (Table 7's x target) at sigma 0.2: on the holdout split the paper's eps target
# left its encoder worse than a random one for this model and data, at every sigma tried
# (0.1-1.0), and x at 0.2 was the best DeP measured (docs/demo_study.md).
DEP_SIGMA = 0.2
DEP_TARGET = 'x'
DDEP_SIGMA = 0.1


def _base(quick: bool, seed: int):
  c = config_schema.base_config()
  c.seed = seed
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny' if quick else 'demo'
  c.data.data_dir = ''
  c.data.batch_size = 8 if quick else 16
  c.data.eval_batch_size = 16 if quick else 64
  c.data.image_size = (32, 32)
  # Whole images: an inception crop of 5% of a 32x32 scene is a blur of one pattern, and
  # a crop that misses an object contradicts the image-level labels of `classify`.
  c.data.area_range = (1.0, 1.0)
  c.data.eval_pad_to = (48, 48) if quick else (32, 32)
  c.optim.lr = 2e-3  # a small model trained for minutes wants more than the paper's 1e-4
  c.optim.warmup_steps = 2 if quick else 50
  c.log_every = 2 if quick else 200
  c.eval_every = 0
  # No TensorBoard pictures: dozens of fine-tunes would spend ~1-2 s each drawing them; the
  # demo's own figures show predictions.
  c.eval.summary_images = 0
  c.keep_checkpoints = 1
  return c


def stage_configs(
    output: str,
    *,
    quick: bool,
    pretrain_steps: int,
    finetune_steps: int,
    fractions,
    seeds: int,
    middle_seeds: int = 0,
    full_seeds: int = 0,
    finetune_lr: float = 0.0,
    methods=METHODS,
    eval_split: str = 'validation',
    base_seed: int = 0,
) -> list[tuple[str, str, object]]:
  """[(name, workdir, config)] in run order: the pretraining stages `methods` need, then
  each method's fine-tunes per fraction and seed.

  `seeds` runs per method at the lowest fraction, `full_seeds` (default `seeds`) at 100%
  and `middle_seeds` (default `seeds`) at the fractions in between. Fine-tune i at a
  fraction uses subset seed i, the same labelled images for every method (a paired
  design), and initialisation/data-order seed `1000 * base_seed + i`. `finetune_lr` > 0
  replaces every method's FINETUNE_LRS.
  """
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f'unknown demo methods {unknown}; choose from {list(METHODS)}')
  needed = {stage for m in methods for stage in _NEEDS[m]}
  runs, workdirs = [], {}

  def add(name, config):
    config.checkpoint_every = config.total_steps
    workdirs[name] = os.path.join(output, 'runs', name)
    runs.append((name, workdirs[name], config))

  if 'supervised' in needed:
    sup = _base(quick, base_seed)
    sup.task, sup.method = 'classify', 'supervised'
    sup.data.train_split = 'unlabelled'  # image-level labels of the large split
    sup.total_steps = max(1, int(pretrain_steps * SUPERVISED_STEPS_FACTOR))
    add('pretrain_supervised', sup)

  if 'dep' in needed:
    dep = _base(quick, base_seed)
    dep.task, dep.method = 'denoise', 'dep'
    dep.denoise.sigma = DEP_SIGMA
    dep.denoise.target = DEP_TARGET
    dep.total_steps = pretrain_steps
    add('pretrain_dep', dep)

  if 'ddep' in needed:
    ddep = _base(quick, base_seed)
    ddep.task, ddep.method = 'denoise', 'ddep'
    ddep.denoise.sigma = DDEP_SIGMA
    ddep.init_from = workdirs['pretrain_supervised']
    ddep.frozen = ('encoder/.*',)
    ddep.total_steps = pretrain_steps
    add('pretrain_ddep', ddep)

  values = sorted({float(f) for f in fractions})
  for fraction in fractions:
    if float(fraction) == 1.0:
      count = full_seeds or seeds
    elif float(fraction) == values[0]:
      count = seeds
    else:
      count = middle_seeds or seeds
    for seed in range(count):
      for method in [m for m in METHODS if m in methods]:
        ft = _base(quick, 1000 * base_seed + seed)
        ft.task, ft.method = 'segment', method
        ft.init_from = workdirs.get(f'pretrain_{method}', '')  # 'none': no pretraining
        ft.data.label_fraction = float(fraction)
        # At 100% the subset is the whole split whatever the seed; the seed still names
        # the run and pairs the methods' runs.
        ft.data.subset_seed = seed
        ft.data.eval_split = '' if eval_split == 'validation' else eval_split
        ft.optim.lr = float(finetune_lr or FINETUNE_LRS[method])
        ft.total_steps = finetune_steps
        add(f'finetune_{method}_f{fraction}_s{seed}', ft)
  return runs


def dependencies(runs) -> dict[str, set[str]]:
  """{stage: the stages whose workdir it initialises from}."""
  by_workdir = {workdir: name for name, workdir, _ in runs}
  return {
      name: {by_workdir[config.init_from]} if config.init_from in by_workdir else set()
      for name, _, config in runs
  }


def _done_marker(workdir: str) -> str:
  return os.path.join(workdir, 'DONE')


def stage_cost(config) -> float:
  """Relative cost of a run: pixels pushed through the model (steps x batch x crop)."""
  h, w = config.data.image_size
  return float(config.total_steps * config.data.batch_size * h * w)


def _configure_jax(output: str) -> None:
  # Identical train steps across runs (same shapes, seeds live in the state) hit this
  # cache, so only the first run of each kind pays for compilation, in any process.
  # A cache the user already chose (JAX_COMPILATION_CACHE_DIR) is kept.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(output, '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def _init_worker(output: str, cores) -> None:
  """A worker process on one core: XLA and tf.data each run one thread there."""
  worker = multiprocessing.current_process()._identity[0] - 1  # pylint: disable=protected-access
  if cores:
    os.sched_setaffinity(0, {cores[worker % len(cores)]})
  # Read when JAX's CPU backend starts, which is after this (the worker has run nothing).
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
  )
  logging.set_verbosity(logging.WARNING)
  process.configure_gc()
  _configure_jax(output)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def run_stage(name: str, workdir: str, config) -> dict:
  """One stage, an ordinary `ddep.training.trainer` run; writes and returns its DONE summary."""
  from ddep.training import trainer as train  # pylint: disable=g-import-not-at-top

  t = time.time()
  result = train.train_and_evaluate(config, workdir)
  summary = {'seconds': round(time.time() - t, 1)}
  if result.metrics:
    summary['miou'] = result.metrics['miou']
  with open(_done_marker(workdir), 'w') as f:
    json.dump(summary, f)
  del name
  return summary


def _worker_cores() -> list[int]:
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # macOS: no affinity, the OS places the workers.
    return []


def run_stages(
    runs, *, output: str, workers: int = 1, log=print, run_one: Callable = run_stage
) -> dict[str, float]:
  """Runs each stage not yet DONE, each once the stages it initialises from are done;
  returns {name: seconds} as each run recorded it.

  workers > 1: a pool of that many processes, one core each; 1: in this process.
  `run_one(name, workdir, config) -> summary` runs a stage (module-level, for the pool).
  """
  t_start = time.time()
  costs = {name: stage_cost(c) for name, _, c in runs}
  index = {name: i for i, (name, _, _) in enumerate(runs, 1)}
  needs = dependencies(runs)
  seconds, done = {}, set()
  pending = []
  for name, workdir, config in runs:
    if os.path.exists(_done_marker(workdir)):
      with open(_done_marker(workdir)) as f:
        seconds[name] = float(json.load(f).get('seconds', 0.0))
      log(f'[demo] ({index[name]}/{len(runs)}) {name}: already done, reusing {workdir}')
      done.add(name)
    else:
      pending.append((name, workdir, config))
  measured = {'seconds': 0.0, 'cost': 0.0}

  def finished(name, summary, started):
    seconds[name] = summary['seconds']
    done.add(name)
    measured['seconds'] += summary['seconds']
    measured['cost'] += costs[name]
    left_cost = sum(costs[n] for n, _, _ in pending) + sum(costs[n] for n in running)
    # Stage-seconds per unit of cost, shared by the workers running at once.
    left = measured['seconds'] / measured['cost'] * left_cost / max(workers, 1)
    extra = f', val mIoU {100 * summary["miou"]:.2f}' if 'miou' in summary else ''
    log(
        f'[demo] ({index[name]}/{len(runs)}) {name}: done in {summary["seconds"]:.0f}s{extra} '
        f'(job: elapsed {time.time() - t_start:.0f}s, ETA {left:.0f}s)'
    )
    del started

  def next_ready():
    for i, (name, _, _) in enumerate(pending):
      if needs[name] <= done:
        return pending.pop(i)
    return None

  running: dict[str, object] = {}
  if workers <= 1:
    while pending:
      name, workdir, config = next_ready()
      log(
          f'[demo] ({index[name]}/{len(runs)}) {name}: {config.task}, {config.total_steps} steps ...'
      )
      finished(name, run_one(name, workdir, config), time.time())
    return seconds

  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=workers,
      mp_context=context,
      initializer=_init_worker,
      initargs=(output, _worker_cores()),
  ) as pool:
    futures = {}
    try:
      while pending or futures:
        while len(futures) < workers:
          stage = next_ready()
          if stage is None:
            break
          name, workdir, config = stage
          log(
              f'[demo] ({index[name]}/{len(runs)}) {name}: {config.task}, '
              f'{config.total_steps} steps ...'
          )
          futures[pool.submit(run_one, name, workdir, config)] = (name, time.time())
          running[name] = True
        if not futures:
          raise RuntimeError(f'stages wait on stages that cannot run: {[n for n, _, _ in pending]}')
        ready, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in ready:
          name, started = futures.pop(future)
          running.pop(name)
          finished(name, future.result(), started)
    except BaseException:
      for future in futures:
        future.cancel()
      raise
  return seconds


def _validation_images(config, count: int):
  """The first `count` validation images and labels, cropped to their own size."""
  from ddep.data import eval_data  # pylint: disable=g-import-not-at-top
  from ddep.datasets import specs  # pylint: disable=g-import-not-at-top

  batch = next(
      iter(
          eval_data.eval_dataset(
              specs.get(config.data.dataset),
              batch_size=count,
              pad_to=tuple(config.data.eval_pad_to),
              process_index=0,
              process_count=1,
          )
      )
  )
  out = []
  for i in range(count):
    h, w = batch['orig_hw'][i] if 'orig_hw' in batch else batch['image'].shape[1:3]
    out.append((np.asarray(batch['image'][i, :h, :w]), np.asarray(batch['label'][i, :h, :w])))
  return out


def _pad_for(model, image):
  s = model.output_stride
  h, w = image.shape[:2]
  return np.pad(image, ((0, -h % s), (0, -w % s), (0, 0)))


def denoising_figures(runs, output: str, clean: np.ndarray) -> list[str]:
  """Figure 4 from each denoising model, at the σ it was trained for:
  clean / noisy / predicted ε / denoised, for the image `clean`."""
  from ddep.reporting import plots  # pylint: disable=g-import-not-at-top
  from ddep.runs import checkpointing  # pylint: disable=g-import-not-at-top
  from ddep.runs import summaries  # pylint: disable=g-import-not-at-top
  from ddep.datasets import specs  # pylint: disable=g-import-not-at-top
  from ddep.training import tasks  # pylint: disable=g-import-not-at-top

  paths = []
  for name, filename, label in (
      ('pretrain_dep', 'denoising.png', 'DeP'),
      ('pretrain_ddep', 'denoising_ddep.png', 'DDeP'),
  ):
    found = [r for r in runs if r[0] == name]
    if not found:  # --methods left this pretraining out.
      continue
    _, workdir, config = found[0]
    model = tasks.get(config.task).build_model(config, specs.get(config.data.dataset))
    params = checkpointing.load_params(workdir)
    sigma = float(config.denoise.sigma)
    h, w = clean.shape[:2]
    eps = np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    x = clean + sigma * eps
    pred = np.asarray(summaries.jitted_apply(model)(params, _pad_for(model, x)[None]))
    pred = pred[0, :h, :w]
    # The network predicts eps (Eq. 4) or, for Table 7's x target, the clean image.
    e = (x - pred) / sigma if config.denoise.target == 'x' else pred
    path = os.path.join(output, filename)
    plots.denoising_grid(
        clean,
        {sigma: x},
        {sigma: e},
        {sigma: x - sigma * e},
        path=path,
        title=f'{label}, {config.model.preset} TransUNet, trained at σ = {sigma:g} '
        f'({config.total_steps} steps)',
    )
    paths.append(path)
  return paths


def segmentation_figure(runs, output: str, images) -> str:
  """Image, ground truth and each method's prediction for `images` ((image, label) pairs),
  from the seed-0 fine-tunes at the lowest label fraction."""
  # report selects matplotlib's headless backend before pyplot is imported.
  from ddep.reporting import plots  # pylint: disable=g-import-not-at-top
  from ddep.runs import checkpointing  # pylint: disable=g-import-not-at-top
  from ddep.runs import summaries  # pylint: disable=g-import-not-at-top
  from ddep.training import tasks  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from ddep.datasets import specs  # pylint: disable=g-import-not-at-top

  finetunes = [(n, wd, c) for n, wd, c in runs if n.startswith('finetune_')]
  lowest = min(float(c.data.label_fraction) for _, _, c in finetunes)
  chosen = {
      c.method: (wd, c)
      for _, wd, c in finetunes
      if float(c.data.label_fraction) == lowest and int(c.data.subset_seed) == 0
  }
  methods = [m for m in METHODS if m in chosen]
  spec = specs.get(chosen[methods[0]][1].data.dataset)
  predictions = {}
  for method in methods:
    workdir, config = chosen[method]
    model = tasks.get(config.task).build_model(config, spec)
    params = checkpointing.load_params(workdir)
    apply = summaries.jitted_apply(model)
    predictions[method] = []
    for image, label in images:
      logits = np.asarray(apply(params, _pad_for(model, image)[None]))[0]
      predictions[method].append(np.argmax(logits[: label.shape[0], : label.shape[1]], -1))
  palette = np.asarray(spec.palette, np.uint8)
  titles = ['image', 'ground truth'] + [METHOD_TITLES[m] for m in methods]
  fig, axes = plt.subplots(
      len(images), len(titles), figsize=(1.6 * len(titles), 1.6 * len(images)), squeeze=False
  )
  for row, (image, label) in enumerate(images):
    shown = [
        visualisation.to_display(image),
        palette[np.where(label == spec.ignore_label, 0, label)],
    ]
    shown += [palette[predictions[m][row]] for m in methods]
    for col, picture in enumerate(shown):
      ax = axes[row, col]
      ax.imshow(picture, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(titles[col], fontsize=8)
  fig.suptitle(
      f'Validation images, fine-tuned on {100 * lowest:g}% of the labels (seed 0)', fontsize=9
  )
  fig.tight_layout()
  path = os.path.join(output, 'segmentation.png')
  plots.save_figure(fig, path, dpi=100)
  return path


def stage_seconds_table(runs, seconds: dict[str, float]) -> str:
  """Seconds per stage kind (pretraining each, fine-tuning summed by method)."""
  rows: dict[str, list[float]] = {}
  for name, _, config in runs:
    kind = name if name.startswith('pretrain_') else f'finetune_{config.method}'
    rows.setdefault(kind, []).append(seconds.get(name, float('nan')))
  lines = ['| Stage | Runs | Seconds |', '|---|---|---|']
  for kind, values in rows.items():
    lines.append(f'| {kind} | {len(values)} | {sum(values):.0f} |')
  lines.append(
      f'| all | {sum(len(v) for v in rows.values())} | '
      f'{sum(sum(v) for v in rows.values()):.0f} |'
  )
  return '\n'.join(lines) + '\n'


def _split_ids(dataset: str, split: str) -> list[str]:
  """Every image id of a split (the 'subset' of a 100% run), without decoding images."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from ddep.datasets import specs  # pylint: disable=g-import-not-at-top

  spec = specs.get(dataset)
  builder = tfds.builder(spec.tfds_name)
  skip = {k: tfds.decode.SkipDecoding() for k in ('image', 'segmentation')}
  ds = builder.as_dataset(split=split, decoders=skip)
  return [ex['image_id'].decode() for ex in tfds.as_numpy(ds)]


def finetune_entries(runs) -> list[dict]:
  """One results.json entry per fine-tune: what anyone needs to recompute the statistics."""
  from ddep.data import subsets  # pylint: disable=g-import-not-at-top

  entries, whole = [], {}
  for name, workdir, config in runs:
    if not name.startswith('finetune_'):
      continue
    result = records.load_run(workdir).results
    ids_path = os.path.join(workdir, 'subset_ids.txt')
    if os.path.exists(ids_path):
      ids = subsets.read_subset_ids(ids_path)
    else:  # 100%: the whole split.
      key = (config.data.dataset, config.data.get('train_split') or 'train')
      if key not in whole:
        whole[key] = _split_ids(*key)
      ids = whole[key]
    entries.append(
        dict(
            method=config.method,
            fraction=float(config.data.label_fraction),
            label_count=len(ids),
            subset_seed=int(config.data.subset_seed),
            subset_ids_sha1=paired_stats.subset_sha1(ids),
            miou=round(100 * float(result['miou']), 4),
            seed=int(config.seed),
            run=name,
        )
    )
  return entries


def write_report(runs, output: str, seconds: dict[str, float]) -> str:
  """results.md (table, paired claims, seconds), results.json and the report's figures."""
  from ddep import report  # pylint: disable=g-import-not-at-top

  finetunes = [records.load_run(wd) for name, wd, _ in runs if name.startswith('finetune_')]
  # No per-run training curves: dozens of figures nobody reads here (ddep.report draws them).
  report.build_report(finetunes, output, curves=False)
  summary = tables.summarize(finetunes)
  entries = finetune_entries(runs)
  claims = paired_stats.paper_claims(entries)
  text = (
      tables.markdown_summary(summary)
      + "\n## The paper's claims, as measured\n\n"
      + 'Each difference is paired: for a subset seed every method fine-tuned on the same '
      'labelled images (at 100%, the same initialisation and data-order seed). A claim '
      '*holds* when the 95% t-interval of the mean difference excludes zero on its side, '
      'is *reversed* when it lies wholly on the other side, and is *within noise* '
      'otherwise.\n\n'
      + paired_stats.markdown_claims(claims)
      + '\n## Seconds per stage\n\n'
      + stage_seconds_table(runs, seconds)
  )
  with open(os.path.join(output, 'results.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(output, 'results.json'), 'w') as f:
    json.dump(
        dict(
            finetunes=entries,
            claims=paired_stats.claims_json(claims),
            stage_seconds={k: seconds[k] for k in sorted(seconds)},
        ),
        f,
        indent=1,
    )
  return text


def main(argv):
  del argv
  process.configure_gc()
  # Progress lines are printed; library INFO logs (orbax, TFDS) would drown them.
  logging.set_verbosity(logging.WARNING)
  output = os.path.abspath(_OUTPUT.value)
  os.makedirs(output, exist_ok=True)
  _configure_jax(output)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  quick = _QUICK.value
  budget = BUDGETS['quick' if quick else _BUDGET.value]
  runs = stage_configs(
      output,
      quick=quick,
      pretrain_steps=_PRETRAIN_STEPS.value or budget['pretrain_steps'],
      finetune_steps=_FINETUNE_STEPS.value or budget['finetune_steps'],
      fractions=_FRACTIONS.value or budget['fractions'],
      seeds=_SEEDS.value or budget['seeds'],
      middle_seeds=_MIDDLE_SEEDS.value or budget['middle_seeds'],
      full_seeds=_FULL_SEEDS.value or budget['full_seeds'],
      finetune_lr=_FINETUNE_LR.value,
      methods=_METHODS.value or METHODS,
      eval_split=_EVAL_SPLIT.value,
      base_seed=_SEED.value,
  )
  t0 = time.time()
  from ddep.data import preparation  # pylint: disable=g-import-not-at-top

  print(f'[demo] preparing the {runs[0][2].data.dataset} dataset ...', flush=True)
  preparation.prepare_generated(runs[0][2].data.dataset, None)
  workers = _WORKERS.value or len(_worker_cores()) or os.cpu_count() or 1
  print(f'[demo] {len(runs)} stages on {workers} worker process(es)', flush=True)
  seconds = run_stages(runs, output=output, workers=workers, log=lambda s: print(s, flush=True))
  summary = write_report(runs, output, seconds)
  # One read of the validation images for both figures.
  images = _validation_images(runs[-1][2], 4)
  figures = denoising_figures(runs, output, images[0][0]) + [
      segmentation_figure(runs, output, images)
  ]
  print('\n' + summary, flush=True)
  print(
      f'[demo] wrote {output}/results.md, {output}/results.json, '
      f'{output}/miou_vs_fraction_*.png, {", ".join(figures)} in {time.time() - t0:.0f}s',
      flush=True,
  )


if __name__ == '__main__':
  app.run(main)
