"""Models: the TransUNet and the import of pretrained encoders."""

from ddep.models.presets import PRESETS, create_model
from ddep.models.pretrained import load_pretrained_encoder
from ddep.models.transunet import TransUNet

__all__ = ['PRESETS', 'TransUNet', 'create_model', 'load_pretrained_encoder']
