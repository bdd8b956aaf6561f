"""The real datasets' builders, built offline from tiny archives in their layouts."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import archives
from ddep.data import eval_data
from ddep.data import pipelines
from ddep.data import preparation
from ddep.datasets import archives as manual_lib
from ddep.datasets import specs


def _build(tfds_name: str, data_dir, manual_dir):
  builder = tfds.builder(tfds_name, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder


def _read(builder, split, skip=('image',)):
  """{image_id: example} with the `skip` features left as their stored bytes."""
  decoders = {key: tfds.decode.SkipDecoding() for key in skip}
  return {
      ex['image_id'].decode(): ex
      for ex in tfds.as_numpy(builder.as_dataset(split, decoders=decoders))
  }


def _assert_jpeg_round_trip(stored: bytes, decoded: np.ndarray, written: archives.Example):
  # The builders keep the archive's JPEG bytes; decoding them lands near the
  # source pixels (quality 95, no chroma subsampling).
  assert stored == written.image_bytes
  assert decoded.shape == written.image.shape
  assert np.abs(decoded.astype(int) - written.image).mean() < 3


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _prepare(dataset, data_dir, manual_dir, pretrain=False):
  """What `python -m ddep.prepare` does, in this process."""
  return preparation.prepare_archives(
      dataset, manual_dir=os.fspath(manual_dir), data_dir=os.fspath(data_dir), pretrain=pretrain
  )


@pytest.fixture(scope='module')
def ade20k_cli(tmp_path_factory, data_dir):
  """ADE20K built by the command a user types: `python -m ddep.prepare`."""
  manual = tmp_path_factory.mktemp('ade_manual')
  written = archives.write_ade20k(os.fspath(manual))
  command = [sys.executable, '-m', 'ddep.prepare', '--dataset=ade20k', f'--manual_dir={manual}']
  p = subprocess.run(
      [*command, f'--data_dir={data_dir}'], capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return p, written


@pytest.fixture(scope='module')
def ade20k(ade20k_cli, data_dir):
  spec = specs.get('ade20k')  # imports the module, which registers the builder
  return tfds.builder(spec.tfds_name, data_dir=os.fspath(data_dir)), ade20k_cli[1], spec


@pytest.fixture(scope='module')
def pascal_context(tmp_path_factory, data_dir):
  manual = tmp_path_factory.mktemp('pc_manual')
  written = archives.write_pascal_context(os.fspath(manual))
  return _prepare('pascal_context_60', data_dir, manual), written


@pytest.fixture(scope='module')
def pascal_voc(tmp_path_factory, data_dir):
  manual = tmp_path_factory.mktemp('voc_manual')
  written = archives.write_pascal_voc(os.fspath(manual))
  # Pascal Context's pretraining images: all of Pascal VOC 2012.
  return _prepare('pascal_context_60', data_dir, manual, pretrain=True), written


@pytest.fixture(scope='module')
def cityscapes_archives(tmp_path_factory):
  manual = tmp_path_factory.mktemp('cityscapes_manual')
  return manual, archives.write_cityscapes(os.fspath(manual))


@pytest.fixture(scope='module')
def cityscapes_fine(cityscapes_archives, data_dir):
  manual, written = cityscapes_archives
  return _prepare('cityscapes', data_dir, manual), written


@pytest.fixture(scope='module')
def cityscapes_extra(cityscapes_archives, data_dir):
  manual, written = cityscapes_archives
  return _prepare('cityscapes', data_dir, manual, pretrain=True), written


# --- ddep.prepare ----------------------------------------------------------------


def test_prepare_command_builds_and_says_where(ade20k_cli, data_dir):
  p, _ = ade20k_cli
  assert f'ade20k/1.0.0 ready in {data_dir}' in p.stdout, p.stdout
  assert '(train 3, validation 2)' in p.stdout
  assert f'--config.data.data_dir={data_dir}' in p.stdout


@pytest.mark.parametrize(
    'dataset,pretrain,archives_named',
    [
        ('ade20k', False, ['ADEChallengeData2016.zip']),
        ('pascal_context_60', False, ['VOCtrainval_03-May-2010.tar']),
        ('pascal_context_59', True, ['VOCtrainval_11-May-2012.tar']),
        ('cityscapes', False, ['leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip']),
        ('cityscapes', True, ['leftImg8bit_trainextra.zip', 'gtCoarse.zip']),
    ],
)
def test_prepare_names_the_missing_archive_and_the_docs(
    tmp_path, dataset, pretrain, archives_named
):
  empty = tmp_path / 'manual'
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as err:
    _prepare(dataset, tmp_path / 'data', empty, pretrain=pretrain)
  message = str(err.value)
  assert all(name in message for name in archives_named), message
  assert os.fspath(empty) in message and 'docs/datasets.md' in message


def test_prepare_needs_a_manual_dir_and_a_known_dataset(tmp_path):
  with pytest.raises(preparation.PrepareError, match=r'--manual_dir=DIR .*docs/datasets\.md'):
    preparation.prepare_archives('ade20k', data_dir=os.fspath(tmp_path))
  with pytest.raises(preparation.PrepareError, match=r'--manual_dir=.*nowhere is not a directory'):
    _prepare('ade20k', tmp_path, tmp_path / 'nowhere')
  with pytest.raises(preparation.PrepareError, match=r"Unknown dataset 'ade20'"):
    _prepare('ade20', tmp_path, tmp_path)


def test_an_unprepared_dataset_prints_the_prepare_command(tmp_path):
  empty = os.fspath(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError) as err:
    eval_data.eval_dataset(specs.get('ade20k'), batch_size=2, **_pipeline_kwargs(empty))
  assert (
      'python -m ddep.prepare --dataset=ade20k --manual_dir=DIR_WITH_THE_ARCHIVES '
      f'--data_dir={empty}\n' in str(err.value)
  )
  # Pascal Context's pretraining images are a builder of their own.
  with pytest.raises(FileNotFoundError) as err:
    pipelines.pretrain_dataset(
        specs.get('pascal_context_60'),
        batch_size=2,
        image_size=(16, 16),
        seed=0,
        **_pipeline_kwargs(empty),
    )
  assert '(pascal_voc) is not prepared' in str(err.value)
  assert 'python -m ddep.prepare --dataset=pascal_context_60 --pretrain --manual_dir=' in str(
      err.value
  )


# --- ADE20K -----------------------------------------------------------------


def test_ade20k_round_trips_images_and_raw_labels(ade20k):
  builder, written, _ = ade20k
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'validation')} == {
      'train': 3,
      'validation': 2,
  }
  for split in ('train', 'validation'):
    stored = _read(builder, split)
    decoded = _read(builder, split, skip=())
    assert sorted(stored) == sorted(written[split])
    for image_id, example in written[split].items():
      _assert_jpeg_round_trip(stored[image_id]['image'], decoded[image_id]['image'], example)
      np.testing.assert_array_equal(decoded[image_id]['segmentation'][..., 0], example.label)


def test_ade20k_label_map_drops_unlabelled_and_shifts(ade20k):
  builder, written, spec = ade20k
  table = spec.label_map
  assert (table[0], table[1], table[150], table[151]) == (255, 0, 149, specs.INVALID_LABEL)
  assert spec.num_classes == len(spec.class_names) == 150
  assert spec.class_names[0] == 'wall' and spec.class_names[149] == 'flag'
  label = _read(builder, 'train')['ADE_train_00000002']['segmentation'][..., 0]
  expected = np.where(label == 0, 255, label.astype(int) - 1)
  np.testing.assert_array_equal(table[label], expected)


def test_ade20k_missing_archive_names_file_and_directory(tmp_path):
  specs.get('ade20k')
  empty = tmp_path / 'manual'
  with pytest.raises(FileNotFoundError, match=r'ADEChallengeData2016\.zip') as err:
    _build('ade20k', tmp_path / 'data', empty)
  assert os.fspath(empty) in str(err.value)


_ADE_MEMBER = 'ADEChallengeData2016/{}/validation/ADE_val_00000002.{}'


@pytest.mark.parametrize(
    'member,data,message',
    [
        (
            _ADE_MEMBER.format('images', 'jpg'),
            b'\xff\xd8 not a JPEG',
            r'member ADEChallengeData2016/images/validation/ADE_val_00000002\.jpg '
            r'\(image_id ADE_val_00000002\): the image is not a file PIL can read',
        ),
        (  # Cut short, as by an interrupted download: its header still reads.
            _ADE_MEMBER.format('images', 'jpg'),
            archives.encode(
                np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8), 'JPEG'
            )[:1500],
            r'member ADEChallengeData2016/images/validation/ADE_val_00000002\.jpg '
            r'\(image_id ADE_val_00000002\): the image is truncated \(no JPEG end marker',
        ),
        (
            _ADE_MEMBER.format('annotations', 'png'),
            archives.encode(np.array([[0, 151], [150, 254]] * 24, np.uint8).repeat(16, 1), 'PNG'),
            r'member ADEChallengeData2016/annotations/validation/ADE_val_00000002\.png '
            r'\(image_id ADE_val_00000002\): raw label values \[151, 254\] are not ids of this '
            r'dataset \(0\.\.150\)',
        ),
    ],
)
def test_bad_archive_members_are_named_with_image_id_and_raw_value(tmp_path, member, data, message):
  manual = tmp_path / 'manual'
  manual.mkdir()
  archives.write_ade20k(os.fspath(manual), replace={member: data})
  with pytest.raises(manual_lib.BadExampleError, match=message) as err:
    _prepare('ade20k', tmp_path / 'data', manual)
  assert os.fspath(manual / 'ADEChallengeData2016.zip') in str(err.value)
  assert 'BytesIO' not in str(err.value)


# --- Pascal Context -----------------------------------------------------------


def test_pascal_context_keeps_listed_ids_with_their_labels(pascal_context):
  builder, written = pascal_context
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'validation')} == {
      'train': 2,
      'validation': 1,
  }
  for split in ('train', 'validation'):
    stored = _read(builder, split)
    decoded = _read(builder, split, skip=())
    # The tar's unlisted 2009_000001 must not leak into any split.
    assert sorted(stored) == sorted(written[split])
    for image_id, example in written[split].items():
      _assert_jpeg_round_trip(stored[image_id]['image'], decoded[image_id]['image'], example)
      np.testing.assert_array_equal(decoded[image_id]['segmentation'][..., 0], example.label)


def test_pascal_context_specs_60_and_59():
  spec60, spec59 = specs.get('pascal_context_60'), specs.get('pascal_context_59')
  raw = np.arange(60)
  np.testing.assert_array_equal(spec60.label_map[raw], raw)
  assert spec60.label_map[60] == specs.INVALID_LABEL
  assert (spec59.label_map[0], spec59.label_map[1], spec59.label_map[59]) == (255, 0, 58)
  assert spec60.class_names[0] == 'background' and spec59.class_names == spec60.class_names[1:]
  # Alphabetical, as the converter's sorted Detail ids are: 55 is tvmonitor.
  assert spec60.class_names[55] == 'tvmonitor' and spec60.class_names[59] == 'wood'
  # VOC devkit colours: aeroplane (128, 0, 0), id 15 (192, 128, 128).
  np.testing.assert_array_equal(
      spec60.palette[[0, 1, 15]], [[0, 0, 0], [128, 0, 0], [192, 128, 128]]
  )


def test_pascal_context_missing_labels_named(tmp_path):
  from ddep.datasets import pascal_context  # pylint: disable=import-outside-toplevel

  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / pascal_context.ARCHIVE).write_bytes(b'')  # the tar alone, no conversion output
  with pytest.raises(FileNotFoundError, match='SegmentationClassContext') as err:
    _build('pascal_context', tmp_path / 'data', manual)
  assert os.fspath(manual) in str(err.value)


# --- Pascal VOC (unlabelled) --------------------------------------------------


def test_pascal_voc_holds_every_jpeg_and_nothing_else(pascal_voc):
  builder, written = pascal_voc
  assert set(builder.info.features) == {'image', 'image_id'}
  assert builder.info.splits['train'].num_examples == 3
  stored = _read(builder, 'train')
  decoded = _read(builder, 'train', skip=())
  assert sorted(stored) == sorted(written['train'])
  for image_id, example in written['train'].items():
    _assert_jpeg_round_trip(stored[image_id]['image'], decoded[image_id]['image'], example)


def test_pascal_voc_missing_archive_named(tmp_path):
  from ddep.datasets import pascal_voc  # pylint: disable=import-outside-toplevel

  with pytest.raises(FileNotFoundError, match=r'VOCtrainval_11-May-2012\.tar'):
    _build('pascal_voc', tmp_path / 'data', tmp_path / 'manual')
  assert pascal_voc.ARCHIVE == 'VOCtrainval_11-May-2012.tar'


# --- Cityscapes (TFDS's own builder) -------------------------------------------


def test_cityscapes_label_tables():
  from ddep.datasets import cityscapes  # pylint: disable=import-outside-toplevel

  table = specs.get('cityscapes').label_map
  assert (table[7], table[8], table[26], table[33]) == (0, 1, 13, 18)
  assert (table[0], table[6], table[29], table[30]) == (255, 255, 255, 255)
  assert table[34] == specs.INVALID_LABEL
  assert sorted(table[:34][table[:34] != 255].tolist()) == list(range(19))
  # Exported predictions map back to the labelIds they came from.
  np.testing.assert_array_equal(table[cityscapes.TRAIN_ID_TO_LABEL_ID], np.arange(19))
  np.testing.assert_array_equal(cityscapes.to_label_ids(np.array([0, 18, 255])), [7, 33, 0])
  np.testing.assert_array_equal(cityscapes.PALETTE[[0, 13]], [[128, 64, 128], [0, 0, 142]])


def test_cityscapes_fine_config(cityscapes_fine):
  builder, written = cityscapes_fine
  spec = specs.get('cityscapes')
  assert {spec.image_key, spec.label_key, 'image_id'} <= set(builder.info.features)
  sizes = {s: builder.info.splits[s].num_examples for s in ('train', 'validation', 'test')}
  assert sizes == {'train': 2, 'validation': 1, 'test': 1}
  for split in ('train', 'validation'):
    read = _read(builder, split, skip=())
    assert sorted(read) == sorted(written[split])
    for image_id, example in written[split].items():
      np.testing.assert_array_equal(read[image_id][spec.image_key], example.image)  # PNG: lossless
      np.testing.assert_array_equal(read[image_id][spec.label_key][..., 0], example.label)
  # The mapping applied to a stored fine label: road stays 0, ground is void.
  label = read[image_id][spec.label_key][..., 0]
  mapped = spec.label_map[label]
  assert (mapped[label == 7] == 0).all() and (mapped[label == 6] == 255).all()
  assert (mapped[label == 33] == 18).all()


def test_cityscapes_extra_config_for_pretraining(cityscapes_extra):
  builder, written = cityscapes_extra
  sizes = {s: builder.info.splits[s].num_examples for s in ('train', 'train_extra', 'validation')}
  assert sizes == {'train': 2, 'train_extra': 2, 'validation': 1}
  for split in ('train', 'train_extra'):
    read = _read(builder, split, skip=())
    assert sorted(read) == sorted(written[split])
    for image_id, example in written[split].items():
      np.testing.assert_array_equal(read[image_id]['image_left'], example.image)
      np.testing.assert_array_equal(
          read[image_id]['segmentation_label'][..., 0], written['coarse'][image_id]
      )


def test_cityscapes_missing_archive_named_before_tfds(tmp_path):
  from ddep.datasets import cityscapes  # pylint: disable=import-outside-toplevel

  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'leftImg8bit_trainvaltest.zip').write_bytes(b'')
  with pytest.raises(FileNotFoundError) as err:
    cityscapes.download_and_prepare(
        'cityscapes/semantic_segmentation_extra', os.fspath(tmp_path), os.fspath(manual)
    )
  message = str(err.value)
  assert 'leftImg8bit_trainextra.zip' in message and 'gtCoarse.zip' in message
  assert 'leftImg8bit_trainvaltest.zip' not in message and os.fspath(manual) in message


# --- Through the input pipelines trainers use ------------------------------------


def _pipeline_kwargs(data_dir):
  return dict(data_dir=os.fspath(data_dir), process_index=0, process_count=1)


def _check_eval(dataset, data_dir, written, pad_to, image_tolerance):
  """Every eval row: the spec-mapped raw label and the image, padding ignored."""
  spec = specs.get(dataset)
  seen = set()
  for batch in eval_data.eval_dataset(
      spec, batch_size=2, pad_to=pad_to, **_pipeline_kwargs(data_dir)
  ):
    for row in np.flatnonzero(batch['_mask']):
      image_id = batch['image_id'][row].decode()
      example = written[image_id]
      h, w = batch['orig_hw'][row] if pad_to else batch['label'].shape[1:]
      assert (h, w) == example.label.shape
      np.testing.assert_array_equal(batch['label'][row, :h, :w], spec.label_map[example.label])
      assert (batch['label'][row, h:] == 255).all() and (batch['label'][row, :, w:] == 255).all()
      expected = example.image / 127.5 - 1.0
      assert np.abs(batch['image'][row, :h, :w] - expected).mean() <= image_tolerance
      seen.add(image_id)
  assert seen == set(written)


def test_ade20k_through_pipelines(ade20k, data_dir):
  _, written, spec = ade20k
  _check_eval('ade20k', data_dir, written['validation'], pad_to=(48, 48), image_tolerance=3 / 127.5)
  it = pipelines.finetune_dataset(
      specs.get('ade20k'), batch_size=2, crop_size=(16, 24), seed=0, **_pipeline_kwargs(data_dir)
  )
  batch = next(it)
  assert batch['image'].shape == (2, 16, 24, 3) and batch['label'].shape == (2, 16, 24)
  # Raw ids 0, 1, 150, 75, 12 arrive as train ids; raw 150 itself never does.
  assert set(np.unique(batch['label'])) <= {255, 0, 149, 74, 11}
  pretrain = pipelines.pretrain_dataset(
      specs.get('ade20k'), batch_size=2, image_size=(16, 16), seed=0, **_pipeline_kwargs(data_dir)
  )
  assert pretrain.num_examples == 3 and next(pretrain)['image'].shape == (2, 16, 16, 3)


def test_pascal_context_through_pipelines(pascal_context, pascal_voc, data_dir):
  written, voc_written = pascal_context[1], pascal_voc[1]
  _check_eval(
      'pascal_context_59',
      data_dir,
      written['validation'],
      pad_to=(48, 48),
      image_tolerance=3 / 127.5,
  )
  _check_eval(
      'pascal_context_60',
      data_dir,
      written['validation'],
      pad_to=(48, 48),
      image_tolerance=3 / 127.5,
  )
  # Pretraining reads the Pascal VOC images, not Pascal Context's train split.
  pretrain = pipelines.pretrain_dataset(
      specs.get('pascal_context_60'),
      batch_size=3,
      image_size=(16, 16),
      seed=0,
      **_pipeline_kwargs(data_dir),
  )
  assert pretrain.num_examples == len(voc_written['train']) == 3
  assert next(pretrain)['image'].shape == (3, 16, 16, 3)


def test_cityscapes_through_pipelines(cityscapes_fine, cityscapes_extra, data_dir):
  written = cityscapes_fine[1]
  _check_eval('cityscapes', data_dir, written['validation'], pad_to=None, image_tolerance=1e-6)
  it = pipelines.finetune_dataset(
      specs.get('cityscapes'),
      batch_size=2,
      crop_size=(64, 128),
      seed=0,
      **_pipeline_kwargs(data_dir),
  )
  batch = next(it)
  assert batch['label'].shape == (2, 64, 128)
  assert set(np.unique(batch['label'])) <= {255, 0, 18, 13, 11, 2, 10}
  # Paper Sec. 5.2: TRAIN_FINE + TRAIN_COARSE images, from the extra config.
  pretrain = pipelines.pretrain_dataset(
      specs.get('cityscapes'),
      batch_size=2,
      image_size=(32, 32),
      seed=0,
      **_pipeline_kwargs(data_dir),
  )
  assert pretrain.num_examples == len(written['train']) + len(written['train_extra']) == 4
  assert next(pretrain)['image'].shape == (2, 32, 32, 3)
