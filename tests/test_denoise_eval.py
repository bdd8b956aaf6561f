"""The held-out denoising metric: reconstruction, PSNR, fixed noise, devices, the train loop."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep.config import schema as config_schema
from ddep.data import preparation
from ddep.datasets import specs
from ddep.evaluators import denoise as denoise_eval
from ddep.models import create_model
from ddep.training import objectives
from ddep.training import sharding
from ddep.training import trainer as train


def _denoise(**kw):
  d = dict(form='additive', target='eps', sigma=0.0, sigma_range=(), gamma=0.0, gamma_range=())
  d.update(kw)
  return types.SimpleNamespace(**d)


@pytest.mark.parametrize('form,level', [('additive', 0.3), ('ddpm', 0.7)])
@pytest.mark.parametrize('target', ['eps', 'x'])
def test_reconstruct_inverts_the_corruption_for_each_form_and_target(form, level, target):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  levels = np.array([level, level / 2], np.float32)
  noisy = np.asarray(objectives.corrupt(x, eps, levels, form=form))
  eps_hat, x_hat = denoise_eval.reconstruct(
      noisy, eps if target == 'eps' else x, levels, form=form, target=target
  )
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  np.testing.assert_allclose(x_hat, x, atol=1e-4)


def test_psnr_clips_to_the_pixel_range_and_uses_peak_to_peak_two():
  x = np.zeros((2, 4, 4, 3), np.float32)
  x_hat = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 5.0)]).astype(np.float32)
  # 10 log10(2^2 / 0.01) = 26.02 dB; the second is clipped to 1: 10 log10(4 / 1) = 6.02 dB.
  np.testing.assert_allclose(denoise_eval.psnr(x_hat, x), [26.0206, 6.0206], atol=1e-3)


def test_noise_and_levels_depend_on_the_image_index_only():
  shape = (4, 4, 3)
  both = np.asarray(denoise_eval.fixed_noise(jnp.array([3, 1]), shape))
  alone = np.asarray(denoise_eval.fixed_noise(jnp.array([1]), shape))
  np.testing.assert_array_equal(both[1], alone[0])
  assert not np.allclose(both[0], both[1])
  ranged = _denoise(sigma_range=(0.2, 0.3))
  levels = np.asarray(denoise_eval.fixed_levels(jnp.arange(6), ranged))
  assert np.all((levels >= 0.2) & (levels <= 0.3)) and len(set(levels.tolist())) == 6
  np.testing.assert_array_equal(denoise_eval.fixed_levels(jnp.array([4]), ranged), levels[4:5])
  ddpm = _denoise(gamma=0.9, form='ddpm')
  np.testing.assert_allclose(denoise_eval.fixed_levels(jnp.arange(2), ddpm), [0.9, 0.9], rtol=1e-7)


def test_centre_crop_box_keeps_the_output_aspect():
  assert denoise_eval.centre_crop_box(40, 44, 32, 32) == (0, 2, 40, 40)
  assert denoise_eval.centre_crop_box(100, 50, 32, 64) == (37, 0, 25, 50)


@pytest.fixture(scope='module')
def tiny():
  model = create_model('tiny', num_outputs=3)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)))['params'])(jax.random.key(3))
  images = np.random.default_rng(1).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  heldout = denoise_eval.HeldoutSet(images, tuple(map(str, range(5))), 'synthetic', 'val')
  return model, jax.device_get(params), heldout


def test_two_devices_equal_one_device_and_an_independent_computation(tiny):
  model, params, heldout = tiny
  denoise = _denoise(sigma=0.4)
  assert jax.device_count() >= 2, 'conftest gives the tests two host devices'
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA,))
  two = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), (sharding.DATA,))
  # 5 images: chunks of 2 on one device, one padded chunk of 6 on two.
  got_one = denoise_eval.evaluate_once(model, denoise, heldout, params, mesh=one, batch_size=2)
  got_two = denoise_eval.evaluate_once(model, denoise, heldout, params, mesh=two, batch_size=5)

  # Independently: the whole set in one call, ε from the documented per-index key.
  x = jnp.asarray(heldout.images)
  eps = jnp.stack(
      [
          jax.random.normal(jax.random.fold_in(jax.random.key(20240), i), x.shape[1:])
          for i in range(5)
      ]
  )
  pred = jax.jit(lambda p, v: model.apply({'params': p}, v))(params, x + 0.4 * eps)
  x_hat = np.clip(np.asarray(x + 0.4 * eps - 0.4 * pred), -1, 1)
  mse_x = np.mean((x_hat - heldout.images) ** 2, axis=(1, 2, 3))
  want = {
      'val/eps_mse': float(np.mean((np.asarray(pred) - np.asarray(eps)) ** 2)),
      'val/psnr': float(np.mean(10 * np.log10(4 / mse_x))),
  }
  for key, value in want.items():
    np.testing.assert_allclose(got_one[key], value, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got_two[key], value, rtol=1e-5, err_msg=key)

  # The pictures come from the same pass: the first rows' ε̂ and x̂ (x̂ unclipped).
  evaluator = denoise_eval.Evaluator(model, denoise, heldout, one, batch_size=2)
  scalars, pictures = evaluator.run(params, {}, pictures=2)
  assert scalars == got_one
  np.testing.assert_allclose(pictures['eps_hat'], pred[:2], atol=1e-5)
  np.testing.assert_allclose(pictures['noisy'], x[:2] + 0.4 * eps[:2], atol=1e-6)
  np.testing.assert_array_equal(pictures['clean'], heldout.images[:2])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  preparation.prepare_generated('demo_tiny', data_dir=path)
  return path


def test_heldout_images_are_the_eval_split_at_the_crop_size_and_too_many_is_an_error(data_dir):
  a = denoise_eval.load_heldout(
      specs.get('demo_tiny'), num_images=3, image_size=(32, 32), data_dir=data_dir
  )
  b = denoise_eval.load_heldout(
      specs.get('demo_tiny'), num_images=3, image_size=(32, 32), data_dir=data_dir
  )
  assert a.images.shape == (3, 32, 32, 3) and a.split == 'validation'
  assert a.image_ids == b.image_ids and np.array_equal(a.images, b.images)
  assert a.images.min() >= -1 and a.images.max() <= 1 and a.images.std() > 0.05
  with pytest.raises(
      ValueError, match=r'eval.denoise_images=10000: demo_tiny/validation has ' r'only \d+ images'
  ):
    denoise_eval.load_heldout(
        specs.get('demo_tiny'), num_images=10000, image_size=(32, 32), data_dir=data_dir
    )
  with pytest.raises(ValueError, match=r"eval.denoise_split='valid'\): Unknown split"):
    denoise_eval.load_heldout(
        specs.get('demo_tiny'), num_images=1, image_size=(32, 32), split='valid', data_dir=data_dir
    )


def test_a_denoise_run_logs_the_metric_keeps_the_best_and_writes_a_grid(data_dir, tmp_path):
  c = config_schema.base_config()
  c.task, c.method = 'denoise', 'dep'
  c.model.preset = 'tiny'
  # Train batch and lr as test_train's runs: their compiled step is in the shared cache.
  c.data.update(
      dataset='demo_tiny',
      data_dir=data_dir,
      prepare=False,
      batch_size=4,
      eval_batch_size=4,
      image_size=(32, 32),
  )
  c.eval.update(denoise_images=3, summary_images=2)
  c.update(total_steps=2, log_every=1, eval_every=1, checkpoint_every=2, checkpoint_async=False)
  c.optim.lr = 1e-3
  workdir = tmp_path / 'run'
  train.train_and_evaluate(c, str(workdir))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  val = [r for r in rows if 'val/psnr' in r]
  assert [r['step'] for r in val] == [1, 2]
  assert all(np.isfinite(r['val/psnr']) and r['val/eps_mse'] > 0 for r in val)
  best = max(val, key=lambda r: r['val/psnr'])['step']
  assert sorted(p.name for p in (workdir / 'best').iterdir() if p.name.isdigit()) == [str(best)]

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
  events.Reload()
  tags = set(events.Tags()['tensors'])
  assert {'val/denoising', 'val/psnr', 'model/params_trainable', 'model/gflops_per_image'} <= tags
  grids = events.Tensors('val/denoising')
  assert [e.step for e in grids] == [1, 2]
  # TensorBoard stores images as [width, height, PNG...]: 4 panels of 32 side by side.
  assert grids[0].tensor_proto.string_val[:2] == [b'128', b'32']
  assert len(grids[0].tensor_proto.string_val) == 2 + 2
