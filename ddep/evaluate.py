r"""Evaluates a trained segmentation run on its dataset's evaluation split.

  python -m ddep.evaluate --workdir=DIR [--config=configs/x.py] [--checkpoint=PATH]

Without --config, the run's own `<workdir>/config.json` is used (overrides then
need --config). Without --checkpoint, the workdir's best checkpoint is taken if
there is one, else its latest. The protocol is the config's `eval.protocol` /
`eval.flip`; the split is `data.eval_split` (default: the dataset's validation).

Prints the per-class table and writes the metrics as JSON next to the
checkpoint, `<checkpoint_dir>/eval_<split>_<protocol>[_flip].json`, so every
number stays with the parameters that produced it.

The loading helpers (`load_config`, `find_checkpoint`, `load_params`) live in ddep.runs.workdir, shared
with `ddep.predict`. Bad input (no checkpoint, a checkpoint that does not fit the
model, an unprepared dataset, a non-segmentation config) exits 1 with one line.
"""

import json
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ddep.config import validation as config_validation
from ddep.data import eval_data
from ddep.data import preparation
from ddep.datasets import specs
from ddep.evaluators import metrics as metrics_lib
from ddep.evaluators import segmentation
from ddep.runs import process
from ddep.runs import storage
from ddep.runs import workdir as workdir_lib
from ddep.training import sharding


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
  checkpoint_dir = workdir_lib.find_checkpoint(workdir, checkpoint)
  model, params = workdir_lib.load_params(config, checkpoint_dir, spec)
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
  eval_iter = eval_data.eval_dataset(
      spec,
      batch_size=int(config.data.eval_batch_size) // jax.process_count(),
      split=split,
      data_dir=config.data.data_dir or None,
      pad_to=tuple(config.data.eval_pad_to) or None,
  )
  result = segmentation.evaluate_segmentation(
      config, model, {'params': params, 'frozen': {}}, mesh, spec, eval_iter=eval_iter
  )

  name = f'eval_{split}_{config.eval.protocol}{"_flip" if config.eval.flip else ""}.json'
  out = dict(
      result,
      dataset=spec.name,
      split=split,
      protocol=config.eval.protocol,
      flip=bool(config.eval.flip),
      step=workdir_lib.checkpoint_step(checkpoint_dir),
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
  flags.DEFINE_string('checkpoint', None, workdir_lib.CHECKPOINT_HELP)
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  process.configure_gc()
  # Before anything touches a JAX backend; ddep.data.stream already keeps TF off accelerators.
  sharding.maybe_initialize_distributed()
  f = flags.FLAGS
  try:
    evaluate(workdir_lib.load_config(f.workdir, f.config), f.workdir, checkpoint=f.checkpoint)
  except (workdir_lib.CheckpointError, FileNotFoundError, config_validation.ConfigError) as e:
    # Bad input, not a bug: one line naming what is wrong, no traceback.
    print(f'ddep.evaluate: error: {e}', file=sys.stderr, flush=True)
    return 2  # As ddep.main: bad input the user can fix.
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
