"""Input pipelines on the real `tiny` demo builder and on a builder of bad examples."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep.data import eval_data
from ddep.data import examples
from ddep.data import pipelines
from ddep.data import preparation
from ddep.data import preprocess
from ddep.data import stream
from ddep.data import subsets
from ddep.datasets import specs
from ddep.runs import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE = dict(process_index=0, process_count=1)
TINY = specs.get('demo_tiny')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  preparation.prepare_generated('demo_tiny', data_dir=path)
  for kind in _BAD_KINDS:
    tfds.builder(f'ddep_test_bad_scenes/{kind}', data_dir=path).download_and_prepare()
  return path


def _all_equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# Label fractions.


def test_paper_subset_counts():
  expected = {
      ('cityscapes', 2975): {1 / 30: 100, 1 / 8: 372, 1 / 4: 744},
      ('pascal_context_59', 4998): {0.01: 50, 0.05: 250, 0.1: 500, 0.2: 1000},
      ('pascal_context_60', 4998): {0.01: 50, 0.05: 250, 0.1: 500, 0.2: 1000},
      ('ade20k', 20210): {0.01: 202, 0.05: 1010, 0.1: 2021, 0.2: 4042},
  }
  for (name, n), counts in expected.items():
    for fraction, count in counts.items():
      assert subsets.subset_size(n, fraction, name) == count
      assert len(subsets.select_subset(n, fraction=fraction, seed=0, dataset=name)) == count
  # Away from the paper's tables: round half up, at least one.
  assert (
      subsets.subset_size(1024, 0.25) == 256
      and subsets.subset_size(10, 0.01) == 1
      and subsets.subset_size(10, 0.25) == 3
  )


def test_select_subset_is_seeded_and_nested():
  ids = [f'img_{i:04d}' for i in range(500)]
  a = subsets.select_subset(ids, fraction=0.1, seed=1)
  assert a == subsets.select_subset(
      list(reversed(ids)), fraction=0.1, seed=1
  )  # Storage order is irrelevant.
  assert a != subsets.select_subset(ids, fraction=0.1, seed=2)
  assert set(subsets.select_subset(ids, fraction=0.05, seed=1)) < set(a)
  assert len(a) == 50 and a == sorted(a) and set(a) <= set(ids)
  idx = subsets.select_subset(500, count=7, seed=3)
  assert idx.dtype.kind == 'i' and len(set(idx.tolist())) == 7 and idx.max() < 500


@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5])
def test_select_subset_rejects_bad_fractions(fraction):
  with pytest.raises(ValueError, match='fraction'):
    subsets.select_subset(100, fraction=fraction, seed=0)


def test_subset_ids_round_trip(tmp_path):
  path = str(tmp_path / 'subset_ids.txt')
  workdir_lib.write_subset_ids(path, ['b', 'a_1', 'c'])
  assert subsets.read_subset_ids(path) == ['b', 'a_1', 'c']


# ---------------------------------------------------------------------------
# Stream plans and process shards.


@pytest.mark.parametrize('chunk_sizes', [[11], [4, 4, 3]])
def test_every_epoch_is_a_fresh_permutation(chunk_sizes):
  plan = stream.Plan(chunk_sizes, seed=5, stream=0, shuffle=True, repeat=True)
  n = sum(chunk_sizes)
  epochs = [[plan.locate(e * n + i) for i in range(n)] for e in range(3)]
  everything = {(c, i) for c, size in enumerate(chunk_sizes) for i in range(size)}
  for order in epochs:
    assert set(order) == everything and len(order) == n
  assert epochs[0] != epochs[1] != epochs[2]
  other_seed = stream.Plan(chunk_sizes, seed=6, stream=0, shuffle=True, repeat=True)
  assert [other_seed.locate(i) for i in range(n)] != epochs[0]
  ordered = stream.Plan(chunk_sizes, seed=5, stream=0, shuffle=False, repeat=False)
  assert [ordered.locate(i) for i in range(n)] == sorted(everything)


def test_process_ranges_are_disjoint_and_cover():
  for n, count in [(10, 3), (7, 8), (4096, 16)]:
    ranges = [stream.process_range(n, i, count) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_process_shards_of_the_data_are_disjoint(data_dir):
  spec = specs.get('demo_tiny')
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)

  def shards(layout, count):
    out = []
    for i in range(count):
      source = stream.Source(
          spec,
          builder,
          ('train',),
          i,
          count,
          subset_ids=None,
          in_memory=True,
          shuffle_chunk=1024,
          layout=layout,
      )
      out.append(source.parse_ids([source.record(0, j) for j in range(source.num_examples)]))
    return out

  # Evaluation: tfds.even_splits ranges, covering.
  flat = [i for s in shards('ranges', 3) for i in s]
  assert len(flat) == len(set(flat)) == 24
  assert set(flat) == {f'train_{i:06d}' for i in range(24)}
  # Streamed training: equal shards, 24 = 5 * 4 + 4, so 4 examples are dropped.
  equal = shards('equal_shards', 5)
  assert [len(s) for s in equal] == [4] * 5
  assert len({i for s in equal for i in s}) == 20


# ---------------------------------------------------------------------------
# Training pipelines.


def test_pretrain_batches(data_dir):
  it = pipelines.pretrain_dataset(
      TINY, batch_size=6, image_size=(20, 24), seed=0, data_dir=data_dir, **SINGLE
  )
  a = [next(it) for _ in range(2)]
  assert set(a[0]) == {'image'}
  img = a[0]['image']
  assert img.shape == (6, 20, 24, 3) and img.dtype == np.float32
  assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.1
  assert it.num_examples == 48
  again = pipelines.pretrain_dataset(
      TINY, batch_size=6, image_size=(20, 24), seed=0, data_dir=data_dir, **SINGLE
  )
  other = pipelines.pretrain_dataset(
      TINY, batch_size=6, image_size=(20, 24), seed=1, data_dir=data_dir, **SINGLE
  )
  assert all(_all_equal(x, next(again)) for x in a)
  assert not np.array_equal(a[0]['image'], next(other)['image'])
  assert json.loads(json.dumps(it.get_state())) == it.get_state()


def test_finetune_batches_share_crop_and_flip(data_dir):
  # Crops larger than the 24-40 px images force padding: label 255 exactly where the image is 0 (grey).
  it = pipelines.finetune_dataset(
      TINY, batch_size=8, crop_size=(44, 44), seed=0, data_dir=data_dir, **SINGLE
  )
  for _ in range(3):
    batch = next(it)
    image, label = batch['image'], batch['label']
    assert image.shape == (8, 44, 44, 3) and label.shape == (8, 44, 44) and label.dtype == np.int32
    assert image.min() >= -1 and image.max() <= 1
    assert set(np.unique(label).tolist()) <= set(range(6)) | {255}
    np.testing.assert_array_equal(label == 255, np.all(image == 0, axis=-1))
  # Padding sits bottom-right and flips move it left: both occur, always identically in image and label.
  padded_left = [
      (label[i, :, 0] == 255).all() and not (label[i, :, -1] == 255).all() for i in range(8)
  ]
  assert 0 < sum(padded_left) < 8


def test_finetune_with_scale_range(data_dir):
  it = pipelines.finetune_dataset(
      TINY,
      batch_size=4,
      crop_size=(24, 24),
      scale_range=(0.5, 2.0),
      seed=3,
      data_dir=data_dir,
      **SINGLE,
  )
  batch = next(it)
  assert batch['label'].shape == (4, 24, 24)
  assert set(np.unique(batch['label']).tolist()) <= set(range(6)) | {255}
  assert (batch['label'] < 6).mean() > 0.3


@pytest.mark.parametrize('in_memory', [True, False])
def test_resume_is_exact(data_dir, in_memory):
  # process 1 of 2 has 12 examples; batches of 5 cross epoch boundaries, chunks of 5 stream from disk.
  kw = dict(
      batch_size=5,
      crop_size=(24, 24),
      scale_range=(0.8, 1.25),
      seed=3,
      data_dir=data_dir,
      process_index=1,
      process_count=2,
      in_memory=in_memory,
      shuffle_chunk=5,
  )
  reference = pipelines.finetune_dataset(TINY, **kw)
  expected = [next(reference) for _ in range(8)]
  interrupted = pipelines.finetune_dataset(TINY, **kw)
  for _ in range(3):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint would store it.
  # In memory, positions are global: process 1 reads [3*10 + 5, 3*10 + 10) next.
  assert state['position'] == (35 if in_memory else 15) and state['step'] == 3
  resumed = pipelines.finetune_dataset(TINY, state=state, **kw)
  for k in range(3, 8):
    assert _all_equal(next(resumed), expected[k]), k
  if in_memory:
    by_step = pipelines.finetune_dataset(TINY, start_step=3, **kw)
    assert all(_all_equal(next(by_step), expected[k]) for k in range(3, 8))
  else:
    interrupted.set_state(state)
    assert _all_equal(next(interrupted), expected[3])


def test_pretraining_resumes_exactly(data_dir):
  # The crop window is drawn while decoding: from the same per-position seed after a resume.
  kw = dict(
      batch_size=5,
      image_size=(12, 12),
      seed=2,
      data_dir=data_dir,
      in_memory=False,
      shuffle_chunk=7,
      **SINGLE,
  )
  it = pipelines.pretrain_dataset(TINY, **kw)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  resumed = pipelines.pretrain_dataset(TINY, state=state, **kw)
  assert all(_all_equal(next(resumed), e) for e in expected)


def test_state_from_other_settings_is_rejected(data_dir):
  kw = dict(batch_size=4, image_size=(16, 16), data_dir=data_dir, **SINGLE)
  state = pipelines.pretrain_dataset(TINY, seed=0, **kw).get_state()
  with pytest.raises(ValueError, match='seed'):
    pipelines.pretrain_dataset(TINY, seed=1, state=state, **kw)


def test_finetune_subset(data_dir):
  kw = dict(batch_size=2, crop_size=(16, 16), seed=0, data_dir=data_dir)
  it = pipelines.finetune_dataset(TINY, subset=0.25, subset_seed=1, **kw, **SINGLE)
  assert len(it.subset_ids) == 6 and it.num_examples == 6
  assert it.subset_ids == subsets.select_subset(
      [f'train_{i:06d}' for i in range(24)], fraction=0.25, seed=1
  )
  assert (
      pipelines.finetune_dataset(TINY, subset=0.25, subset_seed=2, **kw, **SINGLE).subset_ids
      != it.subset_ids
  )
  assert it.split_num_examples == 24
  with pytest.raises(ValueError, match='not in'):
    pipelines.finetune_dataset(TINY, subset=['train_000001', 'nope'], **kw, **SINGLE)


def _global_plan_kw(data_dir, **kw):
  return dict(crop_size=(16, 16), seed=4, data_dir=data_dir, subset=11, subset_seed=3, **kw)


def test_processes_read_slices_of_one_global_stream(data_dir):
  # 11 labelled examples do not split evenly over 2 processes; batches cross epochs.
  one = pipelines.finetune_dataset(TINY, batch_size=4, **_global_plan_kw(data_dir), **SINGLE)
  two = [
      pipelines.finetune_dataset(
          TINY, batch_size=2, **_global_plan_kw(data_dir), process_index=i, process_count=2
      )
      for i in range(2)
  ]
  # One plan: the same subset, the same global epoch size on every process.
  assert all(t.subset_ids == one.subset_ids and t.num_examples == 11 for t in two)
  for step in range(6):
    want = next(one)
    got = [next(t) for t in two]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=k)
  states = [json.loads(json.dumps(t.get_state())) for t in two]
  assert [s['position'] for s in states] == [24, 26]
  # Either process's state resumes the global stream on one process, and one on two.
  for state in states:
    resumed = pipelines.finetune_dataset(
        TINY, batch_size=4, state=state, **_global_plan_kw(data_dir), **SINGLE
    )
    assert _all_equal(
        next(resumed),
        next(
            pipelines.finetune_dataset(
                TINY, batch_size=4, start_step=6, **_global_plan_kw(data_dir), **SINGLE
            )
        ),
    )
  single_state = one.get_state()
  want = next(one)
  halves = [
      next(
          pipelines.finetune_dataset(
              TINY,
              batch_size=2,
              state=single_state,
              **_global_plan_kw(data_dir),
              process_index=i,
              process_count=2,
          )
      )
      for i in range(2)
  ]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), want['image'])


def test_streamed_state_refuses_another_process_count(data_dir):
  kw = dict(batch_size=2, image_size=(16, 16), seed=0, data_dir=data_dir, in_memory=False)
  state = pipelines.pretrain_dataset(TINY, **kw, process_index=0, process_count=2).get_state()
  with pytest.raises(ValueError, match='saved by 2 processes and cannot resume on 1'):
    pipelines.pretrain_dataset(TINY, state=state, **kw, **SINGLE)


def test_supervised_batches(data_dir):
  it = pipelines.supervised_dataset(
      TINY, batch_size=4, image_size=(16, 16), seed=0, data_dir=data_dir, **SINGLE
  )
  batch = next(it)
  assert batch['image'].shape == (4, 16, 16, 3)
  assert batch['labels'].shape == (4, 5) and batch['labels'].dtype == np.float32
  assert (
      set(np.unique(batch['labels']).tolist()) <= {0.0, 1.0} and batch['labels'].sum(-1).min() >= 1
  )
  no_labels = specs.register(
      specs.DatasetSpec(
          name='demo_tiny_no_image_labels', tfds_name='ddep_demo_scenes/tiny', num_classes=6
      )
  )
  with pytest.raises(ValueError, match='no image-level labels'):
    pipelines.supervised_dataset(
        no_labels, batch_size=4, image_size=(16, 16), seed=0, data_dir=data_dir, **SINGLE
    )


# ---------------------------------------------------------------------------
# Evaluation.


def test_eval_covers_every_example_once_at_original_resolution(data_dir):
  spec = specs.get('demo_tiny')
  raw = {
      ex['image_id'].decode(): ex
      for ex in tfds.as_numpy(
          tfds.builder(spec.tfds_name, data_dir=data_dir).as_dataset(split='validation')
      )
  }
  seen = []
  per_process = []
  for i in range(3):
    ev = eval_data.eval_dataset(
        TINY,
        batch_size=2,
        pad_to=(40, 44),
        data_dir=data_dir,
        process_index=i,
        process_count=3,
    )
    batches = list(ev)
    per_process.append(len(batches))
    for batch in batches:
      assert batch['image'].shape == (2, 40, 44, 3) and batch['image_id'].dtype.kind == 'S'
      for j in np.flatnonzero(batch['_mask']):
        image_id = batch['image_id'][j].decode()
        h, w = batch['orig_hw'][j]
        ex = raw[image_id]
        assert (h, w) == ex['image'].shape[:2]
        np.testing.assert_array_equal(batch['label'][j, :h, :w], ex['segmentation'][..., 0])
        np.testing.assert_allclose(batch['image'][j, :h, :w], ex['image'] / 127.5 - 1, atol=1e-6)
        assert (batch['label'][j, h:] == 255).all() and (batch['label'][j, :, w:] == 255).all()
        seen.append(image_id)
      padding = ~batch['_mask']
      assert (batch['label'][padding] == 255).all() and (batch['image_id'][padding] == b'').all()
  assert sorted(seen) == sorted(raw) and len(seen) == 10
  assert per_process == [2, 2, 2]  # Same count everywhere, so collectives line up.


def test_eval_without_pad_to(data_dir):
  batches = list(eval_data.eval_dataset(TINY, batch_size=1, data_dir=data_dir, **SINGLE))
  assert len(batches) == 10 and 'orig_hw' not in batches[0]
  assert batches[0]['label'].shape[1:] == batches[0]['image'].shape[1:3]
  with pytest.raises(ValueError, match='pad_to'):
    list(eval_data.eval_dataset(TINY, batch_size=4, data_dir=data_dir, **SINGLE))
  with pytest.raises(ValueError, match=r'larger than pad_to=\(30, 30\): image_id.*validation_0000'):
    list(eval_data.eval_dataset(TINY, batch_size=4, pad_to=(30, 30), data_dir=data_dir, **SINGLE))


# ---------------------------------------------------------------------------
# Bad examples: example 5 of 8 is broken in a different way per config.

_BAD_KINDS = ('corrupt', 'size', 'range', 'ignored')
_BAD_ID = 'bad_000005'


class DdepTestBadScenes(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k) for k in _BAD_KINDS]

  def _info(self):
    # DatasetInfo directly: dataset_info_from_configs looks for metadata files next to a package.
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3)),
                'segmentation': tfds.features.Image(shape=(None, None, 1)),
                'image_id': tfds.features.Text(),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(), 'validation': self._generate_examples()}

  def _generate_examples(self):
    kind = self.builder_config.name
    for i in range(8):
      rng = np.random.default_rng(i)
      image = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
      label = rng.integers(0, 3, (12, 12, 1), dtype=np.uint8)
      if i == 5:
        if kind == 'corrupt':
          image = io.BytesIO(b'\x89PNG\r\n\x1a\n this is not a png')
        elif kind == 'size':
          label = label[:10]
        elif kind == 'range':
          label[3, 4] = 7
        else:
          label[3, 4] = 9  # Mapped to ignore by the spec: fine.
      yield f'bad_{i:06d}', {'image': image, 'segmentation': label, 'image_id': f'bad_{i:06d}'}


def _bad_spec(kind):
  return specs.register(
      specs.DatasetSpec(
          name=f'bad_{kind}',
          tfds_name=f'ddep_test_bad_scenes/{kind}',
          num_classes=3,
          label_map={0: 0, 1: 1, 2: 2, 9: 255, 255: 255},
      )
  )


@pytest.mark.parametrize(
    'kind, message',
    [('corrupt', 'undecodable'), ('size', 'size'), ('range', r'raw label values \[7\]')],
)
def test_bad_examples_fail_naming_the_example(data_dir, kind, message):
  it = pipelines.finetune_dataset(
      _bad_spec(kind), batch_size=4, crop_size=(8, 8), seed=0, data_dir=data_dir, **SINGLE
  )
  with pytest.raises(examples.BadExampleError, match=message) as err:
    for _ in range(2):  # One epoch.
      next(it)
  assert _BAD_ID in str(err.value)
  with pytest.raises(examples.BadExampleError, match=_BAD_ID):
    list(
        eval_data.eval_dataset(
            _bad_spec(kind), batch_size=4, pad_to=(12, 12), data_dir=data_dir, **SINGLE
        )
    )


@pytest.mark.parametrize('kind', ['corrupt', 'range'])
def test_bad_examples_can_be_skipped_and_counted(data_dir, kind, caplog):
  kw = dict(
      batch_size=4, crop_size=(8, 8), seed=0, data_dir=data_dir, skip_bad_examples=True, **SINGLE
  )
  it = pipelines.finetune_dataset(_bad_spec(kind), **kw)
  batches = [next(it) for _ in range(7)]  # 28 good examples = 4 epochs of 7.
  assert it.get_state()['position'] == 32 and it.num_bad_examples == 4
  assert it.bad_example_ids == [_BAD_ID]  # Listed once, though dropped in every epoch.
  assert f'training skipped 1 bad example(s) of bad_{kind}' in caplog.text
  assert f'image_id={_BAD_ID}' in caplog.text
  if kind == 'range':
    resumed = pipelines.finetune_dataset(_bad_spec(kind), state=it.get_state(), **kw)
    assert _all_equal(next(resumed), next(it)) and resumed.num_bad_examples == it.num_bad_examples
    assert resumed.bad_example_ids == [_BAD_ID]
  assert all(set(np.unique(b['label']).tolist()) <= {0, 1, 2, 255} for b in batches)
  ev = eval_data.eval_dataset(
      _bad_spec(kind),
      batch_size=4,
      pad_to=(12, 12),
      data_dir=data_dir,
      skip_bad_examples=True,
      **SINGLE,
  )
  batches = list(ev)
  ids = [i for b in batches for i in b['image_id'][b['_mask']].tolist()]
  assert (
      len(batches) == 2
      and len(ids) == 7
      and _BAD_ID.encode() not in ids
      and ev.num_bad_examples == 1
  )
  assert ev.bad_example_ids == [_BAD_ID]
  # A run evaluates again and again with one EvalDataset: each pass is the whole split.
  again = list(ev)
  assert len(again) == len(batches) and all(map(_all_equal, again, batches))
  assert ev.num_bad_examples == 1 and ev.bad_example_ids == [_BAD_ID]


def test_ignored_raw_ids_are_not_bad(data_dir):
  ev = eval_data.eval_dataset(
      _bad_spec('ignored'), batch_size=8, pad_to=(12, 12), data_dir=data_dir, **SINGLE
  )
  (batch,) = list(ev)
  j = list(batch['image_id']).index(_BAD_ID.encode())
  assert batch['label'][j, 3, 4] == 255 and batch['_mask'].all()


def test_pretraining_also_rejects_undecodable_images(data_dir):
  it = pipelines.pretrain_dataset(
      _bad_spec('corrupt'), batch_size=8, image_size=(8, 8), seed=0, data_dir=data_dir, **SINGLE
  )
  with pytest.raises(examples.BadExampleError, match=_BAD_ID):
    next(it)


def test_unprepared_dataset_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='prepare'):
    pipelines.pretrain_dataset(
        TINY, batch_size=2, image_size=(8, 8), seed=0, data_dir=str(tmp_path), **SINGLE
    )


def _scene(h, w):
  """Smooth ramps and hard-edged blocks: a misplaced window differs by tens of levels."""
  y, x = np.mgrid[:h, :w]
  blocks = ((y // 8 + x // 8) % 2) * 120
  return np.stack([x * 255 // w, y * 255 // h, blocks + x % 7], -1).astype(np.uint8)


@pytest.mark.parametrize('encode', [tf.io.encode_jpeg, tf.io.encode_png])
def test_decoding_only_the_crop_window_gives_the_crop(encode):
  # 45 x 61: neither side a multiple of the 16 px JPEG MCU, so partial blocks at the edges occur.
  encoded = encode(_scene(45, 61))
  full = examples._decode_image(encoded)
  window = preprocess.inception_window((0.05, 1.0))
  sizes = set()
  for s in range(6):
    seed = tf.constant([s, 0], tf.int64)
    begin, size = window(tf.shape(full), seed)
    expected = tf.slice(full, begin, size).numpy().astype(np.float32)
    got = examples._decode_image_window(encoded, lambda shape: window(shape, seed)).numpy()
    assert got.shape == expected.shape
    sizes.add(got.shape)
    # The same IDCT: only the last column may differ, where the 4:2:0 chroma is upsampled
    # without its right neighbour (exact with chroma_downsampling=False).
    np.testing.assert_array_equal(got[:, :-1], expected[:, :-1])
    assert np.abs(got - expected).mean() < (1.0 if encode is tf.io.encode_jpeg else 1e-9)
  assert len(sizes) > 1  # Real sub-windows, not the whole image every time.


def test_tf_sees_no_accelerator():
  assert tf.config.get_visible_devices('GPU') == []


@pytest.mark.parametrize('task', ['denoise', 'classify'])
def test_a_configs_area_range_reaches_the_pretraining_pipeline(data_dir, task):
  from ddep.config import schema as config_schema
  from ddep.training import tasks

  config = config_schema.base_config()
  config.task = task
  config.data.dataset = 'demo_tiny'
  config.data.data_dir = data_dir
  config.data.image_size = (16, 16)
  config.data.area_range = (0.5, 0.75)
  it = tasks.get(config.task).train_data(config, specs.get(config.data.dataset), local_batch=2)
  assert it.get_state()['config']['area_range'] == [0.5, 0.75]
  assert next(it)['image'].shape == (2, 16, 16, 3)


def _damaged_copy(data_dir, tmp_path):
  """(a copy of `data_dir`, its pretraining shard with 64 bytes flipped mid-file)."""
  copy = tmp_path / 'tfds'
  shutil.copytree(data_dir, copy)
  shard = sorted(copy.rglob(f'*-{TINY.pretrain_splits[0]}.tfrecord*'))[0]
  data = bytearray(shard.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  shard.write_bytes(bytes(data))
  return copy, shard


@pytest.mark.parametrize('in_memory', [True, False], ids=['in_memory', 'streamed'])
@pytest.mark.parametrize('skip_bad_examples', [False, True])
def test_a_damaged_record_file_is_named(data_dir, tmp_path, in_memory, skip_bad_examples):
  """A byte-corrupted shard, read into memory or streamed, with or without skipping bad
  examples: the read fails (a streamed one once hung, its error retried forever by the
  ignore_errors meant for undecodable images) and the file and the dataset are named."""
  copy, shard = _damaged_copy(data_dir, tmp_path)
  with pytest.raises(stream.DamagedFileError) as e:
    it = pipelines.pretrain_dataset(
        TINY,
        batch_size=6,
        image_size=(20, 24),
        seed=0,
        data_dir=str(copy),
        in_memory=in_memory,
        skip_bad_examples=skip_bad_examples,
        **SINGLE,
    )
    for _ in range(20):
      next(it)
  message = str(e.value)
  assert message.startswith(f'{shard}: damaged record file of demo_tiny'), message
  assert '(corrupted record at ' in message and 'function_node' not in message, message
  assert 'ddep.prepare' in message


def test_a_run_on_a_damaged_record_file_stops_with_one_line_naming_it(data_dir, tmp_path):
  """Through the CLI: exit 2 and one line naming the shard, no traceback, nothing saved."""
  copy, shard = _damaged_copy(data_dir, tmp_path)
  workdir = tmp_path / 'run'
  p = subprocess.run(
      [
          sys.executable,
          '-m',
          'ddep.main',
          '--config=tests/configs/tiny_denoise.py',
          f'--workdir={workdir}',
          f'--config.data.data_dir={copy}',
      ],
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert p.returncode == 2, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('ddep.main: error:')]
  assert len(errors) == 1, p.stderr[-3000:]
  assert f'{shard}: damaged record file of demo_tiny (corrupted record at ' in errors[0]
  assert 'Traceback' not in p.stderr + p.stdout
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
