"""Paired comparisons of fine-tuning runs: mean difference, 95% t-interval, verdict.

Every method of a label-efficiency experiment fine-tunes on the same labelled subset for a
given subset seed, so two methods are compared seed by seed (a paired design): the
subset's difficulty, which varies far more than the methods differ, cancels out. The
unpaired "2 x the larger std" rule throws that away.

Pure functions of plain records (the demo's results.json entries):
  {'method', 'fraction', 'subset_seed', 'subset_ids_sha1', 'miou', ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

HOLDS = 'holds'
REVERSED = 'reversed'
WITHIN_NOISE = 'within noise'

# The paper's claims: (better, worse, where, text), "lowest"/"full" label fraction.
PAPER_CLAIMS = (
    ('dep', 'none', 'lowest', 'DeP beats random initialisation with few labels (Fig. 2, Table 1)'),
    ('ddep', 'none', 'lowest', 'DDeP beats random initialisation with few labels (Table 1)'),
    ('ddep', 'supervised', 'lowest', 'DDeP beats supervised pretraining with few labels (Table 1)'),
    ('supervised', 'dep', 'full', 'supervised pretraining beats DeP with all labels (Fig. 2)'),
)


def subset_sha1(ids: Iterable[str]) -> str:
  """SHA-1 of the sorted subset ids, one per line (each line ends in a newline)."""
  return hashlib.sha1(''.join(f'{i}\n' for i in sorted(ids)).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean of n paired differences and its two-sided t-interval."""

  n: int
  mean: float
  low: float
  high: float
  confidence: float


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
  """Student-t interval for the mean of `differences` (n >= 2; the pairs are independent)."""
  d = np.asarray(differences, np.float64)
  if d.ndim != 1 or len(d) < 2:
    raise ValueError(f'a t-interval needs at least 2 paired differences, got {len(d)}')
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must lie in (0, 1), got {confidence}')
  mean = float(d.mean())
  half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
  return Interval(n=len(d), mean=mean, low=mean - half, high=mean + half, confidence=confidence)


def verdict(interval: Interval) -> str:
  """'holds' when the interval lies above zero (the claim's side), 'reversed' when wholly
  below, else 'within noise'."""
  if interval.low > 0:
    return HOLDS
  if interval.high < 0:
    return REVERSED
  return WITHIN_NOISE


def paired_differences(
    entries: Sequence[Mapping], better: str, worse: str, fraction: float
) -> dict[int, float]:
  """{subset_seed: miou(better) - miou(worse)} at `fraction`, over the seeds both ran.

  Raises if a pair's two runs saw different labelled subsets (the design is then not
  paired) or if a (method, fraction, seed) appears twice.
  """
  cells: dict[tuple[str, int], Mapping] = {}
  for e in entries:
    if e['method'] in (better, worse) and math.isclose(float(e['fraction']), fraction):
      key = (e['method'], int(e['subset_seed']))
      if key in cells:
        raise ValueError(f'two runs of {key[0]} at fraction {fraction:g}, subset seed {key[1]}')
      cells[key] = e
  out = {}
  for (method, seed), a in sorted(cells.items()):
    if method != better or (worse, seed) not in cells:
      continue
    b = cells[(worse, seed)]
    if a['subset_ids_sha1'] != b['subset_ids_sha1']:
      raise ValueError(
          f'{better} and {worse} at fraction {fraction:g}, subset seed {seed}, fine-tuned on '
          f'different subsets ({a["subset_ids_sha1"][:10]} vs {b["subset_ids_sha1"][:10]}); '
          'a paired comparison needs the same labelled images'
      )
    out[seed] = float(a['miou']) - float(b['miou'])
  return out


def paper_claims(entries: Sequence[Mapping], confidence: float = 0.95) -> list[dict]:
  """Each of PAPER_CLAIMS as measured: the lowest fraction below 1 for few-label claims,
  fraction 1 for all-label ones. Claims without two paired runs are left out."""
  fractions = sorted({float(e['fraction']) for e in entries})
  lowest = [f for f in fractions if f < 1.0]
  rows = []
  for better, worse, where, text in PAPER_CLAIMS:
    if where == 'lowest' and not lowest:
      continue
    if where == 'full' and 1.0 not in fractions:
      continue
    fraction = lowest[0] if where == 'lowest' else 1.0
    diffs = paired_differences(entries, better, worse, fraction)
    if len(diffs) < 2:
      continue
    interval = t_interval(list(diffs.values()), confidence)
    rows.append(
        dict(
            claim=text,
            better=better,
            worse=worse,
            fraction=fraction,
            differences=diffs,
            interval=interval,
            verdict=verdict(interval),
        )
    )
  return rows


def markdown_claims(rows: Sequence[dict]) -> str:
  """The claims table: mean paired difference, its t-interval, n, and the verdict."""
  lines = [
      "| Paper's claim | Labels | Mean paired difference (points) | 95% t-interval | n | "
      'Measured |',
      '|---|---|---|---|---|---|',
  ]
  for r in rows:
    i = r['interval']
    lines.append(
        f"| {r['claim']} | {100 * r['fraction']:g}% | {i.mean:+.2f} | "
        f'[{i.low:+.2f}, {i.high:+.2f}] | {i.n} | {r["verdict"]} |'
    )
  return '\n'.join(lines) + '\n'


def claims_json(rows: Sequence[dict]) -> list[dict]:
  """The rows as JSON-ready dicts."""
  out = []
  for r in rows:
    i = r['interval']
    out.append(
        dict(
            claim=r['claim'],
            better=r['better'],
            worse=r['worse'],
            fraction=r['fraction'],
            n=i.n,
            mean_difference=round(i.mean, 4),
            interval=[round(i.low, 4), round(i.high, 4)],
            confidence=i.confidence,
            verdict=r['verdict'],
            differences={str(k): round(v, 4) for k, v in r['differences'].items()},
        )
    )
  return out
