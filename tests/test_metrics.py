"""Tests for ddep.evaluators.metrics: each benchmark rule by hand, then a random check
against a plain Python loop."""

import json
import math

import jax
import numpy as np
import pytest

from ddep.evaluators import metrics


def _loop_confusion(labels, predictions, num_classes, ignore_label=255):
  cm = np.zeros((num_classes, num_classes), np.int64)
  for gt, pred in zip(np.ravel(labels), np.ravel(predictions)):
    if gt != ignore_label:
      cm[gt, pred] += 1
  return cm


def _loop_iou(labels, predictions, num_classes, ignore_label=255):
  """IoU straight from pixel sets, independent of any confusion matrix."""
  labels, predictions = np.ravel(labels), np.ravel(predictions)
  keep = labels != ignore_label
  ious = []
  for c in range(num_classes):
    gt = set(np.flatnonzero(keep & (labels == c)))
    pr = set(np.flatnonzero(keep & (predictions == c)))
    union = gt | pr
    ious.append(len(gt & pr) / len(union) if union else math.nan)
  return ious


def test_confusion_matrix_rows_are_ground_truth():
  labels = np.array([[0, 0, 1, 2]])
  predictions = np.array([[0, 1, 1, 1]])
  cm = np.asarray(metrics.confusion_matrix(labels, predictions, 3))
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])
  assert cm.dtype == np.int32


def test_ignore_label_pixels_are_not_counted():
  labels = np.array([0, 255, 1, 255])
  predictions = np.array([0, 1, 1, 0])
  cm = np.asarray(metrics.confusion_matrix(labels, predictions, 2))
  np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])
  # The ignored pixels' predictions (1 and 0) must not become false positives.
  m = metrics.segmentation_metrics(cm)
  assert m['miou'] == 1.0 and m['num_pixels'] == 2


def test_masked_examples_are_not_counted():
  labels = np.zeros((3, 2, 2), np.int32)
  predictions = np.ones((3, 2, 2), np.int32)
  predictions[0] = 0  # only example 0 is right; example 2 is padding.
  mask = np.array([True, True, False])
  cm = np.asarray(metrics.confusion_matrix(labels, predictions, 2, mask=mask))
  np.testing.assert_array_equal(cm, [[4, 4], [0, 0]])
  pixel_mask = np.zeros((3, 2, 2), bool)
  pixel_mask[0, 0, 0] = True
  cm = np.asarray(metrics.confusion_matrix(labels, predictions, 2, mask=pixel_mask))
  np.testing.assert_array_equal(cm, [[1, 0], [0, 0]])


def test_empty_union_is_nan_and_left_out_of_mean():
  # Class 2 is neither in the ground truth nor predicted.
  cm = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
  m = metrics.segmentation_metrics(cm, ['a', 'b', 'c'])
  assert math.isnan(m['per_class_iou']['c'])
  assert m['per_class_iou']['a'] == pytest.approx(3 / 4)
  assert m['per_class_iou']['b'] == pytest.approx(4 / 5)
  assert m['miou'] == pytest.approx((3 / 4 + 4 / 5) / 2)
  assert m['pixel_accuracy'] == pytest.approx(7 / 8)
  assert m['mean_class_accuracy'] == pytest.approx((3 / 4 + 1) / 2)


def test_predicted_only_class_counts_as_zero():
  # Class 2 never occurs in the ground truth but is predicted twice.
  cm = np.array([[2, 0, 2], [0, 3, 0], [0, 0, 0]])
  m = metrics.segmentation_metrics(cm)
  assert m['per_class_iou']['2'] == 0.0
  assert m['miou'] == pytest.approx((2 / 4 + 1 + 0) / 3)
  # Its accuracy is undefined (no ground truth), so it leaves that mean.
  assert math.isnan(m['per_class_accuracy']['2'])
  assert m['mean_class_accuracy'] == pytest.approx((0.5 + 1) / 2)


def test_unmatched_column_is_false_negative_only():
  labels = np.array([0, 0, 0, 1, 1])
  predictions = np.array([0, 7, 255, 1, 0])  # 7 and 255 are no class of 2.
  cm = np.asarray(metrics.confusion_matrix(labels, predictions, 2, unmatched_column=True))
  np.testing.assert_array_equal(cm, [[1, 0, 2], [1, 1, 0]])
  m = metrics.segmentation_metrics(cm)
  # Class 0: TP 1, FN 2 (the unmatched), FP 1. Class 1: TP 1, FN 1, FP 0.
  assert m['per_class_iou']['0'] == pytest.approx(1 / 4)
  assert m['per_class_iou']['1'] == pytest.approx(1 / 2)
  assert m['pixel_accuracy'] == pytest.approx(2 / 5)
  # Without the column, out-of-range predictions drop out with their pixel.
  cm = np.asarray(metrics.confusion_matrix(labels, predictions, 2))
  np.testing.assert_array_equal(cm, [[1, 0], [1, 1]])


def test_empty_evaluation_is_nan_not_error():
  m = metrics.segmentation_metrics(np.zeros((3, 3), np.int64))
  assert math.isnan(m['miou']) and math.isnan(m['pixel_accuracy'])


def test_random_against_python_loop_under_jit():
  rng = np.random.default_rng(0)
  num_classes = 6
  labels = rng.integers(0, num_classes, size=(4, 17, 13))
  labels[rng.random(labels.shape) < 0.2] = 255
  # Class 5 never predicted, so its IoU is 0 wherever it is in the GT.
  predictions = np.where(
      rng.random(labels.shape) < 0.5, labels % 255, rng.integers(0, 5, labels.shape)
  )
  predictions = np.where(predictions == 5, 4, predictions)
  fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
  acc = metrics.ConfusionMatrixAccumulator(num_classes)
  for i in range(labels.shape[0]):
    acc.update(fn(labels[i : i + 1], predictions[i : i + 1], num_classes))
  cm = acc.result()
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, _loop_confusion(labels, predictions, num_classes))
  m = metrics.segmentation_metrics(cm)
  expected = _loop_iou(labels, predictions, num_classes)
  np.testing.assert_allclose(list(m['per_class_iou'].values()), expected, rtol=1e-12)
  assert m['miou'] == pytest.approx(np.nanmean(expected), rel=1e-12)
  keep = labels != 255
  assert m['pixel_accuracy'] == pytest.approx(np.mean(labels[keep] == predictions[keep]))


def test_accumulator_rejects_shape_change_and_overflowed_counts():
  acc = metrics.ConfusionMatrixAccumulator()
  acc.update(np.ones((2, 2), np.int32))
  acc.update(np.ones((2, 2), np.int32))
  np.testing.assert_array_equal(acc.result(), 2 * np.ones((2, 2)))
  with pytest.raises(ValueError, match='shape changed'):
    acc.update(np.ones((3, 3)))
  with pytest.raises(ValueError, match='negative'):
    acc.update(-np.ones((2, 2)))


def test_format_table_scales_to_percent():
  m = metrics.segmentation_metrics(np.array([[1, 2], [0, 0]]), ['road', 'sky'])
  table = metrics.format_table(m)
  assert 'road' in table and ' 33.33' in table  # IoU 1/3.
  sky_line = next(line for line in table.splitlines() if line.startswith('sky'))
  assert '0.00' in sky_line  # predicted-only: IoU 0, accuracy n/a.
  assert 'n/a' in sky_line
  assert 'miou' in table


def test_json_safe_turns_every_nan_into_null():
  value = {'iou': {'car': math.nan, 'road': np.float32(0.5)}, 'rows': (np.float64('nan'), 1)}
  safe = metrics.json_safe(value)
  assert safe == {'iou': {'car': None, 'road': 0.5}, 'rows': [None, 1]}
  assert json.loads(json.dumps(safe, allow_nan=False)) == safe
