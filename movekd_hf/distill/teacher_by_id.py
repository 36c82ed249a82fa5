"""Any teacher by its id: `teacher_from_pretrained` turns a Hub id or local folder of a transformers or timm vision
model into a `TeacherSpec`, reading the model's own config.json (token grid, width, CLS/register tokens) and its
preprocessor_config.json (input size, resize, normalisation), so a researcher names a teacher in one line.

Errors name the id and what was expected (`movekd_hf.errors.InputError` / `SettingsError`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import InputError, SettingsError
from .teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAM_ENCODER_PREFIX,
    TeacherSpec,
    build_teacher,
    config_depth,
    timm_depth,
)


def _no_prefix(config: Any) -> int:
    return 0


def _cls_only(config: Any) -> int:
    return 1


def _cls_and_registers(config: Any) -> int:
    return 1 + config.num_register_tokens  # DINOv2-with-registers, DINOv3: [CLS, registers..., patches...]


def _radio_prefix(config: Any) -> int:
    return config.num_cls_tokens + config.num_registers  # C-RADIO: [CLS x k, registers..., patches...]


def _last_neck(config: Any) -> int:
    return -1  # SAM2: the stride-16 level, SAM2's image embedding


def _unit_scale_neck(config: Any) -> int:
    return list(config.scale_factors).index(1.0)  # SAM3: the level at the ViT's own stride (its detector's input)


@dataclass(frozen=True)
class Family:
    """How one transformers model type is read as a teacher.

    model_class: its vision tower's class. vision_key: the sub-config that holds the tower in a full checkpoint's
    config (None: the config is the tower's own). prefix: tower config -> leading CLS/register tokens of its token
    sequences. has_cls: position 0 is a CLS (DINOv3 ConvNeXt: the pooled) token. reads: the named `read` values it
    offers (layer indices always work). map_layout: layout of its 4D hidden states. neck_index: tower config ->
    the `fpn_hidden_states` level "neck" reads. normalises_inside: the model normalises [0, 1] pixels itself.
    weights_prefix: `TeacherSpec.weights_prefix`.
    """

    model_class: str
    vision_key: str | None = "vision_config"
    prefix: Callable[[Any], int] = _no_prefix
    has_cls: bool = False
    reads: tuple[str, ...] = ("last_hidden_state",)
    map_layout: str = "nchw"
    neck_index: Callable[[Any], int] = _last_neck
    normalises_inside: bool = False
    weights_prefix: str | None = None


_SAM_READS = dict(reads=("neck",), map_layout="nhwc")
# Full-checkpoint model types read their tower from `vision_config`; `*_vision_model` types are the tower alone.
FAMILIES: dict[str, Family] = {
    "clip": Family("CLIPVisionModel", prefix=_cls_only, has_cls=True),
    "clip_vision_model": Family("CLIPVisionModel", None, _cls_only, True),
    "siglip": Family("SiglipVisionModel"),  # SigLIP and the fixed-resolution SigLIP 2 checkpoints
    "siglip_vision_model": Family("SiglipVisionModel", None),
    "aimv2": Family("Aimv2VisionModel"),
    "aimv2_vision_model": Family("Aimv2VisionModel", None),
    "dinov2": Family("Dinov2Model", None, _cls_only, True),
    # Plain ViTs of the ViT layout (CLS, then patches): ViT (MAE/DINO/AugReg checkpoints), DeiT, BEiT.
    "vit": Family("ViTModel", None, _cls_only, True),
    "deit": Family("DeiTModel", None, lambda config: 2, True),  # [CLS, distillation token, patches...]
    "beit": Family("BeitModel", None, _cls_only, True),
    "dinov2_with_registers": Family("Dinov2WithRegistersModel", None, _cls_and_registers, True),
    "dinov3_vit": Family("DINOv3ViTModel", None, _cls_and_registers, True),
    "dinov3_convnext": Family("DINOv3ConvNextModel", None, _cls_only, True),
    "radio": Family("RadioModel", None, _radio_prefix, True, normalises_inside=True),
    "sam": Family("SamVisionModel", **_SAM_READS),
    "sam_vision_model": Family("SamVisionModel", None, **_SAM_READS),
    "sam2": Family("Sam2VisionModel", weights_prefix=SAM_ENCODER_PREFIX, **_SAM_READS),
    "sam2_vision_model": Family("Sam2VisionModel", None, weights_prefix=SAM_ENCODER_PREFIX, **_SAM_READS),
    "sam3": Family("Sam3VisionModel", neck_index=_unit_scale_neck, weights_prefix=SAM_ENCODER_PREFIX, **_SAM_READS),
    "sam3_vision_model": Family(
        "Sam3VisionModel", None, neck_index=_unit_scale_neck, weights_prefix=SAM_ENCODER_PREFIX, **_SAM_READS
    ),
}
# PIL resampling codes as processors save them -> `TeacherSpec.interpolation`.
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
TIMM_READS = ("last_hidden_state", "feature_map")
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _hub_json(name_or_path: str, filename: str, revision: str | None = None) -> dict | None:
    """`filename` of a local folder or Hub repository (at `revision`) as a dict; None when there is no such file."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError as error:
        raise InputError(
            f"teacher {name_or_path!r}: cannot read {filename} ({error})",
            expected="a Hub id or a local folder holding config.json",
        ) from None
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _processor_view(processor: Mapping, name: str) -> dict[str, Any]:
    """The input view (`TeacherSpec` fields) a transformers image processor config describes: "pad" for SAM's
    longest-edge resize, "crop" for a shortest-edge resize and centre crop, "squash" for a fixed height x width."""
    size, where = processor.get("size") or {}, f"{name}/preprocessor_config.json"
    if isinstance(size, int):
        size = {"shortest_edge": size}
    resample = processor.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise SettingsError(
            f"resample {resample!r} has no torch equivalent", file=where, field="resample", expected=str(PIL_RESAMPLE)
        )
    view: dict[str, Any] = dict(interpolation=PIL_RESAMPLE[resample])
    if processor.get("do_center_crop") and processor.get("crop_size"):
        crop = processor["crop_size"]
        crop = crop if isinstance(crop, int) else crop.get("height", crop.get("shortest_edge"))
        view.update(resize_mode="crop", image_size=crop, resize_size=size.get("shortest_edge", crop))
    elif "longest_edge" in size:
        view.update(resize_mode="pad", image_size=size["longest_edge"])
    elif "height" in size and size["height"] == size.get("width"):
        view.update(resize_mode="squash", image_size=size["height"])
    else:
        raise SettingsError(
            f"size {size} is not a fixed square input", file=where, field="size",
            expected='{"height": S, "width": S}, {"longest_edge": S}, or a shortest edge with a centre crop',
        )  # fmt: skip
    if processor.get("do_normalize", True):
        view.update(mean=tuple(processor["image_mean"]), std=tuple(processor["image_std"]))
    else:
        view.update(zip(("mean", "std"), NO_NORMALISATION))
    return view


def _timm_view(pretrained_cfg: Mapping, name: str) -> dict[str, Any]:
    """The input view of a timm `pretrained_cfg`: centre crop of `crop_pct` (timm's eval transform) or squash."""
    _, height, width = pretrained_cfg.get("input_size", (3, 224, 224))
    interpolation = pretrained_cfg.get("interpolation", "bicubic")
    if height != width or interpolation not in PIL_RESAMPLE.values():
        raise SettingsError(
            f"teacher {name!r}: input_size {height}x{width} with {interpolation!r} interpolation",
            field="pretrained_cfg", expected=f"a square input_size and one of {sorted(PIL_RESAMPLE.values())}",
        )  # fmt: skip
    view: dict[str, Any] = dict(
        image_size=height,
        interpolation=interpolation,
        mean=tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pretrained_cfg.get("std", IMAGENET_STD)),
    )
    if pretrained_cfg.get("crop_mode", "center") == "squash":
        return {**view, "resize_mode": "squash"}
    resize = math.floor(height / pretrained_cfg.get("crop_pct", 1.0))  # timm's transforms_factory
    return {**view, "resize_mode": "crop", "resize_size": max(resize, height)}


def _read_fields(read: str | int, offered: tuple[str, ...], depth: int | None, name: str) -> dict[str, Any]:
    """`read` -> (`output`, `feature_layer`), or a SettingsError naming the teacher and what it offers. A layer
    index may come as text ("-2", as a command line gives it)."""
    if isinstance(read, str) and read.removeprefix("-").isdigit():
        read = int(read)
    if isinstance(read, int) and not isinstance(read, bool):
        if depth is not None and not -depth <= read < depth:
            raise SettingsError(
                f"teacher {name!r} has no layer {read}: it has {depth} hidden states (index 0 = embeddings)",
                field="read", expected=f"an integer in {-depth}..{depth - 1}, or one of {list(offered)}",
            )  # fmt: skip
        return dict(output="hidden_state", feature_layer=read)
    if read not in offered:
        raise SettingsError(
            f"teacher {name!r} cannot read {read!r}", field="read", expected=f"a layer index or one of {list(offered)}"
        )
    return dict(output=read)


def _transformers_fields(config: Mapping, name: str, read: str | int | None, revision: str | None) -> dict[str, Any]:
    from transformers import AutoConfig

    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise SettingsError(
            f"teacher {name!r} has model_type {model_type!r}, which no teacher reader knows",
            field="model_type", expected=f"one of {sorted(FAMILIES)}, or a timm model",
        )  # fmt: skip
    tower = AutoConfig.from_pretrained(name, revision=revision)
    tower = getattr(tower, family.vision_key) if family.vision_key else tower
    sizes = {k: v for k, v in tower.to_dict().items() if k not in ("architectures", "transformers_version", "dtype")}
    fields = _read_fields(family.reads[0] if read is None else read, family.reads, config_depth(tower), name)
    fields.update(
        backend="transformers",
        model_class=family.model_class,
        num_prefix_tokens=family.prefix(tower),
        has_cls=family.has_cls,
        map_layout=family.map_layout,
        neck_index=family.neck_index(tower),
        weights_prefix=family.weights_prefix,
        config=sizes,
    )
    if fields["output"] == "neck":  # SAM-family necks are 256-channel maps that the authors' layout may apply to
        fields["num_prefix_tokens"], fields["has_cls"] = 0, False
    processor = _hub_json(name, "preprocessor_config.json", revision)
    if processor is not None:
        fields.update(_processor_view(processor, name))
    elif not family.normalises_inside:
        raise InputError(
            f"teacher {name!r} has no preprocessor_config.json",
            expected="its image processor's config beside config.json",
        )
    else:  # RADIO: any size that is a multiple of its patch; the model's own config size by default
        fields.update(image_size=tower.image_size, resize_mode="squash", interpolation="bilinear")
    if family.normalises_inside:
        fields.update(zip(("mean", "std"), NO_NORMALISATION))
    return fields


def _timm_fields(config: Mapping, name: str, read: str | int | None) -> dict[str, Any]:
    import timm

    arch, model_args = config["architecture"], dict(config.get("model_args") or {})
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **model_args)
    fields = _read_fields("last_hidden_state" if read is None else read, TIMM_READS, timm_depth(model), name)
    prefix = getattr(model, "num_prefix_tokens", 0)
    fields.update(
        backend="timm",
        checkpoint=name if os.path.isdir(name) else f"hf-hub:{name}",
        num_prefix_tokens=prefix,
        has_cls=prefix > 0 and getattr(model, "cls_token", None) is not None,
        config=model_args,
    )
    return {**fields, "model_id": arch, **_timm_view(config.get("pretrained_cfg") or {}, name)}


def teacher_from_pretrained(
    name_or_path: str,
    read: str | int | None = None,
    slug: str | None = None,
    image_size: int | None = None,
    pretrained: bool = True,
    keep_prefix_tokens: bool = False,
    revision: str | None = None,
    **fields: Any,
) -> TeacherSpec:
    """The `TeacherSpec` of a transformers vision model (a model type of `FAMILIES`) or a timm model (a config.json
    with `architecture`, as timm saves to the Hub), from its own config.json and preprocessor_config.json
    (timm: `pretrained_cfg`): model class, prefix (CLS/register) token count, input size, resize, normalisation,
    and the output's token grid and width at that size (measured on the meta device, nothing allocated).

    name_or_path: Hub id (`facebook/dinov3-vitl16-pretrain-lvd1689m`, `timm/vit_small_patch16_224.augreg_in21k`)
        or local folder. read: "last_hidden_state" (ViTs; default), "neck" (SAM family; default there),
        "feature_map" (timm conv nets), or a hidden-state index (0 = embeddings, -1 = the last layer).
    slug: the teacher's key (default: the model type / timm architecture). image_size: input size instead of the
        processor's (a "crop" view keeps its resize-to-crop ratio). pretrained: False builds from the config with
        random weights. keep_prefix_tokens: also return the CLS/register tokens (`TeacherOutput.prefix`).
    revision: the Hub revision (branch, tag or commit) the configs are read at and the weights will load from.
    fields: other `TeacherSpec` fields, which override what was read.

    Raises `InputError` when no config can be read, `SettingsError` for an unknown model type, a `read` the model
    does not offer, a layer out of range, or a preprocessing the spec cannot express; each names the id.
    """
    config = _hub_json(name_or_path, "config.json", revision)
    if config is None:
        raise InputError(f"teacher {name_or_path!r} has no config.json", expected="a Hub id or a local model folder")
    if "architecture" in config:
        found = _timm_fields(config, name_or_path, read)
    else:
        found = {"model_id": name_or_path, **_transformers_fields(config, name_or_path, read, revision)}
    default_slug = found["model_id"].split(".")[0] if found["backend"] == "timm" else config["model_type"]
    spec = TeacherSpec(
        **{**found, "slug": (slug or default_slug).lower(), "pretrained": pretrained, "revision": revision}
    )
    if image_size is not None:
        ratio = (spec.resize_size or spec.image_size) / spec.image_size
        spec = replace(spec, image_size=image_size, resize_size=None if ratio == 1 else round(image_size * ratio))
    spec = replace(spec, keep_prefix_tokens=keep_prefix_tokens, **fields)
    try:
        grid, channels = meta_output_shape(spec)
    except (ValueError, RuntimeError) as error:
        raise SettingsError(
            f"teacher {name_or_path!r} cannot run at {spec.image_size} px and be read as {spec.output!r} ({error})",
            field="read",
            expected="a read its outputs have (token sequences: last_hidden_state or a layer; conv nets: "
            "feature_map) and an image_size its position embeddings take",
        ) from None  # fmt: skip
    return replace(spec, grid=grid, channels=channels)


def meta_output_shape(spec: TeacherSpec) -> tuple[tuple[int, int], int]:
    """Build `spec` without weights on the meta device and run one image through it: (token grid, width)."""
    with torch.device("meta"):
        out = build_teacher(replace(spec, pretrained=False))(torch.empty(1, 3, spec.image_size, spec.image_size))
    return out.grid, out.tokens.shape[-1]
