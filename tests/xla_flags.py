"""XLA flags of every test process, in-process and launched: compile fast, check values.

Tests check values, not speed, and most of the suite's time is cold XLA:CPU compiles of
tiny programs. Measured on the 2-core machine (a cold tiny denoise run, 65 compiles):
optimisation level 0 with the elemental emitters instead of the fusion emitters compiles
in 8.0-8.5 s against 12.6-13.0 s (the whole run 14.2-15.4 s against 19.3-19.8 s).
One LLVM module per program instead of XLA's split for parallel codegen, which on two
cores costs more in per-module set-up than it wins (a cold tiny fine-tuning run, 75
compiles, three runs each: compile CPU 8.4-8.9 s against 10.0-10.4 s). The split changes
how the code is compiled, not what it computes.
"""

FAST_COMPILE = (
    '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false '
    '--xla_cpu_parallel_codegen_split_count=1'
)


def with_devices(count: int) -> str:
  """The flags for a process with `count` host CPU devices."""
  return f'{FAST_COMPILE} --xla_force_host_platform_device_count={count}'
