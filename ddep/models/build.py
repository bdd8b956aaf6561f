"""The TransUNet a config describes, and its parameters at initialisation."""

import jax
import jax.numpy as jnp

from ddep.models import presets


def build_model(config, *, num_outputs: int, num_image_classes: int = 0):
  """`config.model` as a TransUNet with `num_outputs` channels per pixel."""
  m = config.model
  return create(
      m.preset,
      decoder_width=m.decoder_width_multiplier,
      dtype=m.dtype,
      # σ conditioning (Sec. 3.2) only exists while denoising; fine-tuning drops it.
      noise_conditioning=bool(m.noise_conditioning) and config.task == 'denoise',
      remat=m.remat,
      attention_impl=m.attention_impl,
      dropout_rate=float(m.dropout_rate),
      num_outputs=num_outputs,
      num_image_classes=num_image_classes,
  )


def create(
    preset: str,
    *,
    decoder_width: int = 1,
    dtype: str = 'float32',
    remat=(),
    attention_impl: str = '',
    dropout_rate: float | None = None,
    **overrides,
):
  """A preset with the settings configs and the benchmark's flags share, by name.
  `dropout_rate` None keeps the preset's."""
  if dropout_rate is not None:
    overrides['dropout_rate'] = dropout_rate
  return presets.create_model(
      preset,
      decoder_width_multiplier=int(decoder_width),
      dtype=jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32,
      remat=tuple(remat),
      attention_impl=attention_impl or None,
      **overrides,
  )


def init_params(model, key, image_hw, *, classify: bool = False):
  """Parameters at a (1, H, W, 3) sample: with the σ input if the model is conditioned on
  it, and only the encoder and classifier if `classify` (supervised pretraining)."""
  sample = jnp.zeros((1, *image_hw, 3), jnp.float32)
  if classify:
    return model.init(key, sample, method=type(model).classify)['params']
  if model.noise_conditioning:
    return model.init(key, sample, jnp.ones((1,)))['params']
  return model.init(key, sample)['params']


def abstract_params(model, image_hw, **kwargs):
  """init_params' shapes and dtypes, without computing anything."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_hw, **kwargs))
