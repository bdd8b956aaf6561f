"""ADE20K in its SceneParse150 form: the TFDS builder and the 'ade20k' spec.

Manual file: `ADEChallengeData2016.zip` (http://sceneparsing.csail.mit.edu),
laid out as

  ADEChallengeData2016/images/{training,validation}/ADE_train_00000001.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_train_00000001.png

Label PNGs hold 0 (unlabelled) and 1..150; they are stored raw and the spec's
label_map turns them into train ids 0..149 with 0 ignored.
"""

from __future__ import annotations

import zipfile

import numpy as np
import tensorflow_datasets as tfds

from ddep.datasets import archives
from ddep.datasets import specs

ARCHIVE = 'ADEChallengeData2016.zip'
_ROOT = 'ADEChallengeData2016'
# TFDS split name -> the archive's directory name.
_SPLIT_DIRS = {'train': 'training', 'validation': 'validation'}

# The 150 SceneParse classes in raw-id order (raw id = index + 1), short names
# as in the challenge's objectInfo150 table.
CLASS_NAMES = (
    'wall',
    'building',
    'sky',
    'floor',
    'tree',
    'ceiling',
    'road',
    'bed',
    'windowpane',
    'grass',
    'cabinet',
    'sidewalk',
    'person',
    'earth',
    'door',
    'table',
    'mountain',
    'plant',
    'curtain',
    'chair',
    'car',
    'water',
    'painting',
    'sofa',
    'shelf',
    'house',
    'sea',
    'mirror',
    'rug',
    'field',
    'armchair',
    'seat',
    'fence',
    'desk',
    'rock',
    'wardrobe',
    'lamp',
    'bathtub',
    'railing',
    'cushion',
    'base',
    'box',
    'column',
    'signboard',
    'chest of drawers',
    'counter',
    'sand',
    'sink',
    'skyscraper',
    'fireplace',
    'refrigerator',
    'grandstand',
    'path',
    'stairs',
    'runway',
    'case',
    'pool table',
    'pillow',
    'screen door',
    'stairway',
    'river',
    'bridge',
    'bookcase',
    'blind',
    'coffee table',
    'toilet',
    'flower',
    'book',
    'hill',
    'bench',
    'countertop',
    'stove',
    'palm',
    'kitchen island',
    'computer',
    'swivel chair',
    'boat',
    'bar',
    'arcade machine',
    'hovel',
    'bus',
    'towel',
    'light',
    'truck',
    'tower',
    'chandelier',
    'awning',
    'streetlight',
    'booth',
    'television receiver',
    'airplane',
    'dirt track',
    'apparel',
    'pole',
    'land',
    'bannister',
    'escalator',
    'ottoman',
    'bottle',
    'buffet',
    'poster',
    'stage',
    'van',
    'ship',
    'fountain',
    'conveyer belt',
    'canopy',
    'washer',
    'plaything',
    'swimming pool',
    'stool',
    'barrel',
    'basket',
    'waterfall',
    'tent',
    'bag',
    'minibike',
    'cradle',
    'oven',
    'ball',
    'food',
    'step',
    'tank',
    'trade name',
    'microwave',
    'pot',
    'animal',
    'bicycle',
    'lake',
    'dishwasher',
    'screen',
    'blanket',
    'sculpture',
    'hood',
    'sconce',
    'vase',
    'traffic light',
    'tray',
    'ashcan',
    'fan',
    'pier',
    'crt screen',
    'plate',
    'monitor',
    'bulletin board',
    'shower',
    'radiator',
    'glass',
    'clock',
    'flag',
)

# The challenge's colour150 palette, one RGB row per train id.
PALETTE = np.array(
    [
        [120, 120, 120],
        [180, 120, 120],
        [6, 230, 230],
        [80, 50, 50],
        [4, 200, 3],
        [120, 120, 80],
        [140, 140, 140],
        [204, 5, 255],
        [230, 230, 230],
        [4, 250, 7],
        [224, 5, 255],
        [235, 255, 7],
        [150, 5, 61],
        [120, 120, 70],
        [8, 255, 51],
        [255, 6, 82],
        [143, 255, 140],
        [204, 255, 4],
        [255, 51, 7],
        [204, 70, 3],
        [0, 102, 200],
        [61, 230, 250],
        [255, 6, 51],
        [11, 102, 255],
        [255, 7, 71],
        [255, 9, 224],
        [9, 7, 230],
        [220, 220, 220],
        [255, 9, 92],
        [112, 9, 255],
        [8, 255, 214],
        [7, 255, 224],
        [255, 184, 6],
        [10, 255, 71],
        [255, 41, 10],
        [7, 255, 255],
        [224, 255, 8],
        [102, 8, 255],
        [255, 61, 6],
        [255, 194, 7],
        [255, 122, 8],
        [0, 255, 20],
        [255, 8, 41],
        [255, 5, 153],
        [6, 51, 255],
        [235, 12, 255],
        [160, 150, 20],
        [0, 163, 255],
        [140, 140, 140],
        [250, 10, 15],
        [20, 255, 0],
        [31, 255, 0],
        [255, 31, 0],
        [255, 224, 0],
        [153, 255, 0],
        [0, 0, 255],
        [255, 71, 0],
        [0, 235, 255],
        [0, 173, 255],
        [31, 0, 255],
        [11, 200, 200],
        [255, 82, 0],
        [0, 255, 245],
        [0, 61, 255],
        [0, 255, 112],
        [0, 255, 133],
        [255, 0, 0],
        [255, 163, 0],
        [255, 102, 0],
        [194, 255, 0],
        [0, 143, 255],
        [51, 255, 0],
        [0, 82, 255],
        [0, 255, 41],
        [0, 255, 173],
        [10, 0, 255],
        [173, 255, 0],
        [0, 255, 153],
        [255, 92, 0],
        [255, 0, 255],
        [255, 0, 245],
        [255, 0, 102],
        [255, 173, 0],
        [255, 0, 20],
        [255, 184, 184],
        [0, 31, 255],
        [0, 255, 61],
        [0, 71, 255],
        [255, 0, 204],
        [0, 255, 194],
        [0, 255, 82],
        [0, 10, 255],
        [0, 112, 255],
        [51, 0, 255],
        [0, 194, 255],
        [0, 122, 255],
        [0, 255, 163],
        [255, 153, 0],
        [0, 255, 10],
        [255, 112, 0],
        [143, 255, 0],
        [82, 0, 255],
        [163, 255, 0],
        [255, 235, 0],
        [8, 184, 170],
        [133, 0, 255],
        [0, 255, 92],
        [184, 0, 255],
        [255, 0, 31],
        [0, 184, 255],
        [0, 214, 255],
        [255, 0, 112],
        [92, 255, 0],
        [0, 224, 255],
        [112, 224, 255],
        [70, 184, 160],
        [163, 0, 255],
        [153, 0, 255],
        [71, 255, 0],
        [255, 0, 163],
        [255, 204, 0],
        [255, 0, 143],
        [0, 255, 235],
        [133, 255, 0],
        [255, 0, 235],
        [245, 0, 255],
        [255, 0, 122],
        [255, 245, 0],
        [10, 190, 212],
        [214, 255, 0],
        [0, 204, 255],
        [20, 0, 255],
        [255, 255, 0],
        [0, 153, 255],
        [0, 41, 255],
        [0, 255, 204],
        [41, 0, 255],
        [41, 255, 0],
        [173, 0, 255],
        [0, 245, 255],
        [71, 0, 255],
        [122, 0, 255],
        [0, 255, 184],
        [0, 92, 255],
        [184, 255, 0],
        [0, 133, 255],
        [255, 214, 0],
        [25, 194, 194],
        [102, 255, 0],
        [92, 0, 255],
    ],
    np.uint8,
)

# Raw 0 is "other/unlabelled", which SceneParse150 excludes from the metric.
LABEL_MAP = specs.make_label_map({0: specs.IGNORE_LABEL, **{raw: raw - 1 for raw in range(1, 151)}})
# 0..150: what a stored label may hold; anything else is a bad example at build time.
_VALID_IDS = np.flatnonzero(LABEL_MAP != specs.INVALID_LABEL)


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """SceneParse150 (ADE20K challenge 2016): 20,210 train / 2,000 validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Images as the original JPEG bytes, raw label ids 0..150.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {ARCHIVE} from http://sceneparsing.csail.mit.edu (direct link:
    http://data.csail.mit.edu/places/ADEchallenge/{ARCHIVE}) and place it,
    unextracted, in the manual directory.
    """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='ADE20K scene parsing, 150 classes; `segmentation` holds raw ids (0 = unlabelled).',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'segmentation': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                'image_id': tfds.features.Text(),
            }
        ),
        homepage='http://sceneparsing.csail.mit.edu',
        citation='Zhou et al., Scene Parsing through ADE20K Dataset, CVPR 2017.',
    )

  def _split_generators(self, dl_manager):
    archive = archives.require_manual_file(dl_manager, ARCHIVE, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {
        split: self._generate_examples(archive, subdir) for split, subdir in _SPLIT_DIRS.items()
    }

  def _generate_examples(self, archive, subdir):
    image_dir = f'{_ROOT}/images/{subdir}/'
    label_dir = f'{_ROOT}/annotations/{subdir}/'
    # zipfile reads members in any order, so each image meets its label
    # without extracting the 1 GB archive.
    with archive.open('rb') as f, zipfile.ZipFile(f) as zf:
      members = set(zf.namelist())
      images = sorted(n for n in members if n.startswith(image_dir) and n.endswith('.jpg'))
      if not images:
        raise ValueError(f'{archive}: no {image_dir}*.jpg; is this {ARCHIVE}?')
      for image_name in images:
        image_id = image_name[len(image_dir) : -len('.jpg')]
        label_name = f'{label_dir}{image_id}.png'
        if label_name not in members:
          raise ValueError(f'{archive}: {image_name} has no label {label_name}')
        image_bytes = zf.read(image_name)
        label_bytes = zf.read(label_name)
        archives.check_label(
            label_bytes,
            image_bytes,
            label_name=f'{archive} member {label_name}',
            image_name=f'{archive} member {image_name}',
            image_id=image_id,
            valid_ids=_VALID_IDS,
        )
        yield image_id, {'image': image_bytes, 'segmentation': label_bytes, 'image_id': image_id}


SPEC = specs.register(
    specs.DatasetSpec(
        name='ade20k',
        tfds_name='ade20k',
        num_classes=150,
        train_split='train',
        eval_split='validation',
        # Paper Sec. 5.2: on ADE20K, denoising pretraining uses the TRAIN images.
        pretrain_splits=('train',),
        class_names=CLASS_NAMES,
        palette=PALETTE,
        label_map=LABEL_MAP,
    )
)
