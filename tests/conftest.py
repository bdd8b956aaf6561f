"""Shared test settings: keep XLA compiles short and TensorFlow off any accelerator."""
import os

# Tests check values, not speed; fewer optimizations compile much faster on CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)
