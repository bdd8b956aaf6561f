"""Device mesh and shardings: a 1-D 'data' mesh, data parallel or FSDP.

Multi-host runs use JAX's own runtime: `jax.distributed.initialize()` and global
arrays assembled from each process's local batch.
"""

import json
import os

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA = 'data'


def maybe_initialize_distributed() -> None:
  """Joins the multi-process runtime when the environment describes several processes.

  `jax.distributed.initialize()` auto-detects TPU pods, SLURM and Open MPI; an
  explicit coordinator can be given with JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if jax.distributed.is_initialized():
    return
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']),
    )
  elif os.environ.get('SLURM_NTASKS', '1') != '1' or os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, num_shards: int) -> P:
  """Shards the largest dimension divisible by the mesh size; small or indivisible
  arrays stay replicated (their all-gathers would cost more than they save)."""
  if num_shards == 1 or int(np.prod(shape)) < 2**14:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_shards == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, *, fsdp: bool):
  n = mesh.shape[DATA]

  def one(x):
    if not fsdp or not hasattr(x, 'shape'):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, n))

  return jax.tree.map(one, abstract_state)


def abstract(tree, shardings):
  """`tree`'s shapes and dtypes (of arrays or ShapeDtypeStructs) with `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles global arrays, sharded over 'data', from this process's local batch."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }


def allgather_json(value) -> list:
  """[value of process 0, value of process 1, ...] of a JSON-able value, on every process."""
  if jax.process_count() == 1:
    return [value]
  text = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(text)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: len(text)] = text
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
