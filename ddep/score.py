"""Scores predicted label PNGs against ground-truth PNGs, benchmark style.

  python -m ddep.score --dataset=cityscapes --predictions=DIR --ground_truth=DIR [--json=PATH|-]

Progress lines ([ddep] score ..., with an ETA) go to stderr, so stdout holds only the result.

Layouts (the official ones):
  cityscapes         <gt>/**/<city>_<seq>_<frame>_gtFine_labelIds.png; a
                     prediction is the one file named <city>_<seq>_<frame>*.png
                     anywhere under the predictions dir, holding labelIds.
  ade20k             <gt>[/annotations/validation]/ADE_val_*.png, 0 = ignore,
                     1..150 = classes; predictions <stem>.png, same 1..150 ids.
  pascal_context_60  <gt>/**/<id>.png, 0..59 (0 = background, a class).
  pascal_context_59  same files; 0 (background) ignored, 1..59 scored.

The numbers equal cityscapesScripts' evalPixelLevelSemanticLabeling (class IoU
average): ground-truth pixels whose labelId is ignoreInEval are skipped; a
prediction of a non-evaluated labelId is a false negative for the ground-truth
class and a false positive for no class; a class absent from both ground truth
and prediction is NaN and left out of the mean. The same rule covers a
prediction of ADE20K's 0 or Pascal Context 59's background. Ids that the
dataset does not define, in either file, stop the run with the file's name.

Label tables and class names come from ddep.datasets (specs.get(name)), the
same ones training uses; only the file layouts live here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from ddep.datasets import specs
from ddep.evaluators import metrics
from ddep.runs import progress

IGNORE = specs.IGNORE_LABEL
INVALID = -1


class ScoreError(Exception):
  """Bad input: the message names the file and what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one benchmark stores labels and turns raw ids into train ids.

  gt_lut: raw ground-truth id -> train id, IGNORE, or INVALID (an error).
  pred_lut: raw predicted id -> train id, num_classes (no evaluated class:
    a false negative only), or INVALID (an error).
  """

  name: str
  class_names: tuple[str, ...]
  gt_lut: np.ndarray
  pred_lut: np.ndarray
  find_ground_truth: Callable[[Path], list[Path]]
  gt_key: Callable[[Path], str]  # What a prediction's name must start with.
  exact_stem: bool  # True: the prediction is exactly <key>.png.

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _ade20k_dir(root: Path) -> Path:
  nested = root / 'annotations' / 'validation'
  return nested if nested.is_dir() else root


_CITYSCAPES_SUFFIX = '_gtFine_labelIds.png'
# name -> (find ground-truth files under a dir, prediction key of a GT file, exact stem?)
_FILES = {
    'cityscapes': (
        lambda root: sorted(root.rglob('*' + _CITYSCAPES_SUFFIX)),
        lambda path: path.name[: -len(_CITYSCAPES_SUFFIX)],
        False,
    ),
    'ade20k': (
        lambda root: sorted(_ade20k_dir(root).glob('ADE_val_*.png')),
        lambda path: path.stem,
        True,
    ),
    'pascal_context_60': (lambda root: sorted(root.rglob('*.png')), lambda path: path.stem, True),
    'pascal_context_59': (lambda root: sorted(root.rglob('*.png')), lambda path: path.stem, True),
}


def make_layout(name: str) -> Layout:
  """The layout of dataset `name`, its label tables taken from ddep.datasets."""
  if name not in _FILES:
    raise ScoreError(f"unknown dataset {name!r}; known: {', '.join(_FILES)}")
  spec = specs.get(name)
  label_map = np.asarray(spec.label_map).astype(np.int32)
  gt_lut = np.where(label_map == specs.INVALID_LABEL, INVALID, label_map)
  # Predictions use the GT's raw ids. A defined id that is not evaluated
  # (Cityscapes void labelIds, ADE20K 0, Pascal Context 59's background)
  # goes to the extra column: a miss for the GT class, a hit for none.
  pred_lut = np.where(gt_lut == IGNORE, spec.num_classes, gt_lut)
  find, key, exact = _FILES[name]
  return Layout(
      name=name,
      class_names=tuple(spec.class_names),
      gt_lut=gt_lut,
      pred_lut=pred_lut,
      find_ground_truth=find,
      gt_key=key,
      exact_stem=exact,
  )


def pair_files(
    layout: Layout, predictions_dir: Path, ground_truth_dir: Path
) -> list[tuple[Path, Path]]:
  """(prediction, ground truth) pairs; every GT file needs exactly one prediction."""
  for what, path in (('predictions', predictions_dir), ('ground truth', ground_truth_dir)):
    if not path.is_dir():
      raise ScoreError(f'{what} directory {path} does not exist')
  gt_files = layout.find_ground_truth(ground_truth_dir)
  if not gt_files:
    raise ScoreError(f'no {layout.name} ground-truth files found under {ground_truth_dir}')
  # Index by exact stem (ADE20K, Pascal Context) or by city (Cityscapes), then
  # match Cityscapes names with cityscapesScripts' own rule <city>_<seq>_<frame>*.png.
  candidates: dict[str, list[Path]] = {}
  for root, _, names in os.walk(predictions_dir):
    for name in names:
      if name.endswith('.png'):
        key = name[:-4] if layout.exact_stem else name.split('_')[0]
        candidates.setdefault(key, []).append(Path(root) / name)
  pairs = []
  for gt_file in gt_files:
    key = layout.gt_key(gt_file)
    if layout.exact_stem:
      pattern = f'{key}.png'
      found = candidates.get(key, [])
    else:
      pattern = f'{key}*.png'
      found = [
          p for p in candidates.get(key.split('_')[0], []) if fnmatch.fnmatchcase(p.name, pattern)
      ]
    if not found:
      raise ScoreError(
          f'no prediction {pattern} under {predictions_dir} for ground truth {gt_file}'
      )
    if len(found) > 1:
      raise ScoreError(
          f"several predictions for ground truth {gt_file}: {', '.join(map(str, found))}"
      )
    pairs.append((found[0], gt_file))
  return pairs


def _read_ids(path: Path, lut: np.ndarray, what: str) -> np.ndarray:
  """Raw ids of a single-channel PNG mapped through `lut`; bad ids are errors."""
  try:
    with Image.open(path) as image:
      ids = np.array(image)
  except (OSError, ValueError) as e:
    raise ScoreError(f'cannot read {what} {path}: {e}') from e
  if ids.ndim != 2:
    raise ScoreError(f'{what} {path} has shape {ids.shape}; expected a single-channel id image')
  ids = ids.astype(np.int64)
  if ids.min() < 0 or ids.max() > 255:
    raise ScoreError(f'{what} {path} holds ids outside [0, 255] (range {ids.min()}..{ids.max()})')
  mapped = lut[ids]
  if (mapped == INVALID).any():
    bad = np.unique(ids[mapped == INVALID])
    raise ScoreError(
        f'{what} {path} holds ids {bad.tolist()[:10]} that the dataset does not define'
    )
  return mapped


# Images are flattened and padded to a multiple of this many pixels, so the jitted
# confusion matrix compiles for a few lengths, not once per ADE20K image size.
_BUCKET = 1 << 18


def score_pairs(layout: Layout, pairs: Sequence[tuple[Path, Path]]) -> dict:
  """Metrics over all pairs, plus the summed confusion matrix."""
  accumulator = metrics.ConfusionMatrixAccumulator(layout.num_classes)
  # stderr: `--json=-` makes stdout the result alone.
  to_stderr = functools.partial(print, file=sys.stderr, flush=True)
  for prediction_file, gt_file in progress.track(
      pairs, desc='score', unit='images', print_fn=to_stderr
  ):
    gt = _read_ids(gt_file, layout.gt_lut, 'ground truth')
    prediction = _read_ids(prediction_file, layout.pred_lut, 'prediction')
    if prediction.shape != gt.shape:
      raise ScoreError(
          f'prediction {prediction_file} is {prediction.shape[1]}x{prediction.shape[0]} '
          f'but ground truth {gt_file} is {gt.shape[1]}x{gt.shape[0]} (WxH)'
      )
    size = -(-gt.size // _BUCKET) * _BUCKET
    gt = np.pad(gt.ravel(), (0, size - gt.size), constant_values=IGNORE).astype(np.int32)
    prediction = np.pad(prediction.ravel(), (0, size - prediction.size)).astype(np.int32)
    accumulator.update(
        metrics.confusion_matrix(gt, prediction, layout.num_classes, unmatched_column=True)
    )
  cm = accumulator.result()
  result = metrics.segmentation_metrics(cm, layout.class_names)
  result.update(dataset=layout.name, num_images=len(pairs), confusion_matrix=cm.tolist())
  return result


def score(dataset: str, predictions_dir, ground_truth_dir) -> dict:
  """Scores a whole predictions directory; raises ScoreError on bad input."""
  layout = make_layout(dataset)
  return score_pairs(layout, pair_files(layout, Path(predictions_dir), Path(ground_truth_dir)))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, defined on demand so that importing ddep.score defines none."""
  flags.DEFINE_enum(
      'dataset',
      None,
      sorted(_FILES),
      'The benchmark whose layout is read.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'predictions', None, 'Directory of predicted label PNGs.', flag_values=flag_values
  )
  flags.DEFINE_string(
      'ground_truth', None, 'Directory of ground-truth label PNGs.', flag_values=flag_values
  )
  flags.DEFINE_string(
      'json',
      None,
      "Also write the metrics as JSON here ('-' = stdout only).",
      flag_values=flag_values,
  )
  flags.mark_flags_as_required(['dataset', 'predictions', 'ground_truth'], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """app.run's main: `flag_values` are parsed already (tests pass their own)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flag_values
  if f.json and f.json != '-':
    target = Path(os.path.abspath(f.json))
    if target.is_dir() or not target.parent.is_dir():
      # Found before scoring, which can take minutes.
      why = 'is a directory' if target.is_dir() else f'its directory {target.parent} does not exist'
      print(f'ddep.score: error: --json={f.json}: {why}', file=sys.stderr)
      return 2
  try:
    result = score(f.dataset, f.predictions, f.ground_truth)
  except ScoreError as e:
    print(f'ddep.score: error: {e}', file=sys.stderr)
    return 1
  except (NotADirectoryError, FileNotFoundError, IsADirectoryError) as e:
    print(f'ddep.score: error: {e.filename}: {e.strerror}', file=sys.stderr)
    return 2
  if f.json == '-':
    print(json.dumps(metrics.json_safe(result), indent=1))
    return 0
  print(f"{f.dataset}: {result['num_images']} images")
  print(metrics.format_table(result))
  if f.json:
    Path(f.json).write_text(json.dumps(metrics.json_safe(result), indent=1))
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
