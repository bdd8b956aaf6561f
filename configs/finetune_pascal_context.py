r"""Fine-tuning on Pascal Context (paper Tables 3, 5, 6, 7, Figures 5, 7, 8).

60 classes (59 + background, Sec. 4.1; `classes=59` ignores background instead),
512x512 random crops + flips; evaluated on VALIDATION with the long side resized to
520 and 480x480 sliding windows ('pascal_context_sliding', ddep/evaluators/inference.py).
Table 5 is `model=bit_r50_unet` (BiT's ResNet-50 v2 UNet).

  python -m ddep.main --workdir=$W --config=configs/finetune_pascal_context.py:\
method=ddep,width=3,fraction=0.1,seed=2,init_from=$PRETRAIN_WORKDIR

Arguments:
  method     'none' | 'supervised' | 'dep' | 'ddep' (Sec. 4.4)
  fraction   labelled fraction of TRAIN: 1, 0.2, 0.1, 0.05, 0.01 (paper counts
             4998, 1000, 500, 250, 50) or any other
  count      an exact number of labelled images instead (0 = use fraction)
  seed       picks the labelled subset and the training seed (Sec. 4.3)
  width      decoder width multiplier, 1 or 3 (Sec. 4.2)
  lr, wd     Adam learning rate and weight decay; swept over [1e-5, 3e-4] (Sec. 4.3)
  steps      training steps (0 = 40k; the paper does not state its schedule)
  batch      global batch size
  classes    60 (with background) or 59
  model      'r50_vit_b16', 'bit_r50_unet' (Table 5) or 'r50_unet' (post-activation)
  encoder    'supervised': the ImageNet-21k encoder file ('' = checkpoints/...)
  init_from  'dep'/'ddep': the workdir of configs/pretrain_pascal_context.py with
             the same method, width and model; 'supervised': a supervised run of ours
  runlocal   toy size on the generated 'demo_tiny' data, for CPUs and tests
"""

from ddep.config import recipes
from ddep.config import schema as config_schema


def get_config(arg=None):
  a = config_schema.parse_arg(arg, classes=60, **recipes.FINETUNE_ARGS)
  if a.classes not in (59, 60):
    raise ValueError(f'classes={a.classes}: Pascal Context has 59 or 60 classes')
  return recipes.finetuning(
      a,
      dataset=f'pascal_context_{a.classes}',
      crop=(512, 512),
      protocol='pascal_context_sliding',
      flip=False,  # Sec. 4.3 flips on Cityscapes only
      eval_pad_to=(512, 512),  # VOC images are at most 500x500
      protocol_batch=2,  # at most two 480x480 windows at long side 520
      steps=40_000,
  )
