"""Tiny fine-tuning by epochs on 11 labelled demo images, for multi-process CLI tests.

11 examples do not split evenly over 2 processes; 2 epochs at global batch 4 are 6 steps.
"""

from ddep.config import schema as config_schema


def get_config():
  c = config_schema.base_config()
  c.task = 'segment'
  c.method = 'none'
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny'
  c.data.label_count = 11
  c.data.subset_seed = 1
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.image_size = (32, 32)
  c.data.eval_pad_to = (48, 48)
  c.total_epochs = 2.0
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 3
  c.checkpoint_async = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  return c
