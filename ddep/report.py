r"""Gathers finished runs and draws the paper's tables and figures.

  python -m ddep.report --workdirs=RUNS/*,OTHER --output=DIR
  python -m ddep.report --workdirs=GRID --output=DIR --select=best \
      --selection_seeds=0,1 --final_seeds=0,1,...,9   # Sec. 4.3: best (lr, wd) per task

The results contract, one fine-tuning workdir per run:

  results.json   {"method": "ddep", "dataset": "pascal_context_60",
                  "label_fraction": 0.05, "subset_seed": 0, "decoder_width": 1,
                  "label_count": null,
                  "miou": 0.4438, "per_class_iou": {"aeroplane": 0.71, ...},
                  "pixel_accuracy": 0.78, ...}
                 Scores are fractions in [0, 1] (tables show x100); a class
                 absent from the evaluation set has IoU null. `write_results`
                 writes this file from `ddep.evaluators.metrics.segmentation_metrics`.
                 A `data.label_count=N` run records N as "label_count" and
                 N / split size as "label_fraction"; the report groups such
                 runs by N, in columns of their own ("N labels").
  metrics.jsonl  training curves, one JSON object per line:
                 {"step": 1000, "train/loss": 0.41, "val/miou": 0.52, ...}

Outputs in --output: summary.md and summary.json (mean ± sample std over runs,
method x label fraction, per dataset and decoder width), table_*.png,
miou_vs_fraction_*.png (Figures 2, 5, 6: log-x, error bars = std) and
curves/<run>.png. `denoising_grid` draws Figure 4.

  python -m ddep.report --pretraining=PRETRAIN_RUNS/* --output=DIR

reads denoising pretraining workdirs (config.json with task 'denoise' and a
metrics.jsonl) and draws their held-out validation (`ddep.evaluators.denoise`: val/psnr,
val/eps_mse) against step, one line per run, in pretraining_validation.png; the
numbers are in pretraining_validation.json. It is the curve to watch for Figure 8
(longer pretraining is better) while the runs train.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import app
from absl import flags
from etils.epath import Path

from ddep.evaluators import metrics as metrics_lib
from ddep.reporting import plots
from ddep.reporting import records
from ddep.reporting import tables
from ddep.runs import progress
from ddep.runs import storage


def build_report(
    runs: Sequence[records.Run], output, *, curves: bool = True
) -> dict[str, list[Path]]:
  """Writes every table and figure for `runs` into `output`; `curves`: also each run's
  training curves (a figure per run, ~0.6 s each)."""
  output = storage.path(output)
  (output / 'curves').mkdir(parents=True, exist_ok=True)
  summary = tables.summarize(runs)
  written: dict[str, list[Path]] = {'tables': [], 'figures': [], 'curves': []}
  (output / 'summary.md').write_text(tables.markdown_summary(summary))
  (output / 'summary.json').write_text(
      json.dumps(
          metrics_lib.json_safe(
              [
                  {
                      'dataset': d,
                      'decoder_width': w,
                      'method': m,
                      'label_fraction': records.fraction_of(f),
                      'label_count': f.count if isinstance(f, records.LabelCount) else None,
                      'miou_mean': c.mean,
                      'miou_std': c.std,
                      'n': c.n,
                      'mious': list(c.values),
                  }
                  for (d, w, m, f), c in summary.items()
              ]
          ),
          indent=1,
      )
  )
  written['tables'].append(output / 'summary.md')
  for dataset, width in tables.groups(summary):
    suffix = f'{plots.slug(dataset)}_{width:g}x'
    plots.plot_table(summary, dataset, width, output / f'table_{suffix}.png')
    plots.plot_miou_vs_fraction(summary, dataset, width, output / f'miou_vs_fraction_{suffix}.png')
    written['tables'].append(output / f'table_{suffix}.png')
    written['figures'].append(output / f'miou_vs_fraction_{suffix}.png')
  if not curves:
    return written
  used: set[str] = set()
  for run in progress.track(runs, desc='report: training curves', unit='runs'):
    name = plots.slug(run.name)
    while name in used:  # Two runs of one setting and seed: keep both.
      name += '_'
    used.add(name)
    path = output / 'curves' / f'{name}.png'
    if plots.plot_training_curves(run, path):
      written['curves'].append(path)
  return written


def write_pretraining_report(patterns: Sequence[str], output) -> list[Path]:
  """pretraining_validation.json (the data) and .png (the plot) in `output`."""
  output = storage.path(output)
  output.mkdir(parents=True, exist_ok=True)
  data = records.denoise_validation(records.find_pretraining_runs(patterns))
  written = [output / 'pretraining_validation.json']
  written[0].write_text(json.dumps(metrics_lib.json_safe(data), indent=1))
  if plots.plot_denoise_validation(data, output / 'pretraining_validation.png'):
    written.append(output / 'pretraining_validation.png')
  return written


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, defined on demand so that importing ddep.report defines none."""
  flags.DEFINE_list(
      'workdirs', [], 'Fine-tuning run dirs, parent dirs or glob patterns.', flag_values=flag_values
  )
  flags.DEFINE_list(
      'pretraining',
      [],
      'Denoising pretraining workdirs (or parents, globs): their held-out '
      'validation against step (pretraining_validation.png / .json).',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'output',
      None,
      'Directory for the tables and figures (local or gs://).',
      flag_values=flag_values,
  )
  flags.DEFINE_enum(
      'select',
      '',
      ['', 'best'],
      "best: pick each setting's (lr, wd) by mean mIoU over "
      '--selection_seeds (Sec. 4.3) and report it over --final_seeds; the tables then hold only '
      'the chosen runs.',
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      'selection_seeds',
      [],
      'Subset seeds that choose (lr, wd); empty = all.',
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      'final_seeds',
      [],
      'Subset seeds reported at the chosen (lr, wd); empty = all.',
      flag_values=flag_values,
  )
  flags.mark_flag_as_required('output', flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """app.run's main: `flag_values` are parsed already (tests pass their own)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flag_values
  seeds = lambda items: [int(s) for s in items] or None  # noqa: E731
  if not f.workdirs and not f.pretraining:
    raise app.UsageError('give --workdirs (fine-tuning runs) and/or --pretraining (denoising runs)')
  try:
    if f.pretraining:
      written = write_pretraining_report(list(f.pretraining), f.output)
      print(f"pretraining validation -> {', '.join(map(str, written))}")
    if not f.workdirs:
      return 0
    workdirs = records.find_workdirs(list(f.workdirs))
    runs = [
        records.load_run(w) for w in progress.track(workdirs, desc='report: reading', unit='runs')
    ]
    if f.select == 'best':
      chosen = tables.select_best(
          runs, selection_seeds=seeds(f.selection_seeds), final_seeds=seeds(f.final_seeds)
      )
      final = seeds(f.final_seeds)
      runs = [
          r
          for r in runs
          if r.key in chosen
          and records.hyperparameters(r) == (chosen[r.key]['lr'], chosen[r.key]['weight_decay'])
          and (final is None or r.results['subset_seed'] in final)
      ]
      storage.path(f.output).mkdir(parents=True, exist_ok=True)
      (storage.path(f.output) / 'selection.md').write_text(tables.markdown_selection(chosen))
    written = build_report(runs, f.output)
  except records.ReportError as e:
    print(f'ddep.report: error: {e}', file=sys.stderr)
    return 1
  print(f'{len(runs)} runs -> {f.output}')
  for kind, paths in written.items():
    print(f'  {kind}: {len(paths)} files')
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
