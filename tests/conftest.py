"""Shared test settings: short XLA compiles, a compilation cache, TensorFlow off accelerators."""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests check values, not speed; fewer optimizations compile much faster on CPU.
# Two host devices, so shardings (data parallel, FSDP) are exercised for real.
os.environ.setdefault(
  'XLA_FLAGS', '--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2'
)
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
# Many tests (and their subprocesses, which inherit these) compile the same tiny
# train step; the persistent cache turns the repeats into cache hits.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_REPO, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)
