"""The anchor teacher: the student's own tower as training begins (METHOD.md section 4: the `clip` teacher whose
CLS attention weights the tokens and whose CLS scores the other teachers), for every tower a student may have.

One definition of which towers can be students and how their anchor reads an image, shared by training (which
copies the student's weights into it, training/teacher_source.py) and `plan` (which sizes it on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import SettingsError
from .presets import HALF, clip_teacher
from .teachers import TeacherSpec

# The teacher sets' entry that stands for the anchor (the student's own initial tower), whatever the tower is.
ANCHOR = "clip"
# Student tower `model_type` -> (the anchor's slug in a run, the stock transformers class its weights load into).
ANCHOR_TOWERS = {
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
}
# SigLIP 2's variable-resolution class: LLaVA cannot run it as its tower (see `check_student_tower`).
NAFLEX_TOWER = "siglip2_vision_model"
SIGLIP2_FIXED_RESOLUTION_ID = "google/siglip2-so400m-patch14-384"
# The anchor's `model_id`: it has no weights of its own, they are the student's.
STUDENT_TOWER_ID = "student-initial-vision-tower"
# Config fields of a tower that are not architecture (dropped when a tower's config becomes a spec's).
_NOT_SIZES = ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path")


def tower_type(vision_config: Any) -> str | None:
    """The `model_type` of a vision config or its dict."""
    if isinstance(vision_config, Mapping):
        return vision_config.get("model_type")
    return getattr(vision_config, "model_type", None)


def check_student_tower(vision_config: Any, field: str = "vision_config.model_type", file: str | None = None) -> None:
    """Raise `SettingsError` (on `field`, e.g. "--vision" for `init`; `file`: where the config came from) for SigLIP
    2's NaFlex class (`siglip2_vision_model`), which LLaVA cannot run as a tower (its forward needs
    `pixel_attention_mask` and `spatial_shapes`, LlavaProcessor cannot make them, and its patch count varies per
    image), naming the fixed-resolution alternative."""
    if tower_type(vision_config) == NAFLEX_TOWER:
        raise SettingsError(
            f"{NAFLEX_TOWER!r} is SigLIP 2's variable-resolution (NaFlex) tower, which LLaVA cannot run as its vision "
            "tower (it needs pixel_attention_mask and spatial_shapes per image and has no fixed patch grid)",
            file=file,
            field=field,
            expected=f"a fixed-resolution SigLIP 2 checkpoint (model_type 'siglip'), e.g. {SIGLIP2_FIXED_RESOLUTION_ID}",
        )


def anchor_slug(vision_config: Any, field: str = "vision_config.model_type") -> str:
    """The anchor teacher's slug for a student tower (a vision config or its dict): "clip" for a CLIP tower,
    "siglip" for a SigLIP tower (SigLIP 2 fixed-resolution checkpoints have model_type "siglip" too).

    Raises `SettingsError` (on `field`) for any other tower, naming it (`check_student_tower` for SigLIP 2's NaFlex
    class).
    """
    check_student_tower(vision_config, field)
    model_type = tower_type(vision_config)
    if model_type not in ANCHOR_TOWERS:
        raise SettingsError(
            f"no anchor teacher for a {model_type!r} student tower: MoVE-KD copies CLIP and SigLIP towers",
            field=field,
            expected=f"one of {sorted(ANCHOR_TOWERS)}",
        )
    return ANCHOR_TOWERS[model_type][0]


def has_pooling_head(vision_config: Any) -> bool:
    """A SigLIP tower's `vision_use_head` (True by default, as `SiglipVisionConfig` has it)."""
    if isinstance(vision_config, Mapping):
        return bool(vision_config.get("vision_use_head", True))
    return bool(getattr(vision_config, "vision_use_head", True))


def anchor_teacher_spec(config, image_mean=None, image_std=None, sized: bool = False) -> TeacherSpec:
    """The spec of the anchor of a student with this VLM config. `image_mean` / `image_std`: the student processor's
    normalisation (default CLIP's for CLIP, [-1, 1] for SigLIP). CLIP: the paper's `clip` teacher. SigLIP: the
    tower at `vision_feature_layer`, squashed and bicubic as `SiglipImageProcessor` resizes, with `pool_attention`
    where the tower has its head.

    sized: False (training: `config={}`, the weights and their shapes come from the student's tower) or True (the
    tower's own architecture fields in `config`, so the spec builds without the student: meta-device plans).
    Raises `SettingsError` as `anchor_slug` does.
    """
    vision = config.vision_config
    slug = anchor_slug(vision)
    norm = {"mean": tuple(image_mean), "std": tuple(image_std)} if image_mean is not None else {}
    if slug == "clip":
        spec = clip_teacher(
            slug=ANCHOR,
            model_id=STUDENT_TOWER_ID,
            image_size=vision.image_size,
            feature_layer=config.vision_feature_layer,
            pretrained=False,
            config={},
            **norm,
        )
    else:
        spec = TeacherSpec(
            **{"mean": HALF, "std": HALF, **norm},
            slug=slug,
            backend="transformers",
            model_id=STUDENT_TOWER_ID,
            model_class=ANCHOR_TOWERS[vision.model_type][1],
            image_size=vision.image_size,
            resize_mode="squash",
            interpolation="bicubic",
            feature_layer=config.vision_feature_layer,
            pretrained=False,
            pool_attention=has_pooling_head(vision),
        )
    if sized:
        spec = replace(spec, config={k: v for k, v in vision.to_dict().items() if k not in _NOT_SIZES})
    return spec
