r"""Builds a dataset's TFDS files once, from the archives a user downloaded by hand.

  python -m ddep.prepare --dataset=ade20k --manual_dir=DIR [--data_dir=DIR]
  python -m ddep.prepare --dataset=cityscapes --pretrain --manual_dir=DIR

`--dataset` is a run's `config.data.dataset`. `--pretrain` builds the images that
denoising pretraining reads where they are a builder of their own (Cityscapes' extra
images, Pascal VOC 2012 for Pascal Context); for ADE20K they are the same builder.
Which archives each builder needs and where they come from: docs/datasets.md.
(TFDS's own `tfds build` needs apache_beam, which ddep does not install.)
"""
import sys

from absl import app
from absl import flags

from ddep.datasets import manual
from ddep.datasets import specs

_DATASET = flags.DEFINE_string('dataset', None, f'A dataset name: {", ".join(specs.names())}.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'The directory holding the downloaded archives (unextracted); '
    f'not needed by the generated demo datasets. See {manual.DOCS}.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, "Where the TFDS files go; a run's --config.data.data_dir. "
    'Default: TFDS\'s (~/tensorflow_datasets).')
_PRETRAIN = flags.DEFINE_bool(
    'pretrain', False, "Build the images denoising pretraining reads (the spec's "
    'pretrain_tfds_name) instead of the labelled dataset.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    builder = manual.prepare(_DATASET.value, manual_dir=_MANUAL_DIR.value,
                             data_dir=_DATA_DIR.value, pretrain=_PRETRAIN.value)
  except (manual.PrepareError, FileNotFoundError, ValueError) as e:
    # Missing or bad input, not a bug: the message names the file (and the example).
    print(f'ddep.prepare: error: {e}', file=sys.stderr, flush=True)
    return 1
  splits = ', '.join(f'{s} {info.num_examples}' for s, info in sorted(builder.info.splits.items()))
  print(f'ddep.prepare: {builder.info.full_name} ready in {builder.data_dir} ({splits})',
        flush=True)
  if _DATA_DIR.value:
    print(f'ddep.prepare: runs read it with --config.data.data_dir={_DATA_DIR.value}', flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset'])
  app.run(main)
