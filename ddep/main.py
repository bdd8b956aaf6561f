r"""Entry point: `python -m ddep.main --config=configs/<experiment>.py --workdir=DIR`.

Overrides: `--config.key=value`; experiment arguments: `--config=configs/x.py:arg=v,runlocal`.
`--dry_run` prints the resolved config, validates it for this machine's devices and exits.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddep.runs import process

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and logs go.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run',
    False,
    'Print the resolved config, validate it and exit: nothing is read, ' 'built or written.',
)


# Exit codes: bad input the user can fix (config, checkpoint, data), as absl's usage errors;
# a run that failed (non-finite loss); a preempted run to restart (EX_TEMPFAIL).
BAD_INPUT_EXIT_CODE = 2
FAILED_EXIT_CODE = 1


def dry_run(config, workdir: str) -> int:
  """The config as training would see it; checked for this machine's device count."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddep.config import validation as config_validation  # pylint: disable=g-import-not-at-top

  print(config, flush=True)
  try:
    config_validation.validate(config, num_devices=jax.device_count())
  except config_validation.ConfigError as e:
    print(f'ddep.main: error: {e}', file=sys.stderr, flush=True)
    return BAD_INPUT_EXIT_CODE
  print(
      f'ddep.main: config valid for {jax.device_count()} {jax.default_backend()} devices; '
      f'--dry_run, so nothing was written to {workdir}',
      flush=True,
  )
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _DRY_RUN.value:
    return dry_run(_CONFIG.value, _WORKDIR.value)
  process.configure_gc()
  # Import after flag parsing so `--help` stays fast and TF never sees the accelerator.
  from ddep.training import sharding  # pylint: disable=g-import-not-at-top

  sharding.maybe_initialize_distributed()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  from ddep.config import validation as config_validation  # pylint: disable=g-import-not-at-top
  from ddep.data import examples  # pylint: disable=g-import-not-at-top
  from ddep.data import stream  # pylint: disable=g-import-not-at-top
  from ddep.models import pretrained  # pylint: disable=g-import-not-at-top
  from ddep.runs import checkpointing  # pylint: disable=g-import-not-at-top
  from ddep.runs import lock  # pylint: disable=g-import-not-at-top
  from ddep.training import trainer as train  # pylint: disable=g-import-not-at-top

  bad_input = (
      checkpointing.CheckpointError,
      config_validation.ConfigError,
      pretrained.CheckpointError,
      examples.BadExampleError,
      stream.DamagedFileError,
      train.ResumeError,
      lock.WorkdirLockedError,
  )

  logging.info('config:\n%s', _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except bad_input as e:
    # Bad input, not a bug: one line naming what is wrong.
    print(f'ddep.main: error: {e}', file=sys.stderr, flush=True)
    return BAD_INPUT_EXIT_CODE
  except train.NonFiniteLossError as e:
    # The run diverged: what is kept is the last finite checkpoint, named in the message.
    print(f'ddep.main: error: {e}', file=sys.stderr, flush=True)
    return FAILED_EXIT_CODE
  except train.Preempted as e:
    # Expected, not a bug: one line, no traceback, and a status that asks for a rerun.
    print(f'ddep.main: {e}', file=sys.stderr, flush=True)
    return train.PREEMPTED_EXIT_CODE
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
