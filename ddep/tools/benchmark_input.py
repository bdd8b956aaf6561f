"""Input-pipeline throughput: images/s (and per CPU core) at paper resolutions.

Builds a small synthetic TFDS dataset of `--source_hw` images (demo scenes
upsampled, PNG like Cityscapes or JPEG like ADE20K) and times the pretrain
(inception crop to 512x512) and finetune (crop `--crop`) pipelines on it.

  python -m ddep.tools.benchmark_input --source_hw=1024,2048 --crop=1024,1024
  python -m ddep.tools.benchmark_input --dataset=demo --crop=64,64 --image_size=64,64
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

from ddep import input_pipeline
from ddep.datasets import demo_scenes, specs

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "Registered dataset to read instead of the synthetic one.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temporary folder).")
flags.DEFINE_list("source_hw", ["1024", "2048"], "Synthetic image size H,W.")
flags.DEFINE_enum("encoding", "png", ["png", "jpeg"], "Synthetic image encoding.")
flags.DEFINE_integer("num_images", 32, "Synthetic images per split.")
flags.DEFINE_list("image_size", ["512", "512"], "Pretraining crop size (paper Sec. 5.1).")
flags.DEFINE_list(
  "crop", ["1024", "1024"], "Fine-tuning crop size (1024 Cityscapes, 512 ADE20K/Pascal Context)."
)
flags.DEFINE_integer("batch_size", 8, "Per-process batch size.")
flags.DEFINE_integer("warmup", 3, "Batches before timing starts.")
flags.DEFINE_integer("batches", 20, "Batches timed per pipeline.")
flags.DEFINE_list("pipelines", ["pretrain", "finetune"], "Which pipelines to time.")


@dataclasses.dataclass
class _BenchConfig(tfds.core.BuilderConfig):
  height: int = 1024
  width: int = 2048
  encoding: str = "png"
  num_images: int = 32


class DdepBenchImages(tfds.core.GeneratorBasedBuilder):
  """Demo scenes drawn at 1/8 size and upsampled: realistic PNG/JPEG sizes, fast to generate."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format=c.encoding),
          "segmentation": tfds.features.Image(shape=(None, None, 1)),
          "image_id": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    for i in range(c.num_images):
      rng = np.random.default_rng([1, i])
      small, seg = demo_scenes.draw_scene(rng, (c.height // 8, c.width // 8))
      image = np.asarray(Image.fromarray(small).resize((c.width, c.height), Image.BILINEAR))
      # Fine noise so the encoded size resembles a photograph rather than a cartoon.
      image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
      seg = np.kron(seg, np.ones((8, 8), np.uint8))[..., None]
      yield str(i), {"image": image, "segmentation": seg, "image_id": f"bench_{i:05d}"}


def _synthetic_spec(data_dir: str) -> specs.DatasetSpec:
  h, w = (int(s) for s in FLAGS.source_hw)
  name = f"h{h}_w{w}_{FLAGS.encoding}_n{FLAGS.num_images}"
  config = _BenchConfig(
    name=name, height=h, width=w, encoding=FLAGS.encoding, num_images=FLAGS.num_images
  )
  builder = DdepBenchImages(config=config, data_dir=data_dir)
  t = time.time()
  builder.download_and_prepare()
  print(
    f"synthetic data ready ({time.time() - t:.0f} s): {FLAGS.num_images} {h}x{w} {FLAGS.encoding}"
  )
  return specs.DatasetSpec(
    name=f"bench_{name}",
    tfds_name=f"ddep_bench_images/{name}",
    num_classes=demo_scenes.NUM_CLASSES,
    train_split="train",
    eval_split="train",
    pretrain_splits=("train",),
  )


def _time(iterator) -> float:
  for _ in range(FLAGS.warmup):
    next(iterator)
  t = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(iterator)
  return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - t)


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix="ddep_bench_")
  if FLAGS.dataset:
    spec = specs.get(FLAGS.dataset)
    input_pipeline.prepare(spec.name, data_dir=data_dir)
  else:
    spec = _synthetic_spec(data_dir)
  cores = len(os.sched_getaffinity(0))
  common = dict(
    batch_size=FLAGS.batch_size, seed=0, data_dir=data_dir, process_index=0, process_count=1
  )
  for which in FLAGS.pipelines:
    if which == "pretrain":
      size = tuple(int(s) for s in FLAGS.image_size)
      it = input_pipeline.pretrain_dataset(spec, image_size=size, **common)
    elif which == "finetune":
      size = tuple(int(s) for s in FLAGS.crop)
      it = input_pipeline.finetune_dataset(spec, crop_size=size, **common)
    else:
      raise app.UsageError(f"unknown pipeline {which!r}")
    rate = _time(it)
    print(
      f"{which:9s} {spec.name} -> {size[0]}x{size[1]}: {rate:7.1f} images/s, "
      f"{rate / cores:6.1f} images/s/core ({cores} cores)"
    )


if __name__ == "__main__":
  app.run(main)
