"""Every way a dataset's files come to exist before a run reads them: the TFDS build from
downloaded archives (`ddep.prepare`), a user's own folders of images and masks, the
generated demo scenes, the decoded copy of the pretraining images, and the once-per-job
build that multi-process runs share."""

import dataclasses
import json
import os
from typing import Optional

import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from ddep.data import decoded_copy
from ddep.datasets import archives
from ddep.datasets import cityscapes
from ddep.datasets import folder
from ddep.datasets import folder_builder
from ddep.datasets import folder_labels
from ddep.datasets import specs
from ddep.runs import storage

# --val_fraction when neither it nor --val_images is given.
DEFAULT_VAL_FRACTION = 0.1


class PrepareError(Exception):
  """What the user has to fix before a builder can run, named in one message."""


def prepare_archives(
    dataset: str,
    *,
    manual_dir: str | None = None,
    data_dir: str | None = None,
    pretrain: bool = False,
):
  """Builds, once, the TFDS builder of `dataset` (or of its pretraining images); returns it.

  What `python -m ddep.prepare` runs. `manual_dir` holds the downloaded archives;
  the generated demo datasets need none.
  """
  try:
    spec = specs.get(dataset)
  except ValueError as e:
    raise PrepareError(str(e)) from None
  name = spec.pretrain_view().tfds_name if pretrain else spec.tfds_name
  if name == 'pascal_voc':
    # Importing it registers the builder; no spec is named after it.
    from ddep.datasets import pascal_voc  # pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:  # Generated (the demo scenes): nothing to read.
    builder.download_and_prepare()
    return builder
  if not manual_dir:
    raise PrepareError(
        f'{name} is built from archives you download yourself: pass --manual_dir=DIR '
        f'with them in it; {archives.DOCS} lists them.'
    )
  if not os.path.isdir(manual_dir):
    raise PrepareError(
        f'--manual_dir={manual_dir} is not a directory; put the archives of {name} there ({archives.DOCS}).'
    )
  if name.startswith('cityscapes/'):
    # TFDS's own Cityscapes builder names no file when one is missing.
    cityscapes.check_manual_files(name.split('/', 1)[1], manual_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder


@dataclasses.dataclass(frozen=True)
class FolderPrepared:
  """A prepared folder dataset: its metadata (ddep.datasets.folder) and whether this call
  reused an earlier preparation of the same inputs instead of building."""

  spec: specs.DatasetSpec
  metadata: dict
  reused: bool


def _classes_text(path: str) -> str:
  try:
    return storage.path(path).read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise PrepareError(f'--classes={path} cannot be read: {e}') from None


def _folder_options(dataset, val_images, val_masks, val_fraction) -> float | None:
  """The validation fraction, after the checks of flags that go (or never go) together."""
  folder.short_name(dataset)
  if bool(val_images) != bool(val_masks):
    raise PrepareError('--val_images and --val_masks go together: pass both, or neither')
  if val_images and val_fraction is not None:
    raise PrepareError('--val_fraction splits --images; with --val_images, leave it out')
  if val_images:
    return None
  fraction = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
  if not 0 < fraction < 1:
    raise PrepareError(f'--val_fraction={val_fraction} must lie in (0, 1)')
  return fraction


def prepare_folder(
    dataset: str,
    *,
    images: str,
    masks: str,
    classes: str,
    val_images: str | None = None,
    val_masks: str | None = None,
    val_fraction: float | None = None,
    unlabelled: str | None = None,
    data_dir: str | None = None,
    reduce_zero_label: bool = False,
    pretrain_on_labelled: bool = True,
    skip_bad: bool = False,
) -> FolderPrepared:
  """Builds `folder:NAME` from a user's folders (what `ddep.prepare --dataset=folder:NAME`
  runs); see ddep.datasets.folder for what is stored and ddep.datasets.folder_labels for
  the masks and the classes file.

  Every file is read in full; the first bad one stops the build with an error naming it
  (with `skip_bad`, bad files are left out and listed in the metadata's 'skipped').
  The same inputs (names, sizes, times, classes file, options) prepared before are
  reused; anything else removes the earlier preparation first, its decoded copies
  included, and the metadata is written last, so a failed build leaves no dataset.
  """
  try:
    fraction = _folder_options(dataset, val_images, val_masks, val_fraction)
  except ValueError as e:
    raise PrepareError(str(e)) from None
  if not unlabelled and not pretrain_on_labelled:
    raise PrepareError(
        '--nopretrain_on_labelled leaves denoising pretraining no images: pass --unlabelled=DIR'
    )
  classes_text = _classes_text(classes)
  try:
    parsed = folder_labels.parse_classes(classes_text)
  except folder_labels.LabelError as e:
    raise PrepareError(f'--classes={classes}: {e}') from None
  options = dict(
      val_fraction=fraction,
      explicit_validation=bool(val_images),
      reduce_zero_label=reduce_zero_label,
      pretrain_on_labelled=pretrain_on_labelled,
      skip_bad=skip_bad,
  )
  try:
    plan = folder_builder.plan(
        images=images,
        masks=masks,
        val_images=val_images,
        val_masks=val_masks,
        val_fraction=fraction,
        unlabelled=unlabelled,
        pretrain_on_labelled=pretrain_on_labelled,
        skip_bad=skip_bad,
    )
    fingerprint = folder_builder.fingerprint(plan, classes_text=classes_text, options=options)
  except folder_builder.FolderError as e:
    raise PrepareError(str(e)) from None

  previous = folder.read_metadata(dataset, data_dir)
  if (
      previous
      and previous.get('fingerprint') == fingerprint
      and previous.get('format') == folder.FORMAT
  ):
    return FolderPrepared(folder.spec_from_metadata(dataset, previous), previous, reused=True)

  # Stale files go first, the metadata before anything: a run never reads half of them.
  metadata_path = storage.path(folder.metadata_path(dataset, data_dir))
  if metadata_path.exists():
    metadata_path.unlink()
  for directory in folder.builder_dirs(dataset, data_dir):
    if storage.path(directory).exists():
      storage.path(directory).rmtree()

  config = folder_builder.builder_config(dataset)
  builders = [
      folder_builder.DdepFolder(
          splits=plan.labelled,
          classes=parsed,
          reduce_zero_label=reduce_zero_label,
          skip_bad=skip_bad,
          config=config,
          data_dir=data_dir,
      )
  ]
  if plan.pretraining:
    builders.append(
        folder_builder.DdepFolderImages(
            splits=plan.pretraining, skip_bad=skip_bad, config=config, data_dir=data_dir
        )
    )
  try:
    for builder in builders:
      builder.download_and_prepare()
  except folder_builder.FolderError as e:
    for directory in folder.builder_dirs(dataset, data_dir):  # The labelled half, if built.
      if storage.path(directory).exists():
        storage.path(directory).rmtree()
    raise PrepareError(str(e)) from None

  labelled, skipped = builders[0].reports, plan.skipped + builders[0].skipped
  if plan.pretraining:
    skipped += builders[1].skipped
  pretrain_splits = list(plan.pretraining) or ['train']
  metadata = dict(
      format=folder.FORMAT,
      dataset=dataset,
      fingerprint=fingerprint,
      class_names=list(parsed.names),
      palette=None if parsed.colours is None else parsed.colours.tolist(),
      ignore_colour=parsed.ignore_colour,
      images_builder=bool(plan.pretraining),
      pretrain_splits=pretrain_splits,
      splits={s: r.examples for s, r in labelled.items()},
      pretraining_splits={
          s: r.examples
          for s, r in (builders[1].reports if plan.pretraining else labelled).items()
          if s in pretrain_splits
      },
      train_class_pixels=labelled['train'].pixels.tolist(),
      max_validation_hw=list(labelled['validation'].max_hw),
      sources=dict(
          images=images,
          masks=masks,
          classes=classes,
          val_images=val_images,
          val_masks=val_masks,
          unlabelled=unlabelled,
      ),
      options=options,
      skipped=[list(s) for s in skipped],
  )
  storage.write_text_atomic(metadata_path, json.dumps(metadata, indent=2))
  return FolderPrepared(folder.spec_from_metadata(dataset, metadata), metadata, reused=False)


def prepare_generated(dataset: str, data_dir: str | None = None, **download_and_prepare_kwargs):
  """Builds the dataset's TFDS files: generates the demo data; see ddep.prepare for the rest."""
  spec = specs.get(dataset)
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  builder.download_and_prepare(**download_and_prepare_kwargs)
  return builder


def prepare_decoded_copy(dataset, data_dir: str | None) -> str:
  """Writes the copy of `dataset`'s pretraining images, once; their TFDS files must exist.

  Returns the copy's directory. Works on any tf.io.gfile path (gs:// included).
  """
  spec = specs.get(dataset, data_dir=data_dir).pretrain_view()
  source = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not source.is_prepared():
    raise FileNotFoundError(
        f'{spec.tfds_name} is not prepared under data_dir={data_dir!r}: its decoded copy '
        f'is written from it; prepare it with\n  {archives.prepare_command(spec, data_dir=data_dir)}'
    )
  return decoded_copy.write_copy(spec, source)


def prepare_once(dataset: str, data_dir: Optional[str], *, decoded: bool = False) -> None:
  """Builds a generated dataset (and its decoded copy) on process 0 while the others
  wait, then all read it.

  Concurrent builds into one data_dir collide in TFDS's rename of its temporaries.
  """
  if jax.process_index() == 0:
    prepare_generated(dataset, data_dir)
    if decoded:
      prepare_decoded_copy(dataset, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'ddep: {dataset} prepared')
