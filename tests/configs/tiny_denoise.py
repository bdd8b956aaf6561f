"""A tiny denoising run on the generated demo data, for process-level tests."""

from ddep.config import schema as config_schema


def get_config():
  c = config_schema.base_config()
  c.task = 'denoise'
  c.method = 'dep'
  c.model.preset = 'tiny'
  c.data.dataset = 'demo_tiny'
  c.data.batch_size = 4
  c.data.image_size = (32, 32)
  c.total_steps = 6
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  # Synchronous, so that 'step 3' on stdout means the step-2 checkpoint is on disk.
  c.checkpoint_async = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  return c
