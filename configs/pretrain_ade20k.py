r"""Denoising pretraining for ADE20K (paper Sec. 4.3; Tables 4, 7, Figures 6, 7).

DeP (sigma 0.8, whole network from scratch) or DDeP (sigma 0.1, decoder only on the
frozen ImageNet-21k encoder) on the images of the TRAIN set (20,210), 512x512 crops,
Adam lr 1e-4, batch 128, 6000 epochs (ddep/config/recipes.py).

  python -m ddep.main --workdir=$W \
    --config=configs/pretrain_ade20k.py:method=ddep,width=3

Arguments:
  method       'dep' | 'ddep'
  width        decoder width multiplier (Sec. 4.2: 1x and 3x on ADE20K); the
               fine-tuning run uses the same width
  sigma        noise level; 0 = the method's default, 0.8 / 0.1 (Sec. 3.3)
  sigma_range  'lo:hi' draws sigma ~ U(lo, hi) per example instead (Table 6)
  form         'additive' (Eq. 1, the paper's) or 'ddpm' (Eq. 2), which takes gamma
               instead of sigma (a sigma with it fails validation)
  gamma        Eq. 2's gamma in (0, 1); 0 = the method's sigma as gamma, 1 / (1 + sigma^2)
  gamma_range  'lo:hi' draws gamma ~ U(lo, hi) per example instead
  target       'eps' (Eq. 4) or 'x' (Table 7)
  epochs, lr   pretraining length and learning rate (Figure 8)
  batch        global batch size
  model        'r50_vit_b16' (TransUNet), 'bit_r50_unet' (Table 5) or 'r50_unet'
  encoder      DDeP's ImageNet-21k encoder (.npz / .safetensors); '' = the model's
               file under checkpoints/ (docs/experiments.md)
  init_from    DDeP on the encoder of a supervised run of ours instead
  runlocal     toy size on the generated 'demo_tiny' data, for CPUs and tests
"""

from ddep.config import recipes


def get_config(arg=None):
  # Sec. 4.3: the TRAIN images; their labels are never read.
  return recipes.denoising_pretraining(arg, dataset='ade20k')
