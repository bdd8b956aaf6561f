"""Paired statistics of the demo's claims, on hand-made numbers with known answers."""

import hashlib
import math

import pytest

from ddep.reporting import paired_stats


def _entry(method, fraction, seed, miou, sha='s'):
  return dict(
      method=method, fraction=fraction, subset_seed=seed, subset_ids_sha1=f'{sha}{seed}', miou=miou
  )


def test_t_interval_matches_the_textbook_value():
  # d = 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445; half-width 1.963243.
  i = paired_stats.t_interval([1, 2, 3, 4, 5])
  assert i.n == 5 and i.mean == 3
  assert math.isclose(i.high - 3, 2.776445 * math.sqrt(2.5) / math.sqrt(5), rel_tol=1e-6)
  assert math.isclose(i.low, 3 - 1.963243, abs_tol=1e-5)
  # Two pairs: t(0.975, 1) = 12.7062.
  two = paired_stats.t_interval([1.0, 3.0])
  assert math.isclose(two.high - two.mean, 12.7062047 * math.sqrt(2) / math.sqrt(2), rel_tol=1e-6)


def test_t_interval_needs_two_differences_and_a_sane_confidence():
  with pytest.raises(ValueError, match='at least 2'):
    paired_stats.t_interval([1.0])
  with pytest.raises(ValueError, match='confidence'):
    paired_stats.t_interval([1.0, 2.0], confidence=1.5)


def test_verdicts_hold_reverse_and_noise():
  holds = paired_stats.t_interval([2.0, 2.5, 3.0, 2.2, 2.8])
  assert holds.low > 0 and paired_stats.verdict(holds) == 'holds'
  rev = paired_stats.t_interval([-2.0, -2.5, -3.0, -2.2, -2.8])
  assert paired_stats.verdict(rev) == 'reversed'
  # Mean +2 but a wide spread: [-0.48, 4.48] with 3 pairs.
  noise = paired_stats.t_interval([1.0, 2.0, 3.0])
  assert noise.low < 0 < noise.high and paired_stats.verdict(noise) == 'within noise'


def test_pairing_cancels_the_subset_difficulty_an_unpaired_test_would_see():
  # Subsets differ by up to 10 points; DeP is 1.5 +- 0.3 points better on every one.
  base = [40.0, 50.0, 45.0, 35.0, 48.0]
  gain = [1.2, 1.8, 1.5, 1.3, 1.7]
  entries = [_entry('none', 0.02, s, b) for s, b in enumerate(base)]
  entries += [_entry('dep', 0.02, s, b + g) for s, (b, g) in enumerate(zip(base, gain))]
  diffs = paired_stats.paired_differences(entries, 'dep', 'none', 0.02)
  assert diffs == pytest.approx(dict(enumerate(gain)))
  (row,) = [r for r in paired_stats.paper_claims(entries) if r['better'] == 'dep']
  assert row['verdict'] == 'holds' and row['interval'].n == 5
  assert row['interval'].mean == pytest.approx(1.5)


def test_paper_claims_pick_the_lowest_fraction_and_full_labels():
  entries = []
  for seed in range(5):
    for fraction, offset in ((0.02, 0.0), (0.1, 10.0), (1.0, 30.0)):
      entries += [
          _entry('none', fraction, seed, 40 + offset + seed),
          _entry('supervised', fraction, seed, 42 + offset + seed + 0.1 * seed),
          _entry('dep', fraction, seed, 43 + offset + seed),
          _entry('ddep', fraction, seed, 41 + offset + seed + 0.01 * seed),
      ]
  rows = {(r['better'], r['worse']): r for r in paired_stats.paper_claims(entries)}
  assert rows[('dep', 'none')]['fraction'] == 0.02
  assert rows[('dep', 'none')]['verdict'] == 'holds'  # +3 every time
  assert rows[('ddep', 'supervised')]['verdict'] == 'reversed'  # about -1 every time
  full = rows[('supervised', 'dep')]
  assert full['fraction'] == 1.0 and full['verdict'] == 'reversed'
  text = paired_stats.markdown_claims(list(rows.values()))
  assert '| 2% |' in text and '| 100% |' in text and 'reversed' in text
  as_json = paired_stats.claims_json(list(rows.values()))
  assert as_json[0]['n'] == 5 and len(as_json[0]['interval']) == 2


def test_different_subsets_for_one_seed_are_refused():
  entries = [_entry('none', 0.02, 0, 40.0), _entry('dep', 0.02, 0, 42.0, sha='other')]
  entries += [_entry('none', 0.02, 1, 40.0), _entry('dep', 0.02, 1, 42.0)]
  with pytest.raises(ValueError, match='different subsets'):
    paired_stats.paired_differences(entries, 'dep', 'none', 0.02)
  with pytest.raises(ValueError, match='two runs of dep'):
    paired_stats.paired_differences(entries + [_entry('dep', 0.02, 1, 1.0)], 'dep', 'none', 0.02)


def test_subset_sha1_is_of_the_sorted_ids_one_per_line():
  expected = hashlib.sha1(b'a\nb\nc\n').hexdigest()
  assert paired_stats.subset_sha1(['c', 'a', 'b']) == expected
