r"""Denoising pretraining for Pascal Context (paper Sec. 4.3; Tables 3, 5, 6, 7, Figures 5, 7, 8).

DeP (sigma 0.8, whole network from scratch) or DDeP (sigma 0.1, decoder only on the
frozen ImageNet-21k encoder) on all Pascal VOC 2012 images (Sec. 4.3: Pascal Context
is a subset of VOC, and pretraining on all of VOC helps), 512x512 crops, Adam lr 1e-4,
batch 128, 6000 epochs (ddep/config/recipes.py).

  python -m ddep.main --workdir=$W \
    --config=configs/pretrain_pascal_context.py:method=ddep,width=3

Arguments:
  method       'dep' | 'ddep'
  width        decoder width multiplier (Sec. 4.2: 1x and 3x on Pascal Context); the
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
  # The Pascal Context spec pretrains on the 17,125 VOC2012 images (its
  # `pretrain_tfds_name`, docs/datasets.md); 59 or 60 classes read the same images.
  return recipes.denoising_pretraining(arg, dataset='pascal_context_60')
