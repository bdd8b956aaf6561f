"""Where a run's parameters come from: random init, a published encoder, or a run of ours.

The hand-off from pretraining to fine-tuning (paper Sec. 3.1): every parameter of
the earlier run that the new model also has is taken, except the `reinit` parts
(the final projection `head` is initialised afresh). Shape mismatches fail with
one error listing them.
"""

from typing import Sequence

from absl import logging
import flax
import numpy as np

from ddep.models import load_pretrained_encoder
from ddep.models import pretrained
from ddep.models import vit
from ddep.runs import checkpointing

_POSEMB = 'posembed_input/pos_embedding'


def _flat(tree) -> dict[str, np.ndarray]:
  return {
      '/'.join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


def merge_from_run(params, source, *, reinit: Sequence[str] = (), source_name: str = 'init_from'):
  """Returns `params` with every leaf that `source` also has (same path) taken from it."""
  target, src = _flat(params), _flat(source)
  skip = lambda k: any(k == r or k.startswith(r + '/') for r in reinit)  # noqa: E731
  taken, mismatched, not_in_source = [], [], []
  out = dict(target)
  for key, value in target.items():
    if skip(key):
      continue
    if key not in src:
      not_in_source.append(key)
      continue
    source_value = np.asarray(src[key])
    if (
        key.endswith(_POSEMB)
        and source_value.ndim == 4
        and source_value.shape[-1] == value.shape[-1]
        and source_value.shape != tuple(value.shape)
    ):
      # Pretraining and fine-tuning may use other crop sizes: resize the grid (as when
      # importing published encoders) rather than refuse.
      source_value = np.asarray(vit.resize_posemb(source_value, value.shape[1:3]))
    if tuple(source_value.shape) != tuple(value.shape):
      mismatched.append(
          f'{key}: checkpoint {tuple(np.shape(src[key]))} vs model {tuple(value.shape)}'
      )
    else:
      out[key] = source_value.astype(value.dtype)
      taken.append(key)
  if mismatched:
    raise ValueError(
        f'{source_name}: the checkpoint does not fit the model; '
        f'{len(mismatched)} parameters differ in shape: {mismatched}'
    )
  if not taken:
    raise ValueError(
        f'{source_name}: the checkpoint shares no parameter with the model '
        f'(model keys e.g. {sorted(target)[:3]}, checkpoint keys e.g. {sorted(src)[:3]})'
    )
  unused = sorted(k for k in src if k not in target and not skip(k))
  modules = sorted({k.split('/')[0] for k in not_in_source})
  logging.info(
      '%s: took %d params; kept fresh init for %d (modules %s); %d unused',
      source_name,
      len(taken),
      len(not_in_source),
      modules,
      len(unused),
  )
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in out.items()})


def check_sources(config) -> None:
  """Fails, naming the file, if `init_encoder_from` or `init_from` cannot be read.

  Called before a run creates or touches its workdir; what is checked is the file and its
  index of arrays, not yet whether they fit the model (initial_params says that).
  """
  if config.init_encoder_from:
    pretrained.check_file(str(config.init_encoder_from))
  if config.init_from:
    try:
      checkpointing.resolve_checkpoint(config.init_from)
    except FileNotFoundError as e:
      raise checkpointing.CheckpointError(f'config.{e}') from e


def initial_params(config, params):
  """Applies `config.init_encoder_from` and then `config.init_from` to fresh `params`."""
  if config.init_encoder_from:
    params = load_pretrained_encoder(params, config.init_encoder_from)
  if config.init_from:
    source = checkpointing.load_params(config.init_from)
    params = merge_from_run(
        params, source, reinit=tuple(config.reinit), source_name=f'init_from={config.init_from}'
    )
  return params
