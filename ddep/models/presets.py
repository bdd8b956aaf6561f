"""Named model sizes. Configs pick one by name and may override any field."""

from typing import Any

from ddep.models import decoder as decoder_lib
from ddep.models.transunet import TransUNet

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's TransUNet: R50+ViT-B/16 encoder, 1x UNet decoder.
    'r50_vit_b16': {},
    # Table 5's plain ResNet-50 UNet.
    'r50_unet': dict(backbone='r50', resnet_layers=(3, 4, 6, 3)),
    # The same UNet on BiT's ResNet-50 v2 (pre-activation): the encoder the published
    # ImageNet-21k BiT-M-R50x1 weights were trained as (Table 5's supervised and DDeP).
    'bit_r50_unet': dict(backbone='bit_r50', resnet_layers=(3, 4, 6, 3)),
    # Same modules, narrow and shallow: for tests and CPU runs.
    'tiny': dict(
        resnet_layers=(1, 1, 1),
        resnet_width=16,
        num_groups=8,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        mlp_dim=128,
        decoder_widths=(64, 32, 32, 16, 16),
    ),
    'tiny_r50_unet': dict(
        backbone='r50',
        resnet_layers=(1, 1, 1, 1),
        resnet_width=16,
        num_groups=8,
        decoder_widths=(64, 32, 32, 16, 16),
    ),
    'tiny_bit_r50_unet': dict(
        backbone='bit_r50',
        resnet_layers=(1, 1, 1, 1),
        resnet_width=16,
        num_groups=8,
        decoder_widths=(64, 32, 32, 16, 16),
    ),
}


def decoder_widths(preset: str, multiplier: int = 1) -> tuple[int, ...]:
  """The preset's decoder widths times `multiplier` (the paper's 1x/2x/3x, Sec. 4.2)."""
  base = PRESETS[preset].get('decoder_widths', decoder_lib.DECODER_WIDTHS_1X)
  return tuple(multiplier * w for w in base)


def create_model(
    preset: str = 'r50_vit_b16', *, decoder_width_multiplier: int = 1, **overrides
) -> TransUNet:
  if preset not in PRESETS:
    raise ValueError(f'unknown model preset {preset!r}; choose from {sorted(PRESETS)}')
  if decoder_width_multiplier < 1:
    raise ValueError(f'decoder_width_multiplier must be >= 1, got {decoder_width_multiplier}')
  kwargs = dict(PRESETS[preset])
  kwargs['decoder_widths'] = decoder_widths(preset, decoder_width_multiplier)
  kwargs.update(overrides)
  return TransUNet(**kwargs)
