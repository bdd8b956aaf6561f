"""The experiment configs: every paper setting they encode, and each one trained for
one step at toy size (`runlocal`) through the real trainer."""

import importlib
import json
import math
import os
import pathlib
import re

import flax
import jax
import numpy as np
import pytest

from ddep.config import recipes
from ddep.config import validation as config_validation
from ddep.models import presets
from ddep.runs import checkpointing
from ddep.training import objectives
from ddep.training import optimizer as optimizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
HELPERS = {'__init__', 'common', 'recipes'}  # modules of configs/ that are not experiments
# Configs of a user's own folder need one prepared: tests/test_folder_dataset.py runs them.
FOLDER_CONFIGS = {'pretrain_folder', 'finetune_folder'}
CONFIGS = sorted(
    p.stem for p in (REPO / 'configs').glob('*.py') if p.stem not in HELPERS | FOLDER_CONFIGS
)
R50_VIT = 'checkpoints/R50+ViT-B_16.npz'


def get_config(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def test_every_experiment_file_is_a_config():
  assert {
      'finetune_cityscapes',
      'finetune_pascal_context',
      'finetune_ade20k',
      'pretrain_cityscapes',
      'pretrain_pascal_context',
      'pretrain_ade20k',
      'supervised_demo',
  } <= set(CONFIGS)
  for name in CONFIGS:
    assert callable(getattr(importlib.import_module(f'configs.{name}'), 'get_config', None)), name


# ---------------------------------------------------------------------------
# Full size: what the paper's runs are, checked without building anything.

# Every config with each kind of argument it takes, at full size.
FULL_SIZE_ARGS = {
    'supervised_demo': ['', 'model=r50_vit_b16'],
    **{
        f'pretrain_{d}': [
            '',
            'method=dep',
            'method=ddep,width=3',
            'method=ddep,init_from=/runs/sup',
            'method=ddep,sigma_range=0.2:0.3',
            'method=ddep,target=x',
            'method=ddep,epochs=100,lr=3e-4',
            'method=ddep,model=r50_unet',
        ]
        for d in ('cityscapes', 'pascal_context', 'ade20k')
    },
    **{
        f'finetune_{d}': [
            'method=none',
            'method=supervised,fraction=0.01,seed=9',
            'method=supervised,init_from=/runs/sup',
            'method=dep,init_from=/runs/dep',
            'method=ddep,width=3,count=17,init_from=/runs/ddep',
            'method=none,model=r50_unet',
            'method=ddep,lr=1e-5,wd=3e-4,init_from=/p',
        ]
        for d in ('cityscapes', 'pascal_context', 'ade20k')
    },
}
FULL_SIZE_ARGS['finetune_pascal_context'].append('method=none,classes=59')


def test_full_size_args_cover_every_config():
  assert set(FULL_SIZE_ARGS) == set(CONFIGS)


@pytest.mark.parametrize(
    'name,arg', [(n, a) for n in sorted(FULL_SIZE_ARGS) for a in FULL_SIZE_ARGS[n]]
)
def test_full_size_config_validates_on_8_devices(name, arg):
  c = get_config(name, arg)
  config_validation.validate(c, num_devices=8)
  if name != 'supervised_demo':
    assert c.model.preset in ('r50_vit_b16', 'r50_unet')
    assert c.data.dataset in ('cityscapes', 'ade20k', 'pascal_context_60', 'pascal_context_59')


METHOD_INIT = {  # method -> (init_from, init_encoder_from) when fine-tuning
    'none': ('', ''),
    'supervised': ('', R50_VIT),
    'dep': ('/runs/pretrain', ''),
    'ddep': ('/runs/pretrain', ''),
}
CITYSCAPES_COUNTS = {'1': 2975, '1/4': 744, '1/8': 372, '1/30': 100}  # Table 1's header


@pytest.mark.parametrize('method', sorted(METHOD_INIT))
def test_finetune_cityscapes_per_method_and_fraction(method):
  from ddep.data import subsets  # pylint: disable=g-import-not-at-top  (TF: import late)

  for fraction, count in CITYSCAPES_COUNTS.items():
    init = ',init_from=/runs/pretrain' if method in ('dep', 'ddep') else ''
    c = get_config('finetune_cityscapes', f'method={method},fraction={fraction},seed=4{init}')
    assert (c.task, c.method, c.data.dataset) == ('segment', method, 'cityscapes')
    assert (c.init_from, c.init_encoder_from) == METHOD_INIT[method]
    assert tuple(c.frozen) == ()  # fine-tuning trains everything, DDeP included
    assert tuple(c.reinit) == ('head', 'classifier')  # the denoising head is dropped
    assert tuple(c.data.image_size) == (1024, 1024)  # Sec. 4.1
    assert (c.eval.protocol, c.eval.flip) == ('cityscapes_halves', True)  # Sec. 4.3
    assert tuple(c.data.eval_pad_to) == (1024, 2048)
    assert (c.seed, c.data.subset_seed) == (4, 4)
    # '1/30' must reach the paper's exact count, which a rounded 0.0333 would miss.
    assert subsets.subset_size(2975, c.data.label_fraction, 'cityscapes') == count
    assert (c.optim.name, c.optim.decay) == ('adam', 'cosine')
    config_validation.validate(c, num_devices=8)


def test_finetune_datasets_crops_and_protocols():
  expect = {  # Sec. 4.1 crops; protocols of ddep/evaluators/inference.py
      'finetune_ade20k': ('ade20k', (512, 512), 'ade20k_sliding', False),
      'finetune_pascal_context': ('pascal_context_60', (512, 512), 'pascal_context_sliding', False),
  }
  for name, (dataset, crop, protocol, flip) in expect.items():
    c = get_config(name, 'method=ddep,width=3,fraction=0.05,init_from=/p')
    assert (c.data.dataset, tuple(c.data.image_size), c.eval.protocol, bool(c.eval.flip)) == (
        dataset,
        crop,
        protocol,
        flip,
    )
    assert c.model.decoder_width_multiplier == 3
    assert c.data.label_fraction == 0.05
  assert get_config('finetune_pascal_context', 'method=none,classes=59').data.dataset == (
      'pascal_context_59'
  )


def test_finetune_lr_wd_steps_count_and_r50_unet():
  c = get_config(
      'finetune_ade20k', 'method=supervised,lr=3e-4,wd=1e-5,steps=123,count=17,' 'model=r50_unet'
  )
  assert (c.optim.lr, c.optim.weight_decay, c.total_steps, c.data.label_count) == (
      3e-4,
      1e-5,
      123,
      17,
  )
  assert (c.model.preset, c.init_encoder_from) == ('r50_unet', 'checkpoints/BiT-M-R50x1.npz')
  assert get_config('finetune_ade20k', 'method=none').total_steps == 80_000


# Sec. 4.3: Cityscapes TRAIN_FINE + TRAIN_COARSE, all of Pascal VOC, ADE20K TRAIN.
PRETRAIN_IMAGES = {
    'pretrain_cityscapes': ('cityscapes/semantic_segmentation_extra', ('train', 'train_extra')),
    'pretrain_pascal_context': ('pascal_voc', ('train',)),
    'pretrain_ade20k': ('ade20k', ('train',)),
}


@pytest.mark.parametrize('name', sorted(PRETRAIN_IMAGES))
def test_pretraining_reads_the_papers_images(name):
  from ddep.datasets import specs  # pylint: disable=g-import-not-at-top

  view = specs.get(get_config(name).data.dataset).pretrain_view()
  assert (view.tfds_name, view.pretrain_splits) == PRETRAIN_IMAGES[name]


@pytest.mark.parametrize(
    'name,dataset',
    [
        ('pretrain_cityscapes', 'cityscapes'),
        ('pretrain_pascal_context', 'pascal_context_60'),
        ('pretrain_ade20k', 'ade20k'),
    ],
)
def test_pretrain_dep_and_ddep(name, dataset):
  dep = get_config(name, 'method=dep')
  assert (dep.task, dep.method, dep.data.dataset) == ('denoise', 'dep', dataset)
  assert dep.denoise.sigma == 0.8 and tuple(dep.frozen) == ()  # Sec. 3.3; all from scratch
  assert (dep.init_from, dep.init_encoder_from) == ('', '')
  assert (dep.denoise.target, dep.denoise.form, tuple(dep.denoise.sigma_range)) == (
      'eps',
      'additive',
      (),
  )  # Eq. 4
  # Sec. 4.3: Adam, lr 1e-4, batch 128, 6000 epochs, 512x512.
  assert (dep.optim.name, dep.optim.lr, dep.data.batch_size) == ('adam', 1e-4, 128)
  assert (dep.total_epochs, dep.total_steps, tuple(dep.data.image_size)) == (6000, 0, (512, 512))

  ddep = get_config(name, 'method=ddep,width=2')
  assert ddep.denoise.sigma == 0.1 and tuple(ddep.frozen) == ('encoder/.*',)
  assert (ddep.init_from, ddep.init_encoder_from) == ('', R50_VIT)
  assert ddep.model.decoder_width_multiplier == 2
  ours = get_config(name, 'method=ddep,init_from=/runs/sup')  # a supervised run of ours
  assert (ours.init_from, ours.init_encoder_from, tuple(ours.frozen)) == (
      '/runs/sup',
      '',
      ('encoder/.*',),
  )


def test_pretrain_ablation_args():
  name = 'pretrain_pascal_context'
  assert tuple(get_config(name, 'sigma_range=0.2:0.3').denoise.sigma_range) == (0.2, 0.3)  # T. 6
  assert get_config(name, 'target=x').denoise.target == 'x'  # Table 7
  assert get_config(name, 'method=ddep,sigma=0.4').denoise.sigma == 0.4  # Figure 7
  short = get_config(name, 'epochs=250,lr=3e-4')  # Figure 8
  assert (short.total_epochs, short.optim.lr) == (250, 3e-4)
  r50 = get_config(name, 'model=r50_unet')  # Table 5
  assert (r50.model.preset, r50.init_encoder_from) == ('r50_unet', 'checkpoints/BiT-M-R50x1.npz')


def test_ddep_freezes_exactly_the_encoder():
  """The frozen regexes against a real parameter tree: encoder only, all of it."""
  c = get_config('pretrain_cityscapes', 'method=ddep')
  model = presets.create_model('tiny', num_outputs=3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)))
  mask = flax.traverse_util.flatten_dict(
      optimizer_lib.trainable_mask(shapes['params'], c.frozen), sep='/'
  )
  assert {k for k, trainable in mask.items() if not trainable} == {
      k for k in mask if k.startswith('encoder/')
  }
  assert any(k.startswith('decoder/') for k in mask) and any(k.startswith('head/') for k in mask)


@pytest.mark.parametrize(
    'name,arg,message',
    [
        ('finetune_cityscapes', 'method=ddep', 'init_from'),
        ('finetune_ade20k', 'method=dep', 'init_from'),
        ('finetune_cityscapes', 'method=none,init_from=/p', 'random'),
        ('finetune_cityscapes', 'method=supervised,runlocal', 'supervised_demo'),
        ('pretrain_ade20k', 'method=ddep,runlocal', 'supervised_demo'),
        ('pretrain_ade20k', 'method=supervised', 'dep'),
        ('finetune_ade20k', 'method=none,fraction=0', 'fraction'),
        ('finetune_pascal_context', 'method=none,classes=21', 'classes'),
        ('pretrain_cityscapes', 'sigma_range=0.2', 'lo:hi'),
        ('finetune_cityscapes', 'method=none,frac=1', 'unknown config argument'),
    ],
)
def test_bad_args_fail_with_a_reason(name, arg, message):
  with pytest.raises(ValueError, match=message):
    get_config(name, arg)


def test_runlocal_shrinks_to_the_tiny_presets():
  c = get_config('finetune_cityscapes', 'method=ddep,width=2,init_from=/p,runlocal')
  assert (c.model.preset, c.data.dataset, c.eval.protocol) == ('tiny', 'demo_tiny', 'whole')
  assert (c.model.decoder_width_multiplier, c.init_from) == (2, '/p')  # the experiment stays
  assert c.total_steps <= 4 and c.total_epochs == 0
  r50 = get_config('finetune_pascal_context', 'method=none,model=r50_unet,runlocal')
  assert r50.model.preset == 'tiny_r50_unet'
  config_validation.validate(r50)  # its pad must be a multiple of stride 32
  bit = get_config('finetune_pascal_context', 'method=none,model=bit_r50_unet,runlocal')
  assert (bit.model.preset, tuple(bit.data.eval_pad_to)) == ('tiny_bit_r50_unet', (64, 64))
  config_validation.validate(bit)


def test_table5_supervised_and_ddep_start_from_the_published_bit_weights():
  sup = get_config('finetune_pascal_context', 'method=supervised,model=bit_r50_unet')
  assert (sup.model.preset, sup.init_encoder_from) == (
      'bit_r50_unet',
      'checkpoints/BiT-M-R50x1.npz',
  )
  ddep = get_config('pretrain_pascal_context', 'method=ddep,model=bit_r50_unet')
  assert (ddep.model.preset, ddep.init_encoder_from, tuple(ddep.frozen)) == (
      'bit_r50_unet',
      'checkpoints/BiT-M-R50x1.npz',
      ('encoder/.*',),
  )
  config_validation.validate(sup, num_devices=8)
  config_validation.validate(ddep, num_devices=8)


# ---------------------------------------------------------------------------
# runlocal: each config trained for one step. '{name}' stands for that config's
# run's workdir, so pretraining runs are made once and shared (7 runs in all).

RUNLOCAL_ARGS = {
    'supervised_demo': 'runlocal',
    'pretrain_cityscapes': 'method=dep,width=2,runlocal',
    'pretrain_pascal_context': 'method=ddep,sigma_range=0.2:0.3,init_from={supervised_demo},runlocal',
    'pretrain_ade20k': 'method=ddep,target=x,init_from={supervised_demo},runlocal',
    'finetune_cityscapes': 'method=dep,width=2,fraction=1/8,init_from={pretrain_cityscapes},runlocal',
    'finetune_ade20k': 'method=ddep,fraction=0.05,seed=1,init_from={pretrain_ade20k},runlocal',
    # Table 5's UNet on BiT's ResNet-50 v2, at toy size.
    'finetune_pascal_context': 'method=none,model=bit_r50_unet,classes=59,fraction=0.1,runlocal',
}


def test_runlocal_args_cover_every_config():
  assert set(RUNLOCAL_ARGS) == set(CONFIGS)


@pytest.fixture(scope='module')
def one_step_run(tmp_path_factory):
  """name -> (config, workdir) of that config's one-step runlocal run, made on first use."""
  from ddep.training import trainer as train  # pylint: disable=g-import-not-at-top  (TF: import late)

  root = tmp_path_factory.mktemp('runs')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  done = {}

  def run(name):
    if name not in done:
      deps = re.findall(r'\{(\w+)\}', RUNLOCAL_ARGS[name])
      arg = RUNLOCAL_ARGS[name].format(**{d: run(d)[1] for d in deps})
      c = get_config(name, arg)
      c.total_steps = 1
      c.data.data_dir = data_dir
      workdir = str(root / name)
      train.train_and_evaluate(c, workdir)
      done[name] = (c, workdir)
    return done[name]

  return run


def _leaves(tree):
  return {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


@pytest.mark.parametrize('name', CONFIGS)
def test_runlocal_one_step(name, one_step_run):
  c, workdir = one_step_run(name)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '1', 'state'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert losses and all(math.isfinite(v) and v > 0 for v in losses), rows

  if c.task == 'segment':
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    assert 0.0 <= results['miou'] <= 1.0
    assert (results['method'], results['decoder_width']) == (
        c.method,
        c.model.decoder_width_multiplier,
    )
    assert results['label_fraction'] == pytest.approx(c.data.label_fraction)
    # What it was pretrained as, for telling ablations apart in reports.
    assert results['model'] == c.model.preset
    if c.init_from:
      with open(os.path.join(c.init_from, 'config.json')) as f:
        source = json.load(f)
      assert (results['pretraining']['method'], results['pretraining']['sigma']) == (
          source['method'],
          source['denoise']['sigma'],
      )
    else:
      assert results['pretraining'] is None

  params = _leaves(checkpointing.load_params(workdir))
  if c.init_from:
    # Everything but the new head came from the earlier run and moved by at most
    # about one Adam step (lr); a fresh initialisation would be O(0.1) away.
    source = _leaves(checkpointing.load_params(c.init_from))
    shared = [k for k in params if k in source and not k.startswith(('head/', 'classifier/'))]
    assert any(k.startswith('encoder/') for k in shared)
    moved = max(float(np.max(np.abs(params[k] - source[k]))) for k in shared)
    if c.frozen:  # DDeP: the supervised encoder is not touched at all
      frozen = [k for k in shared if k.startswith('encoder/')]
      assert all(np.array_equal(params[k], source[k]) for k in frozen)
    else:
      assert 0 < moved <= 10 * c.optim.lr


def _denoise(arg='', **overrides):
  c = get_config('pretrain_pascal_context', arg)
  for key, value in overrides.items():
    section, name = key.split('__')
    c[section][name] = value
  return c


def test_ddpm_form_takes_gamma_by_default_at_the_methods_sigma():
  ddpm = _denoise('method=ddep,form=ddpm')
  # DDeP's σ = 0.1 (Sec. 3.3) as γ of Eq. 2: 1 / (1 + 0.01); σ is Eq. 1's and stays unset.
  assert (ddpm.denoise.form, ddpm.denoise.sigma) == ('ddpm', 0.0)
  assert ddpm.denoise.gamma == pytest.approx(1 / 1.01, abs=1e-6)
  config_validation.validate(ddpm, num_devices=8)
  assert _denoise('method=dep,form=ddpm,gamma=0.5').denoise.gamma == 0.5
  ranged = _denoise('form=ddpm,gamma_range=0.5:0.6')
  assert (ranged.denoise.gamma, tuple(ranged.denoise.gamma_range)) == (0.0, (0.5, 0.6))
  config_validation.validate(ranged, num_devices=8)
  additive = _denoise('method=ddep')
  assert (additive.denoise.sigma, additive.denoise.gamma) == (0.1, 0.0)
  # What the train step hands to objectives.make_denoising_batch: the form's own level.
  assert objectives.noise_level(ddpm.denoise) == {'gamma': ddpm.denoise.gamma}
  assert objectives.noise_level(ranged.denoise) == {'gamma_range': (0.5, 0.6)}
  assert objectives.noise_level(additive.denoise) == {'sigma': 0.1}
  assert objectives.noise_level(_denoise('sigma_range=0.2:0.3').denoise) == {
      'sigma_range': (0.2, 0.3)
  }


@pytest.mark.parametrize(
    'arg,overrides,match',
    [
        # σ with Eq. 2, γ with Eq. 1: the error names the key that does not belong, and the form.
        (
            'form=ddpm,sigma=0.1',
            {},
            r'config\.denoise\.sigma: 0\.1 is sigma of Eq\. 1.*'
            r"denoise\.form='ddpm' takes denoise\.gamma or denoise\.gamma_range",
        ),
        (
            'form=ddpm,sigma_range=0.2:0.3',
            {},
            r'config\.denoise\.sigma_range: \(0\.2, 0\.3\) is sigma',
        ),
        (
            'gamma=0.5',
            {},
            r'config\.denoise\.gamma: 0\.5 is gamma of Eq\. 2.*'
            r"denoise\.form='additive' takes denoise\.sigma",
        ),
        ('', {'denoise__gamma_range': (0.4, 0.5)}, r'config\.denoise\.gamma_range: \(0\.4, 0\.5\)'),
        ('form=ddpm,gamma=1.5', {}, r'config\.denoise\.gamma: .*in \(0, 1\), got 1\.5'),
        ('form=ddpm,gamma_range=0.5:1.2', {}, r'config\.denoise\.gamma_range: expected .* < 1'),
        (
            '',
            {'denoise__form': 'ddpm', 'denoise__sigma': 0.0},
            r'config\.denoise\.gamma: .*in \(0, 1\), got 0\.0',
        ),
    ],
)
def test_mixing_sigma_and_gamma_fails_validation_naming_the_keys(arg, overrides, match):
  with pytest.raises(config_validation.ConfigError, match=match):
    config_validation.validate(_denoise(arg, **overrides), num_devices=8)
