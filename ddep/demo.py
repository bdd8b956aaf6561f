r"""The main job: a small label-efficiency experiment on the generated demo scenes, on CPU.

  python -m ddep.demo --output=out/demo

It mirrors the paper's Table 1 / Figure 2 at toy scale:
  1. supervised: the encoder is trained on image-level labels (the ImageNet-21k stand-in)
  2. DeP:  the whole TransUNet denoises, σ = 0.8 (Sec. 3.1)
  3. DDeP: the supervised encoder is frozen and the decoder denoises, σ = 0.1
  4. fine-tuning of each initialisation (none / supervised / DeP / DDeP) at several
     label fractions and subset seeds, evaluated by mIoU on the validation split
  5. a table (mean ± std), the mIoU-vs-fraction plot, and a Figure-4 denoising grid.
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

from configs import common

FLAGS = flags.FLAGS
_OUTPUT = flags.DEFINE_string('output', 'out/demo', 'Where runs, tables and figures go.')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny dataset and few steps (for tests).')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 500, 'Steps of each pretraining stage.')
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', 150, 'Steps of each fine-tuning run.')
_FRACTIONS = flags.DEFINE_list('fractions', ['0.02', '0.1', '1.0'], 'Label fractions.')
_SEEDS = flags.DEFINE_integer(
    'seeds', 2, 'Subset seeds per label fraction below 1 (the full set has one subset: one run).')

METHODS = ('none', 'supervised', 'dep', 'ddep')
SIGMAS_FOR_FIGURE = (0.1, 0.2, 0.4, 0.8)


def _base(quick: bool):
  c = common.base_config()
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny' if quick else 'demo'
  c.data.data_dir = ''
  c.data.batch_size = 8 if quick else 16
  c.data.eval_batch_size = 16 if quick else 64
  c.data.image_size = (32, 32) if quick else (64, 64)
  c.data.eval_pad_to = (48, 48) if quick else (64, 64)
  c.optim.lr = 2e-3         # a small model trained for minutes wants more than the paper's 1e-4
  c.optim.warmup_steps = 2 if quick else 20
  c.log_every = 2 if quick else 50
  c.eval_every = 0
  c.keep_checkpoints = 1
  return c


def stage_configs(output: str, *, quick: bool, pretrain_steps: int, finetune_steps: int,
                  fractions, seeds: int) -> list[tuple[str, str, object]]:
  """[(name, workdir, config)] in run order."""
  runs = []

  def add(name, config):
    config.checkpoint_every = config.total_steps
    runs.append((name, os.path.join(output, 'runs', name), config))

  sup = _base(quick)
  sup.task, sup.method = 'classify', 'supervised'
  sup.data.train_split = 'unlabelled'   # image-level labels of the large split
  sup.total_steps = pretrain_steps
  add('pretrain_supervised', sup)

  dep = _base(quick)
  dep.task, dep.method = 'denoise', 'dep'
  dep.denoise.sigma = 0.8
  dep.total_steps = pretrain_steps
  add('pretrain_dep', dep)

  ddep = _base(quick)
  ddep.task, ddep.method = 'denoise', 'ddep'
  ddep.denoise.sigma = 0.1
  ddep.init_from = runs[0][1]
  ddep.frozen = ('encoder/.*',)
  ddep.total_steps = pretrain_steps
  add('pretrain_ddep', ddep)

  init = {'none': '', 'supervised': runs[0][1], 'dep': runs[1][1], 'ddep': runs[2][1]}
  for fraction in fractions:
    # Like the paper (Sec. 4.3), fewer runs where the subset varies less; at 100% the
    # subset seed changes nothing.
    for seed in range(seeds if float(fraction) < 1.0 else 1):
      for method in METHODS:
        ft = _base(quick)
        ft.task, ft.method = 'segment', method
        ft.init_from = init[method]
        ft.seed = seed
        ft.data.label_fraction = float(fraction)
        ft.data.subset_seed = seed
        ft.data.batch_size = 8 if quick else 16
        ft.data.image_size = (32, 32) if quick else (48, 48)
        ft.data.scale_range = (0.75, 1.25)
        ft.total_steps = finetune_steps
        add(f'finetune_{method}_f{fraction}_s{seed}', ft)
  return runs


def _done_marker(workdir: str) -> str:
  return os.path.join(workdir, 'DONE')


def run_stages(runs, *, log=print) -> None:
  from ddep import train  # pylint: disable=g-import-not-at-top
  t_start = time.time()
  for i, (name, workdir, config) in enumerate(runs, 1):
    prefix = f'[demo] ({i}/{len(runs)}) {name}'
    if os.path.exists(_done_marker(workdir)):
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
    extra = f', val mIoU {100 * summary["miou"]:.2f}' if 'miou' in summary else ''
    log(f'{prefix}: done in {summary["seconds"]:.0f}s{extra} '
        f'(elapsed {time.time() - t_start:.0f}s)')


def denoising_figure(runs, output: str, *, quick: bool) -> str:
  """Figure 4 from the DeP model: clean / noisy / predicted ε / denoised for several σ."""
  from ddep import checkpointing, input_pipeline, report, train  # pylint: disable=g-import-not-at-top
  _, workdir, config = next(r for r in runs if r[0] == 'pretrain_dep')
  model = train.build_model(config, num_outputs=3)
  params = checkpointing.load_params(workdir)
  batch = next(iter(input_pipeline.eval_dataset(
      config.data.dataset, batch_size=1, pad_to=tuple(config.data.eval_pad_to),
      process_index=0, process_count=1)))
  h, w = (32, 32) if quick else (64, 64)
  clean = np.asarray(batch['image'][0, :h, :w])
  rng = np.random.default_rng(0)
  eps = rng.standard_normal(clean.shape).astype(np.float32)
  noisy, pred, denoised = {}, {}, {}
  for sigma in SIGMAS_FOR_FIGURE:
    x = clean + sigma * eps
    e = np.asarray(model.apply({'params': params}, x[None]))[0]
    noisy[sigma], pred[sigma], denoised[sigma] = x, e, x - sigma * e
  path = os.path.join(output, 'denoising.png')
  report.denoising_grid(clean, noisy, pred, denoised, path=path)
  return path


def write_report(runs, output: str) -> str:
  from ddep import report  # pylint: disable=g-import-not-at-top
  finetunes = [report.load_run(wd) for name, wd, _ in runs if name.startswith('finetune_')]
  report.build_report(finetunes, output)
  summary = report.markdown_summary(report.summarize(finetunes))
  with open(os.path.join(output, 'results.md'), 'w') as f:
    f.write(summary)
  return summary


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
  runs = stage_configs(output, quick=quick,
                       pretrain_steps=6 if quick else _PRETRAIN_STEPS.value,
                       finetune_steps=4 if quick else _FINETUNE_STEPS.value,
                       fractions=_FRACTIONS.value if not quick else ['1.0'],
                       seeds=1 if quick else _SEEDS.value)
  t0 = time.time()
  from ddep import input_pipeline  # pylint: disable=g-import-not-at-top
  print(f'[demo] preparing the {runs[0][2].data.dataset} dataset ...', flush=True)
  input_pipeline.prepare(runs[0][2].data.dataset, None)
  run_stages(runs, log=lambda s: print(s, flush=True))
  summary = write_report(runs, output)
  figure = denoising_figure(runs, output, quick=quick)
  print('\n' + summary, flush=True)
  print(f'[demo] wrote {output}/results.md, {output}/miou_vs_fraction_*.png, {figure} '
        f'in {time.time() - t0:.0f}s', flush=True)


if __name__ == '__main__':
  app.run(main)
