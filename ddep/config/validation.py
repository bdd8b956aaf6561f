"""Checks a config before anything is built or compiled; errors name the key."""

from typing import Any

from ddep.datasets import folder
from ddep.datasets import specs
from ddep.evaluators import inference
from ddep.models import presets
from ddep.models import transunet
from ddep.models import vit
from ddep.training import layouts
from ddep.training import optimizer

TASKS = ('denoise', 'segment', 'classify')
METHODS = ('none', 'supervised', 'dep', 'ddep')


class ConfigError(ValueError):
  pass


def _fail(key: str, msg: str):
  raise ConfigError(f'config.{key}: {msg}')


def _pair(config, key: str) -> tuple[int, int]:
  value = config
  for part in key.split('.'):
    value = value[part]
  if len(value) != 2 or any(int(v) <= 0 for v in value):
    _fail(key, f'expected (H, W) with positive entries, got {tuple(value)}')
  return int(value[0]), int(value[1])


def output_stride(config) -> int:
  return presets.create_model(config.model.preset).output_stride


def validate(config: Any, *, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first invalid key."""
  if config.task not in TASKS:
    _fail('task', f'unknown task {config.task!r}; choose from {TASKS}')
  if config.method not in METHODS:
    _fail('method', f'unknown method {config.method!r}; choose from {METHODS}')
  if config.model.preset not in presets.PRESETS:
    _fail(
        'model.preset',
        f'unknown preset {config.model.preset!r}; ' f'choose from {sorted(presets.PRESETS)}',
    )
  if config.model.dtype not in ('float32', 'bfloat16'):
    _fail('model.dtype', f"must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
  if int(config.model.decoder_width_multiplier) < 1:
    _fail('model.decoder_width_multiplier', 'must be >= 1')
  if config.model.attention_impl not in vit.ATTENTION_IMPLS:
    _fail(
        'model.attention_impl',
        f'unknown {config.model.attention_impl!r}; choose from ' f'{vit.ATTENTION_IMPLS}',
    )
  if config.mesh.state_layouts not in layouts.LAYOUTS:
    _fail('mesh.state_layouts', f'{config.mesh.state_layouts!r}; choose from {layouts.LAYOUTS}')
  unknown = sorted(set(config.model.remat) - set(transunet.REMAT_PARTS))
  if unknown:
    _fail('model.remat', f'unknown parts {unknown}; choose from {transunet.REMAT_PARTS}')
  if folder.is_folder(config.data.dataset):
    # A folder's spec (its classes) lives with its prepared files: read it now, under the
    # run's data_dir, so that a missing preparation is one line before anything is built,
    # and so that the rest of the run's specs.get(name) finds this spec.
    try:
      specs.get(config.data.dataset, data_dir=config.data.data_dir or folder.default_data_dir())
    except (ValueError, FileNotFoundError) as e:
      _fail('data.dataset', str(e))
  # Other datasets by name only: nothing of the dataset is read here.
  elif config.data.dataset not in specs.names():
    _fail(
        'data.dataset',
        f'unknown dataset {config.data.dataset!r}; choose from {specs.names()} or '
        'folder:NAME (your own images, prepared by ddep.prepare)',
    )
  # Checked now, not when the first evaluation runs after the whole training.
  protocols = tuple(dict.fromkeys(('whole', *inference.PROTOCOLS)))  # 'whole' is one of them
  if config.eval.protocol not in protocols:
    _fail('eval.protocol', f'unknown protocol {config.eval.protocol!r}; choose from {protocols}')
  if int(config.eval.batch_size) < 0:
    _fail('eval.batch_size', "must be >= 0 (0 = the protocol's default)")
  for key in ('denoise_images', 'summary_images'):
    if int(config.eval.get(key, 0)) < 0:
      _fail(f'eval.{key}', f'must be >= 0 (0 = none), got {config.eval[key]}')

  stride = output_stride(config)
  h, w = _pair(config, 'data.image_size')
  if h % stride or w % stride:
    _fail('data.image_size', f'{h}x{w} is not divisible by {stride}')
  if config.data.eval_pad_to:
    ph, pw = _pair(config, 'data.eval_pad_to')
    if config.eval.protocol == 'whole' and (ph % stride or pw % stride):
      _fail('data.eval_pad_to', f'{ph}x{pw} is not divisible by {stride}')

  for key in ('batch_size', 'eval_batch_size'):
    b = int(config.data[key])
    if b <= 0 or b % num_devices:
      _fail(f'data.{key}', f'{b} must be positive and divisible by the {num_devices} devices')

  if not 0.0 < float(config.data.label_fraction) <= 1.0:
    _fail('data.label_fraction', f'{config.data.label_fraction} is outside (0, 1]')
  if int(config.data.label_count) < 0:
    _fail('data.label_count', 'must be >= 0 (0 = use label_fraction)')
  area = tuple(config.data.area_range)
  if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
    _fail('data.area_range', f'expected (lo, hi) with 0 < lo <= hi <= 1, got {area}')
  if config.data.scale_range and (
      len(config.data.scale_range) != 2
      or not 0 < config.data.scale_range[0] <= config.data.scale_range[1]
  ):
    _fail('data.scale_range', f'expected (lo, hi) with 0 < lo <= hi, got {config.data.scale_range}')
  pretrain_images = config.data.get('pretrain_images', 'original')
  if pretrain_images not in ('original', 'decoded'):
    _fail('data.pretrain_images', f"must be 'original' or 'decoded', got {pretrain_images!r}")
  if pretrain_images != 'original' and config.task != 'denoise':
    _fail(
        'data.pretrain_images',
        f"'{pretrain_images}' is the images of denoising pretraining (task='denoise'); "
        f'this run has task={config.task!r}',
    )

  if config.task == 'denoise':
    d = config.denoise
    if d.form not in ('additive', 'ddpm'):
      _fail('denoise.form', f"must be 'additive' or 'ddpm', got {d.form!r}")
    _validate_noise_level(d)
    if d.target not in ('eps', 'x'):
      _fail('denoise.target', f"must be 'eps' or 'x', got {d.target!r}")
  if config.task == 'classify':
    if config.classify.loss not in ('sigmoid', 'softmax'):
      _fail('classify.loss', f"must be 'sigmoid' or 'softmax', got {config.classify.loss!r}")

  o = config.optim
  if o.name not in ('adam', 'adamw'):
    _fail('optim.name', f"must be 'adam' or 'adamw', got {o.name!r}")
  if o.decay not in optimizer.DECAYS:
    _fail('optim.decay', f'unknown decay {o.decay!r}; choose from {optimizer.DECAYS}')
  if not float(o.lr) > 0:
    _fail('optim.lr', f'must be > 0, got {o.lr}')
  if float(o.weight_decay) < 0:
    _fail('optim.weight_decay', 'must be >= 0')
  if int(o.accumulation_steps) < 1:
    _fail('optim.accumulation_steps', 'must be >= 1')
  if bool(config.total_steps) == bool(config.total_epochs):
    _fail('total_steps', 'set exactly one of total_steps and total_epochs')
  if int(config.total_steps) < 0 or float(config.total_epochs) < 0:
    _fail('total_steps', 'durations must be positive')
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    if int(config[key]) <= 0:
      _fail(key, 'must be > 0')
  if int(config.eval_every) < 0:
    _fail('eval_every', 'must be >= 0')
  if (
      config.frozen
      and config.task == 'denoise'
      and not (config.init_from or config.init_encoder_from)
  ):
    _fail(
        'frozen',
        'freezing parameters that were never initialised from a checkpoint '
        '(set init_from or init_encoder_from; DDeP freezes a pretrained encoder)',
    )


def _validate_noise_level(d) -> None:
  """Each form's level in its own equation's terms: σ for Eq. 1, γ for Eq. 2 (Sec. 3.1).

  Mixing them fails naming the keys: a σ read as γ (or the reverse) would train at a
  noise level nobody asked for (σ = 0.1 is γ = 0.99, while γ = 0.1 is σ = 3).
  """
  ddpm = d.form == 'ddpm'
  own, other = ('gamma', 'sigma') if ddpm else ('sigma', 'gamma')
  value = {k: float(d.get(k, 0.0)) for k in ('sigma', 'gamma')}
  ranges = {k: tuple(d.get(f'{k}_range', ())) for k in ('sigma', 'gamma')}
  if value[other] or ranges[other]:
    key = f'denoise.{other}_range' if ranges[other] else f'denoise.{other}'
    equation, form = ('1', 'additive') if other == 'sigma' else ('2', 'ddpm')
    _fail(
        key,
        f'{ranges[other] or value[other]} is {other} of Eq. {equation}, the {form!r} '
        f"form's, but denoise.form={d.form!r} takes denoise.{own} or denoise.{own}_range: "
        f'clear {key} or set denoise.form={form!r} (sigma = s is gamma = 1 / (1 + s^2))',
    )
  high = 1.0 if ddpm else float('inf')  # γ of Eq. 2 lies in (0, 1).
  if ranges[own]:  # A range replaces the fixed value (Table 6).
    r = ranges[own]
    if len(r) != 2 or not 0 < r[0] < r[1] < high:
      _fail(
          f'denoise.{own}_range', f"expected (a, b) with 0 < a < b{' < 1' if ddpm else ''}, got {r}"
      )
  elif not 0 < value[own] < high:
    _fail(
        f'denoise.{own}',
        (f'denoise.form=ddpm needs gamma of Eq. 2 in (0, 1), got ' f'{value[own]}')
        if ddpm
        else f'must be > 0, got {d.sigma}',
    )
