"""Orbax checkpoints of the train state and of every process's input-pipeline position.

Layout under a workdir:
  checkpoints/<step>/state          the last `keep` periodic checkpoints (async)
  checkpoints/<step>/data/metadata  {"process_<i>": iterator state} of every process (JSON)
  best/<step>/state                 the best by validation mIoU

Both items of a step are committed together and deleted together. Older runs kept
the iterator states in checkpoints/data_state/<step>/process_<i>.json; those still
restore.
"""

import json
import re
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # No public path.

from ddep.runs import storage
from ddep.training import optimizer
from ddep.training import sharding

# Orbax splits every replicated array among its replicas so that hosts share the writing
# ("replica-parallel"); each split is an eager device slice. For a bias or a norm scale
# that costs more than it saves, and those are 10 of a ViT block's 16 leaves. Arrays whose
# per-replica part is smaller than this are written whole by one replica. Measured on a
# tiny fine-tuning run (all arrays below it): a save took 0.58-0.65 s, against 0.76-0.84 s.
MIN_REPLICA_SLICE_BYTES = 256 * 1024
ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
        # As orbax's default handler: the per-array metadata files are still written.
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    ),
    override=True,
)


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or does not fit the config's model."""


def _exception_chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def describe_damage(step_dir: str, error: BaseException) -> str:
  """'<file>: <what is wrong>' for a step directory that orbax failed to read.

  Orbax and TensorStore report damage by array key and byte range, not by file:
  the files are checked first, then the file of the reported size is looked for.
  """
  state = storage.path(step_dir) / 'state'
  metadata = state / '_METADATA'
  if not metadata.exists():
    return f'{metadata}: missing (it lists the arrays of the checkpoint)'
  try:
    json.loads(metadata.read_text())
  except (OSError, ValueError) as e:
    return f'{metadata}: unreadable ({type(e).__name__}: {e})'
  manifest = state / 'manifest.ocdbt'
  if (state / 'd').is_dir() and not manifest.exists():
    # OCDBT's index of the array files; TensorStore reports it as its whole spec.
    return f'{manifest}: missing (the index of the array files in {state / "d"})'
  data = storage.path(step_dir) / 'data' / 'metadata'  # orbax's JsonSave file.
  if data.exists():
    try:
      json.loads(data.read_text())
    except (OSError, ValueError) as e:
      return f'{data}: unreadable input-pipeline state ({type(e).__name__}: {e})'
  text = ' '.join(str(c) for c in _exception_chain(error))
  key = re.search(r'Error reading "([^"]+)"', text)
  size = re.search(r'not valid for value of size (\d+)', text)
  if size:
    files = [str(f) for f in storage.files_below(state) if f.stat().length == int(size.group(1))]
    array = f' (array {key.group(1).split("/")[0]})' if key else ''
    if files:
      return f'{", ".join(sorted(files))}: truncated to {size.group(1)} bytes{array}'
  first = next((str(c) for c in _exception_chain(error) if 'Error reading' in str(c)), str(error))
  return f'{state}: {type(error).__name__}: {first.splitlines()[0][:500]}'


class Checkpointer:
  """Periodic (last N) and best checkpoints of one run."""

  def __init__(
      self, workdir: str, *, keep: int, async_save: bool = True, best_metric: str = 'miou'
  ):
    workdir = storage.path(workdir)
    self.directory = workdir / 'checkpoints'
    _remove_leftover_temporaries(self.directory, workdir / 'best')
    self._data_dir = self.directory / 'data_state'
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=opts)
    best_opts = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[best_metric],
        best_mode='max',
        keep_checkpoints_without_metrics=False,
        enable_async_checkpointing=async_save,
    )
    self._best = ocp.CheckpointManager(workdir / 'best', options=best_opts)
    self._best_metric = best_metric  # Higher is better: val mIoU, or a denoise run's PSNR.

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes agreed to save at `step` after a preemption notice (SIGTERM)."""
    return self._manager.reached_preemption(step)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict] = None) -> None:
    """Saves `state` and, as a second item of the same step, every process's `data_state`."""
    items = dict(state=ocp.args.StandardSave(state))
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(_gather_data_states(data_state))
    self._manager.save(step, args=ocp.args.Composite(**items))
    self._prune_data_states()

  def save_best(self, step: int, state: Any, value: float) -> None:
    """Offers `state` as best/ and returns once that save is complete on storage.

    Synchronous on purpose: the evaluation's metrics rows are written after it, so a
    resume that finds no rows for an evaluation step knows its best/ save may not have
    finished, and evaluates again. A step already in best/ (an evaluation repeated after
    a kill) is complete and is kept as it is.
    """
    if step not in self._best.all_steps():
      self._best.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
          metrics={self._best_metric: float(value)},
      )
    self._best.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Optional[dict]]:
    """The train state and this process's input-pipeline state of `step`.

    A damaged step raises one CheckpointError naming its directory and file; nothing
    is deleted (the previous complete steps stay, for a person to choose).
    """
    step_dir = self.directory / str(step)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if (step_dir / 'data').is_dir():
      items['data'] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many kinds for unreadable data.
      raise CheckpointError(self._damaged(step, describe_damage(step_dir, e))) from e
    if 'data' in items:
      states = restored['data'] or {}
      # Another process count: a global stream resumes from any process's position
      # (the iterator checks that it can).
      own = states.get(f'process_{jax.process_index()}', states.get('process_0'))
      return restored['state'], own
    return restored['state'], self._legacy_data_state(step)

  def _legacy_data_state(self, step: int) -> Optional[dict]:
    """This process's iterator state from the layout before the 'data' item."""
    d = self._data_dir / str(step)
    path = d / f'process_{jax.process_index()}.json'
    if not path.exists():
      # Another process count: a global stream resumes from any process's position
      # (the iterator checks that it can).
      path = d / 'process_0.json'
    data_state = None
    if path.exists():
      try:
        data_state = json.loads(path.read_text())
      except (OSError, ValueError) as e:
        raise CheckpointError(
            self._damaged(
                step, f'{path}: unreadable input-pipeline state ({type(e).__name__}: {e})'
            )
        ) from e
    return data_state

  def resume_error(self, step: int, what: str) -> CheckpointError:
    """The error for a step that cannot be resumed from: `what`, and which step to fall back to."""
    return CheckpointError(self._damaged(step, what))

  def _damaged(self, step: int, what: str) -> str:
    older = [s for s in self._manager.all_steps() if s < step]
    hint = (
        f'the previous complete step is {max(older)}: move {self.directory}/{step} aside '
        'to resume from it'
        if older
        else 'no earlier step is saved'
    )
    return (
        f'cannot resume from checkpoint {self.directory}/{step}: {what}. Nothing was deleted; '
        f'{hint}.'
    )

  def _prune_data_states(self) -> None:
    if jax.process_index() != 0 or not self._data_dir.is_dir():
      return
    keep = {str(s) for s in self._manager.all_steps()}
    names = [d.name for d in self._data_dir.iterdir()]
    # Keep the step being saved right now too (not yet in all_steps while async).
    newest = max((int(s) for s in names if s.isdigit()), default=None)
    for name in names:
      if name.isdigit() and name not in keep and int(name) != newest:
        (self._data_dir / name).rmtree(missing_ok=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
    self._best.close()


def _remove_leftover_temporaries(*directories) -> None:
  """Deletes the temporaries of saves that a kill interrupted, with a log line each.

  They are never read (a step without its final name does not exist for orbax), but
  they hold a full state's bytes and confuse a person looking at the workdir. Only one
  run uses a workdir at a time (ddep.runs.lock), so none of them is being written.
  """
  if jax.process_index() != 0:
    return
  for directory in directories:
    if not directory.is_dir():
      continue
    for child in directory.iterdir():
      if '.orbax-checkpoint-tmp' in child.name:
        logging.warning('removing %s, left by a save that was interrupted', child)
        child.rmtree(missing_ok=True)


def _gather_data_states(data_state: dict) -> dict:
  """{'process_<i>': state} of every process, on every process (orbax writes it once)."""
  return {f'process_{i}': state for i, state in enumerate(sharding.allgather_json(data_state))}


def latest_step_dir(directory: str) -> Optional[str]:
  """`directory/<step>` of the newest finished save, or None.

  Only finished saves have a 'state' item; orbax's temporaries are not named <int>.
  """
  directory = storage.path(directory)
  if not directory.is_dir():
    return None
  steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / 'state').is_dir()]
  return str(directory / str(max(steps))) if steps else None


def resolve_checkpoint(path: str) -> str:
  """`path` may be a workdir, its checkpoints/ or best/ dir, or one step's dir.

  Returns the directory holding the 'state' item. Errors name what was looked for.
  """
  path = storage.path(path)
  if not path.exists():
    raise FileNotFoundError(f'init_from: {path} does not exist')
  if (path / 'state').is_dir():
    return str(path)
  found = latest_step_dir(path / 'checkpoints') or latest_step_dir(path)
  if found:
    return found
  raise FileNotFoundError(
      f'init_from: no finished checkpoint under {path} '
      '(expected <workdir>/checkpoints/<step>/state)'
  )


def _restore_on_one_device(path: str, keys: tuple[str, ...]) -> dict:
  """The saved tree's top-level entries `keys` (those it has) as host arrays, whatever the
  device topology it was saved from; the other entries are not read at all."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = {k: v for k, v in checkpointer.metadata(path).item_metadata.tree.items() if k in keys}
  # Without a target orbax rebuilds the saved shardings, which needs the saving topology.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  args = ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True,
  )
  return jax.device_get(checkpointer.restore(path, args=args))


def load_params(path: str) -> dict:
  """Host (numpy) params of a saved run: trainable and frozen parts merged."""
  ckpt = resolve_checkpoint(path)
  try:
    # Not the optimizer state: for Adam that is two thirds of the bytes.
    state = _restore_on_one_device(storage.path(ckpt) / 'state', keys=('params', 'frozen'))
  except Exception as e:  # Orbax raises many kinds for unreadable data.
    raise CheckpointError(f'cannot read checkpoint {ckpt}: {describe_damage(ckpt, e)}') from e
  return optimizer.merge(state.get('params') or {}, state.get('frozen') or {})
