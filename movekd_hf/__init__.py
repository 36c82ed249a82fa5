"""movekd_hf: MoVE-KD (CVPR 2025) in Hugging Face form.

Importing the package registers the MoVE-KD classes with transformers' Auto classes, so saved checkpoints
load with or without `trust_remote_code` wherever the package is installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from . import modeling
from .modeling import (  # noqa: F401 (re-exported)
    MoLELinear,
    MoLEMLP,
    MoVEKDConfig,
    MoVEKDForConditionalGeneration,
    MoVEKDModel,
    MoVEKDNextConfig,
    MoVEKDNextForConditionalGeneration,
    MoVEKDNextModel,
    MoVEKDOutputMixin,
    MoVEKDProcessor,
    MoVEKDVisionConfig,
    MoVEKDVisionModel,
)

__version__ = "0.2.0"


def _register_auto_classes() -> None:
    import transformers

    multimodal = getattr(transformers, "AutoModelForMultimodalLM", None)
    for config_class, base, head in (
        (MoVEKDConfig, MoVEKDModel, MoVEKDForConditionalGeneration),
        (MoVEKDNextConfig, MoVEKDNextModel, MoVEKDNextForConditionalGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, head, exist_ok=True)
        if multimodal is not None:
            multimodal.register(config_class, head, exist_ok=True)
        AutoProcessor.register(config_class, MoVEKDProcessor, exist_ok=True)
    AutoConfig.register(MoVEKDVisionConfig.model_type, MoVEKDVisionConfig, exist_ok=True)
    AutoModel.register(MoVEKDVisionConfig, MoVEKDVisionModel, exist_ok=True)
    MoVEKDVisionConfig.register_for_auto_class()
    MoVEKDVisionModel.register_for_auto_class("AutoModel")
    # Saving copies these classes' modules (and what they import) next to the weights.
    MoVEKDConfig.register_for_auto_class()
    MoVEKDNextConfig.register_for_auto_class()
    MoVEKDForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MoVEKDNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MoVEKDProcessor.register_for_auto_class("AutoProcessor")


_register_auto_classes()

__all__ = modeling.__all__
