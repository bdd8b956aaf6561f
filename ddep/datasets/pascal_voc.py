"""Every Pascal VOC 2012 image, unlabelled, for denoising pretraining.

The paper (Sec. 5.2) pretrains for Pascal Context on all of Pascal VOC. Manual
file: `VOCtrainval_11-May-2012.tar`, whose images are
`VOCdevkit/VOC2012/JPEGImages/<image_id>.jpg` (17,125 of them).

There is no 'pascal_voc' spec (a spec needs classes); the Pascal Context specs
name this builder as their `pretrain_tfds_name`.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from ddep.datasets import archives

ARCHIVE = 'VOCtrainval_11-May-2012.tar'
_IMAGE_DIR = 'VOCdevkit/VOC2012/JPEGImages/'


def iter_jpegs(dl_manager, archive, image_dir: str):
  """(image_id, JPEG bytes) for each `image_dir/*.jpg` in a VOC tar, streamed."""
  # A tar has no index: reading members in archive order is the one cheap way.
  for name, f in dl_manager.iter_archive(archive):
    name = name.replace(os.sep, '/')
    if name.startswith(image_dir) and name.endswith('.jpg'):
      yield name[len(image_dir) : -len('.jpg')], f.read()


class PascalVoc(tfds.core.GeneratorBasedBuilder):
  """Pascal VOC 2012 trainval images without labels: 17,125 in `train`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'All VOC2012 JPEGImages as the original JPEG bytes.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {ARCHIVE} from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/
    and place it, unextracted, in the manual directory.
    """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='All Pascal VOC 2012 trainval images, unlabelled (for denoising pretraining).',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'image_id': tfds.features.Text(),
            }
        ),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
        citation='Everingham et al., The PASCAL Visual Object Classes (VOC) Challenge, IJCV 2010.',
    )

  def _split_generators(self, dl_manager):
    archive = archives.require_manual_file(dl_manager, ARCHIVE, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {'train': self._generate_examples(dl_manager, archive)}

  def _generate_examples(self, dl_manager, archive):
    found = False
    for image_id, image in iter_jpegs(dl_manager, archive, _IMAGE_DIR):
      found = True
      archives.check_image(
          image, name=f'{archive} member {_IMAGE_DIR}{image_id}.jpg', image_id=image_id
      )
      yield image_id, {'image': image, 'image_id': image_id}
    if not found:
      raise ValueError(f'{archive}: no {_IMAGE_DIR}*.jpg; is this {ARCHIVE}?')
