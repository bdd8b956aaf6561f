r"""Denoising pretraining on your own images: a folder dataset, `folder:NAME`.

The paper's recipe (Sec. 4.3, as configs/pretrain_ade20k.py): DeP (sigma 0.8, the whole
network from scratch) or DDeP (sigma 0.1, the decoder on the frozen ImageNet-21k
encoder), Adam lr 1e-4, batch 128, 6000 epochs, 512x512 crops. It reads the pretraining
images ddep.prepare stored: the `--unlabelled` folder and the labelled train images
(unless prepared with --nopretrain_on_labelled). docs/datasets.md, "Your own data".

  python -m ddep.prepare --dataset=folder:NAME --images=DIR --masks=DIR --classes=FILE \
      --unlabelled=DIR
  python -m ddep.main --workdir=$W --config=configs/pretrain_folder.py:name=NAME,method=dep

Arguments: those of configs/pretrain_ade20k.py (method, width, sigma, sigma_range,
form, gamma, gamma_range, target, epochs, lr, batch, model, encoder, init_from), and
  name      NAME of folder:NAME (required)
  crop      training crop, H or HxW ('' = 512, 32 with runlocal)
  heldout   its evaluation, the held-out denoising metric (ddep.evaluators.denoise):
            this many validation images, noised at the training level (0 = none;
            -1 = 64, 2 with runlocal)
  runlocal  the tiny model, 32x32 crops and 4 steps on the named folder, for CPUs
            and tests (DDeP then needs init_from=<configs/supervised_demo.py:runlocal run>)
"""

from ddep.config import recipes
from ddep.config import schema as config_schema


def get_config(arg=None):
  a = config_schema.parse_arg(arg, **recipes.PRETRAIN_ARGS, name='', crop='', heldout=-1)
  dataset = recipes.folder_dataset(a.name)
  c = recipes.pretraining(a, dataset=dataset, runlocal_dataset=dataset)
  # Arguments given explicitly win over the defaults, runlocal's included.
  if a.crop:
    c.data.image_size = recipes.parse_size(a.crop)
  if a.heldout >= 0:
    c.eval.denoise_images = a.heldout
  return c
