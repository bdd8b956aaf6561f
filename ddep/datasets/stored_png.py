"""A lossless copy of a PNG pretraining set, its images re-encoded as uncompressed PNGs.

Why: TF decodes a 1024x2048 Cityscapes-size PNG in ~31 ms of one core, nearly all of
it zlib's inflate, and denoising pretraining decodes every image again in every epoch.
The same pixels in a PNG of stored (uncompressed) deflate blocks decode in ~7 ms
(docs/performance.md), for 1.75x the bytes on disk. A JPEG source needs no copy: it is
decoded only inside the crop window already.

The copy is a TFDS dataset of its own, `<name>_stored_png[/<config>]` next to the
original in the same data_dir, read by TFDS's read-only builder. It holds the
pretraining splits with the original's shards, shard lengths, record order and every
other feature byte for byte; only the image bytes change, and each re-encoded image is
checked to decode to the original's pixels (as the pipeline decodes them, 3 channels of
uint8). So a pretraining run reads bit-identical batches from either, and may switch
between them on resume. `dataset_info.json` is written last: a copy whose writing was
interrupted is not prepared and is written again.

  python -m ddep.prepare --dataset=cityscapes --stored_png_copy --manual_dir=DIR
  ... then train with --config.data.pretrain_images=stored_png
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath

import tensorflow as tf
import tensorflow_datasets as tfds

from ddep import progress
from ddep.datasets import manual
from ddep.datasets import specs

SUFFIX = '_stored_png'
# How `config.data.pretrain_images` names the two sources.
IMAGES = ('original', 'stored_png')

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def copy_tfds_name(tfds_name: str) -> str:
  """'cityscapes/semantic_segmentation_extra' -> 'cityscapes_stored_png/semantic_segmentation_extra'.

  A version ('name/config:1.0.0') is kept: the copy has the original's version.
  """
  path, colon, version = tfds_name.partition(':')
  name, sep, config = path.partition('/')
  return f'{name}{SUFFIX}{sep}{config}{colon}{version}'


def copy_view(spec: specs.DatasetSpec) -> specs.DatasetSpec:
  """A pretraining view (`spec.pretrain_view()`) that reads the copy instead."""
  return dataclasses.replace(spec, tfds_name=copy_tfds_name(spec.tfds_name))


def prepare_command(spec: specs.DatasetSpec, data_dir: str | None) -> str:
  parts = ['python -m ddep.prepare', f'--dataset={spec.name}', '--stored_png_copy']
  if not spec.name.startswith('demo'):
    parts.append('--manual_dir=DIR_WITH_THE_ARCHIVES')
  if data_dir:
    parts.append(f'--data_dir={data_dir}')
  return ' '.join(parts)


def builder(spec: specs.DatasetSpec, data_dir: str | None):
  """The copy's read-only builder for pretraining view `spec`, or an error with the command."""
  name = copy_tfds_name(spec.tfds_name)
  try:
    b = tfds.builder(name, data_dir=data_dir)
    prepared = b.is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    prepared = False
  if not prepared:
    raise FileNotFoundError(
        f'config.data.pretrain_images=stored_png reads {name}, the stored-PNG copy of '
        f'{spec.tfds_name}, which is not prepared under data_dir={data_dir!r}; write it once '
        f'with\n  {prepare_command(spec, data_dir)}'
    )
  return b


def _reencode(image_key: str, channels: int):
  """record -> (record, stored PNG of its image, whether that decodes to the same pixels)."""

  @tf.autograph.experimental.do_not_convert
  def fn(record):
    encoded = tf.io.parse_single_example(record, {image_key: tf.io.FixedLenFeature([], tf.string)})
    encoded = encoded[image_key]
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
    with tf.control_dependencies(
        [tf.debugging.Assert(is_png, ['the image is not a PNG (a stored-PNG copy is for PNGs)'])]
    ):
      # What the pipeline decodes (input_pipeline._decode_image), so 16-bit or palette
      # PNGs are copied as the pipeline sees them.
      pixels = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    stored = tf.io.encode_png(pixels, compression=0)
    same = tf.reduce_all(tf.equal(tf.io.decode_png(stored, channels=channels), pixels))
    return record, stored, same

  return fn


def _image_id(record: bytes, id_key: str = 'image_id') -> str:
  feature = tf.train.Example.FromString(record).features.feature.get(id_key)
  return feature.bytes_list.value[0].decode() if feature and feature.bytes_list.value else '?'


def _copy_shard(src: str, dst: str, *, image_key: str, channels: int, expected: int, bar) -> int:
  """Writes shard `src` re-encoded to `dst`; returns its bytes. Errors name file and record."""
  records = tf.data.TFRecordDataset(src).map(
      _reencode(image_key, channels), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  index = 0
  iterator = iter(records)
  with tf.io.TFRecordWriter(dst) as writer:
    while True:
      try:
        record, stored, same = next(iterator)
      except StopIteration:
        break
      except tf.errors.OpError as e:
        raw = next(iter(tf.data.TFRecordDataset(src).skip(index).take(1))).numpy()
        message = e.message.strip().splitlines()[0] if e.message else type(e).__name__
        raise ValueError(
            f'{src}: record {index} (image_id {_image_id(raw)}): its {image_key!r} cannot be '
            f'copied: {message}'
        ) from None
      record = record.numpy()
      if not bool(same):
        raise ValueError(  # Would be a TF codec bug; never copy pixels that differ.
            f'{src}: record {index} (image_id {_image_id(record)}): the stored PNG does not '
            'decode to the original pixels'
        )
      example = tf.train.Example.FromString(record)
      example.features.feature[image_key].bytes_list.value[0] = stored.numpy()
      writer.write(example.SerializeToString())
      index += 1
      bar(1)
  if index != expected:
    raise ValueError(f'{src}: {index} records, but dataset_info.json says {expected}')
  return tf.io.gfile.stat(dst).length


def prepare(dataset: str, data_dir: str | None) -> str:
  """Writes the copy of `dataset`'s pretraining images, once; their TFDS files must exist."""
  spec = specs.get(dataset).pretrain_view()
  source = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not source.is_prepared():
    raise FileNotFoundError(
        f'{spec.tfds_name} is not prepared under data_dir={data_dir!r}: its stored-PNG copy '
        f'is written from it; prepare it with\n  {manual.prepare_command(spec, data_dir=data_dir)}'
    )
  return write_copy(spec, source)


def write_copy(spec: specs.DatasetSpec, source) -> str:
  """Writes the copy of pretraining view `spec` from its prepared `source` builder, once.

  Returns the copy's directory. Works on any tf.io.gfile path (gs:// included).
  """
  info = json.loads(tf.io.gfile.GFile(posixpath.join(source.data_dir, 'dataset_info.json')).read())
  name = copy_tfds_name(spec.tfds_name)
  base, _, config = name.partition(':')[0].partition('/')
  # Next to the original (<root>/<name>[/<config>]/<version>), where TFDS looks for it.
  root = os.fspath(source.data_dir)
  for _ in range(3 if config else 2):
    root = posixpath.dirname(root.rstrip('/'))
  out_dir = posixpath.join(root, base, *([config] if config else []), info['version'])
  info_path = posixpath.join(out_dir, 'dataset_info.json')
  if tf.io.gfile.exists(info_path):
    return out_dir
  tf.io.gfile.makedirs(out_dir)
  channels = int(source.info.features[spec.image_key].shape[-1] or 3)
  splits = list(spec.pretrain_splits)
  kept = []
  for split_info in info['splits']:
    if split_info['name'] not in splits:
      continue
    split = source.info.splits[split_info['name']]
    lengths = [int(n) for n in split_info['shardLengths']]
    total = sum(lengths)
    num_bytes = 0
    bar = progress.Progress(total, f'stored_png {name} {split.name}', unit='examples', enabled=True)
    for src, expected in zip(split.filenames, lengths):
      src = posixpath.join(source.data_dir, src)
      dst_name = posixpath.basename(src).replace(f'{info["name"]}-', f'{base}-', 1)
      num_bytes += _copy_shard(
          src,
          posixpath.join(out_dir, dst_name),
          image_key=spec.image_key,
          channels=channels,
          expected=expected,
          bar=bar.update,
      )
    bar.done()
    kept.append(dict(split_info, numBytes=str(num_bytes)))
  missing = sorted(set(splits) - {s['name'] for s in kept})
  if missing:
    raise ValueError(f'{spec.tfds_name} has no split(s) {missing} to copy')
  for other in tf.io.gfile.listdir(source.data_dir):
    if other.endswith('.json') and other != 'dataset_info.json':
      tf.io.gfile.copy(
          posixpath.join(source.data_dir, other), posixpath.join(out_dir, other), overwrite=True
      )
  info.update(name=base, splits=kept)
  info.pop('moduleName', None)  # Read by TFDS's read-only builder, not by a module.
  info['description'] = (
      f'The images of {spec.tfds_name} ({", ".join(splits)}) re-encoded as uncompressed '
      f'PNGs by ddep.datasets.stored_png; every other byte as in the original.\n\n'
      + info.get('description', '')
  )
  with tf.io.gfile.GFile(info_path + '.tmp', 'w') as f:
    f.write(json.dumps(info, indent=2))
  tf.io.gfile.rename(info_path + '.tmp', info_path, overwrite=True)
  return out_dir
