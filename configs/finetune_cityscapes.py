r"""Fine-tuning on Cityscapes (paper Table 1, Table 2's DDeP row, Figure 2).

19 classes, 1024x1024 random crops + flips, evaluated on VAL_FINE at full
1024x2048 resolution as two 1024x1024 halves, each averaged with its flip (Sec. 4.3).

  python -m ddep.main --workdir=$W --config=configs/finetune_cityscapes.py:\
method=ddep,width=2,fraction=1/30,seed=3,init_from=$PRETRAIN_WORKDIR

Arguments:
  method     'none' | 'supervised' | 'dep' | 'ddep' (Sec. 4.4)
  fraction   labelled fraction of TRAIN_FINE: 1, 1/4, 1/8, 1/30 (paper counts 2975,
             744, 372, 100) or any other, e.g. 0.01 for Figure 2
  count      an exact number of labelled images instead (0 = use fraction)
  seed       picks the labelled subset and the training seed (Sec. 4.3: repeated
             runs use different subsets)
  width      decoder width multiplier, 1 or 2 (Sec. 4.2)
  lr, wd     Adam learning rate and weight decay; the paper sweeps both over
             [1e-5, 3e-4] per task (launch/sweep.py --lrs --wds)
  steps      training steps (0 = 40k; the paper does not state its schedule)
  batch      global batch size
  model      'r50_vit_b16', 'bit_r50_unet' or 'r50_unet'
  encoder    'supervised': the ImageNet-21k encoder file ('' = checkpoints/...)
  init_from  'dep'/'ddep': the workdir of configs/pretrain_cityscapes.py with the
             same method and width; 'supervised': a supervised run of ours instead
             of `encoder`
  runlocal   toy size on the generated 'demo_tiny' data, for CPUs and tests
"""

from ddep.config import recipes
from ddep.config import schema as config_schema


def get_config(arg=None):
  a = config_schema.parse_arg(arg, **recipes.FINETUNE_ARGS)
  return recipes.finetuning(
      a,
      dataset='cityscapes',
      crop=(1024, 1024),
      protocol='cityscapes_halves',
      flip=True,
      # Every Cityscapes image is 1024x2048: the pad is a no-op that fixes the shape.
      eval_pad_to=(1024, 2048),
      protocol_batch=4,  # two halves and their flips
      steps=40_000,
  )
