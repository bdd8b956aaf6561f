"""Decoding and checking examples: bad examples fail loudly or are dropped and counted.

`Examples` turns the stream positions of a `ddep.data.stream.Plan` into
decoded, checked and augmented examples. Every random augmentation is a
stateless op seeded by (seed, stream position), so an example at a position
is the same whenever it is read. An undecodable image or label, an image/label
size mismatch or a label value outside the dataset's ids raises
`BadExampleError` naming the example, or with skip_bad_examples=True the
example is dropped, logged and counted.
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import logging
import tensorflow as tf

from ddep.data import decoded_copy
from ddep.data import stream as stream_lib
from ddep.datasets import specs

_AUTOTUNE = tf.data.AUTOTUNE


class BadExampleError(ValueError):
  """An example that cannot be decoded or has inconsistent/out-of-range labels."""


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


class Examples:
  """Stream positions -> decoded, checked, augmented examples.

  With `window(image_shape, seed) -> (begin, size)` only that crop of each
  image is decoded (where its format allows) and handed to the transform,
  drawn from the same per-example seed as the transform's.
  """

  def __init__(
      self,
      source: stream_lib.Source,
      plan: stream_lib.Plan,
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
    self.key = tf.constant([stream_lib.check_seed(seed), 2 * stream], tf.int64)
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
      slots: stream_lib.Slots | None = None,
  ):
    spec, source = self.source.spec, self.source

    def decode_image(encoded, pos):
      if self.window is None:
        return _decode_image(encoded)
      seed = stream_lib.fold(self.key, pos)  # The seed `augment` gives the transform.
      return _decode_image_window(encoded, lambda shape: self.window(shape, seed))

    @stream_lib.no_autograph
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

    @stream_lib.no_autograph
    def check(ex):
      message = tf.strings.format(
          'Bad example in dataset ' + spec.name + ': image_id={} (stream position {}): {}',
          (ex['image_id'], ex['_pos'], ex['_problem']),
      )
      with tf.control_dependencies([tf.debugging.Assert(tf.equal(ex['_problem'], ''), [message])]):
        return {k: tf.identity(v) for k, v in ex.items()}

    @stream_lib.no_autograph
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

    @stream_lib.no_autograph
    def augment(ex):
      seed = stream_lib.fold(self.key, ex['_pos'])
      out = transform(ex, seed)
      out['_pos'] = ex['_pos']
      return out

    def decode_chunk(records):
      records = records.map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)
      # Undecodable images raise inside `decode`; they are dropped here and the Python
      # side notices the gap in stream positions and names the example. Per chunk, so
      # that a damaged record file fails the read (DamagedFileError) instead of hanging.
      return records.ignore_errors(log_warning=True)

    ds = self.plan.dataset(start_position, source.chunk_records, slots, per_chunk=decode_chunk)
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
    options.threading.private_threadpool_size = stream_lib.host_cores()
    return ds.with_options(options).prefetch(_AUTOTUNE)

  def image_id_at(self, position: int) -> str:
    chunk_id, index = self.plan.locate(position)
    return self.source.parse_ids([self.source.record(chunk_id, index)])[0]


def next_numpy(iterator, source: stream_lib.Source | None = None):
  """The next batch as numpy; a bad example or a damaged file (of `source`) is named."""
  try:
    return {k: v.numpy() for k, v in next(iterator).items()}
  except tf.errors.DataLossError as e:
    if source is None:
      raise
    raise stream_lib.damaged_file_error(source.spec.name, source.filenames, e) from None
  except tf.errors.InvalidArgumentError as e:
    if 'Bad example' in e.message:
      start = e.message.index('Bad example')
      raise BadExampleError(e.message[start:].splitlines()[0]) from None
    raise


# Bad examples named in iterator states and results.json; beyond this only the count grows.
MAX_LISTED_BAD_EXAMPLES = 100


def log_skipped(examples: Examples, positions: Sequence[int], what: str) -> list[str]:
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


def add_listed(listed: list[str], ids: Sequence[str]) -> None:
  """Adds ids not listed yet (a bad example recurs every epoch), up to the cap."""
  for i in ids:
    if len(listed) < MAX_LISTED_BAD_EXAMPLES and i not in listed:
      listed.append(i)


def undecodable_message(examples: Examples, missing: Sequence[int]) -> str:
  ids = [examples.image_id_at(p) for p in missing[:5]]
  return (
      f'Bad example in dataset {examples.source.spec.name}: undecodable image or label for '
      f"image_id={', '.join(ids)} (stream positions {list(missing[:5])}); "
      f'pass skip_bad_examples=True to drop such examples.'
  )
