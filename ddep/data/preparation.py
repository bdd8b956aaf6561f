"""Every way a dataset's files come to exist before a run reads them: the TFDS build from
downloaded archives (`ddep.prepare`), the generated demo scenes, the decoded copy of the
pretraining images, and the once-per-job build that multi-process runs share."""

import os
from typing import Optional

import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from ddep.data import decoded_copy
from ddep.datasets import archives
from ddep.datasets import cityscapes
from ddep.datasets import specs


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
  spec = specs.get(dataset).pretrain_view()
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
