r"""Builds a dataset's TFDS files once, from the archives a user downloaded by hand.

  python -m ddep.prepare --dataset=ade20k --manual_dir=DIR [--data_dir=DIR]
  python -m ddep.prepare --dataset=cityscapes --pretrain --manual_dir=DIR
  python -m ddep.prepare --dataset=cityscapes --decoded_copy --manual_dir=DIR

`--dataset` is a run's `config.data.dataset`. `--pretrain` builds the images that
denoising pretraining reads where they are a builder of their own (Cityscapes' extra
images, Pascal VOC 2012 for Pascal Context); for ADE20K they are the same builder.
`--decoded_copy` builds them too, then writes their lossless copy stored as pixels,
which pretraining reads with `--config.data.pretrain_images=decoded`: no PNG decoding for
a PNG set such as Cityscapes, for ~3x its disk (ddep.data.decoded_copy).
Which archives each builder needs and where they come from: docs/datasets.md.
(TFDS's own `tfds build` needs apache_beam, which ddep does not install.)

Progress is printed as plain lines with a rate (`[ddep] prepare ade20k train 1200 examples,
31.0 examples/s, 40s elapsed`) in place of TFDS's carriage-return bars.
"""

import contextlib
import sys

from absl import app
from absl import flags

from ddep.data import preparation
from ddep.datasets import archives as manual
from ddep.datasets import specs
from ddep.runs import progress

# TFDS's per-example loop (split_builder) wraps its generator in `utils.tqdm(generator,
# desc='Generating <split> examples...', ...)`; other bars (downloads, shuffling) are silenced.
_TFDS_EXAMPLES_DESC = ('Generating ', ' examples...')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, defined on demand so that importing ddep.prepare defines none."""
  flags.DEFINE_string(
      'dataset', None, f'A dataset name: {", ".join(specs.names())}.', flag_values=flag_values
  )
  flags.DEFINE_string(
      'manual_dir',
      None,
      'The directory holding the downloaded archives (unextracted); '
      f'not needed by the generated demo datasets. See {manual.DOCS}.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'data_dir',
      None,
      "Where the TFDS files go; a run's --config.data.data_dir. "
      "Default: TFDS's (~/tensorflow_datasets).",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      'pretrain',
      False,
      "Build the images denoising pretraining reads (the spec's "
      'pretrain_tfds_name) instead of the labelled dataset.',
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      'decoded_copy',
      False,
      'Build the pretraining images (as --pretrain), then write their copy stored as pixels '
      '(ddep.data.decoded_copy), read with --config.data.pretrain_images=decoded.',
      flag_values=flag_values,
  )
  flags.mark_flags_as_required(['dataset'], flag_values=flag_values)


def _progress_bar(name: str, empty_bar):
  """A stand-in for TFDS's `utils.tqdm`: ddep.runs.progress lines for the example loop."""

  def bar(iterable=None, *args, desc: str = '', total=None, **kwargs):
    start, end = _TFDS_EXAMPLES_DESC
    if iterable is not None and desc.startswith(start) and desc.endswith(end):
      split = desc[len(start) : -len(end)]
      return progress.track(iterable, total=total, desc=f'prepare {name} {split}', unit='examples')
    return empty_bar(iterable, *args, desc=desc, total=total, **kwargs)

  return bar


@contextlib.contextmanager
def plain_progress(name: str):
  """Within it, TFDS builds report through ddep.runs.progress (log-file friendly lines)."""
  from tensorflow_datasets.core import utils as tfds_utils  # pylint: disable=g-import-not-at-top

  original = getattr(tfds_utils, 'tqdm', None)
  empty_bar = getattr(tfds_utils, 'EmptyTqdm', None)
  if original is None or empty_bar is None:  # Another TFDS layout: keep its own bars.
    yield
    return
  tfds_utils.tqdm = _progress_bar(name, empty_bar)
  try:
    yield
  finally:
    tfds_utils.tqdm = original


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  """app.run's main: `flag_values` are parsed already (tests pass their own)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flag_values
  try:
    with plain_progress(f.dataset):
      builder = preparation.prepare_archives(
          f.dataset,
          manual_dir=f.manual_dir,
          data_dir=f.data_dir,
          pretrain=f.pretrain or f.decoded_copy,
      )
      if f.decoded_copy:
        copy_dir = preparation.prepare_decoded_copy(f.dataset, f.data_dir)
  except (preparation.PrepareError, FileNotFoundError, ValueError) as e:
    # Missing or bad input, not a bug: the message names the file (and the example).
    print(f'ddep.prepare: error: {e}', file=sys.stderr, flush=True)
    return 1
  splits = ', '.join(f'{s} {info.num_examples}' for s, info in sorted(builder.info.splits.items()))
  print(
      f'ddep.prepare: {builder.info.full_name} ready in {builder.data_dir} ({splits})', flush=True
  )
  if f.decoded_copy:
    print(
        f'ddep.prepare: its decoded copy is ready in {copy_dir}; pretraining reads it with '
        '--config.data.pretrain_images=decoded',
        flush=True,
    )
  if f.data_dir:
    print(f'ddep.prepare: runs read it with --config.data.data_dir={f.data_dir}', flush=True)
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
