r"""The main job: a small label-efficiency experiment on the generated demo scenes, on CPU.

  python -m ddep.demo --output=out/demo

It mirrors the paper's Table 1 / Figure 2 at toy scale:
  1. supervised: the encoder is trained on image-level labels (the ImageNet-21k stand-in)
  2. DeP:  the whole TransUNet denoises, σ = 0.1 (the paper's 0.8 only smooths here)
  3. DDeP: the supervised encoder is frozen and the decoder denoises, σ = 0.1
  4. fine-tuning of each initialisation (none / supervised / DeP / DDeP) at several
     label fractions and subset seeds, evaluated by mIoU on the validation split
  5. a table (mean ± std), the paper's orderings as measured, the mIoU-vs-fraction plot,
     Figure-4 denoising grids and a segmentation figure.
Every stage is an ordinary `ddep.train` run in its own workdir; a rerun skips the
stages whose workdir says DONE.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from ddep import config_schema

FLAGS = flags.FLAGS
_OUTPUT = flags.DEFINE_string('output', 'out/demo', 'Where runs, tables and figures go.')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny dataset and few steps (for tests).')
_BUDGET = flags.DEFINE_enum(
    'budget',
    'default',
    ['default', 'long'],
    "'default' fits 20 minutes on 2 CPU cores; 'long' is ~10x that.",
)
_PRETRAIN_STEPS = flags.DEFINE_integer(
    'pretrain_steps', 0, 'Steps of each pretraining stage ' "(0: the budget's)."
)
_FINETUNE_STEPS = flags.DEFINE_integer(
    'finetune_steps', 0, 'Steps of each fine-tuning run ' "(0: the budget's)."
)
_FRACTIONS = flags.DEFINE_list('fractions', [], "Label fractions (empty: the budget's).")
_SEEDS = flags.DEFINE_integer(
    'seeds',
    0,
    'Subset seeds per label fraction below 1 (the full set has one subset: one '
    "run); 0: the budget's.",
)
_FINETUNE_LR = flags.DEFINE_float(
    'finetune_lr', 0.0, 'Peak fine-tuning learning rate of ' "every method (0: the budget's)."
)
_METHODS = flags.DEFINE_list(
    'methods',
    [],
    'Initialisations to fine-tune (empty: all); only ' 'the pretraining stages they need run.',
)
_EVAL_SPLIT = flags.DEFINE_enum(
    'eval_split',
    'validation',
    ['validation', 'holdout'],
    "Where fine-tunes are scored: 'holdout' (part of the labelled data, not the validation "
    'split) is for choosing hyper-parameters, as docs/demo_study.md did.',
)

# At least 3 subset seeds where the subset varies, so that a mean comes with a std.
# Every stage trains on 32x32 crops of the 64x64 scenes (1/6 of a 64x64 step's time on
# 2 cores, docs/demo_study.md) and fine-tunes are scored on whole validation images.
BUDGETS = {
    'default': dict(
        pretrain_steps=4000,
        finetune_steps=500,
        finetune_lr=2e-3,
        fractions=['0.02', '1.0'],
        seeds=3,
    ),
    'long': dict(
        pretrain_steps=20000,
        finetune_steps=2000,
        finetune_lr=2e-3,
        fractions=['0.02', '0.1', '1.0'],
        seeds=5,
    ),
    'quick': dict(pretrain_steps=6, finetune_steps=4, finetune_lr=2e-3, fractions=['1.0'], seeds=1),
}

METHODS = ('none', 'supervised', 'dep', 'ddep')
METHOD_TITLES = {'none': 'no pretraining', 'supervised': 'supervised', 'dep': 'DeP', 'ddep': 'DDeP'}
# The pretraining stages each initialisation needs, in run order.
_NEEDS = {
    'none': (),
    'supervised': ('supervised',),
    'dep': ('dep',),
    'ddep': ('supervised', 'ddep'),
}

# Noise levels. DDeP keeps the paper's 0.1 (Sec. 3.3). DeP uses 0.1, not the paper's 0.8,
# chosen on the holdout split (docs/demo_study.md): a frozen DeP encoder under a trained
# decoder scored 20.7 (sigma 0.8), 34.1 (0.2) and 35.9 (0.1) mIoU, a random one 20.3.
# Fig. 7 of the paper also favours a low sigma.
DEP_SIGMA = 0.1
DDEP_SIGMA = 0.1


def _base(quick: bool):
  c = config_schema.base_config()
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny' if quick else 'demo'
  c.data.data_dir = ''
  c.data.batch_size = 8 if quick else 16
  c.data.eval_batch_size = 16 if quick else 64
  c.data.image_size = (32, 32)
  c.data.eval_pad_to = (48, 48) if quick else (64, 64)
  c.optim.lr = 2e-3  # a small model trained for minutes wants more than the paper's 1e-4
  c.optim.warmup_steps = 2 if quick else 50
  c.log_every = 2 if quick else 250
  c.eval_every = 0
  # No TensorBoard pictures: 16 fine-tunes would spend ~1-2 s each drawing them, out of a
  # 20-minute budget whose margin is under a minute; the demo's own figures show predictions.
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
    finetune_lr: float = 2e-3,
    methods=METHODS,
    eval_split: str = 'validation',
) -> list[tuple[str, str, object]]:
  """[(name, workdir, config)] in run order: the pretraining stages `methods` need, then
  each method's fine-tunes per fraction and subset seed."""
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
    sup = _base(quick)
    sup.task, sup.method = 'classify', 'supervised'
    sup.data.train_split = 'unlabelled'  # image-level labels of the large split
    sup.total_steps = pretrain_steps
    add('pretrain_supervised', sup)

  if 'dep' in needed:
    dep = _base(quick)
    dep.task, dep.method = 'denoise', 'dep'
    dep.denoise.sigma = DEP_SIGMA
    dep.total_steps = pretrain_steps
    add('pretrain_dep', dep)

  if 'ddep' in needed:
    ddep = _base(quick)
    ddep.task, ddep.method = 'denoise', 'ddep'
    ddep.denoise.sigma = DDEP_SIGMA
    ddep.init_from = workdirs['pretrain_supervised']
    ddep.frozen = ('encoder/.*',)
    ddep.total_steps = pretrain_steps
    add('pretrain_ddep', ddep)

  for fraction in fractions:
    # Like the paper (Sec. 4.3), fewer runs where the subset varies less; at 100% the
    # subset seed changes nothing.
    for seed in range(seeds if float(fraction) < 1.0 else 1):
      for method in [m for m in METHODS if m in methods]:
        ft = _base(quick)
        ft.task, ft.method = 'segment', method
        ft.init_from = workdirs.get(f'pretrain_{method}', '')  # 'none': no pretraining
        ft.seed = seed
        ft.data.label_fraction = float(fraction)
        ft.data.subset_seed = seed
        ft.data.eval_split = '' if eval_split == 'validation' else eval_split
        ft.data.scale_range = (0.75, 1.25)
        ft.optim.lr = float(finetune_lr)
        ft.total_steps = finetune_steps
        add(f'finetune_{method}_f{fraction}_s{seed}', ft)
  return runs


def _done_marker(workdir: str) -> str:
  return os.path.join(workdir, 'DONE')


def stage_cost(config) -> float:
  """Relative cost of a run: pixels pushed through the model (steps x batch x crop)."""
  h, w = config.data.image_size
  return float(config.total_steps * config.data.batch_size * h * w)


def run_stages(runs, *, log=print) -> dict[str, float]:
  """Runs each stage not yet DONE; returns {name: seconds} as each run recorded it."""
  from ddep import train  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  costs = [stage_cost(c) for _, _, c in runs]
  seconds, measured, measured_cost = {}, 0.0, 0.0
  for i, (name, workdir, config) in enumerate(runs, 1):
    prefix = f'[demo] ({i}/{len(runs)}) {name}'
    if os.path.exists(_done_marker(workdir)):
      with open(_done_marker(workdir)) as f:
        seconds[name] = float(json.load(f).get('seconds', 0.0))
      log(f'{prefix}: already done, reusing {workdir}')
      continue
    log(f'{prefix}: {config.task}, {config.total_steps} steps ...')
    t = time.time()
    result = train.train_and_evaluate(config, workdir)
    summary = {'seconds': round(time.time() - t, 1)}
    if result.metrics:
      summary['miou'] = result.metrics['miou']
    with open(_done_marker(workdir), 'w') as f:
      json.dump(summary, f)
    seconds[name] = summary['seconds']
    measured += time.time() - t
    measured_cost += costs[i - 1]
    # Only runs done in this process count: reused stages took no time now.
    left = measured / measured_cost * sum(costs[i:]) if measured_cost else float('nan')
    extra = f', val mIoU {100 * summary["miou"]:.2f}' if 'miou' in summary else ''
    log(
        f'{prefix}: done in {summary["seconds"]:.0f}s{extra} '
        f'(job: elapsed {time.time() - t_start:.0f}s, ETA {left:.0f}s)'
    )
  return seconds


def _validation_images(config, count: int):
  """The first `count` validation images and labels, cropped to their own size."""
  from ddep import input_pipeline  # pylint: disable=g-import-not-at-top

  batch = next(
      iter(
          input_pipeline.eval_dataset(
              config.data.dataset,
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
  from ddep import checkpointing, report, train  # pylint: disable=g-import-not-at-top

  paths = []
  for name, filename, label in (
      ('pretrain_dep', 'denoising.png', 'DeP'),
      ('pretrain_ddep', 'denoising_ddep.png', 'DDeP'),
  ):
    found = [r for r in runs if r[0] == name]
    if not found:  # --methods left this pretraining out.
      continue
    _, workdir, config = found[0]
    model = train.build_model(config, num_outputs=3)
    params = checkpointing.load_params(workdir)
    sigma = float(config.denoise.sigma)
    h, w = clean.shape[:2]
    eps = np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    x = clean + sigma * eps
    e = np.asarray(model.apply({'params': params}, _pad_for(model, x)[None]))[0, :h, :w]
    path = os.path.join(output, filename)
    report.denoising_grid(
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
  from ddep import checkpointing, report, train  # pylint: disable=g-import-not-at-top
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
    model = train.build_model(config, num_outputs=spec.num_classes)
    params = checkpointing.load_params(workdir)
    predictions[method] = []
    for image, label in images:
      logits = np.asarray(model.apply({'params': params}, _pad_for(model, image)[None]))[0]
      predictions[method].append(np.argmax(logits[: label.shape[0], : label.shape[1]], -1))
  palette = np.asarray(spec.palette, np.uint8)
  titles = ['image', 'ground truth'] + [METHOD_TITLES[m] for m in methods]
  fig, axes = plt.subplots(
      len(images), len(titles), figsize=(1.6 * len(titles), 1.6 * len(images)), squeeze=False
  )
  for row, (image, label) in enumerate(images):
    shown = [report.to_display(image), palette[np.where(label == spec.ignore_label, 0, label)]]
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
  report._save_figure(fig, path, dpi=100)  # pylint: disable=protected-access
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


def write_report(runs, output: str, seconds: dict[str, float]) -> str:
  from ddep import report  # pylint: disable=g-import-not-at-top

  finetunes = [report.load_run(wd) for name, wd, _ in runs if name.startswith('finetune_')]
  report.build_report(finetunes, output)
  summary = report.summarize(finetunes)
  text = (
      report.markdown_summary(summary)
      + "\n## The paper's orderings, as measured\n\n"
      + report.markdown_orderings(report.orderings(summary))
      + '\n## Seconds per stage\n\n'
      + stage_seconds_table(runs, seconds)
  )
  with open(os.path.join(output, 'results.md'), 'w') as f:
    f.write(text)
  return text


def main(argv):
  del argv
  # Progress lines are printed; library INFO logs (orbax, TFDS) would drown them.
  logging.set_verbosity(logging.WARNING)
  output = os.path.abspath(_OUTPUT.value)
  os.makedirs(output, exist_ok=True)
  # Identical train steps across runs (same shapes, seeds live in the state) hit this
  # cache, so only the first run of each kind pays for compilation.
  jax.config.update('jax_compilation_cache_dir', os.path.join(output, '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
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
      finetune_lr=_FINETUNE_LR.value or budget['finetune_lr'],
      methods=_METHODS.value or METHODS,
      eval_split=_EVAL_SPLIT.value,
  )
  t0 = time.time()
  from ddep import input_pipeline  # pylint: disable=g-import-not-at-top

  print(f'[demo] preparing the {runs[0][2].data.dataset} dataset ...', flush=True)
  input_pipeline.prepare(runs[0][2].data.dataset, None)
  seconds = run_stages(runs, log=lambda s: print(s, flush=True))
  summary = write_report(runs, output, seconds)
  # One read of the validation images for both figures.
  images = _validation_images(runs[-1][2], 4)
  figures = denoising_figures(runs, output, images[0][0]) + [
      segmentation_figure(runs, output, images)
  ]
  print('\n' + summary, flush=True)
  print(
      f'[demo] wrote {output}/results.md, {output}/miou_vs_fraction_*.png, '
      f'{", ".join(figures)} in {time.time() - t0:.0f}s',
      flush=True,
  )


if __name__ == '__main__':
  app.run(main)
