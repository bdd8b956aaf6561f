"""TensorBoard pictures and step-0 summaries: pure builders, and previews under a protocol."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddep.config import schema as config_schema
from ddep.datasets import specs
from ddep.models import create_model
from ddep.models import flops
from ddep.reporting import visualisation
from ddep.runs import summaries


class RecordingWriter:

  def __init__(self):
    self.calls = []

  def write_scalars(self, step, scalars):
    self.calls.append(('scalars', step, dict(scalars)))

  def write_images(self, step, images):
    self.calls.append(('images', step, dict(images)))

  def write_hparams(self, hparams):
    self.calls.append(('hparams', None, dict(hparams)))


def test_flat_hparams_flattens_nested_keys_and_shows_sequences_as_text():
  c = ml_collections.ConfigDict(
      {
          'seed': 3,
          'data': {'image_size': (32, 48), 'dataset': 'x'},
          'frozen': ('encoder/.*',),
          'flag': True,
      }
  )
  assert summaries.flat_hparams(c) == {
      'seed': 3,
      'data.image_size': '[32, 48]',
      'data.dataset': 'x',
      'frozen': "['encoder/.*']",
      'flag': True,
  }
  assert 'eval.denoise_images' in summaries.flat_hparams(config_schema.base_config())


def test_model_scalars_count_parameters_and_take_the_analytic_flops():
  model = create_model('tiny', num_outputs=3)
  got = summaries.model_scalars(model, (32, 32), num_trainable=10, num_frozen=2)
  want = flops.forward_flops(flops.model_ops(model, (32, 32))) / 1e9
  assert (
      got
      == {
          'model/params_trainable': 10.0,
          'model/params_frozen': 2.0,
          'model/gflops_per_image': want,
      }
      and want > 0
  )
  # A backbone the analytic count does not know: the counts still come, without GFLOPs.
  bit = create_model('tiny_bit_r50_unet', num_outputs=3)
  assert set(summaries.model_scalars(bit, (32, 32), num_trainable=1, num_frozen=0)) == {
      'model/params_trainable',
      'model/params_frozen',
  }


def test_denoising_grid_puts_the_four_panels_side_by_side():
  clean = np.full((2, 4, 5, 3), -1.0, np.float32)
  noisy = np.full_like(clean, 1.0)
  eps = np.full_like(clean, 1.5)  # Half of the ±3 display range: 0.75.
  x_hat = np.zeros_like(clean)
  grid = visualisation.denoising_grid(clean, noisy, eps, x_hat)
  assert grid.shape == (2, 4, 20, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[0, 0, [0, 5, 10, 15], 0], [0, 255, 191, 128])
  # Large images are subsampled to the panel size: every 2nd pixel of 5 -> 3.
  assert visualisation.denoising_grid(clean, noisy, eps, x_hat, max_side=3).shape == (2, 2, 12, 3)


def test_segmentation_panels_overlay_truth_and_prediction_and_leave_ignored_pixels_plain():
  colours = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
  image = np.zeros((2, 3, 3), np.float32)  # Grey 128 once displayed.
  label = np.array([[0, 1, 255], [1, 1, 0]], np.int32)
  pred = np.ones((2, 3), np.int32)
  [panel] = visualisation.segmentation_panels([image], [label], [pred], colours, ignore_label=255)
  assert panel.shape == (2, 9, 3)
  rgb, truth, guess = panel[:, :3], panel[:, 3:6], panel[:, 6:]
  np.testing.assert_array_equal(rgb, np.full((2, 3, 3), 128))
  np.testing.assert_array_equal(truth[0, 2], [128, 128, 128])  # Ignored: the plain image.
  np.testing.assert_array_equal(
      truth[0, 0], visualisation.overlay(rgb[:1, :1], np.zeros((1, 1), int), colours)[0, 0]
  )
  np.testing.assert_array_equal(guess, visualisation.overlay(rgb, pred, colours))
  [small] = visualisation.segmentation_panels(
      [image], [label], [pred], colours, ignore_label=255, max_side=2
  )
  np.testing.assert_array_equal(small, panel[::2, [0, 2, 3, 5, 6, 8]])


def test_per_class_iou_leaves_out_classes_without_one_and_writes_once():
  result = {'per_class_iou': {'road': 0.5, 'sky': math.nan}}
  assert summaries.per_class_iou(result) == {'val_iou/road': 0.5}
  writer = RecordingWriter()
  panel = np.zeros((4, 12, 3), np.uint8)
  summaries.write_segmentation(writer, 7, result, [panel, panel])
  assert writer.calls[0] == ('scalars', 7, {'val_iou/road': 0.5})
  kind, step, images = writer.calls[1]
  assert (kind, step, sorted(images)) == ('images', 7, ['val/segmentation/0', 'val/segmentation/1'])
  assert images['val/segmentation/0'].shape == (1, 4, 12, 3)


def test_previews_are_predicted_under_the_eval_protocol_at_their_own_size():
  spec = specs.get('demo_tiny')
  model = create_model('tiny', num_outputs=spec.num_classes)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)))['params'])(jax.random.key(0))
  config = config_schema.base_config()
  rng = np.random.default_rng(0)
  # Two images padded to 32x32 as the eval pipeline pads them; their own sizes differ.
  previews = {
      'image': rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
      'label': rng.integers(0, spec.num_classes, (2, 32, 32)).astype(np.int32),
      'orig_hw': np.array([[32, 32], [20, 28]], np.int32),
  }
  panels = summaries.preview_panels(config, model, jax.device_get(params), spec, previews)
  assert [p.shape for p in panels] == [(32, 96, 3), (20, 84, 3)]
  # The prediction panel is the padded image's argmax, cropped (what evaluation scores).
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, previews['image'][1:])
  want = visualisation.overlay(
      panels[1][:, :28],
      np.asarray(jnp.argmax(logits, -1))[0, :20, :28],
      visualisation.palette(spec),
  )
  np.testing.assert_array_equal(panels[1][:, 56:], want)
  np.testing.assert_array_equal(
      panels[1][:, :28], np.round(visualisation.to_display(previews['image'][1, :20, :28]) * 255)
  )


def test_first_examples_take_real_rows_across_batches_and_restart_the_split():
  def batch(ids, mask):
    n = len(ids)
    return {
        'image': np.array(ids, np.float32)[:, None, None, None] * np.ones((n, 2, 2, 3)),
        'label': np.zeros((n, 2, 2), np.int32),
        '_mask': np.array(mask),
        'orig_hw': np.full((n, 2), 2, np.int32),
    }

  class Split:  # Like EvalDataset: every iter() starts at the beginning.

    def __iter__(self):
      return iter(
          [batch([0, 1], [True, True]), batch([2, 0], [True, False]), batch([3, 4], [1, 1])]
      )

  got = summaries.first_examples(Split(), 4)
  assert [float(im[0, 0, 0]) for im in got['image']] == [0, 1, 2, 3]  # The padding row skipped.
  assert len(got['orig_hw']) == 4 and summaries.first_examples(Split(), 0) is None
  assert float(summaries.first_examples(Split(), 1)['image'][0][0, 0, 0]) == 0
