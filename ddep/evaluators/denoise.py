"""The held-out validation signal of denoising pretraining (issue 14; Figure 8).

Pretraining has no labels to score, so a denoise run measures how well it denoises
images it never trains on: a fixed set of the dataset's evaluation images, centre
cropped to the training crop size, each with fixed noise at the training noise level.
Two numbers, comparable across steps and across runs at one noise level:

  val/eps_mse  mean over images of ||ε̂ - ε||² / D, the loss of Eq. 4 (lower is better);
  val/psnr     mean over images of the PSNR (dB) of the denoised image x̂, clipped to
               [-1, 1], against the clean one; peak-to-peak 2 (higher is better). The
               run's "best" checkpoint follows it.

ε̂ and x̂ come from the model's output whatever `denoise.target` is (Table 7): the noisy
image ties them, x~ = x + σε (Eq. 1) or √γ x + √(1 - γ) ε (Eq. 2).

The noise of image i is drawn from `fold_in(key, i)`, so it is the same at every step,
on any number of devices or hosts, and in any batch. A range of noise levels (Table 6)
gives image i a level drawn the same way.
"""

import dataclasses
import functools
import itertools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddep.config import validation as config_validation
from ddep.runs import summaries
from ddep.training import objectives
from ddep.training import optimizer as optimizer_lib
from ddep.training import sharding

# Independent of the run's seed: runs with different seeds are scored on the same noise.
_NOISE_SEED = 20240
_LEVEL_SEED = 20241
# PSNR of images in [-1, 1]: the peak-to-peak range is 2.
_PEAK_TO_PEAK = 2.0


@dataclasses.dataclass(frozen=True)
class HeldoutSet:
  """Clean images (N, H, W, 3) float32 in [-1, 1], identical on every process."""

  images: np.ndarray
  image_ids: tuple[str, ...]
  dataset: str
  split: str


def centre_crop_box(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
  """(top, left, h, w): the largest centred box of an image with the aspect of out_h x out_w."""
  scale = min(height / out_h, width / out_w)
  h = min(height, max(1, round(out_h * scale)))
  w = min(width, max(1, round(out_w * scale)))
  return (height - h) // 2, (width - w) // 2, h, w


def centre_crop_resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """A deterministic view of `image` at `size`: centre crop to its aspect, then resize."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out_h, out_w = (int(s) for s in size)
  top, left, h, w = centre_crop_box(image.shape[0], image.shape[1], out_h, out_w)
  crop = image[top : top + h, left : left + w]
  # Antialiased bilinear: downscaling a large image must not alias into noise-like detail.
  resized = tf.image.resize(crop, (out_h, out_w), method='bilinear', antialias=True)
  return np.clip(resized.numpy(), -1.0, 1.0).astype(np.float32)


def load_heldout(
    spec,
    *,
    num_images: int,
    image_size: Sequence[int],
    split: str = '',
    data_dir: Optional[str] = None,
) -> HeldoutSet:
  """The first `num_images` images of `split` (default: the eval split of dataset `spec`).

  Every process reads the same images: the set is small and must be identical.
  """
  from ddep.data import eval_data  # pylint: disable=g-import-not-at-top

  split = split or spec.eval_split
  # One process's view of the whole split, in storage order; one image per batch, as
  # the images differ in size.
  try:
    examples = eval_data.eval_dataset(
        spec, batch_size=1, split=split, data_dir=data_dir, process_index=0, process_count=1
    )
  except ValueError as e:  # An unknown split, say: name the config keys that chose it.
    raise config_validation.ConfigError(
        f'held-out denoising set of {spec.name} (eval.denoise_split={split!r}): ' f'{e}'
    ) from e
  if examples.num_examples < num_images:
    # A config error the user fixes (ddep.main: one line, exit 2), not a bug.
    raise config_validation.ConfigError(
        f'eval.denoise_images={num_images}: {spec.name}/{split} has only '
        f'{examples.num_examples} images'
    )
  images, ids = [], []
  for batch in itertools.islice(iter(examples), num_images):
    images.append(centre_crop_resize(batch['image'][0], image_size))
    ids.append(batch['image_id'][0].decode())
  return HeldoutSet(np.stack(images), tuple(ids), spec.name, split)


def reconstruct(noisy, prediction, level, *, form: str, target: str):
  """(ε̂, x̂) from the model's prediction of `target`, through x~'s equation (Eq. 1 / 2)."""
  noisy = jnp.asarray(noisy, jnp.float32)
  prediction = jnp.asarray(prediction, jnp.float32)
  level = jnp.asarray(level, jnp.float32).reshape((-1,) + (1,) * (noisy.ndim - 1))
  if form == 'additive':
    signal, noise = jnp.ones_like(level), level  # x~ = x + σ ε
  elif form == 'ddpm':
    signal, noise = jnp.sqrt(level), jnp.sqrt(1.0 - level)  # x~ = √γ x + √(1-γ) ε
  else:
    raise ValueError(f'form must be one of {objectives.NOISE_FORMS}, got {form!r}')
  if target == 'eps':
    return prediction, (noisy - noise * prediction) / signal
  if target == 'x':
    return (noisy - signal * prediction) / noise, prediction
  raise ValueError(f'target must be one of {objectives.DENOISING_TARGETS}, got {target!r}')


def psnr(x_hat, x):
  """Per-image PSNR (dB) of x̂, clipped to the pixel range [-1, 1], against x."""
  x_hat = jnp.clip(jnp.asarray(x_hat, jnp.float32), -1.0, 1.0)
  err = jnp.mean(jnp.square(x_hat - jnp.asarray(x, jnp.float32)).reshape(x.shape[0], -1), axis=1)
  return 10.0 * jnp.log10(_PEAK_TO_PEAK**2 / jnp.maximum(err, 1e-12))


def fixed_noise(index, shape: Sequence[int]):
  """ε of each image (B, *shape): from its index only, never from the batch it is in."""
  key = jax.random.key(_NOISE_SEED)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape)))(index)


def fixed_levels(index, denoise):
  """Each image's noise level in the form's terms: the fixed one, or drawn from the range."""
  level = objectives.noise_level(denoise)
  fixed = [v for k, v in level.items() if not k.endswith('_range')]
  if fixed:
    return jnp.full(index.shape, fixed[0], jnp.float32)
  lo, hi = next(iter(level.values()))
  key = jax.random.key(_LEVEL_SEED)
  return jax.vmap(
      lambda i: jax.random.uniform(
          jax.random.fold_in(key, i), (), jnp.float32, minval=lo, maxval=hi
      )
  )(index)


def make_eval_step(model, denoise, *, images_out: int = 0) -> Callable:
  """(params, frozen, images, index) -> per-image 'eps_mse', 'psnr'; with `images_out`,
  also the first rows' noisy / ε̂ / x̂ (sliced here: only they are gathered to the host).

  `index` is each row's position in the held-out set; padding rows may hold any index.
  """

  def eval_step(params, frozen, images, index):
    eps = fixed_noise(index, images.shape[1:])
    level = fixed_levels(index, denoise)
    noisy = objectives.corrupt(images, eps, level, form=denoise.form)
    prediction = model.apply(
        {'params': optimizer_lib.merge(params, frozen)},
        noisy,
        level if model.noise_conditioning else None,
    )
    eps_hat, x_hat = reconstruct(noisy, prediction, level, form=denoise.form, target=denoise.target)
    sq = jnp.square(eps_hat - eps).reshape(images.shape[0], -1)
    out = {'eps_mse': jnp.mean(sq, axis=1), 'psnr': psnr(x_hat, images)}
    if images_out:
      out.update(noisy=noisy[:images_out], eps_hat=eps_hat[:images_out], x_hat=x_hat[:images_out])
    return out

  return eval_step


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def _global(x: np.ndarray, s):
  return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


@dataclasses.dataclass
class Evaluator:
  """Scores a train state on a held-out set, in chunks of `batch_size` across `mesh`."""

  model: object
  denoise: object
  heldout: HeldoutSet
  mesh: jax.sharding.Mesh
  batch_size: int

  def __post_init__(self):
    devices = self.mesh.devices.size
    # Whole rows per device: a chunk is rounded up to a multiple of the mesh.
    self.batch_size = -(-max(int(self.batch_size), 1) // devices) * devices
    self._steps = {}  # Compiled per number of pictured rows (0 and one other per run).

  def _step(self, images_out: int):
    if images_out not in self._steps:
      self._steps[images_out] = jax.jit(
          make_eval_step(self.model, self.denoise, images_out=images_out),
          out_shardings=sharding.replicated(self.mesh),
      )
    return self._steps[images_out]

  def _batch(self, start: int, stop: int):
    """Rows start..stop of the set padded to a chunk, as global arrays."""
    images = self.heldout.images[start:stop]
    pad = self.batch_size - len(images)
    index = np.arange(start, start + self.batch_size, dtype=np.int32)  # Padding: any index.
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
    s = sharding.batch_sharding(self.mesh)
    return _global(images, s), _global(index, s)

  def run(self, params, frozen, *, pictures: int = 0):
    """({'val/eps_mse', 'val/psnr'}: means over the held-out images, pictures or None).

    The pictures are the first `pictures` images' clean / noisy / ε̂ / x̂ as host arrays,
    taken from the first chunk's pass (no extra forward).
    """
    per_image = {'eps_mse': [], 'psnr': []}
    shown = None
    for start, stop in _chunks(len(self.heldout.images), self.batch_size):
      rows = min(pictures, stop - start) if start == 0 else 0
      out = self._step(rows)(params, frozen, *self._batch(start, stop))
      for k in per_image:
        per_image[k].append(np.asarray(out[k].addressable_data(0))[: stop - start])
      if rows:
        shown = {k: np.asarray(out[k].addressable_data(0)) for k in ('noisy', 'eps_hat', 'x_hat')}
        shown['clean'] = self.heldout.images[:rows]
    metrics = {
        f'val/{k}': float(np.mean(np.concatenate(v).astype(np.float64)))
        for k, v in per_image.items()
    }
    return metrics, shown


def evaluate_once(
    model, denoise, heldout: HeldoutSet, params, *, mesh=None, batch_size: Optional[int] = None
) -> dict[str, float]:
  """One-shot `Evaluator.run` metrics of host `params` (all trainable), e.g. of a checkpoint."""
  mesh = mesh or sharding.make_mesh()
  evaluator = Evaluator(model, denoise, heldout, mesh, batch_size or len(heldout.images))
  replicated = functools.partial(_global, s=sharding.replicated(mesh))
  return evaluator.run(jax.tree.map(lambda x: replicated(np.asarray(x)), params), {})[0]


class DenoisingValidation:
  """The loop's evaluator of a denoise run: held-out ε-MSE and PSNR; best/ follows PSNR."""

  best_key = 'val/psnr'

  def __init__(self, config, model, spec, mesh, writer):
    h, w = config.data.image_size
    heldout = load_heldout(
        spec,
        num_images=int(config.eval.denoise_images),
        image_size=(h, w),
        split=config.eval.get('denoise_split', ''),
        data_dir=config.data.data_dir or None,
    )
    self._evaluator = Evaluator(
        model, config.denoise, heldout, mesh, batch_size=int(config.data.eval_batch_size)
    )
    self._writer = writer
    self._pictures = int(config.eval.get('summary_images', 0))

  def run(self, state, step: int) -> dict[str, float]:
    scalars, pictures = self._evaluator.run(
        state['params'], state['frozen'], pictures=self._pictures
    )
    if pictures:
      summaries.write_denoising(self._writer, step, pictures)
    if jax.process_index() == 0:
      print(
          f'[ddep] step {step}: held-out eps-MSE {scalars["val/eps_mse"]:.4f} '
          f'PSNR {scalars["val/psnr"]:.2f} dB',
          flush=True,
      )
    return scalars
