"""Reading the records of a split and planning a resumable stream over them.

All pipelines run in TensorFlow on the host CPU (importing this module hides
the accelerators from TF). A stream's order is a stateless function of (seed,
epoch): `Plan` says which record comes at which stream position, so a stream
restarts at any position without reading the chunks before it.

Reading. How the records are held depends on their size (`Source`):

* In memory (labelled subsets, or splits of at most 1 GiB encoded): one global
  stream, the same on every process. Every process holds every record; global
  batch k is the stream positions [k*B, (k+1)*B) and process i of n takes its
  slice [k*B + i*B/n, k*B + (i+1)*B/n). The stream does not depend on the
  number of processes, so a run can resume on another process count.
* Streamed from the tfds record files in chunks of `shuffle_chunk` examples
  (each epoch permutes the chunk order and the examples within each chunk, so
  that datasets larger than RAM are shuffled without a stateful shuffle
  buffer). Process i streams only its own equal share: the first floor(N/n)
  examples of the range [N*i/n, N*(i+1)/n) of each split (the remainder, fewer
  than n examples per split, is dropped every epoch), and its stream is keyed
  by the process too. Resuming needs the same process count.

Either way every process has the same examples per epoch, and
`TrainIterator.num_examples` (ddep.data.pipelines) is the global epoch size,
the same on every process. Evaluation (ddep.data.eval_data) reads the ranges
[N*i/n, N*(i+1)/n) (tfds.even_splits) and pads, so that every example counts
once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep.data import preprocess as pp
from ddep.datasets import archives as manual
from ddep.datasets import specs

try:
  # TF is only a host-side data loader: it must never claim accelerator memory.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # Devices were already initialised by someone else; nothing to hide then.
  pass


def host_cores() -> int:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


# Above this many encoded bytes per process a split is streamed from disk.
DEFAULT_MEMORY_LIMIT_BYTES = 1 << 30
_AUTOTUNE = tf.data.AUTOTUNE
# Our dataset functions have no Python control flow on tensors; skipping
# AutoGraph's source conversion makes building a pipeline several times faster.
no_autograph = tf.autograph.experimental.do_not_convert


def builder(spec: specs.DatasetSpec, data_dir: str | None):
  """The prepared builder of `spec`, or an error with the command that prepares it."""
  b = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not b.is_prepared():
    command = manual.prepare_command(spec, data_dir=data_dir)
    raise FileNotFoundError(
        f'Dataset {spec.name!r} ({spec.tfds_name}) is not prepared under data_dir={data_dir!r}; '
        f'prepare it once with\n  {command}\n({manual.DOCS} says which archives to download).'
    )
  return b


def process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Only when the caller did not say; this initialises the backend.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  return int(process_index), int(process_count)


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of the examples that `process_index` reads; disjoint, covering."""
  return (
      num_examples * process_index // process_count,
      num_examples * (process_index + 1) // process_count,
  )


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """A run of consecutive records in one file: records [skip, skip+take)."""

  filename: str
  skip: int
  take: int
  records_in_file: int


def _file_chunks(builder, split: str, start: int, end: int, max_take: int) -> list[_Chunk]:
  if end <= start:
    return []
  chunks = []
  for fi in builder.info.splits[f'{split}[{start}:{end}]'].file_instructions:
    for off in range(0, fi.take, max_take):
      chunks.append(
          _Chunk(fi.filename, fi.skip + off, min(max_take, fi.take - off), fi.examples_in_shard)
      )
  assert sum(c.take for c in chunks) == end - start, (split, start, end)
  return chunks


class DamagedFileError(ValueError):
  """A record file whose bytes fail their checksum (a corrupted or partly copied shard)."""


def _reader_message(error: tf.errors.OpError) -> str:
  """The reader's own words ('corrupted record at 68593'), without TF's op decorations."""
  line = error.message.splitlines()[0]
  line = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', line)
  return re.sub(r'\s*\[Op:\w+\].*$', '', line).strip()


def damaged_file_error(
    spec_name: str, filenames: Sequence[str], error: tf.errors.DataLossError
) -> DamagedFileError:
  """The error naming which of `filenames` is damaged (each is read to its end to find it;
  this runs only once a read has failed)."""
  bad = []
  for filename in dict.fromkeys(filenames):
    try:
      for _ in tf.data.TFRecordDataset(filename):
        pass
    except tf.errors.DataLossError:
      bad.append(filename)
  where = ', '.join(bad) if bad else f'one of {len(set(filenames))} record files'
  return DamagedFileError(
      f'{where}: damaged record file of {spec_name} ({_reader_message(error)}); '
      f'rebuild it with ddep.prepare (or restore the file): skip_bad_examples skips bad '
      'images and labels, not damaged files'
  )


def _read_records(chunks: Sequence[_Chunk]) -> tf.data.Dataset:
  """Serialized records of `chunks`, in order."""
  if not chunks:
    return tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))

  @no_autograph
  def read(filename, skip, take):
    return tf.data.TFRecordDataset(filename).skip(skip).take(take)

  return tf.data.Dataset.from_tensor_slices(
      (
          tf.constant([c.filename for c in chunks]),
          tf.constant([c.skip for c in chunks], tf.int64),
          tf.constant([c.take for c in chunks], tf.int64),
      )
  ).flat_map(read)


def _deserialize(spec: specs.DatasetSpec, features, record):
  """Record -> feature dict with images still encoded (decoded later, where errors are caught)."""
  decoders = {
      k: tfds.decode.SkipDecoding()
      for k in (spec.image_key, spec.label_key)
      # Not the opaque bytes of a decoded copy (ddep.data.decoded_copy): nothing to skip.
      if k in features and isinstance(features[k], tfds.features.Image)
  }
  return features.deserialize_example(record, decoders=decoders)


def _read_ids(records: tf.data.Dataset) -> list[str]:
  """The image ids of serialized records, in order.

  Only the id is parsed, a batch at a time: deserializing whole examples through TFDS
  costs a function trace per pipeline, seconds per run on a small CPU.
  """
  spec = {'image_id': tf.io.FixedLenFeature([], tf.string)}

  @no_autograph
  def parse(batch):
    return tf.io.parse_example(batch, spec)['image_id']

  return [i.decode() for ids in records.batch(4096).map(parse).as_numpy_iterator() for i in ids]


class Source:
  """The records one process reads, addressable as (chunk id, index in chunk).

  In memory there is a single chunk holding every record; on disk the chunks
  are file ranges of at most `shuffle_chunk` records.

  `layout` says which records: 'global' (training in memory: every record of
  every split, on every process), 'equal_shards' (training streamed: this
  process's floor(N/n) records of each split) or 'ranges' (evaluation: this
  process's range of tfds.even_splits, sizes differing by one). 'auto' is
  'global' when the records fit in memory (or `in_memory` is True), else
  'equal_shards'.
  """

  def __init__(
      self,
      spec: specs.DatasetSpec,
      builder,
      splits: Sequence[str],
      process_index: int,
      process_count: int,
      *,
      subset_ids: Sequence[str] | None,
      in_memory: bool | None,
      shuffle_chunk: int,
      layout: str = 'auto',
      memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
  ):
    self.spec = spec
    self.features = builder.info.features
    max_take = max(1, shuffle_chunk)

    def chunks_of(kind):
      chunks = []
      for split in splits:
        n = builder.info.splits[split].num_examples
        start, end = (0, n) if kind == 'global' else process_range(n, process_index, process_count)
        if kind == 'equal_shards':
          end = start + n // process_count
        chunks += _file_chunks(builder, split, start, end, max_take=max_take)
      return chunks

    if layout == 'auto':
      if subset_ids is not None:
        in_memory = True  # Subsets are small; streaming would read the whole split per epoch.
      elif in_memory is None:
        # The same decision on every process: it depends on the global files only.
        in_memory = self._estimated_bytes(chunks_of('global')) <= memory_limit_bytes
      layout = 'global' if in_memory else 'equal_shards'
    elif in_memory is None:
      in_memory = False
    if layout not in ('global', 'equal_shards', 'ranges'):
      raise ValueError(f'unknown layout {layout!r}')
    if subset_ids is not None and layout != 'global':
      raise ValueError("a labelled subset is chosen over the whole split: it needs layout='global'")
    self.layout = layout
    # Whether the stream (order and augmentation) is the same on every process.
    self.is_global = layout == 'global'
    chunks = chunks_of(layout)
    self.in_memory = bool(in_memory)
    if self.in_memory:
      try:
        records = list(_read_records(chunks).as_numpy_iterator())
      except tf.errors.DataLossError as e:
        raise damaged_file_error(spec.name, [c.filename for c in chunks], e) from None
      if subset_ids is not None:
        wanted = set(subset_ids)
        ids = self.parse_ids(records)
        records = [r for r, i in zip(records, ids) if i in wanted]
      self._records = tf.constant(records, tf.string, shape=[len(records)])
      # Captured by the tf.data graph as one dataset rather than re-embedded as a constant.
      self._records_ds = tf.data.Dataset.from_tensors(self._records)
      self.chunk_sizes = [len(records)]
    else:
      self._chunks = chunks
      self.chunk_sizes = [c.take for c in chunks]
    self.filenames = [c.filename for c in chunks]
    self.num_examples = int(sum(self.chunk_sizes))
    # Examples per epoch over all processes: the same number on every process.
    self.global_num_examples = self.num_examples * (1 if self.is_global else process_count)

  @staticmethod
  def _estimated_bytes(chunks):
    sizes = {}
    total = 0
    for c in chunks:
      if c.filename not in sizes:
        sizes[c.filename] = tf.io.gfile.stat(c.filename).length
      # Records in a file are of similar size; a proportional share is enough here.
      total += sizes[c.filename] * c.take / max(1, c.records_in_file)
    return total

  def parse_ids(self, records: Sequence[bytes]) -> list[str]:
    return _read_ids(tf.data.Dataset.from_tensor_slices(tf.constant(list(records), tf.string)))

  def deserialize(self, record):
    return _deserialize(self.spec, self.features, record)

  def chunk_records(self, chunk_id) -> tf.data.Dataset:
    """One element: every serialized record of chunk `chunk_id` as a string vector."""
    if self.in_memory:
      return self._records_ds
    files = tf.constant([c.filename for c in self._chunks])
    skips = tf.constant([c.skip for c in self._chunks], tf.int64)
    takes = tf.constant([c.take for c in self._chunks], tf.int64)
    take = takes[chunk_id]
    records = tf.data.TFRecordDataset(files[chunk_id]).skip(skips[chunk_id]).take(take)
    return records.batch(take)

  def record(self, chunk_id: int, index: int) -> bytes:
    if self.in_memory:
      return self._records[index].numpy()
    c = self._chunks[chunk_id]
    ds = tf.data.TFRecordDataset(c.filename).skip(c.skip + index).take(1)
    return next(ds.as_numpy_iterator())


def read_split_ids(builder, split: str) -> list[str]:
  """Every image id of `split`, in storage order."""
  n = builder.info.splits[split].num_examples
  return _read_ids(_read_records(_file_chunks(builder, split, 0, n, max_take=n)))


# ---------------------------------------------------------------------------
# Stream plans: which record comes at which stream position.


def check_seed(seed: int) -> int:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  return int(seed)


def fold(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=pp.ALG)


def _permutation(n, key):
  # int64 sort keys: float32 ones would tie often for n in the thousands.
  keys = tf.random.stateless_uniform(
      [n], seed=key, minval=None, maxval=None, dtype=tf.int64, alg=pp.ALG
  )
  return tf.argsort(keys, stable=True)


@dataclasses.dataclass(frozen=True)
class Slots:
  """Which positions of a global stream one process reads, in local order.

  Global batch k is the positions [k*B, (k+1)*B) with B = local_batch *
  count; process `index` reads the `local_batch` positions from
  k*B + index*local_batch. Its j-th slot (local order) is `to_global(j)`.
  count=1 is the identity: a stream of the process's own.
  """

  local_batch: int
  index: int = 0
  count: int = 1

  @property
  def global_batch(self) -> int:
    return self.local_batch * self.count

  def to_global(self, slot):
    k, r = np.divmod(slot, self.local_batch)
    return k * self.global_batch + self.index * self.local_batch + r

  def to_slot(self, position):
    """The local slot of a global position this process reads."""
    k, r = np.divmod(position, self.global_batch)
    return k * self.local_batch + r - self.index * self.local_batch

  def mine(self, positions):
    """Mask (TF) of the global positions this process reads."""
    if self.count == 1:
      return tf.ones_like(positions, tf.bool)
    return tf.equal(positions % self.global_batch // self.local_batch, self.index)


class Plan:
  """Epoch e reads the chunks in a random order and each chunk in a random order.

  Both orders are stateless functions of (seed, stream, epoch[, chunk]), in
  TF so that they run inside the tf.data graph and eagerly for look-ups.
  `stream` is 0 for the global stream, or a process's own index.
  """

  def __init__(
      self, chunk_sizes: Sequence[int], *, seed: int, stream: int, shuffle: bool, repeat: bool
  ):
    self.chunk_sizes = list(chunk_sizes)
    self.n = int(sum(chunk_sizes))
    self.shuffle, self.repeat = shuffle, repeat
    # Odd second word: augmentation keys use even ones (ddep.data.examples.Examples), so
    # the streams never share keys.
    self._key = tf.constant([check_seed(seed), 2 * stream + 1], tf.int64)
    self._sizes = tf.constant(self.chunk_sizes, tf.int64)

  def chunk_order(self, epoch):
    c = len(self.chunk_sizes)
    return _permutation(c, fold(self._key, epoch)) if self.shuffle else tf.range(c, dtype=tf.int32)

  def record_order(self, epoch, chunk_id):
    size = self._sizes[chunk_id]
    if not self.shuffle:
      return tf.range(size, dtype=tf.int32)
    return _permutation(size, fold(fold(self._key, epoch), tf.cast(chunk_id, tf.int64) + (1 << 40)))

  def dataset(
      self,
      start_position: int,
      read_chunk: Callable,
      slots: Slots | None = None,
      per_chunk: Callable | None = None,
  ) -> tf.data.Dataset:
    """{'record', '_pos'} from `start_position` on; `read_chunk(id)` yields a chunk's records once.

    With `slots`, only the positions that process reads (the others are never decoded).
    `per_chunk(records)`, if given, maps the dataset of each chunk's picked records
    apart from the chunk's read, so errors it ignores (undecodable images) are never a
    failed read's: ignore_errors() downstream of a damaged record file would retry the
    failing read forever.
    """
    slots = slots or Slots(1)
    start_epoch, start_offset = divmod(start_position, self.n)
    n = tf.constant(self.n, tf.int64)

    @no_autograph
    def epoch_stream(epoch):
      offset = tf.where(tf.equal(epoch, start_epoch), tf.constant(start_offset, tf.int64), 0)
      order = tf.cast(self.chunk_order(epoch), tf.int64)
      sizes = tf.gather(self._sizes, order)
      ends = tf.cumsum(sizes)
      keep = ends > offset  # Chunks that end before the resume point are not read at all.

      @no_autograph
      def chunk_stream(chunk_id, start):
        lo = tf.maximum(offset - start, 0)
        records_order = self.record_order(epoch, chunk_id)[lo:]
        positions = epoch * n + start + tf.range(lo, self._sizes[chunk_id], dtype=tf.int64)
        mine = slots.mine(positions)
        records_order = tf.boolean_mask(records_order, mine)
        positions = tf.boolean_mask(positions, mine)

        @no_autograph
        def pick(records):
          return {'record': tf.gather(records, records_order), '_pos': positions}

        picked = read_chunk(chunk_id).map(pick)
        if per_chunk is None:
          return picked.unbatch()
        return picked.flat_map(
            lambda records: per_chunk(tf.data.Dataset.from_tensor_slices(records))
        )

      chunks = tf.data.Dataset.from_tensor_slices((order[keep], (ends - sizes)[keep]))
      return chunks.flat_map(chunk_stream)

    epochs = (
        tf.data.Dataset.range(start_epoch, start_epoch + 1)
        if not self.repeat
        else tf.data.Dataset.range(start_epoch, 1 << 62)
    )
    return epochs.flat_map(epoch_stream)

  def locate(self, position: int) -> tuple[int, int]:
    """(chunk id, index in chunk) of the record at stream `position`."""
    epoch, offset = divmod(position, self.n)
    for chunk_id in self.chunk_order(epoch).numpy():
      size = self.chunk_sizes[chunk_id]
      if offset < size:
        return int(chunk_id), int(self.record_order(epoch, int(chunk_id))[offset])
      offset -= size
    raise IndexError(position)
