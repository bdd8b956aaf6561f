"""Input pipelines for denoising pretraining, fine-tuning and evaluation.

All pipelines run in TensorFlow on the host CPU and yield process-local numpy
batches. Training streams are exactly resumable: the order of examples is a
stateless function of (seed, epoch), every random augmentation is a stateless
op seeded by (seed, stream position), and an iterator's state is just the next
stream position. Restoring re-plans the stream from that position: chunks
before it are not read, and no skipped record is decoded.

Reading. How the records are held depends on their size:

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
`TrainIterator.num_examples` is the global epoch size, the same on every
process. Evaluation reads the ranges [N*i/n, N*(i+1)/n) (tfds.even_splits)
and pads, so that every example counts once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep.data import preprocess as pp
from ddep.data import decoded_copy
from ddep.datasets import archives as manual
from ddep.datasets import specs

try:
  # TF is only a host-side data loader: it must never claim accelerator memory.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # Devices were already initialised by someone else; nothing to hide then.
  pass


def _host_cores() -> int:
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
_no_autograph = tf.autograph.experimental.do_not_convert

# Paper Sec. 5: labelled-subset sizes used in the label-efficiency tables.
# Keyed by fraction; the totals are the full train splits.
PAPER_SUBSET_COUNTS: dict[str, tuple[int, dict[float, int]]] = {
    'cityscapes': (2975, {1 / 30: 100, 1 / 8: 372, 1 / 4: 744}),
    'pascal_context': (4998, {0.01: 50, 0.05: 250, 0.10: 500, 0.20: 1000}),
    'ade20k': (20210, {0.01: 202, 0.05: 1010, 0.10: 2021, 0.20: 4042}),
}


class BadExampleError(ValueError):
  """An example that cannot be decoded or has inconsistent/out-of-range labels."""


# ---------------------------------------------------------------------------
# Label fractions.


def _subset_family(dataset: str | None) -> str | None:
  if dataset is None:
    return None
  for family in PAPER_SUBSET_COUNTS:
    if dataset == family or dataset.startswith(family + '_'):
      return family
  return None


def subset_size(num_examples: int, fraction: float, dataset: str | None = None) -> int:
  """Number of examples for `fraction` of `num_examples`.

  Uses the paper's exact count when `dataset` is one of its benchmarks and the
  split has the paper's size (the paper's counts do not follow one rounding
  rule), else round-half-up with at least one example.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f'fraction must lie in (0, 1], got fraction={fraction!r}')
  family = _subset_family(dataset)
  if family is not None:
    total, counts = PAPER_SUBSET_COUNTS[family]
    if num_examples == total:
      for f, c in counts.items():
        if math.isclose(f, fraction, rel_tol=1e-6):
          return c
  return max(1, int(math.floor(fraction * num_examples + 0.5)))


def select_subset(
    examples: int | Sequence[str],
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int,
    dataset: str | None = None,
):
  """A deterministic random subset of a split.

  Args:
    examples: the number of examples (-> sorted int indices) or the example
      ids (-> sorted list of ids). Ids are sorted first, so the subset does
      not depend on the order records happen to be stored in.
    fraction / count: exactly one of them. `dataset` selects the paper's
      exact counts for fractions (see subset_size).
    seed: subsets for the same seed are nested (a 1% subset lies inside the
      5% one), different seeds give different subsets.
  """
  if (fraction is None) == (count is None):
    raise ValueError('pass exactly one of fraction= and count=')
  ids = None if isinstance(examples, (int, np.integer)) else sorted({str(i) for i in examples})
  n = int(examples) if ids is None else len(ids)
  if ids is not None and len(ids) != len(examples):
    raise ValueError(f'example ids are not unique ({len(examples) - len(ids)} duplicates)')
  k = subset_size(n, fraction, dataset) if fraction is not None else int(count)
  if not 0 < k <= n:
    raise ValueError(f'count must lie in [1, {n}], got count={k}')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}')
  chosen = np.sort(np.random.default_rng([seed, 0x5B5E7]).permutation(n)[:k])
  return chosen if ids is None else [ids[i] for i in chosen]


def write_subset_ids(path: str, ids: Sequence[str]) -> None:
  """Writes one example id per line (records which labelled subset a run used)."""
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(''.join(f'{i}\n' for i in ids))


def read_subset_ids(path: str) -> list[str]:
  with tf.io.gfile.GFile(path, 'r') as f:
    return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Dataset access.


def _builder(spec: specs.DatasetSpec, data_dir: str | None):
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    command = manual.prepare_command(spec, data_dir=data_dir)
    raise FileNotFoundError(
        f'Dataset {spec.name!r} ({spec.tfds_name}) is not prepared under data_dir={data_dir!r}; '
        f'prepare it once with\n  {command}\n({manual.DOCS} says which archives to download).'
    )
  return builder


def _process_defaults(process_index, process_count):
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


def _read_records(chunks: Sequence[_Chunk]) -> tf.data.Dataset:
  """Serialized records of `chunks`, in order."""
  if not chunks:
    return tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))

  @_no_autograph
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


def _read_ids(spec: specs.DatasetSpec, features, records: tf.data.Dataset) -> list[str]:
  @_no_autograph
  def image_id(record):
    return _deserialize(spec, features, record)['image_id']

  return [
      i.decode() for i in records.map(image_id, num_parallel_calls=_AUTOTUNE).as_numpy_iterator()
  ]


class _Source:
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
      records = list(_read_records(chunks).as_numpy_iterator())
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
    return _read_ids(
        self.spec,
        self.features,
        tf.data.Dataset.from_tensor_slices(tf.constant(list(records), tf.string)),
    )

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


# ---------------------------------------------------------------------------
# Stream plans: which record comes at which stream position.


def _check_seed(seed: int) -> int:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  return int(seed)


def _fold(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=pp._ALG)


def _permutation(n, key):
  # int64 sort keys: float32 ones would tie often for n in the thousands.
  keys = tf.random.stateless_uniform(
      [n], seed=key, minval=None, maxval=None, dtype=tf.int64, alg=pp._ALG
  )
  return tf.argsort(keys, stable=True)


@dataclasses.dataclass(frozen=True)
class _Slots:
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


class _Plan:
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
    # Odd second word: augmentation keys use even ones (see _Examples), so the streams never share keys.
    self._key = tf.constant([_check_seed(seed), 2 * stream + 1], tf.int64)
    self._sizes = tf.constant(self.chunk_sizes, tf.int64)

  def chunk_order(self, epoch):
    c = len(self.chunk_sizes)
    return _permutation(c, _fold(self._key, epoch)) if self.shuffle else tf.range(c, dtype=tf.int32)

  def record_order(self, epoch, chunk_id):
    size = self._sizes[chunk_id]
    if not self.shuffle:
      return tf.range(size, dtype=tf.int32)
    return _permutation(
        size, _fold(_fold(self._key, epoch), tf.cast(chunk_id, tf.int64) + (1 << 40))
    )

  def dataset(
      self, start_position: int, read_chunk: Callable, slots: _Slots | None = None
  ) -> tf.data.Dataset:
    """{'record', '_pos'} from `start_position` on; `read_chunk(id)` yields a chunk's records once.

    With `slots`, only the positions that process reads (the others are never decoded).
    """
    slots = slots or _Slots(1)
    start_epoch, start_offset = divmod(start_position, self.n)
    n = tf.constant(self.n, tf.int64)

    @_no_autograph
    def epoch_stream(epoch):
      offset = tf.where(tf.equal(epoch, start_epoch), tf.constant(start_offset, tf.int64), 0)
      order = tf.cast(self.chunk_order(epoch), tf.int64)
      sizes = tf.gather(self._sizes, order)
      ends = tf.cumsum(sizes)
      keep = ends > offset  # Chunks that end before the resume point are not read at all.

      @_no_autograph
      def chunk_stream(chunk_id, start):
        lo = tf.maximum(offset - start, 0)
        records_order = self.record_order(epoch, chunk_id)[lo:]
        positions = epoch * n + start + tf.range(lo, self._sizes[chunk_id], dtype=tf.int64)
        mine = slots.mine(positions)
        records_order = tf.boolean_mask(records_order, mine)
        positions = tf.boolean_mask(positions, mine)

        @_no_autograph
        def pick(records):
          return {'record': tf.gather(records, records_order), '_pos': positions}

        return read_chunk(chunk_id).map(pick).unbatch()

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


# ---------------------------------------------------------------------------
# Decoding and checking: bad examples fail loudly or are dropped and counted.


def _decode_image(encoded):
  # Only pretraining reads a decoded copy, always through its crop window (below).
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _decode_image_window(encoded, window: Callable):
  """The crop `window(image_shape) -> (begin, size)` of an encoded image, uint8.

  A JPEG is decoded only inside the window (decode_and_crop_jpeg skips the
  IDCT of the blocks outside it), and of an image stored decoded
  (ddep.data.decoded_copy) only the window's rows are read; PNGs cannot be,
  so they are decoded whole and sliced, still in uint8. A JPEG damaged only below
  the window decodes, so pretraining fails on such a file only in the epochs whose
  window reaches the damage (ddep.prepare reads every image; fine-tuning and eval
  decode whole).
  """

  def jpeg():
    begin, size = window(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, tf.concat([begin[:2], size[:2]], 0), channels=3)

  def other():
    image = _decode_image(encoded)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  def not_jpeg():
    return tf.cond(
        decoded_copy.is_decoded(encoded),
        lambda: decoded_copy.decode_window(encoded, window),
        other,
    )

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, not_jpeg)


def _decode_raw_label(encoded):
  return tf.cast(tf.io.decode_image(encoded, channels=1, expand_animations=False)[..., 0], tf.int32)


def _label_problems(spec: specs.DatasetSpec, image, raw, label):
  """A non-empty string describing what is wrong with (image, label), else ''."""
  same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)))
  valid = (label < spec.num_classes) | tf.equal(label, spec.ignore_label)
  size_msg = tf.strings.format(
      'image size {} != label size {}', (tf.shape(image)[:2], tf.shape(label))
  )
  # The stored values, not what label_map made of them (254 for every unknown id).
  bad_values = tf.unique(tf.boolean_mask(raw, ~valid))[0]
  value_msg = tf.strings.format(
      'raw label values {} are not ids of the dataset (label_map sends them outside [0, {}) '
      'and != {})',
      (bad_values, spec.num_classes, spec.ignore_label),
  )
  return tf.where(~same_size, size_msg, tf.where(tf.reduce_all(valid), '', value_msg))


class _Examples:
  """Stream positions -> decoded, checked, augmented examples.

  With `window(image_shape, seed) -> (begin, size)` only that crop of each
  image is decoded (where its format allows) and handed to the transform,
  drawn from the same per-example seed as the transform's.
  """

  def __init__(
      self,
      source: _Source,
      plan: _Plan,
      *,
      seed: int,
      stream: int,
      skip_bad_examples: bool,
      what: str,
      window: Callable | None = None,
  ):
    if window is not None and what == 'segmentation':
      raise ValueError('a decode window would crop the image but not its label')
    self.source, self.plan = source, plan
    self.key = tf.constant([_check_seed(seed), 2 * stream], tf.int64)
    self.skip_bad = skip_bad_examples
    self.what = what  # 'image', 'segmentation' or 'labels': which features to decode.
    self.window = window

  def dataset(
      self,
      start_position: int,
      transform: Callable,
      *,
      batch_size: int,
      drop_remainder: bool,
      slots: _Slots | None = None,
  ):
    spec, source = self.source.spec, self.source

    def decode_image(encoded, pos):
      if self.window is None:
        return _decode_image(encoded)
      seed = _fold(self.key, pos)  # The seed `augment` gives the transform.
      return _decode_image_window(encoded, lambda shape: self.window(shape, seed))

    @_no_autograph
    def decode(ex):
      feats = source.deserialize(ex['record'])
      out = {
          '_pos': ex['_pos'],
          'image_id': feats['image_id'],
          'image': decode_image(feats[spec.image_key], ex['_pos']),
      }
      if self.what == 'segmentation':
        raw = _decode_raw_label(feats[spec.label_key])
        out['label'] = tf.gather(tf.constant(spec.label_map), raw)
        out['_problem'] = _label_problems(spec, out['image'], raw, out['label'])
      else:
        out['_problem'] = tf.constant('')
        if self.what == 'labels':
          out['labels'] = tf.cast(feats[spec.image_labels_key], tf.float32)
      return out

    @_no_autograph
    def check(ex):
      message = tf.strings.format(
          'Bad example in dataset ' + spec.name + ': image_id={} (stream position {}): {}',
          (ex['image_id'], ex['_pos'], ex['_problem']),
      )
      with tf.control_dependencies([tf.debugging.Assert(tf.equal(ex['_problem'], ''), [message])]):
        return {k: tf.identity(v) for k, v in ex.items()}

    @_no_autograph
    def is_good(ex):
      ok = tf.equal(ex['_problem'], '')
      with tf.control_dependencies(
          [
              tf.cond(
                  ok,
                  tf.no_op,
                  lambda: tf.print('Skipping bad example', ex['image_id'], ex['_problem']),
              )
          ]
      ):
        return tf.identity(ok)

    @_no_autograph
    def augment(ex):
      seed = _fold(self.key, ex['_pos'])
      out = transform(ex, seed)
      out['_pos'] = ex['_pos']
      return out

    ds = self.plan.dataset(start_position, source.chunk_records, slots)
    ds = ds.map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)
    # Undecodable images raise inside `decode`; they are dropped here and the
    # Python side notices the gap in stream positions and names the example.
    ds = ds.ignore_errors(log_warning=True)
    if self.skip_bad:
      ds = ds.filter(is_good)
    else:
      ds = ds.map(check, num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.map(augment, num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    # Measured (docs/performance.md): one map instead of `check` + `augment`, and threads
    # of our own rather than TF's shared inter-op pool, save ~8% of the CPU per image.
    options.experimental_optimization.map_fusion = True
    options.threading.private_threadpool_size = _host_cores()
    return ds.with_options(options).prefetch(_AUTOTUNE)

  def image_id_at(self, position: int) -> str:
    chunk_id, index = self.plan.locate(position)
    return self.source.parse_ids([self.source.record(chunk_id, index)])[0]


def _next_numpy(iterator):
  try:
    return {k: v.numpy() for k, v in next(iterator).items()}
  except tf.errors.InvalidArgumentError as e:
    if 'Bad example' in e.message:
      start = e.message.index('Bad example')
      raise BadExampleError(e.message[start:].splitlines()[0]) from None
    raise


# Bad examples named in iterator states and results.json; beyond this only the count grows.
MAX_LISTED_BAD_EXAMPLES = 100


def _log_skipped(examples: _Examples, positions: Sequence[int], what: str) -> list[str]:
  """Logs the skipped examples by id; returns their ids."""
  ids = [examples.image_id_at(p) for p in positions]
  logging.warning(
      '%s skipped %d bad example(s) of %s (undecodable image or label): image_id=%s '
      '(stream positions %s)',
      what,
      len(ids),
      examples.source.spec.name,
      ', '.join(ids),
      list(positions),
  )
  return ids


def _add_listed(listed: list[str], ids: Sequence[str]) -> None:
  """Adds ids not listed yet (a bad example recurs every epoch), up to the cap."""
  for i in ids:
    if len(listed) < MAX_LISTED_BAD_EXAMPLES and i not in listed:
      listed.append(i)


def _undecodable_message(examples: _Examples, missing: Sequence[int]) -> str:
  ids = [examples.image_id_at(p) for p in missing[:5]]
  return (
      f'Bad example in dataset {examples.source.spec.name}: undecodable image or label for '
      f"image_id={', '.join(ids)} (stream positions {list(missing[:5])}); "
      f'pass skip_bad_examples=True to drop such examples.'
  )


# ---------------------------------------------------------------------------
# Resumable training iterators.


def _jsonable(x):
  return json.loads(json.dumps(x))


class TrainIterator:
  """Infinite iterator of process-local numpy batches with an exact, small state.

  The state is {'position', 'step', 'num_bad_examples', 'config',
  'process_index', 'process_count'}; `position` is the stream position of the
  next example this process reads (in the global stream: step * global batch
  + process_index * local batch, unless bad examples were skipped). A new
  iterator built with the same arguments and `state=` (or `set_state`) yields
  exactly the batches the uninterrupted one would have yielded next. A global
  stream's state also resumes on another process count: each process then
  continues with its slice of the same next global batch.
  """

  def __init__(
      self,
      examples: _Examples,
      transform: Callable,
      *,
      slots: _Slots,
      config: dict,
      state: Mapping | None,
      start_step: int = 0,
  ):
    self._examples = examples
    self._transform = transform
    self._slots = slots
    self._batch_size = slots.local_batch
    self._config = _jsonable(config)
    self.subset_ids: list[str] | None = None
    # Examples in the split a subset was drawn from (the denominator of its label fraction).
    self.split_num_examples: int | None = None
    self.set_state(state if state is not None else self._state_at_step(start_step))

  @property
  def num_examples(self) -> int:
    """Examples per epoch over all processes: the same number on every process."""
    return self._examples.source.global_num_examples

  @property
  def num_bad_examples(self) -> int:
    """Bad examples dropped so far (only with skip_bad_examples=True)."""
    return self._num_bad

  @property
  def bad_example_ids(self) -> list[str]:
    """The distinct image ids of the bad examples dropped so far (at most
    MAX_LISTED_BAD_EXAMPLES; `num_bad_examples` counts every drop, each epoch's)."""
    return list(self._bad_ids)

  def _state_at_step(self, step: int) -> dict:
    # Exact unless examples were skipped before `step`; save get_state() to be exact always.
    return self._state(slot=step * self._batch_size, step=step, num_bad=0, bad_ids=[])

  def _state(self, *, slot: int, step: int, num_bad: int, bad_ids: list[str]) -> dict:
    return {
        'position': int(self._slots.to_global(slot)),
        'step': int(step),
        'num_bad_examples': int(num_bad),
        'bad_example_ids': list(bad_ids),
        'config': self._config,
        'process_index': self._slots.index,
        'process_count': self._slots.count,
    }

  def get_state(self) -> dict:
    return self._state(
        slot=self._slot, step=self._step, num_bad=self._num_bad, bad_ids=self._bad_ids
    )

  def set_state(self, state: Mapping) -> None:
    saved = _upgrade_legacy_config(dict(state.get('config', self._config)), self._config)
    if saved != self._config:
      diff = sorted(
          k for k in set(saved) | set(self._config) if saved.get(k) != self._config.get(k)
      )
      if 'process_count' in diff:
        raise ValueError(
            f"Iterator state was saved by {saved.get('process_count')} processes and cannot resume "
            f"on {self._config.get('process_count')}: {self._config['dataset']} is streamed, so "
            'each process reads its own shard; resume with the same number of processes.'
        )
      raise ValueError(
          f'Iterator state was saved with different settings for {diff}: {saved} vs {self._config}'
      )
    position, step = int(state['position']), int(state['step'])
    layout = (int(state.get('process_index', 0)), int(state.get('process_count', 1)))
    if layout == (self._slots.index, self._slots.count):
      self._slot = int(self._slots.to_slot(position))
    else:
      # Another process count: the saved process must sit exactly at the start of its
      # slice of global batch `step`, then this process starts its own slice of it.
      old = _Slots(self._slots.global_batch // layout[1], layout[0], layout[1])
      if position != old.to_global(step * old.local_batch):
        raise ValueError(
            f'Iterator state of process {layout[0]}/{layout[1]} at step {step} is at position '
            f'{position}, not at the start of its slice of the global batch (bad examples were '
            f'skipped), so it cannot resume on {self._slots.count} processes.'
        )
      self._slot = step * self._batch_size
    self._step = step
    self._num_bad = int(state.get('num_bad_examples', 0))
    self._bad_ids = list(state.get('bad_example_ids', []))
    ds = self._examples.dataset(
        int(self._slots.to_global(self._slot)),
        self._transform,
        batch_size=self._batch_size,
        drop_remainder=True,
        slots=self._slots,
    )
    self._iterator = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = _next_numpy(self._iterator)
    got = self._slots.to_slot(batch.pop('_pos'))
    expected = self._slot + np.arange(self._batch_size)
    if not np.array_equal(got, expected):
      missing = sorted(set(range(self._slot, int(got[-1]) + 1)) - set(got.tolist()))
      positions = [int(p) for p in self._slots.to_global(np.asarray(missing))]
      if not self._examples.skip_bad:
        raise BadExampleError(_undecodable_message(self._examples, positions))
      _add_listed(self._bad_ids, _log_skipped(self._examples, positions, 'training'))
    self._num_bad += int(got[-1]) + 1 - self._slot - self._batch_size
    self._slot = int(got[-1]) + 1
    self._step += 1
    return batch


def _upgrade_legacy_config(saved: dict, current: dict) -> dict:
  """A state's config from before global streams (local batch, process in the config).

  One process read the same stream then as now, so such states still restore;
  a multi-process one does not match and is refused.
  """
  saved = _jsonable(saved)
  if 'layout' in saved or saved.get('process_count') != 1:
    return saved
  saved.pop('process_index', None)
  saved.pop('process_count', None)
  saved['layout'] = current.get('layout')
  for key in ('process_index', 'process_count'):
    if key in current:
      saved[key] = 0 if key == 'process_index' else 1
  return saved


def _train_iterator(
    kind: str,
    dataset,
    *,
    splits,
    what: str,
    transform,
    batch_size: int,
    seed: int,
    data_dir,
    process_index,
    process_count,
    start_step: int,
    state,
    skip_bad_examples: bool,
    in_memory,
    shuffle_chunk: int,
    subset_ids=None,
    window: Callable | None = None,
    extra_config: dict,
) -> TrainIterator:
  spec = specs.get(dataset)
  seed = _check_seed(seed)
  process_index, process_count = _process_defaults(process_index, process_count)
  builder = _builder(spec, data_dir)
  source = _Source(
      spec,
      builder,
      splits,
      process_index,
      process_count,
      subset_ids=subset_ids,
      in_memory=in_memory,
      shuffle_chunk=shuffle_chunk,
  )
  if source.num_examples == 0:
    raise ValueError(
        f'{spec.name}: process {process_index}/{process_count} has no examples in {splits}'
    )
  # A global stream is one for all processes; a streamed shard is this process's own.
  if source.is_global:
    stream, slots = 0, _Slots(batch_size, process_index, process_count)
  else:
    stream, slots = process_index, _Slots(batch_size)
  plan = _Plan(source.chunk_sizes, seed=seed, stream=stream, shuffle=True, repeat=True)
  examples = _Examples(
      source,
      plan,
      seed=seed,
      stream=stream,
      skip_bad_examples=skip_bad_examples,
      what=what,
      window=window,
  )
  config = dict(
      kind=kind,
      dataset=spec.name,
      splits=list(splits),
      seed=seed,
      batch_size=batch_size * process_count,  # Global.
      layout=source.layout,
      shuffle_chunk=None if source.in_memory else shuffle_chunk,
      **extra_config,
  )
  if not source.is_global:
    config.update(process_index=process_index, process_count=process_count)
  return TrainIterator(
      examples, transform, slots=slots, config=config, state=state, start_step=start_step
  )


# Inception-style crop + left-right flip, scaled to [-1, 1] (Sec. 5.1): the
# augmentation of both encoder pretraining pipelines, denoising and supervised.
# In two parts, so that the decoder decodes only the crop's window.


def _inception_window(area_range):
  """window(image_shape, seed): the crop, drawn from the first of the seed's two parts."""

  def window(image_shape, seed):
    s_crop, _ = pp.split_seed(seed, 2)
    return pp.inception_crop_window(image_shape, s_crop, area_range=area_range)

  return window


def _inception_augment(crop, seed, out_hw):
  """The decoded window flipped by the seed's second part, then resized to `out_hw`."""
  _, s_flip = pp.split_seed(seed, 2)
  # Flipping commutes with the (mirror-symmetric) resize: flip the uint8 crop, 1 byte per
  # value and on average smaller than the float32 output.
  image = pp.resize_crop(pp.random_flip(crop, s_flip), out_hw)
  return tf.clip_by_value(pp.scale_to_minus1_1(image), -1.0, 1.0)


def pretrain_dataset(
    dataset: str,
    *,
    batch_size: int,
    image_size: Sequence[int] = (512, 512),
    seed: int,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    state: Mapping | None = None,
    area_range: Sequence[float] = (0.05, 1.0),
    skip_bad_examples: bool = False,
    in_memory: bool | None = None,
    shuffle_chunk: int = 1024,
    images: str = 'original',
) -> TrainIterator:
  """Unlabelled images for denoising pretraining: {'image': float32 (B, H, W, 3) in [-1, 1]}.

  Reads the spec's `pretrain_splits` (of `pretrain_tfds_name` if set); inception-style crop + left-right flip
  (paper Sec. 5.1; pretraining at 512x512). `images='decoded'` reads the same images from
  their lossless decoded copy (ddep.data.decoded_copy), which costs no PNG decoding: the
  batches are bit-identical, so a run may switch on resume.
  """
  spec = specs.get(dataset).pretrain_view()
  if images == 'decoded':
    decoded_copy.builder(spec, data_dir)  # Names the command that writes a missing copy.
    spec = decoded_copy.copy_view(spec)
  elif images != 'original':
    raise ValueError(f'images={images!r}: one of {decoded_copy.IMAGES}')
  out_hw = tuple(int(s) for s in image_size)

  def transform(ex, seed):
    return {'image': _inception_augment(ex['image'], seed, out_hw)}

  return _train_iterator(
      'pretrain',
      spec,
      splits=spec.pretrain_splits,
      what='image',
      transform=transform,
      batch_size=batch_size,
      seed=seed,
      data_dir=data_dir,
      process_index=process_index,
      process_count=process_count,
      start_step=start_step,
      state=state,
      skip_bad_examples=skip_bad_examples,
      in_memory=in_memory,
      shuffle_chunk=shuffle_chunk,
      window=_inception_window(area_range),
      extra_config=dict(image_size=list(out_hw), area_range=list(area_range)),
  )


def _resolve_subset(spec, builder, split, subset, subset_seed) -> list[str] | None:
  """The labelled subset's image ids (sorted), or None for the whole split."""
  if subset is None:
    return None
  n = builder.info.splits[split].num_examples
  ids = _read_ids(
      spec, builder.info.features, _read_records(_file_chunks(builder, split, 0, n, max_take=n))
  )
  if isinstance(subset, (float, np.floating)):
    return select_subset(ids, fraction=float(subset), seed=subset_seed, dataset=spec.name)
  if isinstance(subset, (int, np.integer)) and not isinstance(subset, bool):
    return select_subset(ids, count=int(subset), seed=subset_seed)
  chosen = read_subset_ids(subset) if isinstance(subset, str) else [str(i) for i in subset]
  unknown = sorted(set(chosen) - set(ids))
  if unknown:
    raise ValueError(
        f'{len(unknown)} subset ids are not in {spec.name}/{split}, e.g. {unknown[:5]}'
    )
  return sorted(set(chosen))


def finetune_dataset(
    dataset: str,
    *,
    batch_size: int,
    crop_size: Sequence[int],
    seed: int,
    scale_range: Sequence[float] | None = None,
    subset: float | int | Sequence[str] | str | None = None,
    subset_seed: int = 0,
    split: str | None = None,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    state: Mapping | None = None,
    skip_bad_examples: bool = False,
    in_memory: bool | None = None,
    shuffle_chunk: int = 1024,
) -> TrainIterator:
  """Labelled crops: {'image': float32 (B, h, w, 3) in [-1, 1], 'label': int32 (B, h, w)}.

  Labels are train ids with `ignore_label` (255) where unlabelled or padded.
  One random draw per example sets the scale, crop and flip of both image and
  label (paper Sec. 5.1: random crop + left-right flip).

  `subset` picks a labelled subset (paper Sec. 5.2): a fraction in (0, 1]
  (paper counts where known), a count, a sequence of image ids, or a path to
  an id file. The chosen ids are `iterator.subset_ids` (write them to the
  workdir with write_subset_ids); `subset_seed` varies the draw.
  """
  spec = specs.get(dataset)
  split = split or spec.train_split
  crop_hw = tuple(int(s) for s in crop_size)
  builder = _builder(spec, data_dir)
  subset_ids = _resolve_subset(spec, builder, split, subset, subset_seed)

  def transform(ex, seed):
    image, label = pp.joint_random_scale_crop_flip(
        ex['image'],
        ex['label'],
        seed,
        crop_hw,
        scale_range=scale_range,
        ignore_label=spec.ignore_label,
        image_fn=pp.scale_to_minus1_1,  # On the crop: not the whole image in float32.
    )
    return {'image': image, 'label': tf.cast(label, tf.int32)}

  it = _train_iterator(
      'finetune',
      spec,
      splits=(split,),
      what='segmentation',
      transform=transform,
      batch_size=batch_size,
      seed=seed,
      data_dir=data_dir,
      process_index=process_index,
      process_count=process_count,
      start_step=start_step,
      state=state,
      skip_bad_examples=skip_bad_examples,
      in_memory=in_memory,
      shuffle_chunk=shuffle_chunk,
      subset_ids=subset_ids,
      extra_config=dict(
          crop_size=list(crop_hw),
          scale_range=None if scale_range is None else list(scale_range),
          subset_size=None if subset_ids is None else len(subset_ids),
          subset_seed=None if subset_ids is None else subset_seed,
      ),
  )
  it.subset_ids = subset_ids
  it.split_num_examples = builder.info.splits[split].num_examples
  return it


def supervised_dataset(
    dataset: str,
    *,
    batch_size: int,
    image_size: Sequence[int],
    seed: int,
    split: str | None = None,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    state: Mapping | None = None,
    area_range: Sequence[float] = (0.05, 1.0),
    skip_bad_examples: bool = False,
    in_memory: bool | None = None,
    shuffle_chunk: int = 1024,
) -> TrainIterator:
  """Image-level labels for supervised encoder pretraining (the ImageNet-21K stand-in).

  {'image': float32 (B, H, W, 3) in [-1, 1], 'labels': float32 (B, K) multi-hot}.
  """
  spec = specs.get(dataset)
  if spec.image_labels_key is None:
    raise ValueError(
        f'Dataset {spec.name!r} has no image-level labels (DatasetSpec.image_labels_key is None); '
        "supervised_dataset needs e.g. 'demo'."
    )
  out_hw = tuple(int(s) for s in image_size)

  def transform(ex, seed):
    return {'image': _inception_augment(ex['image'], seed, out_hw), 'labels': ex['labels']}

  return _train_iterator(
      'supervised',
      spec,
      splits=(split or spec.train_split,),
      what='labels',
      transform=transform,
      batch_size=batch_size,
      seed=seed,
      data_dir=data_dir,
      process_index=process_index,
      process_count=process_count,
      start_step=start_step,
      state=state,
      skip_bad_examples=skip_bad_examples,
      in_memory=in_memory,
      shuffle_chunk=shuffle_chunk,
      window=_inception_window(area_range),
      extra_config=dict(image_size=list(out_hw), area_range=list(area_range)),
  )


# ---------------------------------------------------------------------------
# Evaluation.


class EvalDataset:
  """Every example of a split exactly once across processes, in storage order.

  Each iteration yields `num_batches` batches (the same number on every
  process, so collective ops line up); padding rows have `_mask` False.
  Keys: 'image' float32 [-1, 1], 'label' int32 train ids at the original
  resolution, '_mask' bool, 'image_id' bytes, and with `pad_to` also
  'orig_hw' int32 (B, 2).
  """

  def __init__(self, examples: _Examples, *, batch_size: int, num_batches: int, pad_to):
    self._examples = examples
    self.batch_size = batch_size
    self.num_batches = num_batches
    self.pad_to = pad_to
    self.num_examples = examples.plan.n
    self.num_bad_examples = 0
    self.bad_example_ids: list[str] = []

  def _transform(self, ex, seed):
    del seed
    ignore = self._examples.source.spec.ignore_label
    image = pp.scale_to_minus1_1(ex['image'])
    label = tf.cast(ex['label'], tf.int32)
    out = {'image_id': ex['image_id'], '_mask': tf.constant(True)}
    if self.pad_to is not None:
      hw = tf.shape(image)[:2]
      fits = tf.debugging.Assert(
          tf.reduce_all(hw <= tf.constant(self.pad_to)),
          [
              'Image larger than pad_to=' + str(self.pad_to) + ': image_id',
              ex['image_id'],
              'size',
              hw,
          ],
      )
      # Gate the padding on the check so its message, not ensure_shape's, is what fails.
      with tf.control_dependencies([fits]):
        out['orig_hw'] = tf.identity(hw)
        image = tf.ensure_shape(pp.pad_to(tf.identity(image), self.pad_to, 0.0), [*self.pad_to, 3])
        label = tf.ensure_shape(
            pp.pad_to(tf.identity(label), self.pad_to, ignore), list(self.pad_to)
        )
    out.update(image=image, label=label)
    return out

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    ds = self._examples.dataset(
        0, self._transform, batch_size=self.batch_size, drop_remainder=False
    )
    iterator = iter(ds)
    template = None
    expected = 0
    self.num_bad_examples, self.bad_example_ids = 0, []
    for _ in range(self.num_batches):
      try:
        batch = _next_numpy(iterator)
      except StopIteration:
        batch = None
      except tf.errors.InvalidArgumentError as e:
        if (
            'to the batch' in e.message
            or 'Cannot batch' in e.message
            or 'different shapes' in e.message
        ):
          raise ValueError(
              f'Images in {self._examples.source.spec.name} differ in size; pass pad_to=(H, W) '
              'to eval_dataset to pad them.'
          ) from e
        if 'larger than pad_to' in e.message:
          start = e.message.index('Image larger')
          raise ValueError(e.message[start:].splitlines()[0]) from None
        raise
      if batch is not None:
        positions = batch.pop('_pos')
        gap = sorted(set(range(expected, int(positions[-1]) + 1)) - set(positions.tolist()))
        if gap and not self._examples.skip_bad:
          raise BadExampleError(_undecodable_message(self._examples, gap))
        if gap:
          self._skipped(gap)
        expected = int(positions[-1]) + 1
        template = template or {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
      if template is None:
        if self.pad_to is None:
          raise ValueError(
              'This process has no eval examples; pass pad_to so padding batches have a shape.'
          )
        template = {
            'image': ((*self.pad_to, 3), np.float32),
            'label': (tuple(self.pad_to), np.int32),
            '_mask': ((), np.bool_),
            'image_id': ((), object),
            'orig_hw': ((2,), np.int32),
        }
      yield _ids_as_bytes(
          _pad_batch(batch, template, self.batch_size, self._examples.source.spec.ignore_label)
      )
    trailing = list(range(expected, self.num_examples))
    if trailing and not self._examples.skip_bad:
      raise BadExampleError(_undecodable_message(self._examples, trailing))
    if trailing:
      self._skipped(trailing)

  def _skipped(self, positions):
    ids = _log_skipped(self._examples, positions, 'evaluation')
    self.num_bad_examples += len(ids)
    _add_listed(self.bad_example_ids, ids)

  def __len__(self):
    return self.num_batches


def _pad_batch(batch, template, batch_size, ignore_label):
  n = 0 if batch is None else len(batch['_mask'])
  if n == batch_size:
    return batch
  out = {}
  for key, (shape, dtype) in template.items():
    fill = {'label': ignore_label, 'image_id': b''}.get(key, 0)
    padded = np.full((batch_size, *shape), fill, dtype=dtype)
    if batch is not None:
      padded[:n] = batch[key]
    out[key] = padded
  return out


def _ids_as_bytes(batch):
  batch['image_id'] = np.array(batch['image_id'].tolist(), dtype=np.bytes_)
  return batch


def eval_dataset(
    dataset: str,
    *,
    batch_size: int,
    split: str | None = None,
    pad_to: Sequence[int] | None = None,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    skip_bad_examples: bool = False,
    in_memory: bool | None = False,
    shuffle_chunk: int = 1024,
) -> EvalDataset:
  """Evaluation batches; see EvalDataset. Images of different sizes need `pad_to`."""
  spec = specs.get(dataset)
  split = split or spec.eval_split
  process_index, process_count = _process_defaults(process_index, process_count)
  builder = _builder(spec, data_dir)
  source = _Source(
      spec,
      builder,
      (split,),
      process_index,
      process_count,
      subset_ids=None,
      in_memory=in_memory,
      shuffle_chunk=shuffle_chunk,
      layout='ranges',
  )
  plan = _Plan(source.chunk_sizes, seed=0, stream=process_index, shuffle=False, repeat=False)
  examples = _Examples(
      source,
      plan,
      seed=0,
      stream=process_index,
      skip_bad_examples=skip_bad_examples,
      what='segmentation',
  )
  total = builder.info.splits[split].num_examples
  largest_shard = -(-total // process_count)
  num_batches = -(-largest_shard // batch_size)
  return EvalDataset(
      examples,
      batch_size=batch_size,
      num_batches=num_batches,
      pad_to=None if pad_to is None else tuple(int(s) for s in pad_to),
  )
