"""The generated demo dataset and the dataset-spec registry."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddep.datasets import demo_scenes, specs

_DEFAULT = demo_scenes.DdepDemoScenes.BUILDER_CONFIGS[0]


def test_scenes_are_a_function_of_split_and_index():
  a = demo_scenes.make_example(_DEFAULT, 'train', 3)
  b = demo_scenes.make_example(_DEFAULT, 'train', 3)
  c = demo_scenes.make_example(_DEFAULT, 'train', 4)
  d = demo_scenes.make_example(_DEFAULT, 'validation', 3)
  for key in ('image', 'segmentation', 'labels'):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['image'], c['image'])
  assert not np.array_equal(a['image'], d['image'])
  assert a['image_id'] == 'train_000003'


def test_examples_are_consistent():
  for i in range(40):
    ex = demo_scenes.make_example(_DEFAULT, 'train', i)
    assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
    assert ex['segmentation'].shape == (32, 32, 1)
    present = set(np.unique(ex['segmentation']).tolist())
    assert present <= set(range(demo_scenes.NUM_CLASSES))
    # Image-level labels are exactly the visible foreground classes.
    assert set((np.flatnonzero(ex['labels']) + 1).tolist()) == present - {0}
    assert ex['labels'].sum() >= 1


def test_colour_does_not_identify_a_class():
  # Every class's mean colour is spread widely across images, around nearly one centre:
  # told apart by its mean colour alone, a class is guessed not much better than chance.
  means = {c: [] for c in range(1, demo_scenes.NUM_CLASSES)}
  for i in range(120):
    ex = demo_scenes.make_example(_DEFAULT, 'unlabelled', i)
    seg = ex['segmentation'][..., 0]
    for c in means:
      if (seg == c).sum() > 30:
        means[c].append(ex['image'][seg == c].mean(axis=0))
  centres = {}
  for c, m in means.items():
    assert len(m) > 10, c
    assert np.std(np.array(m), axis=0).min() > 12, (c, np.std(np.array(m), axis=0))
    centres[c] = np.mean(m, axis=0)
  hits = total = 0
  for c, m in means.items():
    for colour in m:
      guess = min(centres, key=lambda k: np.linalg.norm(colour - centres[k]))
      hits, total = hits + (guess == c), total + 1
  assert hits / total < 0.35, hits / total  # chance: 0.2


def test_each_class_is_its_pattern():
  # Inside an object, a pixel takes the light shade exactly where the class's pattern is
  # set (up to the pixel noise and occluding objects): the pattern, not the colour, is
  # the class.
  agree = {c: [] for c in range(1, demo_scenes.NUM_CLASSES)}
  for i in range(60):
    ex = demo_scenes.make_example(_DEFAULT, 'unlabelled', i)
    lum = ex['image'].astype(np.float32).mean(-1)
    seg = ex['segmentation'][..., 0]
    for c in agree:
      inside = seg == c
      if inside.sum() < 40:
        continue
      light = lum > (lum[inside].max() + lum[inside].min()) / 2
      scores = []
      for phase in np.ndindex(demo_scenes.PERIOD, demo_scenes.PERIOD):
        pattern = demo_scenes._pattern(c, seg.shape, phase)  # pylint: disable=protected-access
        match = (light == pattern)[inside].mean()
        scores.append(max(match, 1 - match))  # either shade may be the light one
      agree[c].append(max(scores))
  for c, v in agree.items():
    assert len(v) > 5 and np.median(v) > 0.95, (c, np.median(v))


def test_tiny_builder_writes_what_make_example_draws(tmp_path):
  builder = tfds.builder('ddep_demo_scenes/tiny', data_dir=str(tmp_path))
  builder.download_and_prepare()
  info = builder.info
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      'unlabelled': 48,
      'train': 24,
      'validation': 10,
      'holdout': 6,
  }
  config = builder.builder_config
  seen = 0
  for ex in tfds.as_numpy(builder.as_dataset(split='validation')):
    image_id = ex['image_id'].decode()
    split, index = image_id.rsplit('_', 1)
    expected = demo_scenes.make_example(config, split, int(index))
    np.testing.assert_array_equal(ex['image'], expected['image'])  # PNG is lossless.
    np.testing.assert_array_equal(ex['segmentation'], expected['segmentation'])
    np.testing.assert_array_equal(ex['labels'], expected['labels'])
    assert config.min_size <= ex['image'].shape[0] <= config.max_size
    seen += 1
  assert seen == 10


def test_demo_spec():
  spec = specs.get('demo')
  assert spec.num_classes == 6 and spec.class_names[0] == 'background'
  assert spec.pretrain_splits == ('unlabelled',) and spec.image_labels_key == 'labels'
  np.testing.assert_array_equal(spec.label_map[:6], np.arange(6))
  assert spec.label_map[255] == 255 and spec.label_map[6] == specs.INVALID_LABEL
  assert specs.get(spec) is spec


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match='known datasets: .*cityscapes.*demo'):
    specs.get('no_such_dataset')


def test_label_maps():
  table = specs.make_label_map({0: 255, 1: 0, 2: 1})
  assert table.dtype == np.uint8 and table.shape == (256,)
  np.testing.assert_array_equal(table[:4], [255, 0, 1, specs.INVALID_LABEL])
  np.testing.assert_array_equal(
      specs.make_label_map(lambda x: np.minimum(x, 255))[[0, 7, 255]], [0, 7, 255]
  )
  spec = specs.DatasetSpec(name='t', tfds_name='t', num_classes=2, label_map={0: 255, 1: 0, 2: 1})
  np.testing.assert_array_equal(spec.valid_raw_ids, [0, 1, 2])
  with pytest.raises(ValueError, match='outside'):
    specs.DatasetSpec(name='t', tfds_name='t', num_classes=2, label_map={0: 0, 1: 5})
  with pytest.raises(ValueError, match='class_names'):
    specs.DatasetSpec(name='t', tfds_name='t', num_classes=2, class_names=('a',))


def test_pretrain_view_switches_builder_and_image_key():
  spec = specs.DatasetSpec(
      name='t',
      tfds_name='a/x',
      num_classes=2,
      image_key='left',
      pretrain_tfds_name='a/y',
      pretrain_image_key='img',
  )
  view = spec.pretrain_view()
  assert (view.tfds_name, view.image_key, view.num_classes) == ('a/y', 'img', 2)
  plain = specs.DatasetSpec(name='t', tfds_name='a/x', num_classes=2).pretrain_view()
  assert (plain.tfds_name, plain.image_key) == ('a/x', 'image')
