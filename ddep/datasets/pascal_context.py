"""Pascal Context: the TFDS builder and the 'pascal_context_60'/'_59' specs.

Labels come from the usual conversion of the Detail API annotations
(`trainval_merged.json`) into 60-class PNGs, as mmsegmentation's
`tools/dataset_converters/pascal_context.py` writes them. The manual
directory holds

  VOCtrainval_03-May-2010.tar                  (the images)
  VOCdevkit/VOC2010/SegmentationClassContext/<image_id>.png
  VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt   (4,998 ids)
  VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt     (5,105 ids)

i.e. the converter's output tree with the VOC2010 tar beside it. Label values
are 0 = background and 1..59 = the 59 classes in alphabetical order, which is
the converter's order (it sorts the Detail category ids, and those are
alphabetical); the official 59_labels.txt order differs.
"""

from __future__ import annotations


import numpy as np
import tensorflow_datasets as tfds

from ddep.datasets import archives
from ddep.datasets import pascal_voc  # also registers the builder pretraining reads
from ddep.datasets import specs

ARCHIVE = 'VOCtrainval_03-May-2010.tar'
LABEL_DIR = 'VOCdevkit/VOC2010/SegmentationClassContext'
SPLIT_LISTS = {
    'train': 'VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt',
    'validation': 'VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt',
}
_IMAGE_DIR = 'VOCdevkit/VOC2010/JPEGImages/'

# Raw label value i names CLASS_NAMES_60[i].
CLASS_NAMES_60 = (
    'background',
    'aeroplane',
    'bag',
    'bed',
    'bedclothes',
    'bench',
    'bicycle',
    'bird',
    'boat',
    'book',
    'bottle',
    'building',
    'bus',
    'cabinet',
    'car',
    'cat',
    'ceiling',
    'chair',
    'cloth',
    'computer',
    'cow',
    'cup',
    'curtain',
    'dog',
    'door',
    'fence',
    'floor',
    'flower',
    'food',
    'grass',
    'ground',
    'horse',
    'keyboard',
    'light',
    'motorbike',
    'mountain',
    'mouse',
    'person',
    'plate',
    'platform',
    'pottedplant',
    'road',
    'rock',
    'sheep',
    'shelves',
    'sidewalk',
    'sign',
    'sky',
    'snow',
    'sofa',
    'table',
    'track',
    'train',
    'tree',
    'truck',
    'tvmonitor',
    'wall',
    'water',
    'window',
    'wood',
)
CLASS_NAMES_59 = CLASS_NAMES_60[1:]


def voc_palette(n: int) -> np.ndarray:
  """The Pascal VOC devkit colour map: id bits spread over the RGB high bits."""
  ids = np.arange(n)
  palette = np.zeros((n, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      bit = (ids >> (3 * shift + channel)) & 1
      palette[:, channel] |= bit << (7 - shift)
  return palette.astype(np.uint8)


PALETTE_60 = voc_palette(60)
LABEL_MAP_60 = specs.make_label_map({raw: raw for raw in range(60)})
# 0..59: what a converted label may hold (the 59-class protocol reads the same files).
_VALID_IDS = np.flatnonzero(LABEL_MAP_60 != specs.INVALID_LABEL)
# The 59-class protocol drops background from the metric, so it is ignored.
LABEL_MAP_59 = specs.make_label_map(
    {0: specs.IGNORE_LABEL, **{raw: raw - 1 for raw in range(1, 60)}}
)


class PascalContext(tfds.core.GeneratorBasedBuilder):
  """Pascal Context, 60-class labels: 4,998 train / 5,105 validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VOC2010 JPEG bytes with the converted 60-class labels (raw 0..59).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    1. Download {ARCHIVE} from http://host.robots.ox.ac.uk/pascal/VOC/voc2010/
       into the manual directory and extract it there too (keep the tar).
    2. Download trainval_merged.json (https://codalabuser.blob.core.windows.net/public/trainval_merged.json)
       into VOCdevkit/VOC2010/, install the Detail API
       (https://github.com/zhanghang1989/detail-api) and run mmsegmentation's
       tools/dataset_converters/pascal_context.py on VOCdevkit. It writes
       {LABEL_DIR}/*.png and {SPLIT_LISTS['train']} and val.txt.
    """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Pascal Context, 60 classes; `segmentation` holds raw ids (0 = background).',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'segmentation': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                'image_id': tfds.features.Text(),
            }
        ),
        homepage='https://cs.stanford.edu/~roozbeh/pascal-context/',
        citation='Mottaghi et al., The Role of Context for Object Detection and Semantic '
        'Segmentation in the Wild, CVPR 2014.',
    )

  def _split_generators(self, dl_manager):
    instructions = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    archive = archives.require_manual_file(dl_manager, ARCHIVE, instructions)
    label_dir = archives.require_manual_file(dl_manager, LABEL_DIR, instructions)
    return {
        split: self._generate_examples(
            dl_manager,
            archive,
            label_dir,
            archives.require_manual_file(dl_manager, ids, instructions),
        )
        for split, ids in SPLIT_LISTS.items()
    }

  def _generate_examples(self, dl_manager, archive, label_dir, id_list):
    wanted = {line.strip() for line in id_list.read_text().splitlines() if line.strip()}
    found = set()
    for image_id, image in pascal_voc.iter_jpegs(dl_manager, archive, _IMAGE_DIR):
      if image_id not in wanted:
        continue
      label_path = label_dir / f'{image_id}.png'
      if not label_path.exists():
        raise ValueError(f'{id_list} lists {image_id} but {label_path} does not exist')
      label = label_path.read_bytes()
      archives.check_label(
          label,
          image,
          label_name=str(label_path),
          image_name=f'{archive} member {_IMAGE_DIR}{image_id}.jpg',
          image_id=image_id,
          valid_ids=_VALID_IDS,
      )
      found.add(image_id)
      yield image_id, {'image': image, 'segmentation': label, 'image_id': image_id}
    if found != wanted:
      missing = sorted(wanted - found)
      raise ValueError(
          f'{len(missing)} ids of {id_list} have no JPEG in {archive}, e.g. {missing[:5]}'
      )


def _spec(name, num_classes, class_names, palette, label_map):
  return specs.register(
      specs.DatasetSpec(
          name=name,
          tfds_name='pascal_context',
          num_classes=num_classes,
          train_split='train',
          eval_split='validation',
          # Paper Sec. 5.2: pretraining on all of Pascal VOC helps Pascal Context.
          pretrain_tfds_name='pascal_voc',
          pretrain_splits=('train',),
          class_names=class_names,
          palette=palette,
          label_map=label_map,
      )
  )


SPEC_60 = _spec('pascal_context_60', 60, CLASS_NAMES_60, PALETTE_60, LABEL_MAP_60)
SPEC_59 = _spec('pascal_context_59', 59, CLASS_NAMES_59, PALETTE_60[1:], LABEL_MAP_59)
