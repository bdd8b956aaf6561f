"""Tests for ddep.training.objectives against numpy references and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep.training import objectives


def _log_softmax_np(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- noise levels


def test_sample_sigma_fixed():
  s = objectives.sample_sigma(jax.random.key(0), 5, sigma=0.1)
  assert s.shape == (5,) and s.dtype == jnp.float32
  np.testing.assert_array_equal(s, np.full(5, np.float32(0.1)))


def test_sample_sigma_range_is_uniform_per_example():
  s = np.asarray(objectives.sample_sigma(jax.random.key(1), 4000, sigma_range=(0.2, 0.3)))
  assert s.dtype == np.float32
  assert s.min() >= 0.2 and s.max() < 0.3
  # U(0.2, 0.3): mean 0.25, std 0.1/sqrt(12) = 0.0289; 4000 draws, 5-sigma bounds.
  assert abs(s.mean() - 0.25) < 5 * 0.0289 / np.sqrt(4000)
  assert abs(s.std() - 0.1 / np.sqrt(12)) < 0.002
  again = objectives.sample_sigma(jax.random.key(1), 4000, sigma_range=(0.2, 0.3))
  np.testing.assert_array_equal(s, again)


@pytest.mark.parametrize(
    'kwargs, word',
    [
        (dict(), 'exactly one'),
        (dict(sigma=0.1, sigma_range=(0.1, 0.2)), 'exactly one'),
        (dict(sigma=0.0), '`sigma`'),
        (dict(sigma=-1.0), '`sigma`'),
        (dict(sigma_range=(0.3, 0.2)), '`sigma_range`'),
        (dict(sigma_range=(0.2, 0.2)), '`sigma_range`'),
        (dict(sigma_range=(0.1,)), '`sigma_range`'),
    ],
)
def test_sample_sigma_rejects_bad_arguments(kwargs, word):
  with pytest.raises(ValueError, match=word):
    objectives.sample_sigma(jax.random.key(0), 2, **kwargs)


# ---------------------------------------------------------------- corruption


def test_corrupt_additive_is_exactly_x_plus_sigma_eps():
  # Dyadic values: every product and sum is exact in float32, so equality is exact.
  x = np.array([[[[0.5, -1.0]]], [[[0.25, 0.75]]]], np.float32)  # (2, 1, 1, 2)
  eps = np.array([[[[2.0, -0.5]]], [[[1.5, -3.0]]]], np.float32)
  sigma = np.array([0.5, 0.125], np.float32)
  out = objectives.corrupt(x, eps, sigma)
  np.testing.assert_array_equal(out, [[[[1.5, -1.25]]], [[[0.4375, 0.375]]]])


def test_corrupt_additive_random_matches_numpy_and_is_not_clipped():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 4, 5, 3)).astype(np.float32)
  eps = rng.standard_normal((3, 4, 5, 3)).astype(np.float32)
  sigma = np.array([0.1, 0.8, 3.0], np.float32)
  out = np.asarray(objectives.corrupt(x, eps, sigma))
  np.testing.assert_allclose(out, x + sigma[:, None, None, None] * eps, rtol=1e-6, atol=1e-7)
  assert np.abs(out).max() > 1.5  # Fig. 4: no clipping to the pixel range.


def test_corrupt_ddpm_matches_eq2_and_additive_equivalence():
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 3, 3, 3)).astype(np.float32)
  eps = rng.standard_normal(x.shape).astype(np.float32)
  gamma = np.array([0.9, 0.2], np.float32)
  out = np.asarray(objectives.corrupt(x, eps, gamma, form='ddpm'))
  g = gamma.astype(np.float64)[:, None, None, None]
  np.testing.assert_allclose(out, np.sqrt(g) * x + np.sqrt(1 - g) * eps, rtol=1e-5, atol=1e-6)
  # Documented relation: Eq. 2 at gamma = 1/(1+sigma^2) is Eq. 1 divided by sqrt(1+sigma^2).
  sigma = np.sqrt((1 - gamma) / gamma)
  additive = np.asarray(objectives.corrupt(x, eps, sigma))
  np.testing.assert_allclose(
      out, additive * np.sqrt(gamma)[:, None, None, None], rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('gamma', [0.0, 1.0, 1.5, -0.1])
def test_corrupt_ddpm_rejects_gamma_outside_unit_interval(gamma):
  x = np.zeros((2, 1, 1, 1), np.float32)
  with pytest.raises(ValueError, match='gamma'):
    objectives.corrupt(x, x, np.array([0.5, gamma], np.float32), form='ddpm')


def test_corrupt_ddpm_under_jit_and_unknown_form():
  x = jnp.ones((2, 1, 1, 1))
  out = jax.jit(lambda g: objectives.corrupt(x, 0 * x, g, form='ddpm'))(jnp.array([0.25, 0.64]))
  np.testing.assert_allclose(out.ravel(), [0.5, 0.8], rtol=1e-6)
  with pytest.raises(ValueError, match='form'):
    objectives.corrupt(x, x, 0.1, form='ddim')


# ---------------------------------------------------------------- denoising loss


def test_denoising_loss_targets_match_numpy():
  rng = np.random.default_rng(2)
  pred, x, eps = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(3))
  want_eps = np.mean((pred.astype(np.float64) - eps) ** 2)
  want_x = np.mean((pred.astype(np.float64) - x) ** 2)
  np.testing.assert_allclose(objectives.denoising_loss(pred, x, eps), want_eps, rtol=1e-6)
  np.testing.assert_allclose(objectives.denoising_loss(pred, x, eps, target='x'), want_x, rtol=1e-6)
  assert abs(want_eps - want_x) > 0.1  # The two targets are told apart.
  with pytest.raises(ValueError, match='target'):
    objectives.denoising_loss(pred, x, eps, target='v')


def test_denoising_loss_hand_computed():
  pred = np.zeros((1, 1, 2, 1), np.float32)
  eps = np.array([[[[1.0], [3.0]]]], np.float32)
  # (1 + 9) / 2 pixels.
  assert float(objectives.denoising_loss(pred, pred, eps)) == 5.0


def test_denoising_loss_bf16_prediction_is_computed_in_float32():
  rng = np.random.default_rng(3)
  pred = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.bfloat16)
  eps = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  loss = objectives.denoising_loss(pred, eps, eps)
  assert loss.dtype == jnp.float32
  want = np.mean((np.asarray(pred, np.float64) - eps) ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_denoising_loss_weights_are_a_weighted_mean_of_examples():
  rng = np.random.default_rng(4)
  pred, eps = (rng.standard_normal((3, 2, 2, 3)).astype(np.float32) for _ in range(2))
  per_example = ((pred.astype(np.float64) - eps) ** 2).reshape(3, -1).mean(1)
  w = np.array([1.0, 0.0, 3.0], np.float32)
  got = objectives.denoising_loss(pred, pred, eps, weights=w)
  np.testing.assert_allclose(got, (per_example[0] + 3 * per_example[2]) / 4, rtol=1e-6)
  np.testing.assert_allclose(
      objectives.denoising_loss(pred, pred, eps, weights=np.ones(3)), per_example.mean(), rtol=1e-6
  )
  assert float(objectives.denoising_loss(pred, pred, eps, weights=np.zeros(3))) == 0.0


@pytest.mark.parametrize('target', ['eps', 'x'])
def test_make_denoising_batch(target):
  images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  fn = jax.jit(lambda r, im: objectives.make_denoising_batch(r, im, sigma=0.8, target=target))
  noisy, tgt, sigma = fn(jax.random.key(0), images)
  np.testing.assert_array_equal(sigma, np.full(4, np.float32(0.8)))
  if target == 'x':
    np.testing.assert_array_equal(tgt, images)
    eps = (noisy - images) / 0.8
  else:
    eps = tgt
    np.testing.assert_allclose(noisy, images + 0.8 * eps, rtol=1e-6, atol=1e-6)
  eps = np.asarray(eps)
  # 3072 standard normal draws: mean within ~5/sqrt(n), std within a few %.
  assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.05
  noisy2, _, _ = fn(jax.random.key(1), images)
  assert not np.allclose(noisy, noisy2)  # Fresh noise for a fresh key.


def test_make_denoising_batch_sigma_range_and_ddpm_guard():
  images = jnp.zeros((64, 2, 2, 1))
  _, _, sigma = objectives.make_denoising_batch(jax.random.key(0), images, sigma_range=(0.2, 0.3))
  assert np.all((sigma >= 0.2) & (sigma < 0.3)) and np.unique(np.asarray(sigma)).size > 50
  with pytest.raises(ValueError, match='gamma'):
    jax.jit(lambda r: objectives.make_denoising_batch(r, images, sigma=1.2, form='ddpm'))(
        jax.random.key(0)
    )


# ---------------------------------------------------------------- segmentation CE


def _ce_numpy(logits, labels, ignore=255, mask=None):
  valid = labels != ignore
  if mask is not None:
    valid &= mask
  logp = _log_softmax_np(logits)
  safe = np.where(valid, labels, 0)
  nll = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  n = valid.sum()
  return (nll * valid).sum() / max(n, 1), n


def _seg_case(seed=0, shape=(2, 5, 6), classes=4):
  rng = np.random.default_rng(seed)
  logits = (3 * rng.standard_normal(shape + (classes,))).astype(np.float32)
  labels = rng.integers(0, classes, shape)
  labels[rng.random(shape) < 0.3] = 255
  return logits, labels


def test_cross_entropy_matches_numpy():
  logits, labels = _seg_case()
  loss, n = objectives.softmax_cross_entropy_with_ignore(logits, labels)
  want, want_n = _ce_numpy(logits, labels)
  assert int(n) == want_n and 0 < want_n < labels.size
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_cross_entropy_hand_computed():
  # Pixel 0: uniform over 2 classes -> log 2. Pixel 1: ignored. Mean over 1 pixel.
  logits = np.array([[[[0.0, 0.0], [100.0, -100.0]]]], np.float32)
  labels = np.array([[[1, 255]]])
  loss, n = objectives.softmax_cross_entropy_with_ignore(logits, labels)
  assert int(n) == 1
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)


def test_cross_entropy_ignored_pixels_change_nothing_and_get_zero_gradient():
  logits, labels = _seg_case(1)
  ignored = labels == 255
  changed = logits.copy()
  changed[ignored] = 1e4 * np.random.default_rng(9).standard_normal(changed[ignored].shape)
  loss = lambda z: objectives.softmax_cross_entropy_with_ignore(z, labels)[0]
  assert float(loss(logits)) == float(loss(changed))
  grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
  assert np.all(grad[ignored] == 0.0)
  assert np.all(np.abs(grad[~ignored]).sum(-1) > 0)
  # Independent gradient: (softmax - onehot) / n_valid at valid pixels.
  p = np.exp(_log_softmax_np(logits))
  onehot = np.eye(4)[np.where(ignored, 0, labels)]
  want = (p - onehot) * (~ignored)[..., None] / (~ignored).sum()
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_cross_entropy_all_ignored_is_zero_not_nan():
  logits = jnp.ones((1, 2, 2, 3))
  labels = np.full((1, 2, 2), 255)
  loss, n = objectives.softmax_cross_entropy_with_ignore(logits, labels)
  assert float(loss) == 0.0 and int(n) == 0
  grad = jax.grad(lambda z: objectives.softmax_cross_entropy_with_ignore(z, labels)[0])(logits)
  assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_mask_and_custom_ignore_label():
  logits, labels = _seg_case(2)
  example_mask = np.array([True, False])
  loss, n = objectives.softmax_cross_entropy_with_ignore(logits, labels, mask=example_mask)
  want, want_n = _ce_numpy(
      logits, labels, mask=np.broadcast_to(example_mask[:, None, None], labels.shape)
  )
  assert int(n) == want_n
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  relabelled = np.where(labels == 255, 0, labels)  # Class 0 is now the void label.
  loss0, n0 = objectives.softmax_cross_entropy_with_ignore(logits, relabelled, ignore_label=0)
  want0, want_n0 = _ce_numpy(logits, relabelled, ignore=0)
  assert int(n0) == want_n0
  np.testing.assert_allclose(loss0, want0, rtol=1e-6)


def test_cross_entropy_per_pixel_bf16_and_large_logits():
  logits, labels = _seg_case(3)
  big = jnp.asarray(logits * 300, jnp.bfloat16)
  nll, valid = objectives.softmax_cross_entropy_per_pixel(big, labels)
  assert nll.dtype == jnp.float32 and nll.shape == labels.shape
  np.testing.assert_array_equal(valid, labels != 255)
  logp = _log_softmax_np(np.asarray(big, np.float64))
  want = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0] * valid
  assert np.all(np.isfinite(nll))
  np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-3)


def test_cross_entropy_out_of_range_label_is_loud():
  logits = np.zeros((1, 1, 2, 3), np.float32)
  loss, _ = objectives.softmax_cross_entropy_with_ignore(logits, np.array([[[0, 254]]]))
  assert np.isnan(float(loss))
  with pytest.raises(ValueError, match='labels'):
    objectives.softmax_cross_entropy_with_ignore(logits, np.zeros((1, 2, 1), int))


# ---------------------------------------------------------------- image classification


def test_sigmoid_classification_loss_matches_numpy():
  rng = np.random.default_rng(6)
  logits = (4 * rng.standard_normal((3, 5))).astype(np.float32)
  labels = (rng.random((3, 5)) < 0.4).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
  np.testing.assert_allclose(
      objectives.image_classification_loss(logits, labels, kind='sigmoid'), want, rtol=1e-5
  )


def test_softmax_classification_loss_normalises_labels_and_skips_empty():
  rng = np.random.default_rng(7)
  logits = rng.standard_normal((3, 4)).astype(np.float32)
  labels = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], np.float32)
  logp = _log_softmax_np(logits)
  want = (-(logp[0, 0] + logp[0, 2]) / 2 - logp[2, 3]) / 2  # Example 1 has no label.
  got = objectives.image_classification_loss(logits, labels, kind='softmax')
  np.testing.assert_allclose(got, want, rtol=1e-6)
  none = objectives.image_classification_loss(logits, np.zeros_like(labels), kind='softmax')
  assert float(none) == 0.0
  with pytest.raises(ValueError, match='kind'):
    objectives.image_classification_loss(logits, labels, kind='hinge')


def test_sigma_gamma_conversion_is_the_same_signal_to_noise_ratio():
  sigma = np.array([0.1, 0.8, 3.0])
  gamma = objectives.gamma_from_sigma(sigma)
  np.testing.assert_allclose(gamma, [1 / 1.01, 1 / 1.64, 0.1], rtol=1e-12)
  np.testing.assert_allclose(objectives.sigma_from_gamma(gamma), sigma, rtol=1e-12)
  # SNR of Eq. 2, gamma / (1 - gamma), equals Eq. 1's 1 / sigma^2.
  np.testing.assert_allclose(gamma / (1 - gamma), 1 / sigma**2, rtol=1e-12)
  with pytest.raises(ValueError, match=r'\(0, 1\)'):
    objectives.sigma_from_gamma([0.5, 1.0])


def test_make_denoising_batch_takes_each_forms_level_in_its_own_terms():
  images = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (3, 4, 4, 3)), jnp.float32)
  key = jax.random.key(2)
  noisy, eps, level = objectives.make_denoising_batch(key, images, gamma=0.64, form='ddpm')
  np.testing.assert_array_equal(level, np.full(3, np.float32(0.64)))
  np.testing.assert_allclose(noisy, 0.8 * images + 0.6 * eps, rtol=1e-5, atol=1e-6)  # Eq. 2
  # The same draw at sigma_from_gamma(0.64) = 0.75 in Eq. 1 is Eq. 2 times 1 / sqrt(gamma).
  additive, eps1, _ = objectives.make_denoising_batch(key, images, sigma=0.75)
  np.testing.assert_array_equal(eps, eps1)
  np.testing.assert_allclose(additive, noisy / 0.8, rtol=1e-5, atol=1e-6)
  _, _, drawn = objectives.make_denoising_batch(
      key, jnp.zeros((256, 1, 1, 1)), gamma_range=(0.5, 0.6), form='ddpm'
  )
  assert np.all((drawn >= 0.5) & (drawn < 0.6)) and np.unique(np.asarray(drawn)).size > 50
  for kwargs, named in (
      (dict(gamma=0.5, sigma=0.1, form='ddpm'), '`sigma`'),
      (dict(gamma_range=(0.5, 0.6), sigma_range=(0.1, 0.2), form='ddpm'), '`sigma_range`'),
      (dict(sigma=0.1, gamma=0.5), '`gamma`'),
  ):
    with pytest.raises(ValueError, match=named):
      objectives.make_denoising_batch(key, images, **kwargs)
  with pytest.raises(ValueError, match='gamma'):
    objectives.make_denoising_batch(key, images, gamma_range=(0.5, 1.5), form='ddpm')
