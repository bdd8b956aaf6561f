"""Tests for ddep.score: benchmark layouts, cityscapesScripts' arithmetic, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

from absl import flags
import numpy as np
import pytest
from PIL import Image

from ddep import score

REPO = Path(__file__).resolve().parents[1]

# Evaluated Cityscapes labelIds (ignoreInEval False) and their names, typed in
# from cityscapesScripts' labels.py independently of ddep.score's table.
CS_EVALUATED = {
    7: 'road',
    8: 'sidewalk',
    11: 'building',
    12: 'wall',
    13: 'fence',
    17: 'pole',
    19: 'traffic light',
    20: 'traffic sign',
    21: 'vegetation',
    22: 'terrain',
    23: 'sky',
    24: 'person',
    25: 'rider',
    26: 'car',
    27: 'truck',
    28: 'bus',
    31: 'train',
    32: 'motorcycle',
    33: 'bicycle',
}


def official_cityscapes_scores(pairs):
  """cityscapesScripts' arithmetic in labelId space (34x34 matrix):
  tp = M[l, l]; fn = row sum - tp (every predicted id); fp = column l summed
  over non-ignored ground-truth rows other than l; NaN if tp+fp+fn == 0."""
  m = np.zeros((34, 34), np.int64)
  for prediction, gt in pairs:
    np.add.at(m, (gt.ravel(), prediction.ravel()), 1)
  scores = {}
  for label, name in CS_EVALUATED.items():
    tp = m[label, label]
    fn = m[label, :].sum() - tp
    fp = sum(m[other, label] for other in CS_EVALUATED if other != label)
    scores[name] = tp / (tp + fp + fn) if tp + fp + fn else math.nan
  valid = [s for s in scores.values() if not math.isnan(s)]
  return scores, sum(valid) / len(valid)


def write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def run(capsys, *argv):
  """The command in-process, its flags parsed into a fresh FlagValues as app.run would."""
  flag_values = flags.FlagValues()
  score.define_flags(flag_values)
  code = score.main(flag_values(['ddep.score', *argv]), flag_values)
  out, err = capsys.readouterr()
  return code, out, err


def write_cityscapes(tmp_path, images):
  """images: {(city, seq, frame): (prediction, gt)} -> (pred_dir, gt_dir)."""
  for i, ((city, seq, frame), (prediction, gt)) in enumerate(images.items()):
    stem = f'{city}_{seq:06d}_{frame:06d}'
    write_png(tmp_path / 'gt' / city / f'{stem}_gtFine_labelIds.png', gt)
    # Predictions anywhere under the dir, with any suffix or none (as cityscapesScripts allows).
    suffix = '_leftImg8bit' if i % 2 == 0 else ''
    write_png(tmp_path / 'pred' / 'nested' / city / f'{stem}{suffix}.png', prediction)
  return str(tmp_path / 'pred'), str(tmp_path / 'gt')


def test_cityscapes_hand_example(tmp_path, capsys):
  # GT: road, road, sidewalk, unlabeled. Pred: road, parking, road, sidewalk.
  # road: tp 1, fn 1 (parking is not evaluated: a miss), fp 1 (on sidewalk) -> 1/3.
  # sidewalk: tp 0, fn 1, fp 0 (its prediction lies on unlabeled, ignored) -> 0.
  pred_dir, gt_dir = write_cityscapes(
      tmp_path, {('aachen', 0, 19): ([[7, 9, 7, 8]], [[7, 7, 8, 0]])}
  )
  code, out, _ = run(
      capsys,
      '--dataset=cityscapes',
      f'--predictions={pred_dir}',
      f'--ground_truth={gt_dir}',
      '--json=-',
  )
  assert code == 0
  result = json.loads(out)
  assert result['per_class_iou']['road'] == pytest.approx(1 / 3)
  assert result['per_class_iou']['sidewalk'] == 0.0
  assert result['per_class_iou']['car'] is None  # absent: NaN -> null, not averaged.
  assert result['miou'] == pytest.approx(1 / 6)
  assert result['pixel_accuracy'] == pytest.approx(1 / 3)


def test_cityscapes_equals_official_arithmetic_on_random_images(tmp_path, capsys):
  rng = np.random.default_rng(0)
  # Ground truth: some evaluated ids and some ignored ones. Predictions add
  # non-evaluated ids (5, 10) and classes absent from the GT (12, 32: IoU 0);
  # the other evaluated classes appear nowhere (NaN).
  gt_ids = np.array([0, 4, 7, 8, 9, 11, 17, 21, 23, 24, 26, 29, 33])
  pred_ids = np.concatenate([gt_ids, [5, 10, 12, 32]])
  images = {}
  for i, key in enumerate([('aachen', 0, 19), ('aachen', 0, 38), ('bremen', 12, 1)]):
    gt = rng.choice(gt_ids, size=(6 + i, 12))
    prediction = np.where(rng.random(gt.shape) < 0.5, gt, rng.choice(pred_ids, gt.shape))
    images[key] = (prediction, gt)
  pred_dir, gt_dir = write_cityscapes(tmp_path, images)
  code, out, _ = run(
      capsys,
      '--dataset=cityscapes',
      f'--predictions={pred_dir}',
      f'--ground_truth={gt_dir}',
      '--json=-',
  )
  assert code == 0
  result = json.loads(out)
  expected, expected_mean = official_cityscapes_scores(images.values())
  assert result['num_images'] == 3
  for name, value in expected.items():
    if math.isnan(value):
      assert result['per_class_iou'][name] is None, name
    else:
      assert result['per_class_iou'][name] == pytest.approx(value, rel=1e-12), name
  # The NaN and predicted-only rules were both exercised.
  assert sum(math.isnan(v) for v in expected.values()) == 8
  assert expected['wall'] == 0.0 and expected['motorcycle'] == 0.0
  assert result['miou'] == pytest.approx(expected_mean, rel=1e-12)


def test_cityscapes_prints_table_and_writes_json(tmp_path, capsys):
  pred_dir, gt_dir = write_cityscapes(tmp_path, {('aachen', 0, 19): ([[7, 8]], [[7, 8]])})
  json_path = tmp_path / 'out.json'
  code, out, err = run(
      capsys,
      '--dataset=cityscapes',
      f'--predictions={pred_dir}',
      '--ground_truth',  # absl takes "--flag value" as well as "--flag=value".
      gt_dir,
      f'--json={json_path}',
  )
  assert code == 0
  assert 'road' in out and '100.00' in out and 'miou' in out
  assert '[ddep] score 1/1 images in ' in err and '[ddep]' not in out  # Progress on stderr.
  assert json.loads(json_path.read_text())['miou'] == 1.0


@pytest.mark.parametrize(
    'case,message',
    [
        ('missing', 'no prediction aachen_000000_000019*.png'),
        ('size', 'is 3x1 but ground truth'),
        ('bad_prediction_id', 'ids [200]'),
        ('bad_gt_id', 'ids [40]'),
        ('rgb', 'single-channel'),
        ('duplicate', 'several predictions'),
    ],
)
def test_cityscapes_bad_input_names_the_file(tmp_path, capsys, case, message):
  gt = [[7, 8]]
  prediction = {
      'size': [[7, 8, 8]],
      'bad_prediction_id': [[7, 200]],
      'rgb': np.zeros((1, 2, 3)),
  }.get(case, gt)
  if case == 'bad_gt_id':
    gt = [[7, 40]]
  pred_dir, gt_dir = write_cityscapes(tmp_path, {('aachen', 0, 19): (prediction, gt)})
  if case == 'missing':
    next(Path(pred_dir).rglob('*.png')).unlink()
  if case == 'duplicate':
    write_png(Path(pred_dir) / 'aachen_000000_000019_other.png', gt)
  code, out, err = run(
      capsys, '--dataset=cityscapes', f'--predictions={pred_dir}', f'--ground_truth={gt_dir}'
  )
  assert code != 0
  assert message in err
  assert 'aachen_000000_000019' in err  # the file is named.
  assert out == ''  # no (wrong) score was printed.


def test_ade20k_conventions(tmp_path, capsys):
  gt_dir = tmp_path / 'ADEChallengeData2016'
  # GT 0 is ignored; prediction 0 is no class (a miss). Class ids are 1-based.
  write_png(gt_dir / 'annotations' / 'validation' / 'ADE_val_00000001.png', [[0, 1, 1, 2, 150]])
  write_png(tmp_path / 'pred' / 'ADE_val_00000001.png', [[2, 1, 0, 2, 150]])
  code, out, _ = run(
      capsys,
      '--dataset=ade20k',
      f"--predictions={tmp_path / 'pred'}",
      f'--ground_truth={gt_dir}',
      '--json=-',
  )
  assert code == 0
  iou = json.loads(out)['per_class_iou']
  assert iou['wall'] == pytest.approx(1 / 2)  # tp 1, fn 1 (predicted 0).
  assert iou['building'] == pytest.approx(1.0)  # the 2 on ignored GT 0 is not a FP.
  assert iou['flag'] == 1.0
  assert iou['sky'] is None
  assert json.loads(out)['miou'] == pytest.approx((0.5 + 1 + 1) / 3)
  write_png(tmp_path / 'pred' / 'ADE_val_00000001.png', [[2, 1, 0, 151, 150]])
  code, _, err = run(
      capsys, '--dataset=ade20k', f"--predictions={tmp_path / 'pred'}", f'--ground_truth={gt_dir}'
  )
  assert code != 0 and 'ids [151]' in err and 'ADE_val_00000001.png' in err


def test_pascal_context_60_and_59(tmp_path, capsys):
  write_png(tmp_path / 'gt' / '2008_000002.png', [[0, 0, 1, 1, 2]])
  write_png(tmp_path / 'pred' / '2008_000002.png', [[0, 1, 0, 1, 2]])
  args = [f"--predictions={tmp_path / 'pred'}", f"--ground_truth={tmp_path / 'gt'}", '--json=-']
  code, out, _ = run(capsys, '--dataset=pascal_context_60', *args)
  assert code == 0
  result = json.loads(out)
  # Background is a class: tp 1, fn 1, fp 1 -> 1/3; aeroplane likewise; bag 1.
  assert result['per_class_iou']['background'] == pytest.approx(1 / 3)
  assert result['per_class_iou']['aeroplane'] == pytest.approx(1 / 3)
  assert result['miou'] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
  code, out, _ = run(capsys, '--dataset=pascal_context_59', *args)
  result = json.loads(out)
  # Background GT ignored, so the aeroplane predicted there is no FP; the
  # background predicted on aeroplane is a miss: tp 1, fn 1 -> 1/2.
  assert 'background' not in result['per_class_iou']
  assert result['per_class_iou']['aeroplane'] == pytest.approx(1 / 2)
  assert result['miou'] == pytest.approx((1 / 2 + 1) / 2)
  write_png(tmp_path / 'pred' / '2008_000002.png', [[0, 1, 0, 1, 60]])
  code, _, err = run(capsys, '--dataset=pascal_context_59', *args)
  assert code != 0 and 'ids [60]' in err


def test_command_line_entry_point(tmp_path):
  pred_dir, gt_dir = write_cityscapes(tmp_path, {('aachen', 0, 19): ([[7, 8]], [[7, 7]])})
  ok = subprocess.run(
      [
          sys.executable,
          '-m',
          'ddep.score',
          '--dataset=cityscapes',
          f'--predictions={pred_dir}',
          f'--ground_truth={gt_dir}',
          '--json=-',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)['per_class_iou']['road'] == pytest.approx(1 / 2)
  bad = subprocess.run(
      [
          sys.executable,
          '-m',
          'ddep.score',
          '--dataset=cityscapes',
          f"--predictions={tmp_path / 'nowhere'}",
          f'--ground_truth={gt_dir}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert bad.returncode != 0 and 'nowhere' in bad.stderr and 'Traceback' not in bad.stderr


@pytest.mark.parametrize('where', ['missing directory', 'a directory'])
def test_a_bad_json_path_is_one_line_before_any_scoring(tmp_path, capsys, where):
  pred_dir, gt_dir = write_cityscapes(tmp_path, {('aachen', 0, 19): ([[7, 8]], [[7, 8]])})
  target = tmp_path / 'nope' / 'out.json' if where == 'missing directory' else tmp_path
  code, out, err = run(
      capsys,
      '--dataset=cityscapes',
      f'--predictions={pred_dir}',
      f'--ground_truth={gt_dir}',
      f'--json={target}',
  )
  assert code == 2 and out == ''
  assert err.strip().startswith(f'ddep.score: error: --json={target}: '), err
  assert 'does not exist' in err if where == 'missing directory' else 'is a directory' in err
  assert '[ddep] score' not in err  # Nothing was scored.
