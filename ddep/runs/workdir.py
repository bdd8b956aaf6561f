"""What a run keeps in its workdir, and reading it back.

  config.json     the run's config (written at start)
  metrics.jsonl   one row per logged step: the curves `ddep.report` draws
  subset_ids.txt  the labelled images a fine-tuning used, one id per line
  results.json    the final evaluation of a segmentation run, with its settings
  checkpoints/, best/   orbax steps (ddep.runs.checkpointing)

`ddep.evaluate`, `ddep.predict`, `ddep.report` and the trainer all go through here.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
from etils import epath
import tensorflow as tf

from ddep.evaluators import metrics as metrics_lib
from ddep.runs import checkpointing
from ddep.runs import storage
from ddep.training import tasks

CONFIG_FILE = 'config.json'
SUBSET_IDS_FILE = 'subset_ids.txt'


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    (storage.path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


RESULTS_FILE = 'results.json'


CURVES_FILE = 'metrics.jsonl'


def pretraining_record(init_from: str) -> dict | None:
  """The settings of the run a fine-tuning started from, read from its config.json.

  `init_from` is that run's workdir or one of its checkpoint dirs. Ablations
  (Tables 6, 7; Figure 8) differ only here, so results.json keeps them and the
  report tells such runs apart. None if there is no run config to read.
  """
  if not init_from:
    return None
  path = storage.path(init_from)
  for directory in (path, *list(path.parents)[:3]):  # <workdir>/checkpoints/<step>
    if (directory / CONFIG_FILE).is_file():
      config = json.loads((directory / CONFIG_FILE).read_text())
      break
  else:
    return None
  model, denoise = config.get('model', {}), config.get('denoise', {})
  return {
      **noise_record(denoise),
      'workdir': str(directory),
      'method': config.get('method'),
      'task': config.get('task'),
      'model': model.get('preset'),
      'decoder_width': model.get('decoder_width_multiplier'),
      'noise_conditioning': model.get('noise_conditioning'),
      'target': denoise.get('target'),
      'total_steps': config.get('total_steps'),
      'total_epochs': config.get('total_epochs'),
  }


def noise_record(denoise: Mapping[str, Any]) -> dict:
  """The noise form and level of a denoising config, each form in its own terms.

  'additive' (Eq. 1) keeps sigma / sigma_range, 'ddpm' (Eq. 2) gamma / gamma_range;
  `sigma_equivalent` is the level as Eq. 1's sigma either way (same signal-to-noise
  ratio, sigma = sqrt((1 - gamma) / gamma)), so that the forms compare at one scale.
  Configs from before `gamma` existed read sigma as gamma under 'ddpm', and are
  recorded as what they ran.
  """
  form = denoise.get('form')
  sigma, sigma_range = denoise.get('sigma'), list(denoise.get('sigma_range') or [])
  gamma, gamma_range = denoise.get('gamma'), list(denoise.get('gamma_range') or [])
  if form == 'ddpm' and 'gamma' not in denoise:  # Older runs: the sigma field held gamma.
    gamma, gamma_range, sigma, sigma_range = sigma, sigma_range, None, []
  if form == 'ddpm':
    # gamma falls as the noise grows: the range's ends swap.
    def to_sigma(g):
      return math.sqrt((1 - g) / g) if g and 0 < g < 1 else None

    equivalent = [to_sigma(g) for g in reversed(gamma_range)] if gamma_range else to_sigma(gamma)
  else:
    equivalent = sigma_range or sigma
    gamma, gamma_range = None, []
  return {
      'form': form,
      'sigma': sigma if form != 'ddpm' else None,
      'sigma_range': sigma_range if form != 'ddpm' else [],
      'gamma': gamma,
      'gamma_range': gamma_range,
      'sigma_equivalent': equivalent,
  }


def write_results(
    workdir,
    *,
    method: str,
    dataset: str,
    label_fraction: float,
    subset_seed: int,
    decoder_width: float,
    metrics: Mapping[str, Any],
    label_count: int | None = None,
    **extra,
) -> epath.Path:
  """Writes `workdir/results.json` from segmentation_metrics' dict (plus extras).

  `label_count` is the number of labelled images of a `data.label_count=` run (its
  `label_fraction` is then that number over the split's size), None otherwise.
  """
  results = {
      'method': method,
      'dataset': dataset,
      'label_fraction': float(label_fraction),
      'label_count': None if label_count is None else int(label_count),
      'subset_seed': int(subset_seed),
      'decoder_width': decoder_width,
      'miou': metrics['miou'],
      'per_class_iou': metrics.get('per_class_iou', {}),
      'pixel_accuracy': metrics.get('pixel_accuracy'),
      'mean_class_accuracy': metrics.get('mean_class_accuracy'),
      **extra,
  }
  path = storage.path(workdir) / RESULTS_FILE
  path.write_text(json.dumps(metrics_lib.json_safe(results), indent=1))
  return path


def write_subset_ids(path: str, ids: Sequence[str]) -> None:
  """Writes one example id per line (records which labelled subset a run used)."""
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(''.join(f'{i}\n' for i in ids))


def read_results(path) -> dict:
  return json.loads(storage.path(path).read_text())


class MetricsLog:
  """Appends metric rows to workdir/metrics.jsonl (the report's training curves)."""

  def __init__(self, workdir):
    self._path = storage.path(workdir) / CURVES_FILE
    self._on = jax.process_index() == 0

  def write(self, step: int, scalars: dict) -> None:
    if self._on:
      row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
      storage.append_text(self._path, json.dumps(row) + '\n')

  def _rows(self) -> list[tuple[Optional[float], str]]:
    """(step or None for a torn or foreign line, line) of every line."""
    rows = []
    for line in self._path.read_text().splitlines():
      try:
        row = json.loads(line)
        row_step = row['step'] if isinstance(row, dict) else None
      except (json.JSONDecodeError, KeyError, TypeError):
        row_step = None
      rows.append((row_step if isinstance(row_step, (int, float)) else None, line))
    return rows

  @staticmethod
  def _is_evaluation(line: str) -> bool:
    return any(k != 'step' and not k.startswith('train/') for k in json.loads(line))

  def evaluated(self, step: int) -> bool:
    """Whether an evaluation of `step` was logged. Its rows are written only once its best/
    save is complete, so False after a kill means: evaluate `step` again."""
    if not self._path.exists():
      return False
    return any(s == step and self._is_evaluation(line) for s, line in self._rows())

  def drop_evaluations(self, step: int) -> None:
    """Drops the evaluation rows of `step`, which is about to be evaluated again."""
    if not self._on or not self._path.exists():
      return
    rows = self._rows()
    kept = [line for s, line in rows if not (s == step and self._is_evaluation(line))]
    if len(kept) != len(rows):
      storage.write_text_atomic(self._path, ''.join(line + '\n' for line in kept))

  def keep_until(self, step: int) -> None:
    """Drops the rows after `step`, the restored checkpoint, so a resumed run's curves
    do not double back; a line torn by a kill mid-write is dropped too."""
    if not self._on or not self._path.exists():
      return
    kept, dropped = [], 0
    for line in self._path.read_text().splitlines():
      try:
        row_step = json.loads(line)['step']
      except (json.JSONDecodeError, KeyError, TypeError):
        row_step = None
      if isinstance(row_step, (int, float)) and row_step <= step:
        kept.append(line + '\n')
      elif line.strip():
        dropped += 1
    if dropped:
      logging.info('%s: dropped %d rows after the restored step %d', self._path, dropped, step)
      storage.write_text_atomic(self._path, ''.join(kept))


CHECKPOINT_HELP = (
    'A step dir (<workdir>/best/<step>), a checkpoints/ or best/ dir (its latest step) or '
    "another workdir (its latest periodic checkpoint); default: this workdir's best, else latest."
)


CheckpointError = checkpointing.CheckpointError


def load_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None):
  """`config` if given, else the run's own config.json."""
  if config is not None:
    return config
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a ddep workdir '
        '(pass --config to say how the run was configured)'
    )
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def find_checkpoint(workdir: str, checkpoint: Optional[str] = None) -> str:
  """The step directory to load: `checkpoint` resolved, else the best, else the latest."""
  if checkpoint:
    path = storage.path(checkpoint)
    if not path.exists():
      raise CheckpointError(f'checkpoint {path} does not exist')
    try:
      return checkpointing.resolve_checkpoint(path)
    except FileNotFoundError as e:
      raise CheckpointError(
          f'no finished checkpoint under {path} (expected <step>/state, '
          'checkpoints/<step>/state or best/<step>/state)'
      ) from e
  for sub in ('best', 'checkpoints'):
    found = checkpointing.latest_step_dir(storage.path(workdir) / sub)
    if found:
      return found
  raise CheckpointError(
      f'no finished checkpoint in workdir {storage.path(workdir)}: looked for '
      'best/<step>/state and checkpoints/<step>/state'
  )


_MAX_KEYS = 20


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  return {'/'.join(k): tuple(v.shape) for k, v in flat.items()}


def check_params_fit(params, expected, *, where: str) -> None:
  """Raises CheckpointError listing every missing, unexpected and misshapen key at once."""
  got, want = _flat_shapes(params), _flat_shapes(expected)
  missing = sorted(want.keys() - got.keys())
  unexpected = sorted(got.keys() - want.keys())
  misshapen = [
      f'{k}: checkpoint {got[k]} vs model {want[k]}'
      for k in sorted(want.keys() & got.keys())
      if got[k] != want[k]
  ]
  if missing or unexpected or misshapen:
    # Every kind of mismatch at once; long lists cut so the message stays readable.
    shown = lambda keys: ', '.join(keys[:_MAX_KEYS]) + (  # noqa: E731
        f', ... ({len(keys) - _MAX_KEYS} more)' if len(keys) > _MAX_KEYS else ''
    )
    parts = [
        f'{name} ({len(keys)}): {shown(keys)}'
        for name, keys in (
            ('missing from the checkpoint', missing),
            ('not in the model', unexpected),
            ('different shapes', misshapen),
        )
        if keys
    ]
    raise CheckpointError(
        f"checkpoint {where} does not fit the config's model; " + '; '.join(parts)
    )


def check_params_finite(params, *, where: str) -> None:
  """Raises CheckpointError naming the parameters that hold NaN or infinity."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  bad = sorted('/'.join(k) for k, v in flat.items() if not np.all(np.isfinite(np.asarray(v))))
  if bad:
    shown = ', '.join(bad[:_MAX_KEYS]) + (
        f', ... ({len(bad) - _MAX_KEYS} more)' if len(bad) > _MAX_KEYS else ''
    )
    raise CheckpointError(
        f'checkpoint {where} has non-finite parameters ({len(bad)}: {shown}); '
        'it comes from a diverged run: evaluate another checkpoint'
    )


def load_params(config, checkpoint_dir: str, spec):
  """(model, host params) of a run's checkpoint, checked against the config's model."""
  task = tasks.get(config.task)
  model = task.build_model(config, spec)
  expected = jax.eval_shape(
      lambda: task.init_params(model, jax.random.key(0), tuple(config.data.image_size))
  )
  params = checkpointing.load_params(checkpoint_dir)  # Its errors name the step dir and file.
  check_params_fit(params, expected, where=checkpoint_dir)
  check_params_finite(params, where=checkpoint_dir)
  return model, jax.device_get(params)


def checkpoint_step(checkpoint_dir: str) -> Optional[int]:
  name = storage.path(checkpoint_dir).name
  return int(name) if name.isdigit() else None
