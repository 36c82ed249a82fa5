"""Frozen teachers behind one interface.

A `TeacherSpec` says what to build (backend, model id or config, input size, normalisation, which output to
take); `build_teacher` hands it to the loader of its backend; the resulting `Teacher` turns one batch of images in
[0, 1] into that teacher's `TeacherOutput` (patch tokens, their grid, the CLS token, and for the anchor teacher the
CLS-to-patch attention row of a CLIP tower, or the pooled output and probe attention row of a SigLIP tower's
attention-pooling head). Backend differences live in the small loader/extractor pairs of `BACKENDS`.
`teacher_by_id.teacher_from_pretrained` writes the spec of any supported transformers or timm vision model from
its own config.json and preprocessor_config.json.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError
from ..modeling.llava_conventions import CLIP_MEAN, CLIP_STD
from .attention_rows import cls_attention_row, encoder_layers, hook_pooling_head
from .vitdet_eva import EVA02ViTDet, EVA02ViTDetConfig, load_eva02_det_state_dict

# SAM's (and torchvision's) normalisation; CLIP's comes with LLaVA's conventions.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("crop", "pad", "squash")
OUTPUTS = ("hidden_state", "last_hidden_state", "feature_map", "neck")
SAM_LAYOUTS = ("grid", "faithful")
MAP_LAYOUTS = ("nchw", "nhwc")

# A SAM2 / SAM3 checkpoint keeps its image encoder under `vision_encoder.` (SAM3 video: `detector_model.` first).
SAM_ENCODER_PREFIX = r"^(?:detector_model\.)?vision_encoder\."


@dataclass(frozen=True)
class TeacherSpec:
    """What one teacher is and how it sees an image.

    slug: lowercase key (`clip`, `eva`, ...). backend: "transformers" | "timm" | "vitdet".
    model_id: Hub id (transformers / vitdet), timm model name, or a local folder or file.
    pretrained: load real weights (from `checkpoint` if given, else `model_id`); False builds the architecture
        from `config` with random weights (tests, meta-device plans).
    revision: the Hub revision (branch, tag or commit) the weights are downloaded at; None: the default branch.
        Not used for a local `checkpoint` (timm: only weights hosted on the Hub, `hf_hub_id` or `hf-hub:`).
    resize_mode: "crop" (shortest side to image_size, centre crop; CLIP-style), "pad" (longest side to
        image_size, pad bottom/right after normalising; SAM-style), "squash" (resize both sides).
    resize_size: "crop" only: the shortest side's size before the centre crop (None: image_size), as
        `size["shortest_edge"]` of a processor or timm's `image_size / crop_pct`.
    output: "hidden_state" (the entry `feature_layer` of the model's hidden states), "last_hidden_state" (the model's
        final, normed output), "feature_map" (the model's final [B, C, h, w] map) or "neck" (a SAM-family image
        encoder's neck: level `neck_index` of `fpn_hidden_states`, or the map itself where there is one level).
        Token sequences lose their `num_prefix_tokens` leading tokens (CLS, registers); [B, C, h, w] /
        [B, h, w, C] maps (`map_layout` "nchw" / "nhwc") become h * w tokens.
    keep_prefix_tokens: also return the dropped prefix tokens, as `TeacherOutput.prefix`.
    sam_layout: "grid" (true 64 x 64 grid) or "faithful" (the authors' position/channel-mixing reshape,
        METHOD.md section 6).
    weights_prefix: regex of the prefix the tower's weight names carry in a full checkpoint, removed on loading
        (SAM2/SAM3 checkpoints hold the whole promptable model; their vision class alone would not find its keys).
    grid, channels: the output's token grid and width at `image_size` as the model's config predicts them
        (`teacher_from_pretrained` and the modern presets fill them; None: not stated).
    pool_attention: also return the model's attention-pooling head (SigLIP's MAP head, `vision_use_head=True`) as
        `TeacherOutput.pooled` and its probe's attention over the final patch tokens as `pool_attention`: the
        anchor of a student without CLS (METHOD.md section 4 takes the CLS row; this is its stand-in). A
        transformers teacher without prefix tokens (the head attends over every token).
    """

    slug: str
    backend: str
    model_id: str
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "crop"
    interpolation: str = "bicubic"
    output: str = "hidden_state"
    feature_layer: int = -2
    num_prefix_tokens: int = 0
    has_cls: bool = False
    cls_attention: bool = False
    pretrained: bool = True
    checkpoint: str | None = None
    filename: str | None = None
    revision: str | None = None
    model_class: str = "AutoModel"
    config: Mapping = field(default_factory=dict)
    sam_layout: str = "grid"
    resize_size: int | None = None
    map_layout: str = "nchw"
    neck_index: int = -1
    keep_prefix_tokens: bool = False
    weights_prefix: str | None = None
    grid: tuple[int, int] | None = None
    channels: int | None = None
    pool_attention: bool = False

    def __post_init__(self) -> None:
        if not self.slug or self.slug != self.slug.lower():
            raise ValueError(f"TeacherSpec.slug must be a lowercase key, got {self.slug!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"TeacherSpec.backend for {self.slug!r} is {self.backend!r}; expected one of {list(BACKENDS)}"
            )
        for name, value, allowed in (
            ("resize_mode", self.resize_mode, RESIZE_MODES),
            ("output", self.output, OUTPUTS),
            ("sam_layout", self.sam_layout, SAM_LAYOUTS),
            ("map_layout", self.map_layout, MAP_LAYOUTS),
        ):
            if value not in allowed:
                raise ValueError(f"TeacherSpec.{name} for {self.slug!r} is {value!r}; expected one of {allowed}")
        if self.image_size <= 0:
            raise ValueError(f"TeacherSpec.image_size for {self.slug!r} must be positive, got {self.image_size}")
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int):
            raise ValueError(f"TeacherSpec.feature_layer for {self.slug!r} must be an int, got {self.feature_layer!r}")
        if self.has_cls and self.num_prefix_tokens < 1:
            raise ValueError(f"TeacherSpec {self.slug!r}: has_cls=True needs num_prefix_tokens >= 1")
        if self.cls_attention and not (
            self.has_cls and self.backend == "transformers" and self.output == "hidden_state"
        ):
            raise ValueError(
                f"TeacherSpec {self.slug!r}: cls_attention needs a transformers hidden_state teacher with a CLS token"
            )
        if self.pool_attention and not (
            self.backend == "transformers"
            and self.output in ("hidden_state", "last_hidden_state")
            and self.num_prefix_tokens == 0
        ):
            raise ValueError(
                f"TeacherSpec {self.slug!r}: pool_attention needs a transformers hidden_state / last_hidden_state "
                "teacher without prefix tokens (the pooling head attends over every token)"
            )
        if self.sam_layout == "faithful" and self.output not in ("feature_map", "neck"):
            raise ValueError(
                f"TeacherSpec {self.slug!r}: sam_layout='faithful' applies to feature_map / neck outputs only"
            )
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(
                f"TeacherSpec.resize_size for {self.slug!r} is {self.resize_size}, below image_size {self.image_size}"
            )


@dataclass
class TeacherOutput:
    """tokens [B, N_t, C_t]; grid (h, w) with h * w = N_t; cls [B, C_t] or None; cls_attention [B, N_t] or None
    (CLS query's attention over the patch keys, softmax over all keys, averaged over heads); prefix [B, P, C_t]
    (the CLS/register tokens dropped from `tokens`) only for specs with `keep_prefix_tokens`; pooled [B, C_t] or
    None (an attention-pooling head's output, e.g. SigLIP's MAP head); pool_attention [B, N_t] or None (that head's
    probe attention over the patch tokens, averaged over heads, rows sum to 1)."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    cls: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    pool_attention: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------- preprocessing


def resized_size(height: int, width: int, spec: TeacherSpec) -> tuple[int, int]:
    """Size before cropping/padding: "crop" scales the shortest side to image_size (other side truncated, as
    CLIPImageProcessor does), "pad" the longest side (other side rounded, as SamImageProcessor does)."""
    size = spec.image_size
    if spec.resize_mode == "squash":
        return size, size
    if spec.resize_mode == "crop":
        size = spec.resize_size or size
        short, long = min(height, width), max(height, width)
        other = int(size * long / short)
        return (size, other) if height <= width else (other, size)
    scale = size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def prepare_images(images: torch.Tensor, spec: TeacherSpec) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> the teacher's normalised [B, 3, S, S] input, on the batch's device."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"teacher {spec.slug!r} expects images [B, 3, H, W], got {tuple(images.shape)}")
    size = spec.image_size
    target = resized_size(images.shape[-2], images.shape[-1], spec)
    x = images
    if target != tuple(images.shape[-2:]):
        antialias = spec.interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=target, mode=spec.interpolation, antialias=antialias, align_corners=False)
        x = x.clamp(0.0, 1.0)  # bicubic overshoots
    if spec.resize_mode == "crop":
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    if spec.resize_mode == "pad":
        # SAM pads the normalised image with zeros at the bottom and right.
        x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
    return x


def prepare_view(view: torch.Tensor, spec: TeacherSpec, valid_size: torch.Tensor | None = None) -> torch.Tensor:
    """A teacher's uint8 view (`teacher_views.make_views`) [B, 3, S, S] -> its normalised float32 input
    [B, 3, S, S], on the view's device: `(x - 255 mean) / (255 std)`, the fused rescale-and-normalise of
    transformers' torchvision image processors; for a `pad` teacher, zeros outside the image's (h, w)
    (`valid_size` [B, 2]; None: the whole view is image), as SAM pads after normalising. Raises `ValueError` for
    a view that is not uint8 at the spec's `image_size`."""
    size = spec.image_size
    if view.dtype != torch.uint8 or view.dim() != 4 or tuple(view.shape[1:]) != (3, size, size):
        raise ValueError(
            f"teacher {spec.slug!r} expects a uint8 view [B, 3, {size}, {size}], got {view.dtype} {tuple(view.shape)}"
        )
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=view.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, dtype=torch.float32, device=view.device).view(1, 3, 1, 1) * 255.0
    # In place on the fresh float copy: at 1024 px every extra temporary costs more than the arithmetic (CPU).
    x = view.float().sub_(mean).div_(std)  # [B, 3, S, S]
    if spec.resize_mode == "pad" and valid_size is not None:
        valid_size = valid_size.to(view.device)
        positions = torch.arange(size, device=view.device)
        rows = positions[None, :] < valid_size[:, :1]  # [B, S]
        cols = positions[None, :] < valid_size[:, 1:]  # [B, S]
        x.mul_((rows[:, :, None] & cols[:, None, :])[:, None])
    return x


# ------------------------------------------------------------------------------------------- token layouts


def tokens_from_map(feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C, h, w] -> tokens [B, h*w, C] in row-major grid order, and (h, w)."""
    return feature_map.flatten(2).transpose(1, 2), (feature_map.shape[-2], feature_map.shape[-1])


def sam_faithful_layout(feature_map: torch.Tensor) -> torch.Tensor:
    """The authors' SAM reshape (METHOD.md section 6), generalised from [B, 256, 64, 64]: flatten (C, H),
    swap with W, fold to [B, W, 2H, C/2], pixel-unshuffle by 2, read as C channels of H*W values.

    [B, C, H, W] -> tokens [B, H*W, C]; a fixed permutation that mixes positions and channels.
    """
    b, c, h, w = feature_map.shape
    if c % 4:
        raise ValueError(f"sam_layout='faithful' needs channels divisible by 4, got {c}")
    x = feature_map.reshape(b, c * h, w).transpose(1, 2)  # [B, W, C*H]
    x = x.reshape(b, w, 2 * h, c // 2)
    x = F.pixel_unshuffle(x, 2)  # [B, 4W, H, C/4]
    return x.reshape(b, c, h * w).transpose(1, 2)


def _split_prefix(hidden: torch.Tensor, spec: TeacherSpec) -> TeacherOutput:
    """[B, P + N, C] -> patch tokens (prefix dropped), square grid, CLS at position 0 if the spec has one;
    [B, C, h, w] / [B, h, w, C] maps (`spec.map_layout`) -> their h * w tokens."""
    if hidden.dim() == 4:
        return _from_map(hidden if spec.map_layout == "nchw" else hidden.permute(0, 3, 1, 2), spec)
    tokens = hidden[:, spec.num_prefix_tokens :]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(
            f"teacher {spec.slug!r}: {tokens.shape[1]} patch tokens after dropping {spec.num_prefix_tokens} "
            "prefix tokens is not a square grid; check num_prefix_tokens"
        )
    cls = hidden[:, 0] if spec.has_cls else None
    prefix = hidden[:, : spec.num_prefix_tokens] if spec.keep_prefix_tokens else None
    return TeacherOutput(tokens=tokens, grid=(side, side), cls=cls, prefix=prefix)


def _from_map(feature_map: torch.Tensor, spec: TeacherSpec) -> TeacherOutput:
    if feature_map.dim() != 4:
        raise ValueError(
            f"teacher {spec.slug!r}: output='feature_map' expects [B, C, h, w], got {tuple(feature_map.shape)}"
        )
    tokens, grid = tokens_from_map(feature_map)
    if spec.sam_layout == "faithful":
        tokens = sam_faithful_layout(feature_map)
    return TeacherOutput(tokens=tokens, grid=grid)


# -------------------------------------------------------------------------------------------------- backends


def _resolve_transformers_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"TeacherSpec.model_class {name!r} is not a transformers class")
    return cls


def load_transformers_teacher(spec: TeacherSpec) -> nn.Module:
    from transformers import AutoConfig

    cls = _resolve_transformers_class(spec.model_class)
    if spec.pretrained:
        mapping = {spec.weights_prefix: ""} if spec.weights_prefix else None
        # A full SAM2/SAM3 checkpoint's config.json is the whole model's (SAM3 video: the tower's sits two levels
        # down), so the tower's own config comes from the spec.
        tower = None
        if spec.weights_prefix and "model_type" in spec.config:
            sizes = dict(spec.config)
            tower = AutoConfig.for_model(sizes.pop("model_type"), **sizes)
        hub = {} if spec.checkpoint or spec.revision is None else {"revision": spec.revision}
        return cls.from_pretrained(spec.checkpoint or spec.model_id, key_mapping=mapping, config=tower, **hub)
    config = dict(spec.config)
    if "model_type" not in config:
        raise ValueError(f"teacher {spec.slug!r}: building without weights needs config['model_type']")
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    # Auto classes dispatch through from_config; a concrete model class builds through _from_config.
    return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


def config_depth(config: Any) -> int | None:
    """Entries of `outputs.hidden_states` a transformers vision config's model returns: the embeddings (or the
    stem's input), then one per layer / Hiera block / ConvNeXt stage. None where the config does not say."""
    for sub in (config, getattr(config, "vision_config", None), getattr(config, "backbone_config", None)):
        # a composite config (a full CLIPModel, a SAM2 vision encoder) keeps the tower's sizes in a sub-config
        if getattr(sub, "num_hidden_layers", None) is not None:
            return sub.num_hidden_layers + 1
        if getattr(sub, "blocks_per_stage", None) is not None:
            return sum(sub.blocks_per_stage) + 1
        if getattr(sub, "depths", None) is not None:
            return len(sub.depths) + 1
    return None


def transformers_depth(model: nn.Module) -> int | None:
    """Entries of `outputs.hidden_states` (the embeddings, then one per layer), from the model's config."""
    return config_depth(getattr(model, "config", None))


def extract_transformers(model: nn.Module, pixel_values: torch.Tensor, spec: TeacherSpec) -> TeacherOutput:
    if spec.output == "feature_map":
        return _from_map(model(pixel_values=pixel_values).last_hidden_state, spec)
    if spec.output == "last_hidden_state" and not spec.pool_attention:
        return _split_prefix(model(pixel_values=pixel_values).last_hidden_state, spec)
    if spec.output == "neck":
        outputs = model(pixel_values=pixel_values)
        levels = getattr(outputs, "fpn_hidden_states", None)  # SAM2/SAM3: several levels; SAM: one map
        return _from_map(outputs.last_hidden_state if levels is None else levels[spec.neck_index], spec)
    captured: dict[str, torch.Tensor] = {}
    handle = None
    pool_handle = hook_pooling_head(model, captured) if spec.pool_attention else None
    if spec.cls_attention:
        layers = encoder_layers(model)
        # hidden_states[k] is the output of layer k - 1, so the layer producing index `feature_layer` is:
        index = spec.feature_layer % (len(layers) + 1) - 1
        if index < 0:
            raise ValueError(
                f"teacher {spec.slug!r}: feature_layer {spec.feature_layer} is the embeddings, not a layer"
            )
        layer = layers[index]

        def hook(_module, _inputs, output):
            captured["row"] = cls_attention_row(output, layer.self_attn)

        handle = layer.layer_norm1.register_forward_hook(hook)
    try:
        outputs = model(pixel_values=pixel_values, output_hidden_states=True)
    finally:
        for hook in (handle, pool_handle):
            if hook is not None:
                hook.remove()
    last = spec.output == "last_hidden_state"  # only with pool_attention here
    out = _split_prefix(outputs.last_hidden_state if last else outputs.hidden_states[spec.feature_layer], spec)
    out.cls_attention = captured.get("row")
    out.pooled, out.pool_attention = captured.get("pooled"), captured.get("pool_attention")
    return out


def load_timm_teacher(spec: TeacherSpec) -> nn.Module:
    import timm

    kwargs = dict(spec.config)
    name = spec.model_id
    if spec.pretrained and spec.checkpoint and spec.checkpoint.startswith("hf-hub:"):
        name = spec.checkpoint + (f"@{spec.revision}" if spec.revision else "")  # a timm repository on the Hub
    elif spec.pretrained and spec.checkpoint and os.path.isdir(spec.checkpoint):
        # A folder written by timm (config.json + weights), as on the Hub: timm reads both from it.
        name = f"local-dir:{os.fspath(spec.checkpoint)}"
    elif spec.pretrained and spec.checkpoint:
        # A bare weights file replaces the Hub download; timm still applies its own key filtering.
        kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(spec.checkpoint))
    elif spec.pretrained and spec.revision:
        kwargs["pretrained_cfg_overlay"] = dict(hf_hub_id=f"{_timm_hub_id(spec)}@{spec.revision}")
    return timm.create_model(name, pretrained=spec.pretrained, **kwargs)


def _timm_hub_id(spec: TeacherSpec) -> str:
    """The Hub repository timm downloads `spec.model_id`'s weights from (`@revision` pins one there)."""
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(spec.model_id)
    if config is None or not config.hf_hub_id:
        raise ValueError(
            f"teacher {spec.slug!r}: revision {spec.revision!r} needs weights hosted on the Hub, but timm's "
            f"{spec.model_id!r} has no `hf_hub_id`"
        )
    return config.hf_hub_id


def timm_depth(model: nn.Module) -> int | None:
    """Blocks `forward_intermediates` takes an index into (timm's `feature_take_indices` over `model.blocks`)."""
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else None


def extract_timm(model: nn.Module, pixel_values: torch.Tensor, spec: TeacherSpec) -> TeacherOutput:
    if spec.output == "feature_map":
        return _from_map(model.forward_features(pixel_values), spec)
    if spec.output == "last_hidden_state":  # a ViT's final, normed tokens, prefix included
        return _split_prefix(model.forward_features(pixel_values), spec)
    ((patches, prefix),) = model.forward_intermediates(
        pixel_values,
        indices=[spec.feature_layer],
        return_prefix_tokens=True,
        norm=False,
        output_fmt="NLC",
        intermediates_only=True,
    )
    return _split_prefix(torch.cat([prefix, patches], dim=1), spec)


def load_vitdet_teacher(spec: TeacherSpec) -> nn.Module:

    model = EVA02ViTDet(EVA02ViTDetConfig(**spec.config))
    if spec.pretrained:
        path = spec.checkpoint
        if path is None and os.path.exists(spec.model_id):
            path = spec.model_id
        if path is None:
            from huggingface_hub import hf_hub_download

            if not spec.filename:
                raise ValueError(f"teacher {spec.slug!r}: a Hub vitdet checkpoint needs TeacherSpec.filename")
            path = hf_hub_download(spec.model_id, spec.filename, revision=spec.revision)
        load_eva02_det_state_dict(model, path)
    return model


def extract_vitdet(model: nn.Module, pixel_values: torch.Tensor, spec: TeacherSpec) -> TeacherOutput:
    return _from_map(model(pixel_values), spec)


def no_depth(model: nn.Module) -> None:
    """A backend that reads no hidden state by index (feature maps only): nothing to check."""
    return None


@dataclass(frozen=True)
class Backend:
    """load: spec -> model. extract: (model, pixel_values, spec) -> TeacherOutput. depth: model -> how many
    entries `TeacherSpec.feature_layer` indexes into (None: unknown, or the backend has no such index)."""

    load: Callable[[TeacherSpec], nn.Module]
    extract: Callable[[nn.Module, torch.Tensor, TeacherSpec], TeacherOutput]
    depth: Callable[[nn.Module], int | None] = no_depth


BACKENDS: dict[str, Backend] = {
    "transformers": Backend(load_transformers_teacher, extract_transformers, transformers_depth),
    "timm": Backend(load_timm_teacher, extract_timm, timm_depth),
    "vitdet": Backend(load_vitdet_teacher, extract_vitdet),
}


def check_feature_layer(spec: TeacherSpec, model: nn.Module) -> None:
    """Raise `SettingsError` naming the teacher, the layer and the valid range when a `hidden_state` spec's
    `feature_layer` is not an index of its model's hidden states (Python indexing: -depth..depth-1), or, with
    `cls_attention`, names the embeddings (index 0), which no attention layer produces."""
    depth = BACKENDS[spec.backend].depth(model)
    if spec.output != "hidden_state" or depth is None:
        return
    in_range = -depth <= spec.feature_layer < depth
    embeddings = in_range and spec.feature_layer % depth == 0  # hidden_states[0]: before any layer
    if in_range and not (spec.cls_attention and embeddings):
        return
    name = f"{spec.slug!r} ({spec.model_id}, {type(model).__name__})"
    if in_range:
        problem = f"teacher {name}: feature_layer {spec.feature_layer} is the embeddings, which have no CLS attention"
        expected = f"a layer: 1..{depth - 1} or {1 - depth}..-1"
    else:
        unit = "hidden states (index 0 = embeddings)" if spec.backend == "transformers" else "blocks"
        problem = f"teacher {name} has no feature_layer {spec.feature_layer}: it has {depth} {unit}"
        expected = f"an integer in {-depth}..{depth - 1} (-1 = the last)"
    raise SettingsError(problem, field="feature_layer", expected=expected)


# ---------------------------------------------------------------------------------------------- the wrapper


class Teacher(nn.Module):
    """A frozen teacher: images [B, 3, H, W] in [0, 1], or its own uint8 view, -> TeacherOutput. Its model never
    trains: parameters have requires_grad=False, forward runs under no_grad, and `.train()` leaves the model in eval
    mode."""

    def __init__(self, spec: TeacherSpec, model: nn.Module):
        super().__init__()
        check_feature_layer(spec, model)  # here, not as an IndexError in the middle of the first forward
        self.spec = spec
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def slug(self) -> str:
        return self.spec.slug

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.model.eval()  # dropout/batch-norm statistics of a teacher must never change
        return self

    def forward(
        self,
        images: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        valid_size: torch.Tensor | None = None,
    ) -> TeacherOutput:
        """images: [B, 3, H, W] in [0, 1] (resized and normalised here, `prepare_images`), or view: this teacher's
        uint8 view [B, 3, S, S] with `valid_size` [B, 2] for a `pad` teacher (cast and normalised here,
        `prepare_view`), moved to the teacher's device first (a uint8 view moves a quarter of the bytes)."""
        if (images is None) == (view is None):
            raise ValueError(f"teacher {self.slug!r} takes either `images` or `view`, not both or neither")
        reference = next(self.model.parameters())
        if view is not None:
            pixel_values = prepare_view(view.to(device=reference.device), self.spec, valid_size)
        else:
            pixel_values = prepare_images(images.to(device=reference.device), self.spec)
        pixel_values = pixel_values.to(reference.dtype)
        with torch.no_grad():
            return BACKENDS[self.spec.backend].extract(self.model, pixel_values, self.spec)


def build_teacher(spec: TeacherSpec) -> Teacher:
    """Build the teacher of `spec` through its backend's loader (under a `torch.device("meta")` context the
    architecture is built without memory, for shape checks)."""
    return Teacher(spec, BACKENDS[spec.backend].load(spec))
