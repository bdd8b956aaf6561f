"""The base config every experiment starts from, and the string-argument parser.

Configs are data: an experiment file in configs/ sets values; `ddep.config.validation`
checks them before anything is compiled. The schema lives in the package, so that a
config file imports only `ddep` and loads from any path.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """big_vision-style `get_config('key=value,flag')` arguments, typed by the defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ('', '1', 'true', 'yes')  # A bare flag means True.
    else:
      out[key] = kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What this run trains: 'denoise' (DeP/DDeP pretraining, paper Sec. 3), 'segment'
  # (fine-tuning) or 'classify' (supervised encoder pretraining on image labels).
  c.task = 'segment'
  # The method this run belongs to, for reports: 'none', 'supervised', 'dep', 'ddep'.
  c.method = 'none'

  c.model = ml_collections.ConfigDict(
      dict(
          preset='r50_vit_b16',
          decoder_width_multiplier=1,
          dtype='float32',  # computation dtype; parameters stay float32
          noise_conditioning=False,  # Sec. 3.2
          remat=(),  # any of 'resnet', 'transformer', 'decoder'
          attention_impl='',  # '' per backend: cuDNN on GPUs (bf16), else XLA; or 'xla'/'cudnn'
          dropout_rate=0.0,
      )
  )

  c.data = ml_collections.ConfigDict(
      dict(
          dataset='demo',
          data_dir='',  # '' = TFDS default
          batch_size=128,  # global, across all hosts
          eval_batch_size=8,  # global
          image_size=(512, 512),  # train crop (H, W); divisible by 16
          scale_range=(),  # e.g. (0.5, 2.0) for random scaling while fine-tuning
          area_range=(0.05, 1.0),  # inception crop's area fraction (denoise, classify runs)
          label_fraction=1.0,  # fraction of the labelled split (Sec. 4.3)
          label_count=0,  # or an exact count; overrides label_fraction
          subset_seed=0,
          train_split='',  # '' = the dataset's labelled train split (segment, classify)
          eval_split='',  # '' = the dataset's validation split
          eval_pad_to=(),  # pad eval images/labels to this (H, W) when sizes vary
          skip_bad_examples=False,
          # Denoising pretraining's images: 'original', or 'decoded', their lossless copy
          # stored as pixels (ddep.data.decoded_copy; bit-identical batches without
          # PNG decoding, for PNG sets such as Cityscapes; `ddep.prepare --decoded_copy`).
          pretrain_images='original',
          prepare=True,  # build generated datasets (demo) when missing
      )
  )

  c.denoise = ml_collections.ConfigDict(
      dict(
          sigma=0.8,  # fixed σ (Eq. 4); 0.8 for DeP, 0.1 for DDeP (Sec. 3.3)
          sigma_range=(),  # (a, b): σ ~ U(a, b) per example instead (Table 6)
          form='additive',  # 'additive' x + σε (Eq. 1) or 'ddpm' (Eq. 2)
          # 'ddpm' takes γ of Eq. 2 instead of σ (then 0 / ()); σ = s is γ = 1 / (1 + s²).
          gamma=0.0,  # fixed γ in (0, 1)
          gamma_range=(),  # (a, b): γ ~ U(a, b) per example instead
          target='eps',  # 'eps' (Eq. 4) or 'x' (Table 7)
      )
  )

  c.classify = ml_collections.ConfigDict(dict(loss='sigmoid', num_classes=0))

  # Initialisation: a run of ours (workdir or checkpoint dir) and/or a published encoder.
  c.init_from = ''
  c.init_encoder_from = ''  # .npz (original ViT layout) or timm .safetensors
  c.reinit = ('head', 'classifier')  # never taken from init_from (Sec. 3.1: new head)
  c.frozen = ()  # regexes over param paths; DDeP: ('encoder/.*',)

  c.optim = ml_collections.ConfigDict(
      dict(
          name='adam',
          lr=1e-4,
          weight_decay=0.0,
          warmup_steps=0,
          decay='cosine',
          end_lr_factor=0.0,
          grad_clip_norm=0.0,
          accumulation_steps=1,
          b1=0.9,
          b2=0.999,
      )
  )
  c.total_steps = 0  # exactly one of total_steps / total_epochs
  c.total_epochs = 0.0

  c.eval = ml_collections.ConfigDict(
      dict(
          protocol='whole',
          flip=False,
          batch_size=0,
          # Denoise runs: ε-MSE and PSNR on this many held-out images at every eval, with
          # fixed noise at the training level (ddep.evaluators.denoise); 0 = none. Read from
          # denoise_split ('' = the dataset's eval split) at the training crop size.
          denoise_images=0,
          denoise_split='',
          summary_images=4,  # TensorBoard pictures per eval (grids, overlays); 0 = none
      )
  )
  c.log_every = 50
  c.eval_every = 1000  # 0 = only at the end
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.checkpoint_async = True  # saves overlap training; tests may want them synchronous
  c.profile = False

  # Devices: a 1-D 'data' mesh over all devices; FSDP shards params along it. The train
  # state's memory layouts: 'auto' (XLA's choice for the train step, ddep.training.layouts)
  # or 'default' (row-major).
  c.mesh = ml_collections.ConfigDict(dict(fsdp=False, state_layouts='auto'))
  return c
