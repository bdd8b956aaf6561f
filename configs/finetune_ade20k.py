r"""Fine-tuning on ADE20K (paper Tables 4 and 7, Figures 6 and 7).

150 classes, 512x512 random crops + flips; evaluated on VALIDATION with the short
side resized to 512 and 512x512 sliding windows ('ade20k_sliding', ddep/evaluators/inference.py).

  python -m ddep.main --workdir=$W --config=configs/finetune_ade20k.py:\
method=ddep,width=3,fraction=0.05,seed=7,init_from=$PRETRAIN_WORKDIR

Arguments:
  method     'none' | 'supervised' | 'dep' | 'ddep' (Sec. 4.4)
  fraction   labelled fraction of TRAIN: 1, 0.2, 0.1, 0.05, 0.01 (paper counts
             20210, 4042, 2021, 1010, 202) or any other
  count      an exact number of labelled images instead (0 = use fraction)
  seed       picks the labelled subset and the training seed (Sec. 4.3)
  width      decoder width multiplier, 1 or 3 (Sec. 4.2)
  lr, wd     Adam learning rate and weight decay; swept over [1e-5, 3e-4] (Sec. 4.3)
  steps      training steps (0 = 80k; the paper does not state its schedule)
  batch      global batch size
  model      'r50_vit_b16', 'bit_r50_unet' or 'r50_unet'
  encoder    'supervised': the ImageNet-21k encoder file ('' = checkpoints/...)
  init_from  'dep'/'ddep': the workdir of configs/pretrain_ade20k.py with the same
             method and width; 'supervised': a supervised run of ours
  runlocal   toy size on the generated 'demo_tiny' data, for CPUs and tests
"""

from ddep.config import recipes
from ddep.config import schema as config_schema


def get_config(arg=None):
  a = config_schema.parse_arg(arg, **recipes.FINETUNE_ARGS)
  return recipes.finetuning(
      a,
      dataset='ade20k',
      crop=(512, 512),
      protocol='ade20k_sliding',
      flip=False,  # Sec. 4.3 flips on Cityscapes only
      # ADEChallengeData2016 images vary in size (mostly ~512 px on the short side);
      # 2048 is a generous bound, and a larger image stops evaluation with
      # "image larger than pad_to" rather than being cropped.
      eval_pad_to=(2048, 2048),
      protocol_batch=4,
      steps=80_000,
  )
