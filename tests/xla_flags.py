"""XLA flags of every test process, in-process and launched: compile fast, check values.

Tests check values, not speed, and most of the suite's time is cold XLA:CPU compiles of
tiny programs. Measured on the 2-core machine (a cold tiny denoise run, 65 compiles):
optimisation level 0 with the elemental emitters instead of the fusion emitters compiles
in 8.0-8.5 s against 12.6-13.0 s (the whole run 14.2-15.4 s against 19.3-19.8 s).
"""

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def with_devices(count: int) -> str:
  """The flags for a process with `count` host CPU devices."""
  return f'{FAST_COMPILE} --xla_force_host_platform_device_count={count}'
