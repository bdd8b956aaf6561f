"""What differs between the three kinds of run, as one object each (config.task):

  denoise   DeP/DDeP pretraining: predict the noise (or the clean image) of noisy crops
            (Sec. 3, Eq. 4); held-out PSNR picks best/.
  segment   fine-tuning: per-pixel cross-entropy over labelled crops; val mIoU picks best/.
  classify  supervised encoder pretraining (the ImageNet-21k stand-in of Table 1):
            image-level labels from the masks; no evaluation.

A task gives the model's outputs and init inputs, its loss, its training data, its
evaluators and the metric that picks `best/`. The trainer, `ddep.evaluate` and the
benchmark branch on nothing else.

The input pipelines and evaluators (TensorFlow) are imported where they are built: the
model, the losses and so the benchmark run where TensorFlow is not installed.
"""

from typing import Callable, Optional

import jax

from ddep.datasets import specs
from ddep.models import build
from ddep.models import TransUNet
from ddep.training import objectives


def _data_dir(config) -> Optional[str]:
  return config.data.data_dir or None


def _common_data_args(config, local_batch: int, state) -> dict:
  d = config.data
  return dict(
      batch_size=local_batch,
      seed=int(config.seed),
      data_dir=_data_dir(config),
      state=state,
      skip_bad_examples=bool(d.skip_bad_examples),
  )


class Task:
  """The base: a task names itself and the checkpoint metric; subclasses fill in the rest."""

  name: str = ''
  best_metric: str = ''  # The Checkpointer's name for the metric best/ follows ('' = none).
  writes_results = False  # results.json: the final evaluation with the run's settings.

  def num_outputs(self, spec: specs.DatasetSpec) -> int:
    raise NotImplementedError

  def num_image_classes(self, config, spec: specs.DatasetSpec) -> int:
    del config, spec
    return 0

  def build_model(self, config, spec: specs.DatasetSpec) -> TransUNet:
    return build.build_model(
        config,
        num_outputs=self.num_outputs(spec),
        num_image_classes=self.num_image_classes(config, spec),
    )

  def init_params(self, model: TransUNet, key, image_hw):
    return build.init_params(model, key, image_hw)

  def loss_fn(self, model: TransUNet, config) -> Callable:
    """(params, batch, rng) -> (loss, aux metrics)."""
    raise NotImplementedError

  def train_data(self, config, spec: specs.DatasetSpec, *, local_batch: int, state=None):
    """This process's training batches: an iterator with get_state/set_state, num_examples."""
    raise NotImplementedError

  def evaluators(self, config, spec: specs.DatasetSpec, model, mesh, writer) -> list:
    """Objects with `run(state, step) -> {key: value}` and `best_key` (or None)."""
    del config, spec, model, mesh, writer
    return []


class Denoise(Task):
  name = 'denoise'
  best_metric = 'psnr'

  def num_outputs(self, spec):
    return 3  # ε̂ (or x̂) per pixel.

  def loss_fn(self, model, config):
    d = config.denoise

    def loss(params, batch, rng):
      noise_rng, dropout_rng = jax.random.split(rng)
      noisy, target, sigma = objectives.make_denoising_batch(
          noise_rng, batch['image'], form=d.form, target=d.target, **objectives.noise_level(d)
      )
      pred = model.apply(
          {'params': params},
          noisy,
          sigma if model.noise_conditioning else None,
          train=True,
          rngs={'dropout': dropout_rng},
      )
      return objectives.mean_squared_error(pred, target), {}

    return loss

  def train_data(self, config, spec, *, local_batch, state=None):
    from ddep.data import pipelines  # pylint: disable=g-import-not-at-top

    d = config.data
    return pipelines.pretrain_dataset(
        spec,
        image_size=tuple(d.image_size),
        area_range=tuple(d.area_range),
        images=d.get('pretrain_images', 'original'),
        **_common_data_args(config, local_batch, state),
    )

  def evaluators(self, config, spec, model, mesh, writer):
    if not int(config.eval.get('denoise_images', 0)):
      return []
    from ddep.evaluators import denoise  # pylint: disable=g-import-not-at-top

    return [denoise.DenoisingValidation(config, model, spec, mesh, writer)]


class Segment(Task):
  name = 'segment'
  best_metric = 'miou'
  writes_results = True

  def num_outputs(self, spec):
    return spec.num_classes

  def loss_fn(self, model, config):
    del config

    def loss(params, batch, rng):
      logits = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
      value, n = objectives.softmax_cross_entropy_with_ignore(logits, batch['label'])
      return value, {'train/valid_pixels': n}

    return loss

  def train_data(self, config, spec, *, local_batch, state=None):
    from ddep.data import pipelines  # pylint: disable=g-import-not-at-top

    d = config.data
    subset = None
    if int(d.label_count):
      subset = int(d.label_count)
    elif float(d.label_fraction) < 1.0:
      subset = float(d.label_fraction)
    return pipelines.finetune_dataset(
        spec,
        crop_size=tuple(d.image_size),
        scale_range=tuple(d.scale_range) or None,
        subset=subset,
        subset_seed=int(d.subset_seed),
        split=d.get('train_split') or None,
        **_common_data_args(config, local_batch, state),
    )

  def evaluators(self, config, spec, model, mesh, writer):
    from ddep.evaluators import segmentation  # pylint: disable=g-import-not-at-top

    return [
        segmentation.SegmentationValidation(
            config, model, spec, mesh, writer, data_dir=_data_dir(config)
        )
    ]


class Classify(Task):
  name = 'classify'
  best_metric = 'miou'  # Never used: classify runs have no evaluator.

  def num_outputs(self, spec):
    return 3  # The decoder is built but unused: supervised pretraining trains the encoder.

  def num_image_classes(self, config, spec):
    if config.classify.num_classes:
      return int(config.classify.num_classes)
    if not spec.image_labels_key:
      raise ValueError(f'config.task=classify: dataset {spec.name!r} has no image-level labels')
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    info = tfds.builder(spec.tfds_name, data_dir=_data_dir(config)).info
    return int(info.features[spec.image_labels_key].shape[-1])

  def init_params(self, model, key, image_hw):
    return build.init_params(model, key, image_hw, classify=True)

  def loss_fn(self, model, config):
    kind = config.classify.loss

    def loss(params, batch, rng):
      logits = model.apply(
          {'params': params},
          batch['image'],
          train=True,
          rngs={'dropout': rng},
          method=TransUNet.classify,
      )
      return objectives.image_classification_loss(logits, batch['labels'], kind=kind), {}

    return loss

  def train_data(self, config, spec, *, local_batch, state=None):
    from ddep.data import pipelines  # pylint: disable=g-import-not-at-top

    d = config.data
    return pipelines.supervised_dataset(
        spec,
        image_size=tuple(d.image_size),
        split=d.get('train_split') or None,
        area_range=tuple(d.area_range),
        **_common_data_args(config, local_batch, state),
    )


TASKS = {t.name: t for t in (Denoise(), Segment(), Classify())}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'config.task: unknown {name!r}; known: {", ".join(TASKS)}')
  return TASKS[name]
