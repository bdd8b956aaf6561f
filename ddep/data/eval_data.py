"""Evaluation batches: every example of a split exactly once across processes.

Process i of n reads the range [N*i/n, N*(i+1)/n) of the split (tfds.even_splits) in
storage order, and every process yields the same number of batches, padded with
rows whose `_mask` is False, so that collective ops line up and every example
counts once.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from ddep.config import validation as config_validation
from ddep.data import examples as examples_lib
from ddep.data import preprocess as pp
from ddep.data import stream as stream_lib
from ddep.datasets import specs


class EvalDataset:
  """Every example of a split exactly once across processes, in storage order.

  Each iteration yields `num_batches` batches (the same number on every
  process, so collective ops line up); padding rows have `_mask` False.
  Keys: 'image' float32 [-1, 1], 'label' int32 train ids at the original
  resolution, '_mask' bool, 'image_id' bytes, and with `pad_to` also
  'orig_hw' int32 (B, 2).
  """

  def __init__(self, examples: examples_lib.Examples, *, batch_size: int, num_batches: int, pad_to):
    self._examples = examples
    self.batch_size = batch_size
    self.num_batches = num_batches
    self.pad_to = pad_to
    self.num_examples = examples.plan.n
    self.num_bad_examples = 0
    self.bad_example_ids: list[str] = []
    self._dataset = None

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

  def _batches(self) -> tf.data.Dataset:
    """The split's batches, built once: a run evaluates many times, and building (tracing
    the pipeline's functions) took ~0.1 s of each tiny evaluation; iterating again
    reads the split again from its start."""
    if self._dataset is None:
      self._dataset = self._examples.dataset(
          0, self._transform, batch_size=self.batch_size, drop_remainder=False
      )
    return self._dataset

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    iterator = iter(self._batches())
    template = None
    expected = 0
    self.num_bad_examples, self.bad_example_ids = 0, []
    for _ in range(self.num_batches):
      try:
        batch = examples_lib.next_numpy(iterator, self._examples.source)
      except StopIteration:
        batch = None
      except tf.errors.InvalidArgumentError as e:
        if (
            'to the batch' in e.message
            or 'Cannot batch' in e.message
            or 'different shapes' in e.message
        ):
          raise config_validation.ConfigError(
              f'Images in {self._examples.source.spec.name} differ in size: set '
              "config.data.eval_pad_to=(H, W) (eval_dataset's pad_to) to pad them to one size"
          ) from e
        if 'larger than pad_to' in e.message:
          start = e.message.index('Image larger')
          raise ValueError(e.message[start:].splitlines()[0]) from None
        raise
      if batch is not None:
        positions = batch.pop('_pos')
        gap = sorted(set(range(expected, int(positions[-1]) + 1)) - set(positions.tolist()))
        if gap and not self._examples.skip_bad:
          raise examples_lib.BadExampleError(examples_lib.undecodable_message(self._examples, gap))
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
      raise examples_lib.BadExampleError(examples_lib.undecodable_message(self._examples, trailing))
    if trailing:
      self._skipped(trailing)

  def _skipped(self, positions):
    ids = examples_lib.log_skipped(self._examples, positions, 'evaluation')
    self.num_bad_examples += len(ids)
    examples_lib.add_listed(self.bad_example_ids, ids)

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
    spec: specs.DatasetSpec,
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
  split = split or spec.eval_split
  process_index, process_count = stream_lib.process_defaults(process_index, process_count)
  builder = stream_lib.builder(spec, data_dir)
  source = stream_lib.Source(
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
  plan = stream_lib.Plan(
      source.chunk_sizes, seed=0, stream=process_index, shuffle=False, repeat=False
  )
  examples = examples_lib.Examples(
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
