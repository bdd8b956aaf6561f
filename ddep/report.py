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

import dataclasses
import io
import json
import math
import re
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # Headless: runs on training hosts without a display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils.epath import Path  # noqa: E402

from ddep.evaluators import metrics as metrics_lib  # noqa: E402
from ddep.runs import progress  # noqa: E402
from ddep.runs import storage  # noqa: E402
from ddep.reporting import visualisation

RESULTS_FILE = 'results.json'
CURVES_FILE = 'metrics.jsonl'
REQUIRED = {
    'method': str,
    'dataset': str,
    'label_fraction': (int, float),
    'subset_seed': int,
    'decoder_width': (int, float),
    'miou': (int, float),
}
# Paper order: baselines first, then ours; other methods follow alphabetically.
METHOD_ORDER = ('none', 'no_pretraining', 'random_init', 'supervised', 'dep', 'ddep')
METHOD_LABELS = {
    'none': 'No pretraining',
    'no_pretraining': 'No pretraining',
    'random_init': 'No pretraining',
    'supervised': 'Supervised',
    'dep': 'DeP',
    'ddep': 'DDeP',
}


class ReportError(Exception):
  """Bad or missing run files; the message names the file."""


@dataclasses.dataclass(frozen=True)
class LabelCount:
  """The labels setting of `data.label_count=N` runs, a column apart from the fractions.

  Runs are averaged by `count`; `fraction` (N / split size) only places the column on
  the plots' fraction axis, so it takes no part in equality.
  """

  count: int
  fraction: float = dataclasses.field(compare=False)


def _fraction_of(labels: float | LabelCount) -> float:
  return labels.fraction if isinstance(labels, LabelCount) else labels


def _labels_order(labels: float | LabelCount) -> tuple:
  # Most labels first (100% leads, as in Tables 1, 3, 4); a count after an equal fraction.
  return -_fraction_of(labels), isinstance(labels, LabelCount)


def pretraining_record(init_from: str) -> dict | None:
  """The settings of the run a fine-tuning started from, read from its config.json.

  `init_from` is that run's workdir or one of its checkpoint dirs. Ablations
  (Tables 6, 7; Figure 8) differ only here, so results.json keeps them and the
  report tells such runs apart. None if there is no run config to read.
  """
  if not init_from:
    return None
  path = storage.path(init_from)
  for directory in (path, *list(path.parents)[:3]):  # <workdir>/checkpoints/<step>
    if (directory / 'config.json').is_file():
      config = json.loads((directory / 'config.json').read_text())
      break
  else:
    return None
  model, denoise = config.get('model', {}), config.get('denoise', {})
  return {
      **noise_record(denoise),
      'workdir': str(directory),
      'method': config.get('method'),
      'task': config.get('task'),
      'model': model.get('preset'),
      'decoder_width': model.get('decoder_width_multiplier'),
      'noise_conditioning': model.get('noise_conditioning'),
      'target': denoise.get('target'),
      'total_steps': config.get('total_steps'),
      'total_epochs': config.get('total_epochs'),
  }


def noise_record(denoise: Mapping[str, Any]) -> dict:
  """The noise form and level of a denoising config, each form in its own terms.

  'additive' (Eq. 1) keeps sigma / sigma_range, 'ddpm' (Eq. 2) gamma / gamma_range;
  `sigma_equivalent` is the level as Eq. 1's sigma either way (same signal-to-noise
  ratio, sigma = sqrt((1 - gamma) / gamma)), so that the forms compare at one scale.
  Configs from before `gamma` existed read sigma as gamma under 'ddpm', and are
  recorded as what they ran.
  """
  form = denoise.get('form')
  sigma, sigma_range = denoise.get('sigma'), list(denoise.get('sigma_range') or [])
  gamma, gamma_range = denoise.get('gamma'), list(denoise.get('gamma_range') or [])
  if form == 'ddpm' and 'gamma' not in denoise:  # Older runs: the sigma field held gamma.
    gamma, gamma_range, sigma, sigma_range = sigma, sigma_range, None, []
  if form == 'ddpm':
    # gamma falls as the noise grows: the range's ends swap.
    def to_sigma(g):
      return math.sqrt((1 - g) / g) if g and 0 < g < 1 else None

    equivalent = [to_sigma(g) for g in reversed(gamma_range)] if gamma_range else to_sigma(gamma)
  else:
    equivalent = sigma_range or sigma
    gamma, gamma_range = None, []
  return {
      'form': form,
      'sigma': sigma if form != 'ddpm' else None,
      'sigma_range': sigma_range if form != 'ddpm' else [],
      'gamma': gamma,
      'gamma_range': gamma_range,
      'sigma_equivalent': equivalent,
  }


def write_results(
    workdir,
    *,
    method: str,
    dataset: str,
    label_fraction: float,
    subset_seed: int,
    decoder_width: float,
    metrics: Mapping[str, Any],
    label_count: int | None = None,
    **extra,
) -> Path:
  """Writes `workdir/results.json` from segmentation_metrics' dict (plus extras).

  `label_count` is the number of labelled images of a `data.label_count=` run (its
  `label_fraction` is then that number over the split's size), None otherwise.
  """
  results = {
      'method': method,
      'dataset': dataset,
      'label_fraction': float(label_fraction),
      'label_count': None if label_count is None else int(label_count),
      'subset_seed': int(subset_seed),
      'decoder_width': decoder_width,
      'miou': metrics['miou'],
      'per_class_iou': metrics.get('per_class_iou', {}),
      'pixel_accuracy': metrics.get('pixel_accuracy'),
      'mean_class_accuracy': metrics.get('mean_class_accuracy'),
      **extra,
  }
  path = storage.path(workdir) / RESULTS_FILE
  path.write_text(json.dumps(metrics_lib.json_safe(results), indent=1))
  return path


@dataclasses.dataclass
class Run:
  workdir: Path
  results: dict
  curves: list[dict]
  # What sets this run apart from others of its method (`assign_variants`), e.g.
  # 'sigma=0.2'; '' when nothing does.
  variant: str = ''

  @property
  def key(self) -> tuple:
    """(dataset, decoder_width, method, labels): runs averaged together.

    The method carries the variant, as 'ddep [sigma=0.2]', so that ablations of one
    method are separate rows rather than averaged as if they were seeds. `labels` is
    the label fraction, or a LabelCount for `label_count=` runs.
    """
    r = self.results
    method = f"{r['method']} [{self.variant}]" if self.variant else r['method']
    fraction = _fraction_key(r['label_fraction'])
    labels = LabelCount(int(r['label_count']), fraction) if r.get('label_count') else fraction
    return r['dataset'], r['decoder_width'], method, labels

  @property
  def name(self) -> str:
    dataset, width, method, labels = self.key
    tag = f'n{labels.count}' if isinstance(labels, LabelCount) else f'f{labels:g}'
    return f"{dataset}_{method}_{width:g}x_{tag}_seed{self.results['subset_seed']}"


def _fraction_key(fraction: float) -> float:
  # 1/30 may be written as 0.0333 or 0.033333333; both are the same setting.
  return float(f'{float(fraction):.3g}')


def validate_results(results: Any, path: Path) -> dict:
  if not isinstance(results, dict):
    raise ReportError(f'{path}: expected a JSON object, got {type(results).__name__}')
  problems = []
  for key, kind in REQUIRED.items():
    value = results.get(key)
    if value is None:
      problems.append(f'missing {key!r}')
    elif isinstance(value, bool) or not isinstance(value, kind):
      problems.append(f'{key!r} is {value!r}')
  if not problems:
    if not 0 <= results['miou'] <= 1:
      problems.append(f"miou {results['miou']} is not a fraction in [0, 1]")
    if not 0 < results['label_fraction'] <= 1:
      problems.append(f"label_fraction {results['label_fraction']} is not in (0, 1]")
    count = results.get('label_count')
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
      problems.append(f'label_count {count!r} is not a count of images')
  if problems:
    raise ReportError(f'{path}: ' + '; '.join(problems))
  return results


def read_curves(path: Path) -> list[dict]:
  """metrics.jsonl rows; a malformed line is an error naming its number.

  A resumed run may have appended rows again for steps an earlier attempt had
  logged after its last checkpoint; the last attempt's rows win. A row supersedes
  the earlier rows of later steps, and those of its own step with the same keys.
  """
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ReportError(f'{path}:{number}: not JSON ({e})') from e
    if not isinstance(row, dict) or not isinstance(row.get('step'), (int, float)):
      raise ReportError(f"{path}:{number}: expected an object with a numeric 'step'")
    # Rows stay sorted by step, so the superseded ones are at the end.
    while rows and rows[-1]['step'] > row['step']:
      rows.pop()
    same_step = len(rows)
    while same_step and rows[same_step - 1]['step'] == row['step']:
      same_step -= 1
    rows[same_step:] = [r for r in rows[same_step:] if r.keys() != row.keys()]
    rows.append(row)
  return rows


def load_run(workdir) -> Run:
  workdir = storage.path(workdir)
  path = workdir / RESULTS_FILE
  try:
    results = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise ReportError(f'{path}: missing (run not finished?)') from e
  except json.JSONDecodeError as e:
    raise ReportError(f'{path}: not JSON ({e})') from e
  validate_results(results, path)
  curves_path = workdir / CURVES_FILE
  curves = read_curves(curves_path) if curves_path.exists() else []
  return Run(workdir, results, curves)


def find_workdirs(patterns: Sequence[str]) -> list[Path]:
  """Run dirs: each pattern is glob-expanded; a dir without results.json is
  searched below for run dirs. Unfinished runs (no results.json) are skipped."""
  found: dict[Path, None] = {}
  for pattern in patterns:
    matches = storage.glob(pattern) or [pattern]
    hits = []
    for match in map(storage.path, matches):
      if (match / RESULTS_FILE).is_file():
        hits.append(match)
      elif match.is_dir():
        hits.extend(p.parent for p in storage.files_below(match, RESULTS_FILE))
    if not hits:
      raise ReportError(f'no {RESULTS_FILE} found for --workdirs entry {pattern!r}')
    for hit in hits:
      found.setdefault(storage.path(hit), None)
  return list(found)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (dataset, decoder width, method, label fraction) setting over runs."""

  values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def std(self) -> float:
    # Sample std over seeds/subsets; undefined (NaN) for a single run.
    return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan


def _provenance(run: Run) -> dict[str, Any]:
  """The settings a result depends on besides its key: model and pretraining."""
  fields = {'model': run.results.get('model')}
  for name, value in (run.results.get('pretraining') or {}).items():
    # Where it ran is not what it was; sigma_equivalent only restates gamma.
    if name not in ('workdir', 'sigma_equivalent'):
      fields[name] = value
  return fields


def assign_variants(runs: Sequence[Run]) -> None:
  """Labels each run with the settings that differ among runs of its method.

  Runs of one (dataset, width, method) whose model or pretraining differ (say σ or
  the target) get a variant naming the differing fields; identical ones stay
  together, as seeds. Results without these fields (older runs) differ in nothing.
  """
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    r = run.results
    groups.setdefault((r['dataset'], r['decoder_width'], r['method']), []).append(run)
  for group in groups.values():
    fields = [_provenance(run) for run in group]
    names = sorted({name for f in fields for name in f})
    # Compared as JSON: values may be lists (σ ranges).
    differing = [n for n in names if len({json.dumps(f.get(n)) for f in fields}) > 1]
    for run, f in zip(group, fields):
      run.variant = ', '.join(f'{n}={f.get(n)}' for n in differing)


def summarize(runs: Sequence[Run]) -> dict[tuple, Cell]:
  """{(dataset, decoder_width, method, labels): Cell of mIoUs}; see Run.key."""
  assign_variants(runs)
  values: dict[tuple, list[float]] = {}
  for run in runs:
    values.setdefault(run.key, []).append(float(run.results['miou']))
  return {key: Cell(tuple(v)) for key, v in sorted(values.items(), key=lambda kv: _sort_key(kv[0]))}


def _method_rank(method: str) -> tuple:
  base = method.split(' [', 1)[0]  # A variant sorts after its plain method.
  return (METHOD_ORDER.index(base), method) if base in METHOD_ORDER else (len(METHOD_ORDER), method)


def _sort_key(key: tuple) -> tuple:
  dataset, width, method, labels = key
  return dataset, width, _method_rank(method), _labels_order(labels)


def method_label(method: str) -> str:
  base, bracket, variant = method.partition(' [')
  return METHOD_LABELS.get(base, base) + (f' [{variant}' if bracket else '')


def format_fraction(fraction: float) -> str:
  return f'{100 * fraction:.3g}%'


def format_labels(labels: float | LabelCount) -> str:
  if isinstance(labels, LabelCount):
    return f'{labels.count} labels'
  return format_fraction(labels)


def _groups(summary: Mapping[tuple, Cell]) -> dict[tuple, dict]:
  """{(dataset, width): {"methods": [...], "fractions": [labels...]}} in paper order."""
  groups: dict[tuple, dict] = {}
  for dataset, width, method, fraction in summary:
    group = groups.setdefault((dataset, width), {'methods': [], 'fractions': []})
    if method not in group['methods']:
      group['methods'].append(method)
    if fraction not in group['fractions']:
      group['fractions'].append(fraction)
  for group in groups.values():
    group['methods'].sort(key=_method_rank)
    group['fractions'].sort(key=_labels_order)
  return groups


def format_cell(cell: Cell | None) -> str:
  if cell is None:
    return '–'
  std = '' if math.isnan(cell.std) else f' ± {100 * cell.std:.2f}'
  return f'{100 * cell.mean:.2f}{std} (n={cell.n})'


def _group_title(dataset: str, width: float) -> str:
  return f'{dataset}, {width:g}× decoder'


def markdown_summary(summary: Mapping[tuple, Cell]) -> str:
  """mIoU (%) mean ± sample std (n runs), one table per dataset and decoder width."""
  parts = []
  for (dataset, width), group in _groups(summary).items():
    header = ['Method'] + [format_labels(f) for f in group['fractions']]
    lines = [
        f'## {_group_title(dataset, width)}: mIoU (%), mean ± std over runs',
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    for method in group['methods']:
      cells = [format_cell(summary.get((dataset, width, method, f))) for f in group['fractions']]
      lines.append('| ' + ' | '.join([method_label(method)] + cells) + ' |')
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts) + '\n'


# The paper's claims as (better, worse, where): "lowest"/"highest" label fraction of a table.
PAPER_ORDERINGS = (
    ('dep', 'none', 'lowest', 'DeP beats random initialisation with few labels (Fig. 2, Table 1)'),
    ('ddep', 'none', 'lowest', 'DDeP beats random initialisation with few labels (Table 1)'),
    ('ddep', 'supervised', 'lowest', 'DDeP beats supervised pretraining with few labels (Table 1)'),
    ('supervised', 'dep', 'highest', 'supervised pretraining beats DeP with all labels (Fig. 2)'),
)


def _margin(a: Cell, b: Cell) -> float:
  return 2 * max(a.std, b.std)


def compare(better: Cell, worse: Cell) -> str:
  """'holds', 'reversed' or 'within noise' for the claim `better` > `worse`.

  A difference counts only beyond twice the larger of the two sample stds; with
  a single run on either side there is no std, and the verdict says so.
  """
  diff = better.mean - worse.mean
  if better.n < 2 or worse.n < 2:
    return 'holds (n=1, no std)' if diff > 0 else 'reversed (n=1, no std)'
  margin = _margin(better, worse)
  if diff > margin:
    return 'holds'
  if -diff > margin:
    return 'reversed'
  return 'within noise'


def orderings(summary: Mapping[tuple, Cell]) -> list[dict]:
  """Each of PAPER_ORDERINGS as measured, per (dataset, decoder width) table."""
  rows = []
  for (dataset, width), group in _groups(summary).items():
    fractions = group['fractions']
    for better, worse, where, claim in PAPER_ORDERINGS:
      labels = fractions[-1] if where == 'lowest' else fractions[0]  # Sorted most labels first.
      fraction = _fraction_of(labels)
      # "Few labels" needs a fraction below 100%, "all labels" needs 100%.
      if (where == 'lowest' and fraction >= 1.0) or (where == 'highest' and fraction < 1.0):
        continue
      a = summary.get((dataset, width, better, labels))
      b = summary.get((dataset, width, worse, labels))
      if a is None or b is None:
        continue
      rows.append(
          dict(
              dataset=dataset,
              decoder_width=width,
              label_fraction=fraction,
              labels=format_labels(labels),
              better=better,
              worse=worse,
              claim=claim,
              difference=a.mean - b.mean,
              margin=_margin(a, b),
              verdict=compare(a, b),
          )
      )
  return rows


def markdown_orderings(rows: Sequence[dict]) -> str:
  lines = [
      "| Paper's claim | Labels | Difference (points) | 2 × max std | Measured |",
      '|---|---|---|---|---|',
  ]
  for r in rows:
    margin = '–' if math.isnan(r['margin']) else f"{100 * r['margin']:.2f}"
    lines.append(
        f"| {r['claim']} | {r.get('labels') or format_fraction(r['label_fraction'])} | "
        f"{100 * r['difference']:+.2f} | {margin} | {r['verdict']} |"
    )
  return '\n'.join(lines) + '\n'


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_')


def plot_table(summary: Mapping[tuple, Cell], dataset: str, width: float, path) -> None:
  group = _groups(summary)[(dataset, width)]
  cells = [
      [format_cell(summary.get((dataset, width, m, f))) for f in group['fractions']]
      for m in group['methods']
  ]
  fig, ax = plt.subplots(figsize=(2 + 2.2 * len(group['fractions']), 1 + 0.45 * len(cells)))
  ax.axis('off')
  table = ax.table(
      cellText=cells,
      rowLabels=[method_label(m) for m in group['methods']],
      colLabels=[format_labels(f) for f in group['fractions']],
      loc='center',
  )
  table.auto_set_font_size(False)
  table.set_fontsize(9)
  table.scale(1, 1.4)
  ax.set_title(f'{_group_title(dataset, width)}: mIoU (%)')
  _save_figure(fig, path, dpi=100, bbox_inches='tight')


def plot_miou_vs_fraction(summary: Mapping[tuple, Cell], dataset: str, width: float, path) -> None:
  """Figures 2, 5, 6: mIoU against label fraction (log x), one line per method."""
  group = _groups(summary)[(dataset, width)]
  columns = sorted(group['fractions'], key=_fraction_of)  # Counts at their true fraction.
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for method in group['methods']:
    points = [
        (f, summary[(dataset, width, method, f)])
        for f in columns
        if (dataset, width, method, f) in summary
    ]
    fractions = [_fraction_of(f) for f, _ in points]
    means = [100 * c.mean for _, c in points]
    stds = [0.0 if math.isnan(c.std) else 100 * c.std for _, c in points]
    ax.errorbar(fractions, means, yerr=stds, marker='o', capsize=3, label=method_label(method))
  ax.set_xscale('log')
  ax.set_xticks([_fraction_of(f) for f in columns])
  ax.set_xticklabels([format_labels(f) for f in columns])
  ax.minorticks_off()
  ax.set_xlabel('fraction of labelled training images')
  ax.set_ylabel('mIoU (%)')
  ax.set_title(_group_title(dataset, width))
  ax.grid(alpha=0.3)
  ax.legend()
  _save_figure(fig, path, dpi=100, bbox_inches='tight')


def plot_training_curves(run: Run, path) -> bool:
  """One panel per logged metric against step; False if there is nothing to plot."""
  series: dict[str, tuple[list, list]] = {}
  for row in run.curves:
    for key, value in row.items():
      if (
          key != 'step'
          and isinstance(value, (int, float))
          and not isinstance(value, bool)
          and math.isfinite(value)
      ):
        steps, values = series.setdefault(key, ([], []))
        steps.append(row['step'])
        values.append(value)
  if not series:
    return False
  cols = min(3, len(series))
  rows = math.ceil(len(series) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, (key, (steps, values)) in zip(axes.flat, sorted(series.items())):
    ax.plot(steps, values, marker='.' if len(steps) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(series) :]:
    ax.axis('off')
  fig.suptitle(run.name)
  fig.tight_layout()
  _save_figure(fig, path, dpi=80)
  return True


def denoising_grid(
    clean,
    noisy_by_sigma: Mapping[float, Any],
    predicted_noise_by_sigma: Mapping[float, Any],
    denoised_by_sigma: Mapping[float, Any],
    *,
    path=None,
    noise_scale: float = 3.0,
    title: str = '',
) -> bytes:
  """Figure 4: per σ, a row clean | noisy x+σε | predicted ε | denoised.

  Images are (H, W, 3) or (H, W) in [-1, 1] and are shown clipped to [0, 1]
  after mapping. ε ~ N(0, I) is not bounded, so the predicted noise is
  shown with ±noise_scale mapped to [0, 1]. Returns the PNG bytes and writes
  them to `path` if given.
  """
  sigmas = sorted(noisy_by_sigma)
  for name, images in (
      ('predicted_noise_by_sigma', predicted_noise_by_sigma),
      ('denoised_by_sigma', denoised_by_sigma),
  ):
    if sorted(images) != sigmas:
      raise ValueError(f'{name} has σ {sorted(images)}, noisy_by_sigma has {sigmas}')
  columns = ('clean', 'noisy', 'predicted noise', 'denoised')
  fig, axes = plt.subplots(len(sigmas), 4, figsize=(8, 2.1 * len(sigmas)), squeeze=False)
  for row, sigma in enumerate(sigmas):
    images = (
        visualisation.to_display(clean),
        visualisation.to_display(noisy_by_sigma[sigma]),
        visualisation.to_display(predicted_noise_by_sigma[sigma], noise_scale),
        visualisation.to_display(denoised_by_sigma[sigma]),
    )
    for col, image in enumerate(images):
      ax = axes[row, col]
      ax.imshow(
          image, cmap='gray' if image.ndim == 2 else None, vmin=0, vmax=1, interpolation='nearest'
      )
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(columns[col])
    axes[row, 0].set_ylabel(f'σ = {sigma:g}')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  data = buffer.getvalue()
  if path is not None:
    storage.path(path).write_bytes(data)
  return data


def _save_figure(fig, path, **savefig_kw) -> None:
  """PNG bytes through the storage layer: matplotlib would open() a gs:// path locally."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', **savefig_kw)
  plt.close(fig)
  storage.path(path).write_bytes(buffer.getvalue())


def hyperparameters(run: Run) -> tuple[float, float]:
  """(lr, weight decay) of a run, from its workdir's config.json (what the sweep varied)."""
  path = run.workdir / 'config.json'
  try:
    optim = json.loads(path.read_text())['optim']
    return float(optim['lr']), float(optim['weight_decay'])
  except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ReportError(f'{path}: no optim.lr / optim.weight_decay to select by ({e!r})') from e


def select_best(
    runs: Sequence[Run],
    *,
    selection_seeds: Sequence[int] | None = None,
    final_seeds: Sequence[int] | None = None,
) -> dict[tuple, dict]:
  """Sec. 4.3's sweep selection: per (dataset, width, method, labels), the (lr, wd) whose
  mean validation mIoU over `selection_seeds` is best, reported over `final_seeds`.

  Seeds are `subset_seed`s (None: all of them). Returns {key: {"lr", "weight_decay",
  "selection": Cell, "final": Cell, "candidates": {(lr, wd): Cell}}}.
  """
  assign_variants(runs)
  by_pair: dict[tuple, dict[tuple, list[Run]]] = {}
  for run in runs:
    by_pair.setdefault(run.key, {}).setdefault(hyperparameters(run), []).append(run)

  def cell(group, seeds):
    values = [
        float(r.results['miou'])
        for r in group
        if seeds is None or r.results['subset_seed'] in seeds
    ]
    return Cell(tuple(values)) if values else None

  chosen = {}
  for key in sorted(by_pair, key=_sort_key):
    candidates = {pair: cell(group, selection_seeds) for pair, group in by_pair[key].items()}
    candidates = {pair: c for pair, c in candidates.items() if c is not None}
    if not candidates:
      continue
    # Ties go to the smaller lr, then wd: deterministic whatever the file order.
    pair = max(sorted(candidates), key=lambda p: candidates[p].mean)
    final = cell(by_pair[key][pair], final_seeds)
    chosen[key] = dict(
        lr=pair[0],
        weight_decay=pair[1],
        selection=candidates[pair],
        final=final,
        candidates=candidates,
    )
  return chosen


def markdown_selection(chosen: Mapping[tuple, dict]) -> str:
  lines = [
      '| Dataset | Width | Method | Labels | lr | wd | Selection mIoU (%) | Final mIoU (%) |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for (dataset, width, method, labels), c in chosen.items():
    lines.append(
        f'| {dataset} | {width:g}x | {method_label(method)} | {format_labels(labels)} | '
        f"{c['lr']:g} | {c['weight_decay']:g} | {format_cell(c['selection'])} | "
        f"{format_cell(c['final'])} |"
    )
  return '\n'.join(lines) + '\n'


def build_report(runs: Sequence[Run], output, *, curves: bool = True) -> dict[str, list[Path]]:
  """Writes every table and figure for `runs` into `output`; `curves`: also each run's
  training curves (a figure per run, ~0.6 s each)."""
  output = storage.path(output)
  (output / 'curves').mkdir(parents=True, exist_ok=True)
  summary = summarize(runs)
  written: dict[str, list[Path]] = {'tables': [], 'figures': [], 'curves': []}
  (output / 'summary.md').write_text(markdown_summary(summary))
  (output / 'summary.json').write_text(
      json.dumps(
          metrics_lib.json_safe(
              [
                  {
                      'dataset': d,
                      'decoder_width': w,
                      'method': m,
                      'label_fraction': _fraction_of(f),
                      'label_count': f.count if isinstance(f, LabelCount) else None,
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
  for dataset, width in _groups(summary):
    suffix = f'{_slug(dataset)}_{width:g}x'
    plot_table(summary, dataset, width, output / f'table_{suffix}.png')
    plot_miou_vs_fraction(summary, dataset, width, output / f'miou_vs_fraction_{suffix}.png')
    written['tables'].append(output / f'table_{suffix}.png')
    written['figures'].append(output / f'miou_vs_fraction_{suffix}.png')
  if not curves:
    return written
  used: set[str] = set()
  for run in progress.track(runs, desc='report: training curves', unit='runs'):
    name = _slug(run.name)
    while name in used:  # Two runs of one setting and seed: keep both.
      name += '_'
    used.add(name)
    path = output / 'curves' / f'{name}.png'
    if plot_training_curves(run, path):
      written['curves'].append(path)
  return written


# The held-out denoising metric of `ddep.evaluators.denoise`: (key, panel title).
DENOISE_VALIDATION = (('val/psnr', 'held-out PSNR (dB)'), ('val/eps_mse', 'held-out ε-MSE'))


@dataclasses.dataclass
class PretrainingRun:
  """A denoising pretraining workdir: its config and its curves (no results.json)."""

  workdir: Path
  config: dict
  curves: list[dict]

  @property
  def label(self) -> str:
    """Method, noise level and what Figure 8 varies (lr, length), e.g. 'dep σ=0.8 lr=1e-4 ...'."""
    c = self.config
    noise = noise_record(c.get('denoise', {}))
    level = (
        f"γ={noise['gamma_range'] or noise['gamma']}"
        if noise['form'] == 'ddpm'
        else f"σ={noise['sigma_range'] or noise['sigma']}"
    )
    length = (
        f"{c['total_epochs']:g} epochs"
        if c.get('total_epochs')
        else f"{c.get('total_steps')} steps"
    )
    lr = c.get('optim', {}).get('lr')
    return f"{c.get('method')} {level} lr={lr:g} {length} ({self.workdir.name})"


def find_pretraining_runs(patterns: Sequence[str]) -> list[PretrainingRun]:
  """Denoise workdirs at or below each (glob) pattern; ones without curves are skipped."""
  found: dict[Path, PretrainingRun] = {}
  for pattern in patterns:
    hits = []
    for match in map(storage.path, storage.glob(pattern) or [pattern]):
      configs = [match / 'config.json'] if (match / 'config.json').is_file() else []
      if not configs and match.is_dir():
        configs = storage.files_below(match, 'config.json')
      hits.extend(configs)
    if not hits:
      raise ReportError(f'no config.json found for --pretraining entry {pattern!r}')
    for path in hits:
      try:
        config = json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise ReportError(f'{path}: not JSON ({e})') from e
      curves_path = path.parent / CURVES_FILE
      if config.get('task') == 'denoise' and curves_path.exists():
        found.setdefault(path.parent, PretrainingRun(path.parent, config, read_curves(curves_path)))
  return list(found.values())


def denoise_validation(runs: Sequence[PretrainingRun]) -> list[dict]:
  """Per run: its label, workdir and the (step, value) series of each held-out metric."""
  out = []
  for run in runs:
    series = {
        key: [
            [row['step'], row[key]] for row in run.curves if isinstance(row.get(key), (int, float))
        ]
        for key, _ in DENOISE_VALIDATION
    }
    out.append({'label': run.label, 'workdir': str(run.workdir), **series})
  return out


def plot_denoise_validation(data: Sequence[Mapping[str, Any]], path) -> bool:
  """One panel per held-out metric against step, a line per run; False if none has it."""
  if not any(d[key] for d in data for key, _ in DENOISE_VALIDATION):
    return False
  fig, axes = plt.subplots(1, len(DENOISE_VALIDATION), figsize=(11, 4), squeeze=False)
  for ax, (key, title) in zip(axes[0], DENOISE_VALIDATION):
    for run in data:
      if run[key]:
        steps, values = zip(*run[key])
        ax.plot(steps, values, marker='.' if len(steps) < 30 else None, label=run['label'])
    ax.set_title(title)
    ax.set_xlabel('pretraining step')
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize='small')
  fig.tight_layout()
  _save_figure(fig, path, dpi=100)
  return True


def write_pretraining_report(patterns: Sequence[str], output) -> list[Path]:
  """pretraining_validation.json (the data) and .png (the plot) in `output`."""
  output = storage.path(output)
  output.mkdir(parents=True, exist_ok=True)
  data = denoise_validation(find_pretraining_runs(patterns))
  written = [output / 'pretraining_validation.json']
  written[0].write_text(json.dumps(metrics_lib.json_safe(data), indent=1))
  if plot_denoise_validation(data, output / 'pretraining_validation.png'):
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
    workdirs = find_workdirs(list(f.workdirs))
    runs = [load_run(w) for w in progress.track(workdirs, desc='report: reading', unit='runs')]
    if f.select == 'best':
      chosen = select_best(
          runs, selection_seeds=seeds(f.selection_seeds), final_seeds=seeds(f.final_seeds)
      )
      final = seeds(f.final_seeds)
      runs = [
          r
          for r in runs
          if r.key in chosen
          and hyperparameters(r) == (chosen[r.key]['lr'], chosen[r.key]['weight_decay'])
          and (final is None or r.results['subset_seed'] in final)
      ]
      storage.path(f.output).mkdir(parents=True, exist_ok=True)
      (storage.path(f.output) / 'selection.md').write_text(markdown_selection(chosen))
    written = build_report(runs, f.output)
  except ReportError as e:
    print(f'ddep.report: error: {e}', file=sys.stderr)
    return 1
  print(f'{len(runs)} runs -> {f.output}')
  for kind, paths in written.items():
    print(f'  {kind}: {len(paths)} files')
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
