r"""Fine-tuning on your own images and masks: a folder dataset, `folder:NAME`.

The paper's recipe for images of any size (Sec. 4.3, as configs/finetune_ade20k.py):
512x512 random crops, pixelwise cross-entropy, Adam lr 1e-4 with cosine decay, batch
16, 80k steps; evaluated on the validation split with the short side resized to 512
and 512x512 sliding windows ('ade20k_sliding'). docs/datasets.md, "Your own data".

  python -m ddep.main --workdir=$W --config=configs/finetune_folder.py:\
name=NAME,method=dep,count=100,init_from=$PRETRAIN_WORKDIR

Arguments: those of configs/finetune_ade20k.py (method, fraction, count, seed, width,
lr, wd, steps, batch, model, encoder, init_from), and
  name      NAME of folder:NAME (required)
  crop      training crop, H or HxW ('' = 512, 32 with runlocal)
  protocol  the evaluation protocol: 'ade20k_sliding', 'pascal_context_sliding',
            'cityscapes_halves' or 'whole' ('' = ade20k_sliding, whole with runlocal)
  pad       H or HxW that every validation image fits, to batch them ('' = 2048, 48
            with runlocal; 'whole' needs multiples of the output stride); ddep.prepare
            prints the largest validation size
  runlocal  the tiny model, 32x32 crops and 4 steps on the named folder, for CPUs and tests
"""

from ddep.config import recipes
from ddep.config import schema as config_schema


def get_config(arg=None):
  a = config_schema.parse_arg(arg, **recipes.FINETUNE_ARGS, name='', crop='', protocol='', pad='')
  dataset = recipes.folder_dataset(a.name)
  c = recipes.finetuning(
      a,
      dataset=dataset,
      crop=(512, 512),
      protocol='ade20k_sliding',  # any image size: the short side resized to 512
      flip=False,
      eval_pad_to=(2048, 2048),  # a bound, as for ADE20K; ddep.prepare prints the real one
      protocol_batch=4,
      steps=80_000,
      runlocal_dataset=dataset,
  )
  # Arguments given explicitly win over the defaults, runlocal's included.
  if a.crop:
    c.data.image_size = recipes.parse_size(a.crop)
  if a.protocol:
    c.eval.protocol = a.protocol
  if a.pad:
    c.data.eval_pad_to = recipes.parse_size(a.pad, 'pad')
  return c
