"""What a MoVE-KD checkpoint carries as remote code. Files here import only torch and transformers, with
single-dot relative imports, so `save_pretrained` can copy them next to the weights."""

from .configuration_movekd import MoVEKDConfig, MoVEKDNextConfig, MoVEKDVisionConfig
from .modeling_movekd import (
    MoVEKDForConditionalGeneration,
    MoVEKDModel,
    MoVEKDNextForConditionalGeneration,
    MoVEKDNextModel,
    MoVEKDOutputMixin,
    MoVEKDVisionModel,
)
from .mole import MoLELinear, MoLEMLP
from .processing_movekd import MoVEKDProcessor

__all__ = [
    "MoLELinear",
    "MoLEMLP",
    "MoVEKDOutputMixin",
    "MoVEKDConfig",
    "MoVEKDForConditionalGeneration",
    "MoVEKDModel",
    "MoVEKDNextConfig",
    "MoVEKDNextForConditionalGeneration",
    "MoVEKDNextModel",
    "MoVEKDProcessor",
    "MoVEKDVisionConfig",
    "MoVEKDVisionModel",
]
