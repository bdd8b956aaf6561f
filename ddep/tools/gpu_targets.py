"""Deviceless XLA:GPU targets: compile a step for an H100 or H200 on a machine without one.

XLA:GPU compiles for a described device (a `GpuTargetConfigProto`) through
`jax.experimental.topologies`, with no GPU, driver or libcuda present. What comes
back is the real GPU program: its buffer assignment (`memory_analysis()`, hence
whether a batch fits), its cuDNN convolutions, Triton gemms and fusions. What it
cannot give: timings, autotuned kernels (cuDNN algorithms and workspaces are
chosen on a device, so a real run needs some more temporary memory), or XLA's
cost analysis (unimplemented for these executables; `ddep.tools.hlo_roofline`
counts the compiled HLO instead).

Needs JAX's CUDA plugin, matching the installed jax, e.g.
`pip install "jax[cuda13]==0.10.2"` (about 5 GB of NVIDIA wheels); not a
dependency of ddep. The plugin refuses to start without a GPU unless
JAX_SKIP_CUDA_CONSTRAINTS_CHECK is set, which `mesh` does.
"""

import os

import numpy as np

# Datasheet figures of the SXM parts; the field names are XLA's
# (stream_executor/device_description.proto). Both are Hopper: 132 SMs at 1.98 GHz.
TARGETS = {
    'h100': dict(
        description='NVIDIA H100 80GB HBM3',
        memory_bytes=85_520_809_984,
        bandwidth=3_352_320_000_000,
    ),
    'h200': dict(
        description='NVIDIA H200', memory_bytes=150_754_820_096, bandwidth=4_800_000_000_000
    ),
}

_TEMPLATE = """\
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 13
  minor: 0
  patch: 0
}}
device_description_str: "{description}"
"""


def target_config(name: str) -> str:
  """The GpuTargetConfigProto text of a known target."""
  if name not in TARGETS:
    raise ValueError(f'unknown GPU target {name!r}; known: {sorted(TARGETS)}')
  return _TEMPLATE.format(**TARGETS[name])


def memory_bytes(name: str) -> int:
  return TARGETS[name]['memory_bytes']


def mesh(name: str, axis: str, num_devices: int = 1):
  """A 1-D mesh of `num_devices` described (not present) GPUs of target `name`."""
  config = target_config(name)
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

  try:
    topology = topologies.get_topology_desc(
        platform='cuda', target_config=config, topology=f'1x1x{num_devices}'
    )
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(
        f'--target {name}: cannot describe a CUDA device ({type(e).__name__}: {e}). '
        'Deviceless GPU compilation needs the CUDA plugin of this jax version, e.g. '
        'pip install "jax[cuda13]==<jax version>", and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 '
        'set before JAX first starts its backends'
    ) from e
  return Mesh(np.asarray(topology.devices[:num_devices]), (axis,))
