"""Encoders of the segmentation UNets: the R50+ViT hybrid (TransUNet) and a plain ResNet.

Both return `(features, skips)`: the coarsest map and the higher-resolution maps
the decoder concatenates, keyed by the checkpoint name of the module that made them.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ddep.models import resnet
from ddep.models import vit

Dtype = Any


class HybridViTEncoder(nn.Module):
  """R50+ViT-B/16 as in the original ViT code: ResNet stem + 3 stages, 1x1 patch
  embedding of the 1/16 map, Transformer, no class token."""

  resnet_layers: Sequence[int] = (3, 4, 9)
  resnet_width: int = 64
  num_groups: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  remat_resnet: bool = False
  remat_transformer: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x, skips = resnet.resnet_features(
        images.astype(self.dtype),
        layers=self.resnet_layers,
        width=self.resnet_width,
        num_groups=self.num_groups,
        dtype=self.dtype,
        remat=self.remat_resnet,
    )
    # The R50 stages already reach 1/16, so the "patches" are 1x1.
    x = nn.Conv(
        self.hidden_size,
        (1, 1),
        dtype=self.dtype,
        conv_general_dilated=resnet.conv_general_dilated,
        name='embedding',
    )(x)
    x = vit.Encoder(
        self.num_layers,
        self.mlp_dim,
        self.num_heads,
        dtype=self.dtype,
        dropout_rate=self.dropout_rate,
        attention_impl=self.attention_impl,
        remat=self.remat_transformer,
        name='Transformer',
    )(x, train=train)
    return x, skips


class ResNetEncoder(nn.Module):
  """A plain (BiT-style) ResNet, e.g. ResNet-50 with stages (3, 4, 6, 3) (paper Table 5)."""

  resnet_layers: Sequence[int] = (3, 4, 6, 3)
  resnet_width: int = 64
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat_resnet: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout in the ResNet.
    x, skips = resnet.resnet_features(
        images.astype(self.dtype),
        layers=self.resnet_layers,
        width=self.resnet_width,
        num_groups=self.num_groups,
        dtype=self.dtype,
        remat=self.remat_resnet,
    )
    return x, skips
