"""The paper's tables from finished runs: mean ± std per method and label fraction, the
paper's orderings checked against them, and the (lr, wd) selection of Sec. 4.3.
Pure functions of records.Run values."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ddep.reporting import records

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


def _provenance(run: records.Run) -> dict[str, Any]:
  """The settings a result depends on besides its key: model and pretraining."""
  fields = {'model': run.results.get('model')}
  for name, value in (run.results.get('pretraining') or {}).items():
    # Where it ran is not what it was; sigma_equivalent only restates gamma.
    if name not in ('workdir', 'sigma_equivalent'):
      fields[name] = value
  return fields


def assign_variants(runs: Sequence[records.Run]) -> None:
  """Labels each run with the settings that differ among runs of its method.

  Runs of one (dataset, width, method) whose model or pretraining differ (say σ or
  the target) get a variant naming the differing fields; identical ones stay
  together, as seeds. Results without these fields (older runs) differ in nothing.
  """
  groups: dict[tuple, list[records.Run]] = {}
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


def summarize(runs: Sequence[records.Run]) -> dict[tuple, Cell]:
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
  return dataset, width, _method_rank(method), records.labels_order(labels)


def method_label(method: str) -> str:
  base, bracket, variant = method.partition(' [')
  return METHOD_LABELS.get(base, base) + (f' [{variant}' if bracket else '')


def format_fraction(fraction: float) -> str:
  return f'{100 * fraction:.3g}%'


def format_labels(labels: float | records.LabelCount) -> str:
  if isinstance(labels, records.LabelCount):
    return f'{labels.count} labels'
  return format_fraction(labels)


def groups(summary: Mapping[tuple, Cell]) -> dict[tuple, dict]:
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
    group['fractions'].sort(key=records.labels_order)
  return groups


def format_cell(cell: Cell | None) -> str:
  if cell is None:
    return '–'
  std = '' if math.isnan(cell.std) else f' ± {100 * cell.std:.2f}'
  return f'{100 * cell.mean:.2f}{std} (n={cell.n})'


def group_title(dataset: str, width: float) -> str:
  return f'{dataset}, {width:g}× decoder'


def markdown_summary(summary: Mapping[tuple, Cell]) -> str:
  """mIoU (%) mean ± sample std (n runs), one table per dataset and decoder width."""
  parts = []
  for (dataset, width), group in groups(summary).items():
    header = ['Method'] + [format_labels(f) for f in group['fractions']]
    lines = [
        f'## {group_title(dataset, width)}: mIoU (%), mean ± std over runs',
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
  for (dataset, width), group in groups(summary).items():
    fractions = group['fractions']
    for better, worse, where, claim in PAPER_ORDERINGS:
      labels = fractions[-1] if where == 'lowest' else fractions[0]  # Sorted most labels first.
      fraction = records.fraction_of(labels)
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


def select_best(
    runs: Sequence[records.Run],
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
  by_pair: dict[tuple, dict[tuple, list[records.Run]]] = {}
  for run in runs:
    by_pair.setdefault(run.key, {}).setdefault(records.hyperparameters(run), []).append(run)

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
