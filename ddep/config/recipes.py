"""What the experiment configs (configs/*.py) share: each method's initialisation, `runlocal`.

Not an experiment itself (it has no `get_config`). The experiment files set every
dataset-specific value themselves; this module holds only the parts that must
agree between them:

  * `pretrain_method` / `finetune_method`: the paper's four methods (Sec. 3, 4.4)
    as initialisation and freezing settings;
  * `denoising_pretraining`: the one pretraining recipe of Sec. 4.3, which is the
    same on every dataset (only the images differ);
  * `finetuning`: the fine-tuning recipe; each configs/finetune_*.py passes its
    dataset's crop, evaluation protocol and schedule;
  * `parse_fraction`: label fractions such as '1/30' that must match the paper's
    subset counts exactly;
  * `shrink_for_runlocal`: the tiny CPU variant every config offers.
"""

import fractions

from ddep.config import schema as config_schema

# The published ImageNet-21k encoders (paper Sec. 3: "supervised model checkpoints
# pretrained on the ImageNet-21K dataset"); the loader reads local files only, so
# launch/tpu.sh and docs/experiments.md copy them here (relative to the repo root).
#   gs://vit_models/imagenet21k/R50+ViT-B_16.npz
#   gs://bit_models/BiT-M-R50x1.npz (needs a converter to our layout; see docs)
ENCODERS = {
    'r50_vit_b16': 'checkpoints/R50+ViT-B_16.npz',
    # Post-activation: no published weights fit it (the loader says so); Table 5 uses
    # bit_r50_unet, the pre-activation ResNet-50 the BiT-M-R50x1 weights were trained as.
    'r50_unet': 'checkpoints/BiT-M-R50x1.npz',
    'bit_r50_unet': 'checkpoints/BiT-M-R50x1.npz',
}
# runlocal swaps each paper model for the preset of the same architecture at toy size.
TINY_PRESETS = {
    'r50_vit_b16': 'tiny',
    'r50_unet': 'tiny_r50_unet',
    'bit_r50_unet': 'tiny_bit_r50_unet',
}
# Sec. 3.3: sigma = 0.8 works best for DeP, 0.1 for DDeP.
DEFAULT_SIGMA = {'dep': 0.8, 'ddep': 0.1}
PRETRAIN_METHODS = ('dep', 'ddep')
FINETUNE_METHODS = ('none', 'supervised', 'dep', 'ddep')
# DDeP trains the decoder only (Sec. 3.1); big_vision-style regexes over param paths.
FROZEN_ENCODER = ('encoder/.*',)
# The stand-in for ImageNet-21k pretraining on the demo data (runlocal has no npz).
SUPERVISED_STAND_IN = 'configs/supervised_demo.py'


def parse_fraction(text: str) -> float:
  """'1/30' -> 1/30 exactly, so the paper's subset counts are found (e.g. 100 images)."""
  value = float(fractions.Fraction(text))
  if not 0 < value <= 1:
    raise ValueError(f'fraction={text!r} must lie in (0, 1]')
  return value


def folder_dataset(name: str) -> str:
  """configs/*_folder.py's `name=NAME` -> 'folder:NAME', the dataset ddep.prepare built."""
  if not name:
    raise ValueError(
        'name=NAME is required: the folder dataset prepared by '
        'python -m ddep.prepare --dataset=folder:NAME (docs/datasets.md, "Your own data")'
    )
  return f'folder:{name}'


def parse_size(text: str, name: str = 'crop') -> tuple[int, int]:
  """'512' -> (512, 512), '512x1024' -> (512, 1024): (height, width)."""
  height, sep, width = text.partition('x')
  try:
    size = (int(height), int(width if sep else height))
  except ValueError:
    raise ValueError(f'{name}={text!r}: expected H or HxW, e.g. 512 or 512x1024') from None
  if min(size) <= 0:
    raise ValueError(f'{name}={text!r} must be positive')
  return size


def parse_range(text: str, name: str = 'sigma_range') -> tuple[float, float]:
  """'0.2:0.3' -> (0.2, 0.3); a colon because commas separate config arguments."""
  lo, sep, hi = text.partition(':')
  if not sep:
    raise ValueError(f'{name}={text!r}: expected lo:hi, e.g. 0.2:0.3')
  return float(lo), float(hi)


def pretrain_method(
    c,
    *,
    method: str,
    sigma: float,
    sigma_range: str,
    target: str,
    encoder: str,
    init_from: str,
    form: str = 'additive',
    gamma: float = 0.0,
    gamma_range: str = '',
) -> None:
  """Denoising pretraining (Eq. 4) for DeP (everything, from scratch) or DDeP
  (decoder only, on a frozen supervised encoder)."""
  if method not in PRETRAIN_METHODS:
    raise ValueError(f'method={method!r}: denoising pretraining is one of {PRETRAIN_METHODS}')
  c.task = 'denoise'
  c.method = method
  c.denoise.form = form
  c.denoise.sigma_range = parse_range(sigma_range) if sigma_range else ()  # Table 6
  c.denoise.gamma_range = parse_range(gamma_range, 'gamma_range') if gamma_range else ()
  if form == 'ddpm':
    # Eq. 2 in its own terms; by default at the method's σ's signal-to-noise ratio, so that
    # Eq. 1 and Eq. 2 compare at one noise level. A σ given here fails validation, by name.
    c.denoise.sigma = float(sigma)
    default_gamma = 1 / (1 + DEFAULT_SIGMA[method] ** 2)
    c.denoise.gamma = float(gamma) or (0.0 if gamma_range else round(default_gamma, 6))
  else:
    c.denoise.sigma = float(sigma) or DEFAULT_SIGMA[method]  # sigma_range, if set, wins
    c.denoise.gamma = float(gamma)  # Must stay 0 for Eq. 1; validation says so.
  c.denoise.target = target  # Table 7: 'eps' (Eq. 4) or 'x'
  if method == 'ddep':
    # The supervised encoder: a published checkpoint, or a supervised run of ours.
    if init_from:
      c.init_from = init_from
    else:
      c.init_encoder_from = encoder
    c.frozen = FROZEN_ENCODER


PRETRAIN_ARGS = dict(
    method='ddep',
    width=1,
    sigma=0.0,
    sigma_range='',
    form='additive',
    gamma=0.0,
    gamma_range='',
    target='eps',
    epochs=6000.0,
    lr=1e-4,
    batch=128,
    model='r50_vit_b16',
    encoder='',
    init_from='',
    runlocal=False,
)


def denoising_pretraining(arg, *, dataset: str):
  """Sec. 4.3: Adam, lr 1e-4, batch 128, 6000 epochs, 512x512 crops, on `dataset`'s
  pretraining images; arguments as documented in configs/pretrain_*.py."""
  return pretraining(config_schema.parse_arg(arg, **PRETRAIN_ARGS), dataset=dataset)


def pretraining(a, *, dataset: str, runlocal_dataset: str = 'demo_tiny'):
  """`denoising_pretraining` from parsed PRETRAIN_ARGS (plus any the experiment adds);
  `runlocal_dataset` is what runlocal trains on."""
  c = config_schema.base_config()
  pretrain_method(
      c,
      method=a.method,
      sigma=a.sigma,
      sigma_range=a.sigma_range,
      form=a.form,
      gamma=a.gamma,
      gamma_range=a.gamma_range,
      target=a.target,
      encoder=a.encoder or ENCODERS[a.model],
      init_from=a.init_from,
  )
  c.model.preset = a.model
  c.model.decoder_width_multiplier = a.width  # must match the fine-tuning run's
  c.model.dtype = 'bfloat16'  # compute only; parameters and optimizer stay float32

  c.data.dataset = dataset
  c.data.batch_size = a.batch
  c.data.eval_batch_size = 32  # chunks of the held-out denoising set; divides the devices
  c.data.image_size = (512, 512)  # Sec. 4.1: all denoising pretraining at 512x512

  c.optim.name = 'adam'
  c.optim.lr = a.lr
  c.optim.decay = 'cosine'  # Sec. 4.3 states cosine decay for fine-tuning; we use it here too
  c.total_epochs = a.epochs
  c.log_every = 100
  # The held-out denoising metric (ddep.evaluators.denoise), the curve to watch for Figure 8;
  # best/ keeps the step with the highest held-out PSNR.
  c.eval_every = 5000
  c.eval.denoise_images = 64
  c.checkpoint_every = 5000
  c.keep_checkpoints = 2

  if a.runlocal:
    shrink_for_runlocal(c, model=a.model, dataset=runlocal_dataset)
    c.eval.denoise_images = 2
  return c


def finetune_method(c, *, method: str, encoder: str, init_from: str) -> None:
  """Fine-tuning initialisation per method (Sec. 4.4); everything is trained."""
  if method not in FINETUNE_METHODS:
    raise ValueError(f'method={method!r}: choose from {FINETUNE_METHODS}')
  c.task = 'segment'
  c.method = method
  if method == 'none':
    if init_from:
      raise ValueError('method=none trains from random initialisation; drop init_from')
  elif method == 'supervised':
    if init_from:  # a supervised run of ours (e.g. the demo stand-in) ...
      c.init_from = init_from
    else:  # ... or the published ImageNet-21k encoder; the decoder starts random.
      c.init_encoder_from = encoder
  else:
    # DeP/DDeP: the whole pretrained network; `reinit` drops the denoising head (Sec. 3.1).
    if not init_from:
      raise ValueError(
          f'method={method} fine-tunes a pretraining run: pass '
          f'init_from=<workdir of configs/pretrain_*.py:method={method}>'
      )
    c.init_from = init_from


FINETUNE_ARGS = dict(
    method='ddep',
    fraction='1',
    count=0,
    seed=0,
    width=1,
    lr=1e-4,
    wd=1e-4,
    steps=0,
    batch=16,
    model='r50_vit_b16',
    encoder='',
    init_from='',
    runlocal=False,
)


def finetuning(
    a,
    *,
    dataset: str,
    crop: tuple[int, int],
    protocol: str,
    flip: bool,
    eval_pad_to: tuple[int, int],
    protocol_batch: int,
    steps: int,
    runlocal_dataset: str = 'demo_tiny',
):
  """Fine-tuning on `dataset` with pixelwise cross-entropy, Adam and cosine decay
  (Sec. 4.3); `a` are the parsed FINETUNE_ARGS (plus any the experiment adds);
  `runlocal_dataset` is what runlocal trains on."""
  c = config_schema.base_config()
  finetune_method(c, method=a.method, encoder=a.encoder or ENCODERS[a.model], init_from=a.init_from)
  c.model.preset = a.model
  c.model.decoder_width_multiplier = a.width  # Sec. 4.2
  c.model.dtype = 'bfloat16'  # compute only; parameters and optimizer stay float32

  c.seed = a.seed
  c.data.dataset = dataset
  c.data.batch_size = a.batch
  c.data.eval_batch_size = 16
  c.data.image_size = crop  # Sec. 4.1: random crop + left-right flip only
  c.data.label_fraction = parse_fraction(a.fraction)  # paper counts (Sec. 4.3) apply
  c.data.label_count = a.count  # or an exact number of labelled images
  # Sec. 4.3: repeated runs use different subsets, so one seed picks both.
  c.data.subset_seed = a.seed
  c.data.eval_pad_to = eval_pad_to  # eval images differ in size; the pad is ignored
  c.eval.protocol = protocol
  c.eval.flip = flip
  c.eval.batch_size = protocol_batch  # windows per call: one compile per protocol

  # Sec. 4.3: lr and weight decay are swept over [1e-5, 3e-4] per task
  # (launch/sweep.py --lrs= --wds=). 'adam' adds the decay to the gradient (L2): decoupled
  # AdamW decay of lr * wd ~ 1e-8 per step would do nothing at these values.
  c.optim.name = 'adam'
  c.optim.lr = a.lr
  c.optim.weight_decay = a.wd
  c.optim.decay = 'cosine'
  c.total_steps = a.steps or steps
  c.log_every = 50
  c.eval_every = 5000
  c.checkpoint_every = 5000
  c.keep_checkpoints = 2

  if a.runlocal:
    shrink_for_runlocal(c, model=a.model, dataset=runlocal_dataset)
  return c


def shrink_for_runlocal(c, *, model: str, dataset: str = 'demo_tiny') -> None:
  """The same experiment at toy size on `dataset` (the generated 'demo_tiny' unless a
  config names its own, as the folder configs do): a few steps on CPU in seconds.

  Published encoders are not available offline, so a run that needs one must be
  given `init_from=<workdir of configs/supervised_demo.py:runlocal>` instead.
  """
  if c.init_encoder_from:
    raise ValueError(
        f'runlocal has no published encoder ({c.init_encoder_from}); pass '
        f'init_from=<workdir of {SUPERVISED_STAND_IN}:runlocal>'
    )
  c.model.preset = TINY_PRESETS.get(model, model)
  c.model.dtype = 'float32'  # bfloat16 is emulated, hence slow, on CPU.
  c.data.dataset = dataset
  c.data.prepare = True  # demo_tiny is generated offline on first use
  c.data.batch_size = 2
  c.data.eval_batch_size = 2
  c.data.image_size = (32, 32)
  # demo_tiny images are at most 40x44; the pad must be a multiple of the output
  # stride for the 'whole' protocol (16 for the hybrid, 32 for the R50 UNet).
  c.data.eval_pad_to = (
      (64, 64) if c.model.preset in ('tiny_r50_unet', 'tiny_bit_r50_unet') else (48, 48)
  )
  # The paper's protocols need real image sizes (1024x2048 halves, 512-px windows).
  c.eval.protocol = 'whole'
  c.eval.flip = False
  c.eval.batch_size = 0
  c.total_steps = 4
  c.total_epochs = 0.0
  c.optim.warmup_steps = 0
  c.log_every = 1
  c.eval_every = 2
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
