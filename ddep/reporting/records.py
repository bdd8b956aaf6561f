"""Finished runs read back for reports: a fine-tuning's results.json and metrics.jsonl
(checked against the results contract in ddep.report), and pretraining runs' held-out
validation curves."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from etils.epath import Path

from ddep.runs import storage
from ddep.runs import workdir as workdir_lib
from ddep.runs.workdir import CURVES_FILE, RESULTS_FILE

REQUIRED = {
    'method': str,
    'dataset': str,
    'label_fraction': (int, float),
    'subset_seed': int,
    'decoder_width': (int, float),
    'miou': (int, float),
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


def fraction_of(labels: float | LabelCount) -> float:
  return labels.fraction if isinstance(labels, LabelCount) else labels


def labels_order(labels: float | LabelCount) -> tuple:
  # Most labels first (100% leads, as in Tables 1, 3, 4); a count after an equal fraction.
  return -fraction_of(labels), isinstance(labels, LabelCount)


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


def hyperparameters(run: Run) -> tuple[float, float]:
  """(lr, weight decay) of a run, from its workdir's config.json (what the sweep varied)."""
  path = run.workdir / 'config.json'
  try:
    optim = json.loads(path.read_text())['optim']
    return float(optim['lr']), float(optim['weight_decay'])
  except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ReportError(f'{path}: no optim.lr / optim.weight_decay to select by ({e!r})') from e


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
    noise = workdir_lib.noise_record(c.get('denoise', {}))
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
