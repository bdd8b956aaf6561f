"""Losses for denoising pretraining and segmentation fine-tuning.

Everything here is a pure `jax.numpy` function of arrays, safe under `jax.jit`,
and computes its reductions in float32 whatever the input dtype, so a model
run in bfloat16 still gets a float32 loss.

Denoising (paper Sec. 3.1-3.2):
    * `sample_sigma`: one noise level per example, fixed or ~U(a, b) (Table 6).
    * `corrupt`: x~ = x + sigma*eps (Eq. 1) or sqrt(g)*x + sqrt(1-g)*eps (Eq. 2).
    * `gamma_from_sigma`, `sigma_from_gamma`: the same noise level in the terms of
        the other equation (equal signal-to-noise ratio).
    * `denoising_loss`: ||f(x~) - eps||^2 (Eq. 4), or the target x (Table 7).
    * `make_denoising_batch`: the three above in one call for the train step.

Supervised:
    * `softmax_cross_entropy_with_ignore`: pixelwise CE for segmentation
        (Sec. 4.3), with the dataset's ignore label left out of the mean.
    * `image_classification_loss`: sigmoid (multi-label) or softmax CE, for
        classification (pre)training of the encoder.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NOISE_FORMS = ('additive', 'ddpm')
DENOISING_TARGETS = ('eps', 'x')


# ----------------------------------------------------------------------------
# Denoising pretraining.
# ----------------------------------------------------------------------------


def sample_sigma(
    rng: Array,
    batch_size: int,
    *,
    sigma: Optional[float] = None,
    sigma_range: Optional[Sequence[float]] = None,
) -> Array:
  """Noise levels, one per example: shape (batch_size,), float32.

  Args:
      rng: PRNG key; unused when `sigma` is fixed.
      batch_size: number of examples.
      sigma: a fixed noise level (the paper's default, Sec. 3.3: 0.8 for DeP,
          0.1 for DDeP).
      sigma_range: (a, b): sigma ~ U(a, b) independently per example (Sec. 3.2,
          Table 6 uses U(0.2, 0.3)).

  Exactly one of `sigma` and `sigma_range` must be given. `make_denoising_batch`
  draws Eq. 2's gamma with it too; gamma must lie in (0, 1), which `corrupt` checks.
  """
  if (sigma is None) == (sigma_range is None):
    raise ValueError(
        'Give exactly one of `sigma` (fixed noise level) and `sigma_range` '
        f'((a, b) for sigma ~ U(a, b)); got sigma={sigma!r}, '
        f'sigma_range={sigma_range!r}.'
    )
  if sigma is not None:
    if not float(sigma) > 0:
      raise ValueError(f'`sigma` must be > 0, got {sigma!r}.')
    return jnp.full((batch_size,), sigma, jnp.float32)
  if len(sigma_range) != 2:
    raise ValueError(f'`sigma_range` must be a pair (a, b), got {sigma_range!r}.')
  lo, hi = (float(v) for v in sigma_range)
  if not 0 <= lo < hi:
    raise ValueError(f'`sigma_range` (a, b) needs 0 <= a < b, got {sigma_range!r}.')
  return jax.random.uniform(rng, (batch_size,), jnp.float32, minval=lo, maxval=hi)


def gamma_from_sigma(sigma):
  """gamma of Eq. 2 with the signal-to-noise ratio of sigma in Eq. 1: 1 / (1 + sigma^2)."""
  return 1.0 / (1.0 + np.square(np.asarray(sigma, np.float64)))


def sigma_from_gamma(gamma):
  """sigma of Eq. 1 with the signal-to-noise ratio of gamma in Eq. 2: sqrt((1 - g) / g)."""
  gamma = np.asarray(gamma, np.float64)
  if not (np.all(gamma > 0) and np.all(gamma < 1)):
    raise ValueError(f'gamma of Eq. 2 must lie in (0, 1), got {gamma.tolist()}.')
  return np.sqrt((1.0 - gamma) / gamma)


def _per_example(values: Array, like: Array) -> Array:
  """Reshapes (B,) or scalar values to broadcast against `like` (B, ...)."""
  values = jnp.asarray(values, jnp.float32)
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _check_gamma_if_concrete(gamma) -> None:
  """Raises for gamma outside (0, 1) when its value is known (not traced)."""
  try:
    g = np.asarray(gamma)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # Traced under jit; `make_denoising_batch` checks the config instead.
  if g.size and not (np.all(g > 0) and np.all(g < 1)):
    raise ValueError(
        "form='ddpm': gamma of Eq. 2 must lie in " f'(0, 1); got values in [{g.min()}, {g.max()}].'
    )


def corrupt(x: Array, eps: Array, sigma, *, form: str = 'additive') -> Array:
  """Noisy image x~ from clean images `x` (B, H, W, C) and noise `eps`.

  Args:
      x: clean images, pixels in [-1, 1] (Sec. 3.1).
      eps: standard normal noise, same shape as `x`.
      sigma: (B,) per-example noise level (or a scalar) in the form's terms:
          sigma of Eq. 1 for 'additive', gamma in (0, 1) of Eq. 2 for 'ddpm'.
      form: 'additive': x~ = x + sigma * eps (Eq. 1), unclipped (Fig. 4
          caption: no clipping during training). 'ddpm': x~ = sqrt(g) * x +
          sqrt(1 - g) * eps (Eq. 2) with g the given gamma.

  Returns:
      x~ in float32.

  Eq. 2 with gamma is Eq. 1 with sigma = sqrt((1 - gamma) / gamma), rescaled by
  sqrt(gamma) = 1 / sqrt(1 + sigma^2): same signal-to-noise ratio, unit
  variance. That is why the paper finds no real difference (Sec. 3.1).
  """
  x = jnp.asarray(x, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  if x.shape != eps.shape:
    raise ValueError(f'x {x.shape} and eps {eps.shape} must have one shape.')
  if form == 'additive':
    return x + _per_example(sigma, x) * eps
  if form == 'ddpm':
    _check_gamma_if_concrete(sigma)
    gamma = _per_example(sigma, x)
    return jnp.sqrt(gamma) * x + jnp.sqrt(1.0 - gamma) * eps
  raise ValueError(f'`form` must be one of {NOISE_FORMS}, got {form!r}.')


def mean_squared_error(
    prediction: Array, target: Array, *, weights: Optional[Array] = None
) -> Array:
  """Mean over examples, pixels and channels of (prediction - target)^2.

  Args:
      prediction: (B, ...) model output, any float dtype.
      target: same shape.
      weights: optional (B,) per-example weights, e.g. 0 for padded examples.
          The result is then sum_b w_b * m_b / sum_b w_b with m_b the example's
          mean; 0 if all weights are 0. All-ones weights give the plain mean.

  Returns:
      float32 scalar.
  """
  if prediction.shape != target.shape:
    raise ValueError(
        f'prediction {prediction.shape} and target {target.shape} must have one shape.'
    )
  # Squares of bf16 differences lose most of their mantissa: go to f32 first.
  sq = jnp.square(jnp.asarray(prediction, jnp.float32) - jnp.asarray(target, jnp.float32))
  if weights is None:
    return jnp.mean(sq)
  per_example = jnp.mean(sq.reshape(sq.shape[0], -1), axis=1)
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(weights)
  return jnp.sum(weights * per_example) / jnp.where(total > 0, total, 1.0)


def denoising_loss(
    prediction: Array,
    x: Array,
    eps: Array,
    *,
    target: str = 'eps',
    weights: Optional[Array] = None,
) -> Array:
  """Denoising objective ||f(x~) - target||^2 (Eq. 4), as a float32 scalar.

  The squared norm is averaged over pixels and channels as well as the batch
  (a constant rescaling of Eq. 4 that keeps the learning rate independent of
  the image size).

  Args:
      prediction: f_theta(x~), (B, H, W, C).
      x: the clean images.
      eps: the noise that was added.
      target: 'eps' predicts the noise (Eq. 4, the paper's choice); 'x' predicts
          the clean image (the Table 7 ablation).
      weights: optional (B,) per-example weights, see `mean_squared_error`.
  """
  if target == 'eps':
    return mean_squared_error(prediction, eps, weights=weights)
  if target == 'x':
    return mean_squared_error(prediction, x, weights=weights)
  raise ValueError(f'`target` must be one of {DENOISING_TARGETS}, got {target!r}.')


def make_denoising_batch(
    rng: Array,
    images: Array,
    *,
    sigma: Optional[float] = None,
    sigma_range: Optional[Sequence[float]] = None,
    gamma: Optional[float] = None,
    gamma_range: Optional[Sequence[float]] = None,
    form: str = 'additive',
    target: str = 'eps',
) -> Tuple[Array, Array, Array]:
  """Corrupts a batch of clean images for one denoising training step.

  Each form takes its noise level in its own equation's terms: 'additive' (Eq. 1)
  exactly one of `sigma` / `sigma_range`, 'ddpm' (Eq. 2) exactly one of `gamma` /
  `gamma_range`. Giving the other form's level is an error, not a reinterpretation.

  Args:
      rng: PRNG key (fold in the step so every step draws fresh noise).
      images: (B, H, W, C) clean images in [-1, 1].
      sigma, sigma_range: Eq. 1's noise level, fixed or ~U(a, b), see `sample_sigma`.
      gamma, gamma_range: Eq. 2's gamma in (0, 1), fixed or ~U(a, b).
      form: 'additive' (Eq. 1) or 'ddpm' (Eq. 2), see `corrupt`.
      target: 'eps' or 'x', see `denoising_loss`.

  Returns:
      (noisy, target, level): the model input x~, the regression target (use
      `mean_squared_error(model(noisy), target)`), and the (B,) noise levels in the
      form's terms, sigma or gamma (for logging or for conditioning the model on
      the noise level, Sec. 3.2).
  """
  if target not in DENOISING_TARGETS:
    raise ValueError(f'`target` must be one of {DENOISING_TARGETS}, got {target!r}.')
  if form not in NOISE_FORMS:
    raise ValueError(f'`form` must be one of {NOISE_FORMS}, got {form!r}.')
  own, other = ('gamma', 'sigma') if form == 'ddpm' else ('sigma', 'gamma')
  given = dict(sigma=sigma, sigma_range=sigma_range, gamma=gamma, gamma_range=gamma_range)
  mixed = [k for k in (other, f'{other}_range') if given[k] is not None]
  if mixed:
    raise ValueError(
        f"form={form!r} takes `{own}` or `{own}_range`; got {', '.join(f'`{k}`' for k in mixed)} "
        f"(sigma is Eq. 1's noise level, gamma Eq. 2's: gamma = 1 / (1 + sigma^2))."
    )
  level, level_range = given[own], given[f'{own}_range']
  if form == 'ddpm':
    # Static config values, so this also guards traced calls of `corrupt`.
    _check_gamma_if_concrete(level if level is not None else level_range)
  rng_sigma, rng_eps = jax.random.split(rng)
  images = jnp.asarray(images, jnp.float32)
  # One sampler for both: a fixed value or ~U(a, b) per example.
  sigmas = sample_sigma(rng_sigma, images.shape[0], sigma=level, sigma_range=level_range)
  eps = jax.random.normal(rng_eps, images.shape, jnp.float32)
  noisy = corrupt(images, eps, sigmas, form=form)
  return noisy, (eps if target == 'eps' else images), sigmas


# ----------------------------------------------------------------------------
# Supervised losses.
# ----------------------------------------------------------------------------


def softmax_cross_entropy_per_pixel(
    logits: Array,
    labels: Array,
    *,
    ignore_label: int = 255,
    mask: Optional[Array] = None,
) -> Tuple[Array, Array]:
  """Per-pixel softmax cross-entropy and the mask of pixels that count.

  Args:
      logits: (B, H, W, C) class scores.
      labels: (B, H, W) integer class ids; `ignore_label` marks void pixels.
      ignore_label: label of pixels to leave out (255 in Pascal/ADE20K style
          masks, Cityscapes after train-id mapping).
      mask: optional validity mask, (B,) per example (e.g. padded eval batches)
          or (B, H, W) per pixel; False/0 leaves the pixel out.

  Returns:
      (loss, valid): loss (B, H, W) float32 with 0 at left-out pixels, and valid
      (B, H, W) bool. A label outside [0, C) that is not `ignore_label` gives a
      NaN loss there, so broken label maps fail loudly instead of training on
      a wrong class.
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'logits {logits.shape} must be labels {labels.shape} + (classes,).')
  num_classes = logits.shape[-1]
  labels = jnp.asarray(labels)
  valid = labels != ignore_label
  if mask is not None:
    mask = jnp.asarray(mask).astype(bool)
    valid &= mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
  # Gather with an in-range label everywhere so left-out pixels cannot
  # produce NaN or out-of-bounds reads that would leak into the gradient.
  safe_labels = jnp.where(valid, labels, 0)
  bad = valid & ((labels < 0) | (labels >= num_classes))
  safe_labels = jnp.where(bad, 0, safe_labels)
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  nll = jnp.where(bad, jnp.nan, nll)
  # `where`, not multiply: its gradient to left-out pixels is exactly zero.
  return jnp.where(valid, nll, 0.0), valid


def softmax_cross_entropy_with_ignore(
    logits: Array,
    labels: Array,
    *,
    ignore_label: int = 255,
    mask: Optional[Array] = None,
) -> Tuple[Array, Array]:
  """Pixelwise softmax cross-entropy averaged over the valid pixels (Sec. 4.3).

  Pixels labelled `ignore_label` (or masked out) count in neither the sum nor
  the number of pixels, and their logits get exactly zero gradient.

  Args: see `softmax_cross_entropy_per_pixel`.

  Returns:
      (loss, num_valid): float32 scalar mean over valid pixels (0, not NaN, when
      there are none) and the int32 number of valid pixels, so that callers can
      combine batches or devices as sum(loss * n) / sum(n).
  """
  nll, valid = softmax_cross_entropy_per_pixel(logits, labels, ignore_label=ignore_label, mask=mask)
  num_valid = jnp.sum(valid, dtype=jnp.int32)
  loss = jnp.sum(nll) / jnp.maximum(num_valid, 1).astype(jnp.float32)
  return loss, num_valid


def image_classification_loss(logits: Array, labels: Array, *, kind: str = 'sigmoid') -> Array:
  """Image-level classification loss for (B, K) logits and multi-hot labels.

  Args:
      logits: (B, K) class scores.
      labels: (B, K) multi-hot {0, 1} (or soft) targets.
      kind: 'sigmoid': binary cross-entropy per class, averaged over classes and
          examples (multi-label, as for ImageNet-21k). 'softmax': cross-entropy
          against the labels normalised to sum to 1 per example; examples with no
          positive label have no target distribution and are left out.

  Returns:
      float32 scalar (0 for softmax when no example has a positive label).
  """
  if logits.shape != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} must have one shape.')
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  if kind == 'sigmoid':
    # log_sigmoid(-z) = log(1 - sigmoid(z)), stable for large |z|.
    bce = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
    return jnp.mean(bce)
  if kind == 'softmax':
    total = jnp.sum(labels, axis=-1)
    has_label = total > 0
    target = labels / jnp.where(has_label, total, 1.0)[:, None]
    ce = -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    count = jnp.sum(has_label)
    return jnp.sum(jnp.where(has_label, ce, 0.0)) / jnp.maximum(count, 1)
  raise ValueError(f"`kind` must be 'sigmoid' or 'softmax', got {kind!r}.")


def noise_level(denoise) -> dict:
  """`config.denoise`'s level as `make_denoising_batch` arguments, in the form's own terms:
  σ / σ range for 'additive' (Eq. 1), γ / γ range for 'ddpm' (Eq. 2)."""
  name = 'gamma' if denoise.form == 'ddpm' else 'sigma'
  # getattr: plain namespaces (ddep.tools.benchmark) stand in for configs too.
  level_range = tuple(getattr(denoise, f'{name}_range', ()))
  if level_range:
    return {f'{name}_range': level_range}
  return {name: float(getattr(denoise, name, 0.0))}
