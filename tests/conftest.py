"""Shared test settings: short XLA compiles, a compilation cache, TensorFlow off accelerators."""

import os

import xla_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests check values, not speed; fewer optimizations compile much faster on CPU (xla_flags).
# Two host devices, so shardings (data parallel, FSDP) are exercised for real.
os.environ.setdefault('XLA_FLAGS', xla_flags.with_devices(2))
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
# Many tests (and their subprocesses, which inherit these) compile the same tiny
# train step; the persistent cache turns the repeats into cache hits.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_REPO, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

from ddep.runs import process  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)
# As the programs do (ddep.runs.process): the in-process runs trace as they would.
process.configure_gc()


# The files that take longest (by `--durations`: test_train ~9 min of one worker, the
# others 3-7 min, test_evaluate_predict 1.5 min, test_folder_dataset 1 min; the rest well
# under a minute), scheduled
# first so that with `-n 3 --dist loadfile` the short files fill in at the end instead of
# one long file running alone on one worker while the other idles.
_SLOW_FILES_FIRST = (
    'test_train.py',
    'test_configs.py',
    'test_benchmark.py',
    'test_multihost.py',
    'test_demo.py',
    'test_models.py',
    'test_evaluate_predict.py',
    'test_folder_dataset.py',
)


def pytest_configure(config):
  # xdist sorts files by their number of tests unless told not to, which puts the few-test,
  # long subprocess files (demo, multihost) last.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return _SLOW_FILES_FIRST.index(name) if name in _SLOW_FILES_FIRST else len(_SLOW_FILES_FIRST)

  items.sort(key=rank)  # Stable: the order within each file is kept.
