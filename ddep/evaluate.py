r"""Evaluates a trained segmentation run on its dataset's evaluation split.

  python -m ddep.evaluate --workdir=DIR [--config=configs/x.py] [--checkpoint=PATH]

Without --config, the run's own `<workdir>/config.json` is used (overrides then
need --config). Without --checkpoint, the workdir's best checkpoint is taken if
there is one, else its latest. The protocol is the config's `eval.protocol` /
`eval.flip`; the split is `data.eval_split` (default: the dataset's validation).

Prints the per-class table and writes the metrics as JSON next to the
checkpoint, `<checkpoint_dir>/eval_<split>_<protocol>[_flip].json`, so every
number stays with the parameters that produced it.

The loading helpers (`load_config`, `find_checkpoint`, `load_params`) are shared
with `ddep.predict`. Bad input (no checkpoint, a checkpoint that does not fit the
model, an unprepared dataset, a non-segmentation config) exits 1 with one line.
"""

import json
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from ddep.runs import checkpointing
from ddep.config import validation as config_validation
from ddep.data import pipelines as input_pipeline
from ddep.evaluators import metrics as metrics_lib
from ddep.training import sharding
from ddep.runs import storage
from ddep.training import trainer as train
from ddep.datasets import specs
from ddep.data import preparation

CHECKPOINT_HELP = (
    'A step dir (<workdir>/best/<step>), a checkpoints/ or best/ dir (its latest step) or '
    "another workdir (its latest periodic checkpoint); default: this workdir's best, else latest."
)


CheckpointError = checkpointing.CheckpointError


def load_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None):
  """`config` if given, else the run's own config.json."""
  if config is not None:
    return config
  path = storage.path(workdir) / 'config.json'
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


def load_params(config, checkpoint_dir: str, spec):
  """(model, host params) for a segmentation run, checked against the config's model."""
  model = train.build_model(config, num_outputs=spec.num_classes)
  h, w = config.data.image_size
  expected = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3), jnp.float32))['params']
  )
  params = checkpointing.load_params(checkpoint_dir)  # Its errors name the step dir and file.
  check_params_fit(params, expected, where=checkpoint_dir)
  return model, jax.device_get(params)


def checkpoint_step(checkpoint_dir: str) -> Optional[int]:
  name = storage.path(checkpoint_dir).name
  return int(name) if name.isdigit() else None


def check_segmentation_config(config) -> None:
  if config.task != 'segment':
    raise config_validation.ConfigError(
        f"config.task: a {config.task!r} run predicts no segmentation labels; give a 'segment' run"
    )


def evaluate(config, workdir: str, *, checkpoint: Optional[str] = None) -> dict:
  """Evaluates one checkpoint of `workdir`; returns the metrics plus step, checkpoint, json."""
  check_segmentation_config(config)
  config_validation.validate(config, num_devices=jax.device_count())
  spec = specs.get(config.data.dataset)
  checkpoint_dir = find_checkpoint(workdir, checkpoint)
  model, params = load_params(config, checkpoint_dir, spec)
  logging.info('evaluating %s', checkpoint_dir)

  mesh = sharding.make_mesh()
  shardings = sharding.state_shardings(params, mesh, fsdp=bool(config.mesh.fsdp))
  # Global arrays from the identical host copy every process holds.
  params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings
  )

  if config.data.prepare and spec.name.startswith('demo'):
    preparation.prepare_once(spec.name, config.data.data_dir or None)
  split = config.data.eval_split or spec.eval_split
  eval_iter = input_pipeline.eval_dataset(
      spec.name,
      batch_size=int(config.data.eval_batch_size) // jax.process_count(),
      split=split,
      data_dir=config.data.data_dir or None,
      pad_to=tuple(config.data.eval_pad_to) or None,
  )
  result = train.evaluate_segmentation(
      config, model, {'params': params, 'frozen': {}}, mesh, spec, eval_iter=eval_iter
  )

  name = f'eval_{split}_{config.eval.protocol}{"_flip" if config.eval.flip else ""}.json'
  out = dict(
      result,
      dataset=spec.name,
      split=split,
      protocol=config.eval.protocol,
      flip=bool(config.eval.flip),
      step=checkpoint_step(checkpoint_dir),
      checkpoint=checkpoint_dir,
  )
  out['json'] = str(storage.path(checkpoint_dir) / name)
  if jax.process_index() == 0:
    storage.write_text_atomic(out['json'], json.dumps(metrics_lib.json_safe(out), indent=1))
    print(f'{spec.name} {split}, protocol {config.eval.protocol}, checkpoint {checkpoint_dir}')
    print(metrics_lib.format_table(result), flush=True)
    print(f'wrote {out["json"]}')
  return out


def define_flags() -> None:
  # Defined only when run as a program, so that ddep.predict can import this module
  # and define flags of the same names.
  config_flags.DEFINE_config_file(
      'config',
      None,
      'Experiment config file; default: the ' "workdir's config.json.",
      lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'The run to evaluate.')
  flags.DEFINE_string('checkpoint', None, CHECKPOINT_HELP)
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Before anything touches a JAX backend; input_pipeline already keeps TF off accelerators.
  sharding.maybe_initialize_distributed()
  f = flags.FLAGS
  try:
    evaluate(load_config(f.workdir, f.config), f.workdir, checkpoint=f.checkpoint)
  except (CheckpointError, FileNotFoundError, config_validation.ConfigError) as e:
    # Bad input, not a bug: one line naming what is wrong, no traceback.
    print(f'ddep.evaluate: error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
