"""The decoded copy of a pretraining set: lossless, bit-identical batches, clear errors."""

import glob
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep.config import schema as config_schema
from ddep.config import validation as config_validation
from ddep.data import decoded_copy
from ddep.data import pipelines
from ddep.data import preparation
from ddep.datasets import specs
from ddep.tools import benchmark_input


def _records(builder, split):
  out = []
  for name in builder.info.splits[split].filenames:
    path = os.path.join(builder.data_dir, name)
    out += [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
  return out


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  preparation.prepare_generated('demo_tiny', d)
  return d


def test_copy_is_lossless_and_pretraining_reads_the_same_batches(data_dir):
  spec = specs.get('demo_tiny').pretrain_view()
  out_dir = preparation.prepare_decoded_copy('demo_tiny', data_dir)
  original = tfds.builder(spec.tfds_name, data_dir=data_dir)
  copy = decoded_copy.builder(spec, data_dir)
  assert copy.data_dir == out_dir
  assert list(copy.info.splits) == list(spec.pretrain_splits)
  for split in spec.pretrain_splits:
    assert copy.info.splits[split].shard_lengths == original.info.splits[split].shard_lengths
    for a, b in zip(_records(original, split), _records(copy, split), strict=True):
      fa, fb = a.features.feature, b.features.feature
      assert sorted(fa) == sorted(fb)
      for key in fa:
        if key != spec.image_key:
          assert fa[key] == fb[key], key
      old, new = fa[spec.image_key].bytes_list.value[0], fb[spec.image_key].bytes_list.value[0]
      pixels = tf.io.decode_png(old, channels=3).numpy()
      # The documented layout: magic, (H, W, C) little-endian int32, the pixels row by row.
      assert new[:8] == decoded_copy.MAGIC
      assert np.frombuffer(new[8:20], '<i4').tolist() == list(pixels.shape)
      assert new[20:] == pixels.tobytes()
      # Any window reads back exactly, as the pipeline reads it.
      h, w, _ = pixels.shape
      begin, size = (h // 3, w // 4, 0), (h - h // 3 - 1, w // 2, 3)
      window = decoded_copy.decode_window(
          tf.constant(new), lambda shape: (tf.constant(begin), tf.constant(size))
      )
      np.testing.assert_array_equal(
          window.numpy(), pixels[begin[0] : begin[0] + size[0], begin[1] : begin[1] + size[1]]
      )
  # TFDS itself reads the copy, its image as the opaque bytes features.json declares.
  (example,) = copy.as_dataset(split=spec.pretrain_splits[0]).take(1)
  assert example[spec.image_key].dtype == tf.string
  assert example[spec.image_key].numpy()[:8] == decoded_copy.MAGIC

  # Written once: a second call leaves it alone.
  info = os.path.join(out_dir, 'dataset_info.json')
  mtime = os.stat(info).st_mtime_ns
  assert preparation.prepare_decoded_copy('demo_tiny', data_dir) == out_dir
  assert os.stat(info).st_mtime_ns == mtime

  common = dict(batch_size=4, image_size=(16, 16), seed=3, data_dir=data_dir)
  common.update(process_index=0, process_count=1)
  a = pipelines.pretrain_dataset(specs.get('demo_tiny'), **common)
  b = pipelines.pretrain_dataset(specs.get('demo_tiny'), images='decoded', **common)
  for _ in range(3):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x['image'], y['image'])
  # The same stream, so a run may switch on resume: a state saved on one restores on the other.
  c = pipelines.pretrain_dataset(specs.get('demo_tiny'), images='decoded', **common)
  c.set_state(a.get_state())
  np.testing.assert_array_equal(next(a)['image'], next(c)['image'])


def test_a_missing_copy_names_the_command(tmp_path):
  d = str(tmp_path)
  preparation.prepare_generated('demo_tiny', d)
  common = dict(batch_size=2, seed=0, data_dir=d, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='--dataset=demo_tiny --decoded_copy'):
    pipelines.pretrain_dataset(specs.get('demo_tiny'), images='decoded', **common)
  with pytest.raises(ValueError, match="images='jpeg'"):
    pipelines.pretrain_dataset(specs.get('demo_tiny'), images='jpeg', **common)


def test_a_jpeg_source_is_refused_naming_the_record(tmp_path):
  d = str(tmp_path)
  spec = benchmark_input.synthetic_spec(d, (16, 24), 'jpeg', num_images=2)
  with pytest.raises(ValueError, match=r'record 0 \(image_id bench_00000\).*not a PNG'):
    preparation.prepare_decoded_copy(spec, d)
  assert not glob.glob(os.path.join(d, '*_decoded', '*', '*', 'dataset_info.json'))


def test_only_denoising_pretraining_takes_the_copy():
  c = config_schema.base_config()
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny'
  c.data.image_size = (32, 32)
  c.data.batch_size = c.data.eval_batch_size = 2
  c.data.pretrain_images = 'decoded'
  with pytest.raises(ValueError, match=r"data.pretrain_images.*task='segment'"):
    config_validation.validate(c)
  c.data.pretrain_images = 'stored'
  with pytest.raises(ValueError, match=r"data.pretrain_images: must be 'original' or 'decoded'"):
    config_validation.validate(c)


def _cli(*args, cwd):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run(
      [sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
  )


def test_cli_prepares_the_copy_and_a_pretraining_config_reads_only_it(tmp_path):
  from ddep.training import tasks  # pylint: disable=g-import-not-at-top  (jax: import late)

  d = str(tmp_path / 'tfds')
  p = _cli('ddep.prepare', '--dataset=demo_tiny', '--decoded_copy', f'--data_dir={d}', cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'decoded copy is ready' in p.stdout and 'pretrain_images=decoded' in p.stdout
  # Spoil the original's pretraining shard: a run that read it would fail to decode.
  spec = specs.get('demo_tiny').pretrain_view()
  original = tfds.builder(spec.tfds_name, data_dir=d)
  for split in spec.pretrain_splits:
    for name in original.info.splits[split].filenames:
      with open(os.path.join(original.data_dir, name), 'wb') as f:
        f.write(b'not a tfrecord')
  # The experiment file's config, as ddep.main builds its input (without compiling a
  # model: the train step does not care where the pixels came from).
  c = importlib.import_module('configs.pretrain_cityscapes').get_config('method=dep,runlocal')
  c.data.data_dir = d
  c.data.pretrain_images = 'decoded'
  config_validation.validate(c)
  preparation.prepare_once(c.data.dataset, d, decoded=True)  # Both exist: nothing is rebuilt.
  batch = next(tasks.get(c.task).train_data(c, specs.get(c.data.dataset), local_batch=2))
  assert batch['image'].shape == (2, *c.data.image_size, 3)
