"""Export the distilled student encoder alone, as an Auto-loadable vision model with its remote code, so other
VLMs can take it as their vision tower."""

from __future__ import annotations

from pathlib import Path

from ..modeling import MoVEKDVisionConfig, MoVEKDVisionModel
from ..modeling.configuration_movekd import MOLE_DEFAULTS


def export_student_encoder(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` with the student tower of a MoVE-KD checkpoint (weights, config, image processor, code).

    The weights move over unchanged (strict load: every key must fit); the MoLE settings come from the
    checkpoint's config.
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    vlm = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
    if getattr(vlm.config, "model_type", None) not in ("movekd_llava", "movekd_llava_next", "movekd_llava_onevision"):
        raise ValueError(f"{checkpoint} is a {vlm.config.model_type!r} checkpoint, not a MoVE-KD one.")
    vision = vlm.config.vision_config
    if vision.model_type != "clip_vision_model":
        raise ValueError(f"Only CLIP student towers export for now; {checkpoint} has {vision.model_type!r}.")
    settings = {name: getattr(vlm.config, name) for name in MOLE_DEFAULTS}
    config = MoVEKDVisionConfig(**{**vision.to_dict(), "model_type": MoVEKDVisionConfig.model_type, **settings})
    encoder = MoVEKDVisionModel(config)
    encoder.load_state_dict(vlm.model.vision_tower.state_dict(), strict=True)
    out = Path(out_dir)
    encoder.save_pretrained(out)
    AutoImageProcessor.from_pretrained(checkpoint).save_pretrained(out)
    return out
