"""A lossless copy of a PNG pretraining set with its images stored decoded (uint8 pixels).

Why: TF decodes a 1024x2048 Cityscapes-size PNG in ~31 ms of one core, nearly all of it
zlib's inflate, and denoising pretraining decodes every image again in every epoch. The
copy stores each image's pixels as they are decoded, behind a 20-byte header, so reading
an image is a copy of the rows its crop window covers (docs/performance.md). It takes
H*W*3 bytes an image: 6.3 MB at 1024x2048, against ~2.2 MB for Cityscapes' PNGs. A JPEG
source needs no copy (it is decoded only inside the crop window already) and is refused.

The copy is a TFDS dataset of its own, `<name>_decoded[/<config>]` next to the original
in the same data_dir, read by TFDS's read-only builder. It holds the pretraining splits
with the original's shards, shard lengths, record order and every other feature byte for
byte; its features.json declares the image as opaque bytes (`tfds.load` returns them
undecoded). Each image is checked to read back to the pixels the pipeline decodes from
the original (3 channels of uint8), so pretraining reads bit-identical batches from
either and may switch between them on resume. `dataset_info.json` is written last: a
copy whose writing was interrupted is not prepared, and is written again.

  python -m ddep.prepare --dataset=cityscapes --decoded_copy --manual_dir=DIR
  ... then pretrain with --config.data.pretrain_images=decoded
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddep.datasets import archives as manual
from ddep.datasets import specs
from ddep.runs import progress

SUFFIX = '_decoded'
# How `config.data.pretrain_images` names the two sources.
IMAGES = ('original', 'decoded')

# The stored image: MAGIC, then height, width and channels as little-endian int32, then
# the uint8 pixels row by row. No image format starts with 0x89 'DDEP'.
MAGIC = b'\x89DDEPpx1'
HEADER_BYTES = len(MAGIC) + 12
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# features.json's description of the stored image: bytes TFDS does not decode.
_OPAQUE_FEATURE = {
    'pythonClassName': 'tensorflow_datasets.core.features.tensor_feature.Tensor',
    'tensor': {'dtype': 'string', 'encoding': 'none', 'shape': {}},
}


def copy_tfds_name(tfds_name: str) -> str:
  """'cityscapes/semantic_segmentation_extra' -> 'cityscapes_decoded/semantic_segmentation_extra'.

  A version ('name/config:1.0.0') is kept: the copy has the original's version.
  """
  path, colon, version = tfds_name.partition(':')
  name, sep, config = path.partition('/')
  return f'{name}{SUFFIX}{sep}{config}{colon}{version}'


def copy_view(spec: specs.DatasetSpec) -> specs.DatasetSpec:
  """A pretraining view (`spec.pretrain_view()`) that reads the copy instead."""
  return dataclasses.replace(spec, tfds_name=copy_tfds_name(spec.tfds_name))


# ---------------------------------------------------------------------------
# The stored format, in TF (the input pipeline's decoders) and for writing.


def encode(pixels: np.ndarray) -> bytes:
  """uint8 (H, W, C) -> the stored bytes."""
  pixels = np.ascontiguousarray(pixels, np.uint8)
  return MAGIC + np.asarray(pixels.shape, '<i4').tobytes() + pixels.tobytes()


def is_decoded(encoded: tf.Tensor) -> tf.Tensor:
  return tf.equal(tf.strings.substr(encoded, 0, len(MAGIC)), MAGIC)


def stored_shape(encoded: tf.Tensor) -> tf.Tensor:
  """(H, W, C) int32 of stored bytes."""
  return tf.io.decode_raw(tf.strings.substr(encoded, len(MAGIC), 12), tf.int32, little_endian=True)


def decode_window(encoded: tf.Tensor, window) -> tf.Tensor:
  """The crop `window(image_shape) -> (begin, size)` of stored bytes: only its rows are read."""
  shape = stored_shape(encoded)
  begin, size = window(shape)
  row_bytes = tf.cast(shape[1] * shape[2], tf.int64)
  start = HEADER_BYTES + tf.cast(begin[0], tf.int64) * row_bytes
  rows = tf.io.decode_raw(
      tf.strings.substr(encoded, start, tf.cast(size[0], tf.int64) * row_bytes), tf.uint8
  )
  rows = tf.reshape(rows, [size[0], shape[1], shape[2]])
  return tf.slice(rows, [0, begin[1], 0], [size[0], size[1], shape[2]])


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """The whole stored image, uint8 (H, W, C)."""
  return decode_window(encoded, lambda shape: (tf.zeros([3], tf.int32), shape))


# ---------------------------------------------------------------------------
# Writing the copy.


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
        f'config.data.pretrain_images=decoded reads {name}, the decoded copy of '
        f'{spec.tfds_name}, which is not prepared under data_dir={data_dir!r}; write it once '
        f'with\n  {manual.prepare_command(spec, data_dir=data_dir, decoded_copy=True)}'
    )
  return b


def _decode_png(image_key: str, channels: int):
  """record -> (record, its image's pixels as the input pipeline decodes them)."""

  @tf.autograph.experimental.do_not_convert
  def fn(record):
    encoded = tf.io.parse_single_example(record, {image_key: tf.io.FixedLenFeature([], tf.string)})
    encoded = encoded[image_key]
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
    message = 'the image is not a PNG (JPEGs are decoded in their crop window already)'
    with tf.control_dependencies([tf.debugging.Assert(is_png, [message])]):
      # ddep.data.examples._decode_image's call, so 16-bit or palette PNGs are stored as
      # the pipeline sees them.
      return record, tf.io.decode_image(encoded, channels=channels, expand_animations=False)

  return fn


def _image_id(record: bytes, id_key: str = 'image_id') -> str:
  feature = tf.train.Example.FromString(record).features.feature.get(id_key)
  return feature.bytes_list.value[0].decode() if feature and feature.bytes_list.value else '?'


def _copy_shard(src: str, dst: str, *, image_key: str, channels: int, expected: int, bar) -> int:
  """Writes shard `src` with decoded images to `dst`; returns its bytes.

  Errors name the file, the record and its image id.
  """
  records = tf.data.TFRecordDataset(src).map(
      _decode_png(image_key, channels), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  index = 0
  iterator = iter(records)
  with tf.io.TFRecordWriter(dst) as writer:
    while True:
      try:
        record, pixels = next(iterator)
      except StopIteration:
        break
      except tf.errors.OpError as e:
        raw = next(iter(tf.data.TFRecordDataset(src).skip(index).take(1))).numpy()
        message = e.message.strip().splitlines()[0] if e.message else type(e).__name__
        raise ValueError(
            f'{src}: record {index} (image_id {_image_id(raw)}): its {image_key!r} cannot be '
            f'copied: {message}'
        ) from None
      record, pixels = record.numpy(), pixels.numpy()
      stored = encode(pixels)
      if not np.array_equal(decode(tf.constant(stored)).numpy(), pixels):
        raise ValueError(  # A reader bug; never write what would not read back.
            f'{src}: record {index} (image_id {_image_id(record)}): the stored pixels do not '
            'read back'
        )
      example = tf.train.Example.FromString(record)
      example.features.feature[image_key].bytes_list.value[0] = stored
      writer.write(example.SerializeToString())
      index += 1
      bar(1)
  if index != expected:
    raise ValueError(f'{src}: {index} records, but dataset_info.json says {expected}')
  return tf.io.gfile.stat(dst).length


def write_copy(spec: specs.DatasetSpec, source) -> str:
  """Writes the copy of pretraining view `spec` from its prepared `source` builder, once."""
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
    num_bytes = 0
    bar = progress.Progress(
        sum(lengths), f'decoded copy {base} {split.name}', unit='examples', enabled=True
    )
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
    if other.endswith('.json') and other not in ('dataset_info.json', 'features.json'):
      tf.io.gfile.copy(
          posixpath.join(source.data_dir, other), posixpath.join(out_dir, other), overwrite=True
      )
  features = json.loads(tf.io.gfile.GFile(posixpath.join(source.data_dir, 'features.json')).read())
  features['featuresDict']['features'][spec.image_key] = _OPAQUE_FEATURE
  with tf.io.gfile.GFile(posixpath.join(out_dir, 'features.json'), 'w') as f:
    f.write(json.dumps(features, indent=2))
  info.update(name=base, splits=kept)
  info.pop('moduleName', None)  # Read by TFDS's read-only builder, not by a module.
  info['description'] = (
      f'The images of {spec.tfds_name} ({", ".join(splits)}) stored decoded (uint8 pixels '
      f'behind a header, see ddep.data.decoded_copy); every other byte as in the '
      f'original.\n\n' + info.get('description', '')
  )
  with tf.io.gfile.GFile(info_path + '.tmp', 'w') as f:
    f.write(json.dumps(info, indent=2))
  tf.io.gfile.rename(info_path + '.tmp', info_path, overwrite=True)
  return out_dir
