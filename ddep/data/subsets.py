"""Labelled subsets (paper Sec. 5.2): how many examples a label fraction is, and which.

Subsets are deterministic and seeded: the ids are sorted first (storage order does not
matter), then permuted by the seed; subsets of one seed are nested, and for the paper's
benchmarks fractions map to its exact counts (PAPER_SUBSET_COUNTS).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from ddep.config import validation as config_validation

# Paper Sec. 5: labelled-subset sizes used in the label-efficiency tables.
# Keyed by fraction; the totals are the full train splits.
PAPER_SUBSET_COUNTS: dict[str, tuple[int, dict[float, int]]] = {
    'cityscapes': (2975, {1 / 30: 100, 1 / 8: 372, 1 / 4: 744}),
    'pascal_context': (4998, {0.01: 50, 0.05: 250, 0.10: 500, 0.20: 1000}),
    'ade20k': (20210, {0.01: 202, 0.05: 1010, 0.10: 2021, 0.20: 4042}),
}


def _subset_family(dataset: str | None) -> str | None:
  if dataset is None:
    return None
  for family in PAPER_SUBSET_COUNTS:
    if dataset == family or dataset.startswith(family + '_'):
      return family
  return None


def subset_size(num_examples: int, fraction: float, dataset: str | None = None) -> int:
  """Number of examples for `fraction` of `num_examples`.

  Uses the paper's exact count when `dataset` is one of its benchmarks and the
  split has the paper's size (the paper's counts do not follow one rounding
  rule), else round-half-up with at least one example.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f'fraction must lie in (0, 1], got fraction={fraction!r}')
  family = _subset_family(dataset)
  if family is not None:
    total, counts = PAPER_SUBSET_COUNTS[family]
    if num_examples == total:
      for f, c in counts.items():
        if math.isclose(f, fraction, rel_tol=1e-6):
          return c
  return max(1, int(math.floor(fraction * num_examples + 0.5)))


def select_subset(
    examples: int | Sequence[str],
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int,
    dataset: str | None = None,
):
  """A deterministic random subset of a split.

  Args:
    examples: the number of examples (-> sorted int indices) or the example
      ids (-> sorted list of ids). Ids are sorted first, so the subset does
      not depend on the order records happen to be stored in.
    fraction / count: exactly one of them. `dataset` selects the paper's
      exact counts for fractions (see subset_size).
    seed: subsets for the same seed are nested (a 1% subset lies inside the
      5% one), different seeds give different subsets.
  """
  if (fraction is None) == (count is None):
    raise ValueError('pass exactly one of fraction= and count=')
  ids = None if isinstance(examples, (int, np.integer)) else sorted({str(i) for i in examples})
  n = int(examples) if ids is None else len(ids)
  if ids is not None and len(ids) != len(examples):
    raise ValueError(f'example ids are not unique ({len(examples) - len(ids)} duplicates)')
  k = subset_size(n, fraction, dataset) if fraction is not None else int(count)
  if not 0 < k <= n:
    what = 'count' if count is not None else f'fraction {fraction} gives {k} examples; the count'
    raise config_validation.ConfigError(
        f'{what} must lie in [1, {n}] (the examples in the split), got count={k}: '
        'check config.data.label_count or config.data.label_fraction'
    )
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}')
  chosen = np.sort(np.random.default_rng([seed, 0x5B5E7]).permutation(n)[:k])
  return chosen if ids is None else [ids[i] for i in chosen]


def read_subset_ids(path: str) -> list[str]:
  """The ids of an id file: one per line, blank lines ignored (a run's subset_ids.txt)."""
  with tf.io.gfile.GFile(path, 'r') as f:
    return [line.strip() for line in f if line.strip()]


def resolve_subset(
    subset: float | int | Sequence[str] | str,
    ids: Sequence[str],
    *,
    seed: int,
    dataset: str,
    split: str,
) -> list[str]:
  """The labelled subset's image ids (sorted) among `ids`, every image id of `dataset`/`split`.

  `subset` is a fraction (the paper's counts for `dataset` where known), a count,
  a sequence of image ids or the path of an id file; `seed` varies the draw.
  """
  if isinstance(subset, (float, np.floating)):
    return select_subset(ids, fraction=float(subset), seed=seed, dataset=dataset)
  if isinstance(subset, (int, np.integer)) and not isinstance(subset, bool):
    return select_subset(ids, count=int(subset), seed=seed)
  chosen = read_subset_ids(subset) if isinstance(subset, str) else [str(i) for i in subset]
  unknown = sorted(set(chosen) - set(ids))
  if unknown:
    raise ValueError(f'{len(unknown)} subset ids are not in {dataset}/{split}, e.g. {unknown[:5]}')
  return sorted(set(chosen))
