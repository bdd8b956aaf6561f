"""Input-pipeline throughput: images/s (and per CPU core) at paper resolutions.

Builds a small synthetic TFDS dataset of `--source_hw` images (demo scenes
upsampled, PNG like Cityscapes or JPEG like ADE20K) and times the pretrain
(inception crop to 512x512) and finetune (crop `--crop`) pipelines on it.

Two rates per pipeline: images per wall-clock second (divided by the cores the
process may use), and images per CPU-second of the process (all its threads):
the second is what a host must supply per image, and it is robust to other
jobs sharing the machine. Pin to one core (`taskset -c 1`) to measure the
per-core rate directly.

  python -m ddep.tools.benchmark_input --source_hw=1024,2048 --crop=1024,1024
  python -m ddep.tools.benchmark_input --dataset=demo --crop=64,64 --image_size=64,64
  python -m ddep.tools.benchmark_input --pipelines=pretrain --pretrain_images=decoded
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from absl import app, flags
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ddep.data import pipelines
from ddep.data import preparation
from ddep.datasets import demo_scenes, specs
from ddep.runs import progress

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', None, 'Registered dataset to read instead of the synthetic one.')
flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: a temporary folder).')
flags.DEFINE_list('source_hw', ['1024', '2048'], 'Synthetic image size H,W.')
flags.DEFINE_enum('encoding', 'png', ['png', 'jpeg'], 'Synthetic image encoding.')
flags.DEFINE_integer('num_images', 32, 'Synthetic images per split.')
flags.DEFINE_list('image_size', ['512', '512'], 'Pretraining crop size (paper Sec. 5.1).')
flags.DEFINE_list(
    'crop', ['1024', '1024'], 'Fine-tuning crop size (1024 Cityscapes, 512 ADE20K/Pascal Context).'
)
flags.DEFINE_integer('batch_size', 8, 'Per-process batch size.')
flags.DEFINE_integer('warmup', 3, 'Batches before timing starts.')
flags.DEFINE_integer('batches', 20, 'Batches timed per pipeline.')
flags.DEFINE_list('pipelines', ['pretrain', 'finetune'], 'Which pipelines to time.')
flags.DEFINE_enum(
    'pretrain_images',
    'original',
    ['original', 'decoded'],
    "The pretrain pipeline's images: as stored, or their copy stored as pixels "
    '(ddep.data.decoded_copy; written first, once per data_dir).',
)


@dataclasses.dataclass
class _BenchConfig(tfds.core.BuilderConfig):
  height: int = 1024
  width: int = 2048
  encoding: str = 'png'
  num_images: int = 32


class DdepBenchImages(tfds.core.GeneratorBasedBuilder):
  """Demo scenes drawn at 1/8 size and upsampled: realistic PNG/JPEG sizes, fast to generate."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': "Labels of the image's size when a side is not a multiple of 8."}

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format=c.encoding),
                'segmentation': tfds.features.Image(shape=(None, None, 1)),
                'image_id': tfds.features.Text(),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    for i in range(c.num_images):
      rng = np.random.default_rng([1, i])
      small, seg = demo_scenes.draw_scene(rng, (c.height // 8, c.width // 8))
      image = np.asarray(Image.fromarray(small).resize((c.width, c.height), Image.BILINEAR))
      # Fine noise so the encoded size resembles a photograph rather than a cartoon.
      image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
      # Nearest resize: x8 blocks where the size allows, and always the image's size.
      seg = np.asarray(Image.fromarray(seg).resize((c.width, c.height), Image.NEAREST))[..., None]
      yield str(i), {'image': image, 'segmentation': seg, 'image_id': f'bench_{i:05d}'}


def synthetic_spec(
    data_dir: str, source_hw, encoding: str = 'png', num_images: int = 32
) -> specs.DatasetSpec:
  """Builds (once per data_dir) `num_images` synthetic images of `source_hw`; their spec."""
  h, w = (int(s) for s in source_hw)
  name = f'h{h}_w{w}_{encoding}_n{num_images}'
  config = _BenchConfig(name=name, height=h, width=w, encoding=encoding, num_images=num_images)
  builder = DdepBenchImages(config=config, data_dir=data_dir)
  t = time.time()
  builder.download_and_prepare()
  print(f'synthetic data ready ({time.time() - t:.0f} s): {num_images} {h}x{w} {encoding}')
  return specs.DatasetSpec(
      name=f'bench_{name}',
      tfds_name=f'ddep_bench_images/{name}',
      num_classes=demo_scenes.NUM_CLASSES,
      train_split='train',
      eval_split='train',
      pretrain_splits=('train',),
  )


def _time(iterator, *, batches: int, warmup: int, batch_size: int) -> dict:
  """Images per wall second and per CPU-second (every thread of this process)."""
  for _ in range(warmup):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in progress.track(range(batches), desc='benchmark_input', unit='batches'):
    next(iterator)
  images = batches * batch_size
  return {
      'images_per_s': images / (time.perf_counter() - wall),
      'images_per_cpu_s': images / max(time.process_time() - cpu, 1e-9),
  }


def measure(
    spec,
    which: str,
    *,
    data_dir: str,
    batch_size: int,
    batches: int,
    warmup: int,
    image_size=(512, 512),
    crop=(1024, 1024),
    pretrain_images: str = 'original',
) -> dict:
  """Times one pipeline ('pretrain' or 'finetune') on `spec`; the rates and its sizes."""
  common = dict(batch_size=batch_size, seed=0, data_dir=data_dir, process_index=0, process_count=1)
  if which == 'pretrain':
    size = tuple(int(s) for s in image_size)
    it = pipelines.pretrain_dataset(spec, image_size=size, images=pretrain_images, **common)
  elif which == 'finetune':
    size = tuple(int(s) for s in crop)
    it = pipelines.finetune_dataset(spec, crop_size=size, **common)
  else:
    raise ValueError(f'unknown pipeline {which!r}')
  cores = len(os.sched_getaffinity(0))
  rates = _time(it, batches=batches, warmup=warmup, batch_size=batch_size)
  return dict(
      pipeline=which,
      dataset=spec.name,
      images=pretrain_images if which == 'pretrain' else 'original',
      size=list(size),
      cores=cores,
      images_per_s_per_core=rates['images_per_s'] / cores,
      **rates,
  )


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix='ddep_bench_')
  if FLAGS.dataset:
    spec = specs.get(FLAGS.dataset)
    preparation.prepare_generated(spec.name, data_dir=data_dir)
  else:
    spec = synthetic_spec(data_dir, FLAGS.source_hw, FLAGS.encoding, FLAGS.num_images)
  if FLAGS.pretrain_images == 'decoded' and 'pretrain' in FLAGS.pipelines:
    t = time.time()
    copy_dir = preparation.prepare_decoded_copy(spec, data_dir)
    print(f'decoded copy ready ({time.time() - t:.0f} s): {copy_dir}')
  for which in FLAGS.pipelines:
    if which not in ('pretrain', 'finetune'):
      raise app.UsageError(f'unknown pipeline {which!r}')
    r = measure(
        spec,
        which,
        data_dir=data_dir,
        batch_size=FLAGS.batch_size,
        batches=FLAGS.batches,
        warmup=FLAGS.warmup,
        image_size=FLAGS.image_size,
        crop=FLAGS.crop,
        pretrain_images=FLAGS.pretrain_images,
    )
    images = ' (decoded copy)' if r['images'] != 'original' else ''
    print(
        f"{which:9s} {spec.name}{images} -> {r['size'][0]}x{r['size'][1]}: {r['images_per_s']:7.1f} "
        f"images/s, {r['images_per_s_per_core']:6.1f} images/s/core ({r['cores']} cores), "
        f"{r['images_per_cpu_s']:6.1f} images/CPU-s"
    )


if __name__ == '__main__':
  app.run(main)
