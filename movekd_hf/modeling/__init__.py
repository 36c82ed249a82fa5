"""What a MoVE-KD checkpoint carries as remote code. Files here import only torch and transformers, with
single-dot relative imports, so `save_pretrained` can copy them next to the weights.

Importing this package registers the MoVE-KD classes with transformers' Auto classes (this file itself is not
copied into checkpoints)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_movekd import MoVEKDConfig, MoVEKDNextConfig, MoVEKDOnevisionConfig, MoVEKDVisionConfig
from .modeling_movekd import (
    MoVEKDForConditionalGeneration,
    MoVEKDModel,
    MoVEKDNextForConditionalGeneration,
    MoVEKDNextModel,
    MoVEKDOnevisionForConditionalGeneration,
    MoVEKDOnevisionModel,
    MoVEKDOutputMixin,
    MoVEKDVisionModel,
)
from .mole import MoLELinear, MoLEMLP
from .processing_movekd import MoVEKDOnevisionProcessor, MoVEKDProcessor

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
    "MoVEKDOnevisionConfig",
    "MoVEKDOnevisionForConditionalGeneration",
    "MoVEKDOnevisionModel",
    "MoVEKDOnevisionProcessor",
    "MoVEKDProcessor",
    "MoVEKDVisionConfig",
    "MoVEKDVisionModel",
]


def _register_auto_classes() -> None:
    import transformers

    multimodal = getattr(transformers, "AutoModelForMultimodalLM", None)
    for config_class, base, head, processor in (
        (MoVEKDConfig, MoVEKDModel, MoVEKDForConditionalGeneration, MoVEKDProcessor),
        (MoVEKDNextConfig, MoVEKDNextModel, MoVEKDNextForConditionalGeneration, MoVEKDProcessor),
        (
            MoVEKDOnevisionConfig,
            MoVEKDOnevisionModel,
            MoVEKDOnevisionForConditionalGeneration,
            MoVEKDOnevisionProcessor,
        ),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, head, exist_ok=True)
        if multimodal is not None:
            multimodal.register(config_class, head, exist_ok=True)
        AutoProcessor.register(config_class, processor, exist_ok=True)
    AutoConfig.register(MoVEKDVisionConfig.model_type, MoVEKDVisionConfig, exist_ok=True)
    AutoModel.register(MoVEKDVisionConfig, MoVEKDVisionModel, exist_ok=True)
    MoVEKDVisionConfig.register_for_auto_class()
    MoVEKDVisionModel.register_for_auto_class("AutoModel")
    # Saving copies these classes' modules (and what they import) next to the weights.
    MoVEKDConfig.register_for_auto_class()
    MoVEKDNextConfig.register_for_auto_class()
    MoVEKDOnevisionConfig.register_for_auto_class()
    MoVEKDForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MoVEKDNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MoVEKDOnevisionForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MoVEKDProcessor.register_for_auto_class("AutoProcessor")
    MoVEKDOnevisionProcessor.register_for_auto_class("AutoProcessor")


_register_auto_classes()
