r"""Builds a dataset's TFDS files once, from the archives a user downloaded by hand, or
from a user's own folders of images and masks.

  python -m ddep.prepare --dataset=ade20k --manual_dir=DIR [--data_dir=DIR]
  python -m ddep.prepare --dataset=cityscapes --pretrain --manual_dir=DIR
  python -m ddep.prepare --dataset=cityscapes --decoded_copy --manual_dir=DIR
  python -m ddep.prepare --dataset=folder:NAME --images=DIR --masks=DIR --classes=FILE \
      [--val_images=DIR --val_masks=DIR | --val_fraction=F] [--unlabelled=DIR] [--data_dir=DIR]

`folder:NAME` is any config's `config.data.dataset` once prepared: images (JPEG or PNG,
nested folders, any sizes) with masks of the same relative path and stem (PNG, ids or
colours), a classes file (one class a line, optional colour), and optionally a folder of
unlabelled images for denoising pretraining. Every file is read in full first; a bad one
stops the build naming it (or is left out and named, with --skip_bad). docs/datasets.md,
"Your own data", has a worked example.

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
from ddep.datasets import folder
from ddep.datasets import specs
from ddep.runs import progress

# TFDS's per-example loop (split_builder) wraps its generator in `utils.tqdm(generator,
# desc='Generating <split> examples...', ...)`; other bars (downloads, shuffling) are silenced.
_TFDS_EXAMPLES_DESC = ('Generating ', ' examples...')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, defined on demand so that importing ddep.prepare defines none."""
  flags.DEFINE_string(
      'dataset',
      None,
      f'A dataset name: {", ".join(specs.names())}, or folder:NAME for your own images '
      '(--images, --masks, --classes).',
      flag_values=flag_values,
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
  define_folder_flags(flag_values)
  flags.mark_flags_as_required(['dataset'], flag_values=flag_values)


def define_folder_flags(flag_values: flags.FlagValues) -> None:
  """The flags of --dataset=folder:NAME (ddep.data.preparation.prepare_folder)."""
  folder_flag = lambda define, name, default, help_: define(  # noqa: E731
      name, default, f'folder:NAME: {help_}', flag_values=flag_values
  )
  folder_flag(
      flags.DEFINE_string,
      'images',
      None,
      'the labelled images (.jpg, .jpeg, .png; nested folders are searched), local or gs://.',
  )
  folder_flag(
      flags.DEFINE_string,
      'masks',
      None,
      'their masks: PNGs of the same relative path and stem (a/b/x.jpg -> a/b/x.png), holding '
      'class ids (255 ignored) or the colours of the classes file.',
  )
  folder_flag(
      flags.DEFINE_string,
      'classes',
      None,
      "a text file, one class a line in id order, with an optional colour ('road 128 64 128' "
      "or 'road #804080'); a line 'ignore R G B' names the colour of unlabelled pixels.",
  )
  folder_flag(flags.DEFINE_string, 'val_images', None, 'validation images, if kept apart.')
  folder_flag(flags.DEFINE_string, 'val_masks', None, 'their masks (with --val_images).')
  folder_flag(
      flags.DEFINE_float,
      'val_fraction',
      None,
      'without --val_images: the fraction of --images that validates, chosen by a hash of '
      f'each relative file name (default {preparation.DEFAULT_VAL_FRACTION}).',
  )
  folder_flag(
      flags.DEFINE_string,
      'unlabelled',
      None,
      'images without masks, for denoising pretraining (its split `unlabelled`).',
  )
  folder_flag(
      flags.DEFINE_bool,
      'pretrain_on_labelled',
      True,
      'with --unlabelled, pretrain on the labelled train images too '
      '(--nopretrain_on_labelled: on the unlabelled ones only).',
  )
  folder_flag(
      flags.DEFINE_bool,
      'reduce_zero_label',
      False,
      'in masks of ids, 0 means ignore and id k is the class on line k of --classes (k-1 '
      'from 0), as ADE20K stores them.',
  )
  folder_flag(
      flags.DEFINE_bool,
      'skip_bad',
      False,
      'leave out (and name) unpaired, unreadable, mis-sized or mislabelled files instead of '
      'stopping at the first.',
  )


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
  if folder.is_folder(f.dataset):
    return _prepare_folder(f)
  given = [n for n in _FOLDER_FLAGS if f[n].present]
  if given:
    print(
        f'ddep.prepare: error: --{given[0]} is a flag of --dataset=folder:NAME, not of '
        f'--dataset={f.dataset}',
        file=sys.stderr,
        flush=True,
    )
    return 1
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


_FOLDER_FLAGS = (
    'images',
    'masks',
    'classes',
    'val_images',
    'val_masks',
    'val_fraction',
    'unlabelled',
    'pretrain_on_labelled',
    'reduce_zero_label',
    'skip_bad',
)


def _prepare_folder(f) -> int:
  """--dataset=folder:NAME: builds it from the folders; one line per problem, exit 1."""
  missing = [n for n in ('images', 'masks', 'classes') if not f[n].value]
  problem = None
  if missing:
    problem = f'--dataset={f.dataset} needs --{", --".join(missing)} ({folder.PREPARE_ARGS})'
  elif f.manual_dir or f.pretrain:
    problem = f'--{"manual_dir" if f.manual_dir else "pretrain"} is not a flag of folder:NAME'
  if problem is None:
    try:
      with plain_progress(f.dataset):
        prepared = preparation.prepare_folder(
            f.dataset,
            images=f.images,
            masks=f.masks,
            classes=f.classes,
            val_images=f.val_images,
            val_masks=f.val_masks,
            val_fraction=f.val_fraction,
            unlabelled=f.unlabelled,
            data_dir=f.data_dir,
            reduce_zero_label=f.reduce_zero_label,
            pretrain_on_labelled=f.pretrain_on_labelled,
            skip_bad=f.skip_bad,
        )
        if f.decoded_copy:
          copy_dir = preparation.prepare_decoded_copy(f.dataset, f.data_dir)
    except (preparation.PrepareError, FileNotFoundError, ValueError) as e:
      problem = str(e)
  if problem is not None:
    print(f'ddep.prepare: error: {problem}', file=sys.stderr, flush=True)
    return 1
  for line in folder_report(prepared, data_dir=f.data_dir):
    print(f'ddep.prepare: {line}', flush=True)
  if f.decoded_copy:
    print(f'ddep.prepare: its decoded copy is ready in {copy_dir}', flush=True)
  return 0


def folder_report(prepared: preparation.FolderPrepared, *, data_dir: str | None) -> list[str]:
  """What a user needs to know after a folder build: counts, what was left out, classes
  without pixels, the size the evaluation pad must hold, the config line."""
  meta, spec = prepared.metadata, prepared.spec
  lines = [f'skipped {path}: {why}' for path, why in meta['skipped']]
  splits = ', '.join(f'{s} {n}' for s, n in meta['splits'].items())
  pretraining = ', '.join(f'{s} {n}' for s, n in meta['pretraining_splits'].items())
  state = 'unchanged since its last preparation; reused' if prepared.reused else 'ready'
  lines.append(
      f'{spec.name} {state} under {data_dir or folder.default_data_dir()}: {spec.num_classes} '
      f'classes; {splits}; pretraining on {pretraining}'
      + (f'; {len(meta["skipped"])} file(s) left out' if meta['skipped'] else '')
  )
  empty = [n for n, p in zip(spec.class_names, meta['train_class_pixels']) if not p]
  if empty:
    lines.append(
        f'warning: no train mask shows class(es) {", ".join(empty)}: check the ids or colours '
        'of the masks (is 255 a class of yours? it is ignored)'
    )
  height, width = meta['max_validation_hw']
  name = folder.short_name(spec.name)
  lines.append(
      f'validation images are at most {height}x{width}; configs: '
      f'--config=configs/pretrain_folder.py:name={name},method=dep and '
      f'--config=configs/finetune_folder.py:name={name},init_from=DIR'
      + (f' --config.data.data_dir={data_dir}' if data_dir else '')
  )
  return lines


if __name__ == '__main__':
  define_flags()
  app.run(main)
