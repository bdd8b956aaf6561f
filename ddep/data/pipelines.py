"""Training pipelines: denoising pretraining, fine-tuning and supervised pretraining.

Each yields process-local numpy batches of one resolved `DatasetSpec`, through
a `TrainIterator`. Training streams are exactly resumable: the order of
examples is a stateless function of (seed, epoch) (ddep.data.stream), every
random augmentation is a stateless op seeded by (seed, stream position)
(ddep.data.examples), and an iterator's state is just the next stream
position. Restoring re-plans the stream from that position: chunks before it
are not read, and no skipped record is decoded. ddep.data.stream says how
records are held (in memory or streamed) and how processes share them.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from ddep.data import decoded_copy
from ddep.data import examples as examples_lib
from ddep.data import preprocess as pp
from ddep.data import stream as stream_lib
from ddep.data import subsets
from ddep.datasets import specs

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
      examples: examples_lib.Examples,
      transform: Callable,
      *,
      slots: stream_lib.Slots,
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
    examples.MAX_LISTED_BAD_EXAMPLES; `num_bad_examples` counts every drop, each epoch's)."""
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
    _check_state_fields(state)
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
    num_bad = int(state.get('num_bad_examples', 0))
    if layout == (self._slots.index, self._slots.count):
      self._slot = int(self._slots.to_slot(position))
      # Each step reads one batch, plus the bad examples it skipped: any other position is
      # not where this run stopped, and resuming there would silently read other data.
      expected = step * self._batch_size + num_bad
      if self._slot != expected or int(self._slots.to_global(self._slot)) != position:
        raise StateError(
            f'position {position} does not fit step {step}: after {step} batches of '
            f'{self._batch_size} and {num_bad} skipped examples, process '
            f'{self._slots.index} reads from position {int(self._slots.to_global(expected))}'
        )
    else:
      # Another process count: the saved process must sit exactly at the start of its
      # slice of global batch `step`, then this process starts its own slice of it.
      old = stream_lib.Slots(self._slots.global_batch // layout[1], layout[0], layout[1])
      if position != old.to_global(step * old.local_batch):
        raise ValueError(
            f'Iterator state of process {layout[0]}/{layout[1]} at step {step} is at position '
            f'{position}, not at the start of its slice of the global batch (bad examples were '
            f'skipped), so it cannot resume on {self._slots.count} processes.'
        )
      self._slot = step * self._batch_size
    self._step = step
    self._num_bad = num_bad
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
    batch = examples_lib.next_numpy(self._iterator, self._examples.source)
    got = self._slots.to_slot(batch.pop('_pos'))
    expected = self._slot + np.arange(self._batch_size)
    if not np.array_equal(got, expected):
      missing = sorted(set(range(self._slot, int(got[-1]) + 1)) - set(got.tolist()))
      positions = [int(p) for p in self._slots.to_global(np.asarray(missing))]
      if not self._examples.skip_bad:
        raise examples_lib.BadExampleError(
            examples_lib.undecodable_message(self._examples, positions)
        )
      examples_lib.add_listed(
          self._bad_ids, examples_lib.log_skipped(self._examples, positions, 'training')
      )
    self._num_bad += int(got[-1]) + 1 - self._slot - self._batch_size
    self._slot = int(got[-1]) + 1
    self._step += 1
    return batch


class StateError(ValueError):
  """A saved input position that is damaged: not what get_state() wrote at its step."""


def _check_state_fields(state) -> None:
  """A saved position has the fields and types get_state() writes (it may be hand-edited)."""
  if not isinstance(state, Mapping):
    raise StateError(f'the input-pipeline state is a JSON {type(state).__name__}, not an object')
  missing = [k for k in ('position', 'step') if k not in state]
  if missing:
    raise StateError(f'the input-pipeline state lacks {missing} (it has {sorted(state)})')
  for key in ('position', 'step', 'num_bad_examples', 'process_index', 'process_count'):
    value = state.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise StateError(f'the input-pipeline state has {key}={value!r}, not a count')
  if not isinstance(state.get('config', {}), Mapping):
    raise StateError('the input-pipeline state has a config that is not a JSON object')


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
    spec: specs.DatasetSpec,
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
  seed = stream_lib.check_seed(seed)
  process_index, process_count = stream_lib.process_defaults(process_index, process_count)
  builder = stream_lib.builder(spec, data_dir)
  source = stream_lib.Source(
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
    stream, slots = 0, stream_lib.Slots(batch_size, process_index, process_count)
  else:
    stream, slots = process_index, stream_lib.Slots(batch_size)
  plan = stream_lib.Plan(source.chunk_sizes, seed=seed, stream=stream, shuffle=True, repeat=True)
  examples = examples_lib.Examples(
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
def pretrain_dataset(
    spec: specs.DatasetSpec,
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
  spec = spec.pretrain_view()
  if images == 'decoded':
    decoded_copy.builder(spec, data_dir)  # Names the command that writes a missing copy.
    spec = decoded_copy.copy_view(spec)
  elif images != 'original':
    raise ValueError(f'images={images!r}: one of {decoded_copy.IMAGES}')
  out_hw = tuple(int(s) for s in image_size)

  def transform(ex, seed):
    return {'image': pp.inception_augment(ex['image'], seed, out_hw)}

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
      window=pp.inception_window(area_range),
      extra_config=dict(image_size=list(out_hw), area_range=list(area_range)),
  )


def finetune_dataset(
    spec: specs.DatasetSpec,
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
  an id file. The chosen ids are `iterator.subset_ids` (the trainer writes
  them to the workdir, ddep.runs.workdir.write_subset_ids); `subset_seed` varies the draw.
  """
  split = split or spec.train_split
  crop_hw = tuple(int(s) for s in crop_size)
  builder = stream_lib.builder(spec, data_dir)
  subset_ids = None
  if subset is not None:
    subset_ids = subsets.resolve_subset(
        subset,
        stream_lib.read_split_ids(builder, split),
        seed=subset_seed,
        dataset=spec.name,
        split=split,
    )

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
    spec: specs.DatasetSpec,
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
  if spec.image_labels_key is None:
    raise ValueError(
        f'Dataset {spec.name!r} has no image-level labels (DatasetSpec.image_labels_key is None); '
        "supervised_dataset needs e.g. 'demo'."
    )
  out_hw = tuple(int(s) for s in image_size)

  def transform(ex, seed):
    return {'image': pp.inception_augment(ex['image'], seed, out_hw), 'labels': ex['labels']}

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
      window=pp.inception_window(area_range),
      extra_config=dict(image_size=list(out_hw), area_range=list(area_range)),
  )
