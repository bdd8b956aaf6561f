"""TransUNet: hybrid R50+ViT-B/16 encoder + UNet decoder (paper Sec. 3, Fig. 3)."""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ddep.models import bit
from ddep.models import decoder as decoder_lib
from ddep.models import encoders
from ddep.models import resnet

Dtype = Any

BACKBONES = ('r50_vit', 'r50', 'bit_r50')
REMAT_PARTS = ('resnet', 'transformer', 'decoder')


class TransUNet(nn.Module):
  """Encoder-decoder for dense prediction.

  Defaults are the paper's model: R50+ViT-B/16 encoder and the 1x decoder
  [1024, 512, 256, 128, 64]. `backbone='r50'` gives the plain ResNet-50 UNet of
  Table 5 (set `resnet_layers=(3, 4, 6, 3)`); `backbone='bit_r50'` the same UNet on
  BiT's pre-activation ResNet v2, which the published BiT-M-R50x1 weights fit.

  Parameters are float32; `dtype` is the computation dtype. Outputs are float32.
  """

  num_outputs: int = 3
  backbone: str = 'r50_vit'
  resnet_layers: Sequence[int] = (3, 4, 9)
  resnet_width: int = 64
  num_groups: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  decoder_widths: Sequence[int] = decoder_lib.DECODER_WIDTHS_1X
  decoder_norm: str = 'group'
  noise_conditioning: bool = False
  num_image_classes: int = 0
  attention_impl: Optional[str] = None
  remat: Sequence[str] = ()
  dtype: Dtype = jnp.float32

  def setup(self):
    unknown = set(self.remat) - set(REMAT_PARTS)
    if unknown:
      raise ValueError(f'unknown remat parts {sorted(unknown)}; choose from {REMAT_PARTS}')
    if self.backbone == 'r50_vit':
      self.encoder = encoders.HybridViTEncoder(
          resnet_layers=self.resnet_layers,
          resnet_width=self.resnet_width,
          num_groups=self.num_groups,
          hidden_size=self.hidden_size,
          num_layers=self.num_layers,
          num_heads=self.num_heads,
          mlp_dim=self.mlp_dim,
          dropout_rate=self.dropout_rate,
          attention_impl=self.attention_impl,
          dtype=self.dtype,
          remat_resnet='resnet' in self.remat,
          remat_transformer='transformer' in self.remat,
      )
    elif self.backbone == 'r50':
      self.encoder = encoders.ResNetEncoder(
          resnet_layers=self.resnet_layers,
          resnet_width=self.resnet_width,
          num_groups=self.num_groups,
          dtype=self.dtype,
          remat_resnet='resnet' in self.remat,
      )
    elif self.backbone == 'bit_r50':
      self.encoder = bit.ResNetV2(
          layers=self.resnet_layers,
          width=self.resnet_width,
          num_groups=self.num_groups,
          dtype=self.dtype,
          remat='resnet' in self.remat,
      )
    else:
      raise ValueError(f'unknown backbone {self.backbone!r}; choose from {BACKBONES}')
    self.decoder = decoder_lib.UNetDecoder(
        widths=self.decoder_widths,
        norm=self.decoder_norm,
        num_groups=self.num_groups,
        dtype=self.dtype,
        remat='decoder' in self.remat,
    )
    self.head = nn.Conv(
        self.num_outputs, (1, 1), dtype=self.dtype, conv_general_dilated=resnet.conv_general_dilated
    )
    if self.noise_conditioning:
      self.noise_embedding = decoder_lib.NoiseEmbedding(dtype=self.dtype)
    if self.num_image_classes:
      self.classifier = nn.Dense(self.num_image_classes, dtype=self.dtype)

  @property
  def output_stride(self) -> int:
    return 16 if self.backbone == 'r50_vit' else 2 ** (len(self.resnet_layers) + 1)

  def _check_input(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be (N, H, W, 3), got {images.shape}')
    h, w = images.shape[1:3]
    s = self.output_stride
    if h % s or w % s:
      raise ValueError(f'image size {h}x{w} must be divisible by {s}')

  def encode(self, images, *, train: bool = False):
    """Returns `(features, skips)`: the coarsest map and a dict of the 1/2 (`root`),
    1/4 (`block1`), 1/8 (`block2`) (and, for the ResNets, 1/16 `block3`) maps.

    The coarsest map is (N, H/16, W/16, hidden) after the final LayerNorm for the
    hybrid, the last stage's 1/32 map for `r50`, and for `bit_r50` the 1/32 map after
    BiT's final GroupNorm and ReLU (what timm's `forward_features` returns)."""
    self._check_input(images)
    return self.encoder(images, train=train)

  def __call__(self, images, sigma: Optional[jnp.ndarray] = None, *, train: bool = False):
    """Dense prediction (N, H, W, num_outputs). `sigma` (N,) is required exactly when
    the model is noise-conditioned."""
    if self.noise_conditioning != (sigma is not None):
      raise ValueError(
          'pass sigma if and only if noise_conditioning=True '
          f'(noise_conditioning={self.noise_conditioning})'
      )
    features, skips = self.encode(images, train=train)
    cond = self.noise_embedding(sigma) if sigma is not None else None
    y = self.decoder(features, list(skips.values()), images.shape[1:3], cond)
    return self.head(y).astype(jnp.float32)

  def classify(self, images, *, train: bool = False):
    """Image-level logits from globally pooled encoder features (supervised encoder
    pretraining on image-level labels); needs `num_image_classes > 0`."""
    if not self.num_image_classes:
      raise ValueError('classify() needs num_image_classes > 0')
    features, _ = self.encode(images, train=train)
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    return self.classifier(pooled.astype(self.dtype)).astype(jnp.float32)
