"""`ddep_demo_scenes`: generated segmentation scenes for offline demos and tests.

Each image holds one to three objects of five classes on a smooth background. A class is
its surface pattern (horizontal stripes, vertical stripes, checks, blocks, dots, all with
a 4-pixel period), drawn as a dark/light shade of a random colour; the outline (disk,
square, triangle), size, rotation and colour are drawn at random. So the class is never
in a pixel's colour but always in its neighbourhood, as textures are on real data, and a
denoiser must recognise the pattern to restore it. Scenes are a pure function of
(config seed, split, index).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from ddep.datasets import specs

CLASS_NAMES = ('background', 'hstripes', 'vstripes', 'checks', 'blocks', 'dots')
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]],
    np.uint8,
)
_SPLIT_IDS = {'unlabelled': 0, 'train': 1, 'validation': 2, 'holdout': 3}
# Every pattern repeats every 4 pixels: fine enough to need a look at several pixels, coarse
# enough to survive the 32x32 scale of the demo.
PERIOD = 4


@dataclasses.dataclass
class DemoScenesConfig(tfds.core.BuilderConfig):
  """Image size range (square sizes drawn per image) and split sizes."""

  min_size: int = 32
  max_size: int = 32
  num_unlabelled: int = 4096
  num_train: int = 1024
  num_validation: int = 256
  # Labelled scenes for choosing hyper-parameters, so that validation is looked at once.
  num_holdout: int = 256
  seed: int = 0


def _rotated_coords(size_hw, centre, angle):
  yy, xx = np.mgrid[0 : size_hw[0], 0 : size_hw[1]].astype(np.float32)
  dy, dx = yy - centre[0], xx - centre[1]
  c, s = np.cos(angle), np.sin(angle)
  return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(kind, u, v, r):
  """A disk, square or triangle of radius ~r: the outline says nothing about the class."""
  if kind == 0:
    return np.hypot(u, v) < r
  if kind == 1:
    return (np.abs(u) < 0.85 * r) & (np.abs(v) < 0.85 * r)
  inside = np.ones_like(u, bool)  # Equilateral triangle as three half-planes.
  for k in range(3):
    a = 2 * np.pi * k / 3
    inside &= np.cos(a) * u + np.sin(a) * v < 0.6 * r
  return inside


def _pattern(cls, size_hw, phase):
  """The class's binary pattern (which of the object's two colours each pixel takes),
  axis-aligned, shifted by `phase` (dy, dx) pixels."""
  yy, xx = np.mgrid[0 : size_hw[0], 0 : size_hw[1]]
  y, x, half = yy + phase[0], xx + phase[1], PERIOD // 2
  if cls == 1:  # horizontal stripes
    return (y % PERIOD) < half
  if cls == 2:  # vertical stripes
    return (x % PERIOD) < half
  if cls == 3:  # checkerboard of 2x2 cells
    return ((y // half) + (x // half)) % 2 == 0
  if cls == 4:  # 2x2 blocks on a 4-pixel grid
    return ((y % PERIOD) < half) & ((x % PERIOD) < half)
  if cls == 5:  # single-pixel dots on a 4-pixel grid
    return ((y % PERIOD) == 0) & ((x % PERIOD) == 0)
  raise ValueError(cls)


def _contrast_colours(rng):
  """A dark and a light shade of one random colour, in random order: the pattern shows
  as a luminance contrast, the colour itself says nothing about the class."""
  base = rng.uniform(0, 255, size=3)
  dark = base * rng.uniform(0.1, 0.35)
  light = 255 - (255 - base) * rng.uniform(0.1, 0.35)
  pair = np.stack([dark, light]).astype(np.float32)
  return pair if rng.random() < 0.5 else pair[::-1]


def _two_colours(rng, min_dist=90.0):
  while True:
    c = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if np.linalg.norm(c[0] - c[1]) > min_dist:
      return c


def _background(size_hw, rng):
  c = _two_colours(rng, min_dist=40.0)
  u, _ = _rotated_coords(size_hw, (size_hw[0] / 2, size_hw[1] / 2), rng.uniform(0, 2 * np.pi))
  w = np.clip(0.5 + u / max(size_hw), 0, 1)
  # Low-frequency blotches so the background is not a flat colour either.
  yy, xx = np.mgrid[0 : size_hw[0], 0 : size_hw[1]].astype(np.float32)
  for _ in range(3):
    f = rng.uniform(0.05, 0.2, size=2)
    w = w + 0.15 * np.sin(f[0] * yy + f[1] * xx + rng.uniform(0, 2 * np.pi))
  w = np.clip(w, 0, 1)[..., None]
  return (1 - w) * c[0] + w * c[1]


def draw_scene(rng: np.random.Generator, size_hw: tuple[int, int]):
  """One (image uint8 HxWx3, segmentation uint8 HxW) pair: 1-3 patterned objects of random
  outline and colour on a smooth background; later objects occlude earlier ones."""
  image = _background(size_hw, rng)
  seg = np.zeros(size_hw, np.uint8)
  short = min(size_hw)
  for _ in range(rng.integers(1, 4)):
    cls = int(rng.integers(1, NUM_CLASSES))
    r = rng.uniform(0.25, 0.4) * short
    centre = rng.uniform(0.15, 0.85, size=2) * np.array(size_hw)
    u, v = _rotated_coords(size_hw, centre, rng.uniform(0, 2 * np.pi))
    mask = _shape_mask(int(rng.integers(0, 3)), u, v, r)
    colours = _contrast_colours(rng)
    w = _pattern(cls, size_hw, rng.integers(0, PERIOD, size=2))[..., None].astype(np.float32)
    image = np.where(mask[..., None], (1 - w) * colours[0] + w * colours[1], image)
    seg[mask] = cls
  image = image + rng.normal(0, 6.0, size=image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), seg


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def make_example(config: DemoScenesConfig, split: str, index: int) -> dict:
  rng = scene_rng(config.seed, split, index)
  size = int(rng.integers(config.min_size, config.max_size + 1))
  aspect_jitter = int(rng.integers(0, (config.max_size - config.min_size) // 4 + 1))
  image, seg = draw_scene(rng, (size, size + aspect_jitter))
  labels = np.zeros((NUM_CLASSES - 1,), np.uint8)
  labels[np.unique(seg[seg > 0]) - 1] = 1
  return {
      'image': image,
      'segmentation': seg[..., None],
      'image_id': f'{split}_{index:06d}',
      'labels': labels,
  }


class DdepDemoScenes(tfds.core.GeneratorBasedBuilder):
  """Generated scenes with 5 object classes + background."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'A `holdout` split for choosing hyper-parameters without the validation split.',
      '2.0.0': 'Classes are patterns in luminance contrast (not shape + texture); 32x32 default.',
  }
  BUILDER_CONFIGS = [
      DemoScenesConfig(name='default', description='32x32 images, 4096/1024/256/256 examples.'),
      # Varying sizes on purpose: tests exercise padding and per-image eval shapes.
      DemoScenesConfig(
          name='tiny',
          description='24-40 px images, 48/24/10/6 examples, for tests.',
          min_size=24,
          max_size=40,
          num_unlabelled=48,
          num_train=24,
          num_validation=10,
          num_holdout=6,
      ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3)),
                'segmentation': tfds.features.Image(shape=(None, None, 1)),
                'image_id': tfds.features.Text(),
                'labels': tfds.features.Tensor(shape=(NUM_CLASSES - 1,), dtype=np.uint8),
            }
        ),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    sizes = {
        'unlabelled': c.num_unlabelled,
        'train': c.num_train,
        'validation': c.num_validation,
        'holdout': c.num_holdout,
    }
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split, num_examples):
    for index in range(num_examples):
      example = make_example(self.builder_config, split, index)
      yield example['image_id'], example


_COMMON = dict(
    num_classes=NUM_CLASSES,
    train_split='train',
    eval_split='validation',
    pretrain_splits=('unlabelled',),
    class_names=CLASS_NAMES,
    palette=PALETTE,
    label_map=specs.identity_label_map(NUM_CLASSES),
    image_labels_key='labels',
)
specs.register(
    specs.DatasetSpec(name='demo', tfds_name='ddep_demo_scenes/default:2.0.0', **_COMMON)
)
specs.register(
    specs.DatasetSpec(name='demo_tiny', tfds_name='ddep_demo_scenes/tiny:2.0.0', **_COMMON)
)
