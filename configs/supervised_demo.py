r"""Supervised encoder pretraining on the generated demo scenes: our offline stand-in
for the ImageNet-21k checkpoints (paper Sec. 3) that 'supervised' and DDeP start from.

Task 'classify': multi-label image classification (which of the five object classes
a scene contains) through the encoder and a pooled linear classifier. Its workdir is
what `init_from=` takes in the other configs when no published encoder is at hand:

  python -m ddep.main --workdir=$SUP --config=configs/supervised_demo.py
  python -m ddep.main --workdir=$W \
    --config=configs/pretrain_pascal_context.py:method=ddep,init_from=$SUP,runlocal

Arguments:
  model     a preset; the paper's names map to their tiny versions under runlocal
  steps, lr, batch
  runlocal  'demo_tiny', a few steps, for CPUs and tests
"""

from ddep.config import recipes
from ddep.config import schema as config_schema


def get_config(arg=None):
  a = config_schema.parse_arg(arg, model='tiny', steps=2000, lr=1e-3, batch=64, runlocal=False)
  c = config_schema.base_config()
  c.task = 'classify'
  c.method = 'supervised'
  c.model.preset = a.model
  c.classify.loss = 'sigmoid'  # several classes per scene, as ImageNet-21k's multi-labels

  c.data.dataset = 'demo'
  c.data.batch_size = a.batch
  c.data.eval_batch_size = 16  # unused by classification, but must divide the devices
  c.data.image_size = (32, 32)  # the demo scenes' size
  # Whole scenes: an inception crop can miss the objects the image-level labels name.
  c.data.area_range = (1.0, 1.0)

  c.optim.name = 'adam'
  c.optim.lr = a.lr
  c.optim.decay = 'cosine'
  c.optim.warmup_steps = 100
  c.total_steps = a.steps
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 500
  c.keep_checkpoints = 1

  if a.runlocal:
    recipes.shrink_for_runlocal(c, model=a.model)
  return c
