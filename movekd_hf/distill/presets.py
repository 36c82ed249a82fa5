"""Teacher specs from one place: one factory per teacher kind, the paper's teachers and teacher sets (METHOD.md
section 1, real ids, input sizes and normalisation), the modern ones (issue 17), and the `tiny`, `tiny-modern` and
`tiny-modern-2` sets for CPU runs.

A factory fixes what makes its kind (backend, model class, normalisation, resize mode, which output is read) and
takes the architecture's size as `sizes` (the paper's teacher by default) plus any other `TeacherSpec` field
(`model_id`, `pretrained`, `image_size`, ...), which override the preset's. What a factory leaves out is
`TeacherSpec`'s default, CLIP's view: centre crop, bicubic, CLIP normalisation, the hidden state at layer -2. Each spec also carries the full
architecture config, so `pretrained=False` builds the same model with random weights (or, under
`torch.device("meta")`, without memory) and nothing is downloaded.

The modern presets (issue 17: SigLIP 2, DINOv3 ViT and ConvNeXt, AIMv2, SAM2, SAM3, C-RADIO) are what
`teacher_by_id.teacher_from_pretrained` reads from each model's config.json and preprocessor_config.json, written out
with the published sizes so they build offline; tests/test_teacher_by_id.py checks both agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .teachers import IMAGENET_MEAN, IMAGENET_STD, SAM_ENCODER_PREFIX, TeacherSpec
from .vitdet_eva import EVA02ViTDetConfig

# CLIP ViT-L/14-336 (CLIPVisionConfig fields): LLaVA-1.5's vision tower, so the student's architecture and
# initial weights as well as the `clip` teacher.
CLIP_L_336_ID = "openai/clip-vit-large-patch14-336"
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
)
# SAM ViT-L image encoder (SamVisionConfig fields of facebook/sam-vit-large): windows of 14, global blocks
# 5/11/17/23, 256-channel neck.
SAM_L_ID = "facebook/sam-vit-large"
SAM_L = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_dim=4096,
    image_size=1024,
    patch_size=16,
    output_channels=256,
    window_size=14,
    global_attn_indexes=[5, 11, 17, 23],
    num_pos_feats=128,
)
# EVA-02-L ViTDet (the COCO detector's backbone); its sizes are `EVA02ViTDetConfig`'s defaults.
EVA02_L_ID = "Yuxin-CV/EVA-02"
EVA02_L_FILENAME = "eva02/det/eva02_L_coco_det_sys_o365.pth"
# ConvNeXt-XXLarge (open_clip, LAION-2B): timm's model name decides its sizes; its input is LLaVA-scale 1024 px.
CONVNEXT_XXL_ID = "convnext_xxlarge.clip_laion2b_soup"
CONVNEXT_XXL_IMAGE_SIZE = 1024


# ----------------------------------------------------------------------------------------- modern teachers
# Sizes of the published checkpoints (tests/test_teacher_by_id.py names each number's source).
HALF = (0.5, 0.5, 0.5)  # SigLIP's and SAM3's normalisation
SIGLIP2_SO400M_ID = "google/siglip2-so400m-patch16-384"  # fixed-resolution SigLIP 2: model_type "siglip"
SIGLIP2_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
DINOV3_VITL_ID = "facebook/dinov3-vitl16-pretrain-lvd1689m"
DINOV3_VITL = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=16,
    image_size=224,
    num_register_tokens=4,
    layerscale_value=1.0,
    layer_norm_eps=1e-5,
    key_bias=False,
)
DINOV3_CONVNEXT_L_ID = "facebook/dinov3-convnext-large-pretrain-lvd1689m"
DINOV3_CONVNEXT_L = dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536], image_size=224)
AIMV2_L_ID = "apple/aimv2-large-patch14-224"
AIMV2_L = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=8,
    image_size=224,
    patch_size=14,
)
SAM2_L_ID = "facebook/sam2.1-hiera-large"
SAM2_L = dict(
    backbone_config=dict(
        model_type="sam2_hiera_det_model",
        hidden_size=144,
        num_attention_heads=2,
        embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        blocks_per_stage=[2, 6, 36, 4],
        global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
        window_size_per_stage=[8, 4, 16, 8],
        image_size=[1024, 1024],
    ),
    backbone_channel_list=[1152, 576, 288, 144],
    fpn_hidden_size=256,
)
SAM3_ID = "facebook/sam3"
SAM3 = dict(
    backbone_config=dict(
        model_type="sam3_vit_model",
        hidden_size=1024,
        intermediate_size=4736,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=1008,
        patch_size=14,
        window_size=24,
        global_attn_indexes=[7, 15, 23, 31],
        pretrain_image_size=336,
    ),
    fpn_hidden_size=256,
    scale_factors=[4.0, 2.0, 1.0, 0.5],
)
C_RADIO_ID = "nvidia/C-RADIOv4-H"
C_RADIO = dict(
    hidden_size=1280,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=16,
    image_size=512,  # RADIO's preferred resolution; any multiple of 16 up to max_img_size works
    max_img_size=2048,
    num_cls_tokens=3,
    num_registers=7,
)


def _spec(fields: Mapping[str, Any], **preset: Any) -> TeacherSpec:
    """A `TeacherSpec` of the preset's fields, with the caller's `fields` overriding them."""
    return TeacherSpec(**{**preset, **fields})


def _modern_spec(fields: Mapping[str, Any], sizes: Mapping[str, Any], model_type: str, **preset: Any) -> TeacherSpec:
    """`_spec` for a transformers model of the modern presets: their processors squash the image to a square
    (bilinear) unless the preset says otherwise; `sizes` are the config fields of `model_type`."""
    defaults = dict(backend="transformers", resize_mode="squash", interpolation="bilinear")
    return _spec(fields, **{**defaults, **preset, "config": {"model_type": model_type, **sizes}})


def clip_teacher(sizes: Mapping[str, Any] = CLIP_L_336, **fields: Any) -> TeacherSpec:
    """A transformers CLIP vision tower read at `feature_layer` (-2, as LLaVA), its CLS token dropped from the
    patch tokens and kept, with the CLS-to-patch attention row that weights the distillation loss.

    sizes: `CLIPVisionConfig` fields (CLIP ViT-L/14-336 by default); `image_size` is also the input size.
    """
    return _spec(
        fields,
        slug="clip",
        backend="transformers",
        model_id=CLIP_L_336_ID,
        model_class="CLIPVisionModel",
        image_size=sizes["image_size"],
        num_prefix_tokens=1,
        has_cls=True,
        cls_attention=True,
        config={"model_type": "clip_vision_model", **sizes},
    )


def eva_teacher(sizes: Mapping[str, Any] | None = None, **fields: Any) -> TeacherSpec:
    """The EVA-02 ViTDet backbone's final feature map (EVA-02-L at 1024 px by default).

    sizes: `EVA02ViTDetConfig` fields that differ from EVA-02-L (none by default); `image_size` is also the
    input size.
    """
    sizes = dict(sizes or {})
    paper_weights = fields.get("model_id", EVA02_L_ID) == EVA02_L_ID  # the file is one of that Hub repo's
    return _spec(
        fields,
        slug="eva",
        backend="vitdet",
        model_id=EVA02_L_ID,
        filename=EVA02_L_FILENAME if paper_weights else None,
        image_size=sizes.get("image_size", EVA02ViTDetConfig.image_size),
        output="feature_map",
        config=sizes,
    )


def convnext_teacher(sizes: Mapping[str, Any] | None = None, **fields: Any) -> TeacherSpec:
    """A timm ConvNeXt's final feature map (`forward_features`; ConvNeXt-XXLarge at 1024 px by default).

    sizes: keyword arguments of `timm.create_model` that change the named model (`dims`, `depths`,
    `output_stride`, ...); none by default. Pass a small `model_id` (e.g. `convnext_atto`) and `image_size` for
    tiny teachers.
    """
    return _spec(
        fields,
        slug="convnext",
        backend="timm",
        model_id=CONVNEXT_XXL_ID,
        image_size=CONVNEXT_XXL_IMAGE_SIZE,
        output="feature_map",
        config=dict(sizes or {}),
    )


def sam_teacher(sizes: Mapping[str, Any] = SAM_L, **fields: Any) -> TeacherSpec:
    """The SAM image encoder's neck output, on SAM's own view: longest side resized (bilinear), ImageNet
    normalisation, zero padding at the bottom and right.

    sizes: `SamVisionConfig` fields (SAM ViT-L by default; small random ones want `initializer_range=0.02`, as
    SAM's stock 1e-10 makes every output vanish); `image_size` is also the input size. The vision encoder
    loads alone from a full SAM checkpoint (same `vision_encoder.` key prefix).
    """
    return _spec(
        fields,
        slug="sam",
        backend="transformers",
        model_id=SAM_L_ID,
        model_class="SamVisionModel",
        image_size=sizes["image_size"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_mode="pad",
        interpolation="bilinear",
        output="feature_map",
        config={"model_type": "sam_vision_model", **sizes},
    )


def siglip2_teacher(sizes: Mapping[str, Any] = SIGLIP2_SO400M, **fields: Any) -> TeacherSpec:
    """A SigLIP (2) vision tower's final tokens (after its post-layernorm; no CLS), on SigLIP's view: squashed to
    a square (bilinear), normalised to [-1, 1]. sizes: `SiglipVisionConfig` fields (SigLIP 2 so400m/16 at 384 px:
    576 x 1152 tokens by default)."""
    return _modern_spec(
        fields,
        sizes,
        "siglip_vision_model",
        slug="siglip2",
        model_id=SIGLIP2_SO400M_ID,
        model_class="SiglipVisionModel",
        image_size=sizes["image_size"],
        mean=HALF,
        std=HALF,
        output="last_hidden_state",
    )


def dinov3_teacher(sizes: Mapping[str, Any] = DINOV3_VITL, **fields: Any) -> TeacherSpec:
    """A DINOv3 ViT's final, normed patch tokens, its CLS kept as `cls` and its register tokens dropped; DINOv3's
    view (squash, bilinear, ImageNet normalisation). sizes: `DINOv3ViTConfig` fields (ViT-L/16 at 224 px:
    196 x 1024 tokens by default; DINOv3 runs at any multiple of 16, e.g. `image_size=448`)."""
    return _modern_spec(
        fields,
        sizes,
        "dinov3_vit",
        slug="dinov3",
        model_id=DINOV3_VITL_ID,
        model_class="DINOv3ViTModel",
        image_size=sizes["image_size"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        output="last_hidden_state",
        num_prefix_tokens=1 + sizes["num_register_tokens"],
        has_cls=True,
    )


def dinov3_convnext_teacher(sizes: Mapping[str, Any] = DINOV3_CONVNEXT_L, **fields: Any) -> TeacherSpec:
    """A DINOv3 ConvNeXt's last stage as normed tokens (stride 32), its pooled token kept as `cls`; DINOv3's view.
    sizes: `DINOv3ConvNextConfig` fields (ConvNeXt-Large at 224 px: 49 x 1536 tokens by default)."""
    return _modern_spec(
        fields,
        sizes,
        "dinov3_convnext",
        slug="dinov3_convnext",
        model_id=DINOV3_CONVNEXT_L_ID,
        model_class="DINOv3ConvNextModel",
        image_size=sizes["image_size"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        output="last_hidden_state",
        num_prefix_tokens=1,
        has_cls=True,
    )


def aimv2_teacher(sizes: Mapping[str, Any] = AIMV2_L, **fields: Any) -> TeacherSpec:
    """An AIMv2 vision tower's final, RMS-normed tokens (no CLS), on CLIP's view (its processor is CLIP's).
    sizes: `Aimv2VisionConfig` fields (AIMv2-L/14 at 224 px: 256 x 1024 tokens by default)."""
    return _modern_spec(
        fields,
        sizes,
        "aimv2_vision_model",
        slug="aimv2",
        model_id=AIMV2_L_ID,
        model_class="Aimv2VisionModel",
        image_size=sizes["image_size"],
        resize_mode="crop",
        interpolation="bicubic",
        output="last_hidden_state",
    )


def sam2_teacher(sizes: Mapping[str, Any] = SAM2_L, **fields: Any) -> TeacherSpec:
    """The SAM2 image encoder's neck at stride 16 (the image embedding its mask decoder reads), on SAM2's view:
    squashed to 1024 x 1024 (bilinear), ImageNet normalisation. sizes: `Sam2VisionConfig` fields (SAM 2.1
    Hiera-L: 4096 x 256 tokens by default); `backbone_config["image_size"]` is the input size."""
    return _modern_spec(
        fields,
        sizes,
        "sam2_vision_model",
        slug="sam2",
        model_id=SAM2_L_ID,
        model_class="Sam2VisionModel",
        image_size=sizes["backbone_config"]["image_size"][0],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        output="neck",
        map_layout="nhwc",
        neck_index=-1,
        weights_prefix=SAM_ENCODER_PREFIX,
    )


def sam3_teacher(sizes: Mapping[str, Any] = SAM3, **fields: Any) -> TeacherSpec:
    """The SAM3 image encoder's neck at the ViT's own stride 14 (the level its detector reads), on SAM3's view:
    squashed to 1008 x 1008 (bilinear), normalised to [-1, 1]. sizes: `Sam3VisionConfig` fields (SAM3's
    ViT-L/14: 5184 x 256 tokens by default); `backbone_config["image_size"]` is the input size."""
    return _modern_spec(
        fields,
        sizes,
        "sam3_vision_model",
        slug="sam3",
        model_id=SAM3_ID,
        model_class="Sam3VisionModel",
        image_size=sizes["backbone_config"]["image_size"],
        mean=HALF,
        std=HALF,
        output="neck",
        map_layout="nhwc",
        neck_index=list(sizes.get("scale_factors", SAM3["scale_factors"])).index(1.0),
        weights_prefix=SAM_ENCODER_PREFIX,
    )


def radio_teacher(sizes: Mapping[str, Any] = C_RADIO, **fields: Any) -> TeacherSpec:
    """C-RADIO, one agglomerated teacher (distilled from SigLIP 2, DINOv3, SAM and others): its final patch
    features, the first summary (CLS) token kept as `cls`, its other CLS and register tokens dropped. RADIO
    normalises [0, 1] pixels itself, so the spec passes them unnormalised (squash, bilinear). sizes:
    `RadioConfig` fields (C-RADIOv4-H at 512 px: 1024 x 1280 tokens by default)."""
    return _modern_spec(
        fields,
        sizes,
        "radio",
        slug="radio",
        model_id=C_RADIO_ID,
        model_class="RadioModel",
        image_size=sizes["image_size"],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        output="last_hidden_state",
        num_prefix_tokens=sizes["num_cls_tokens"] + sizes["num_registers"],
        has_cls=True,
    )


PAPER_TEACHERS: dict[str, TeacherSpec] = {
    "clip": clip_teacher(),
    "eva": eva_teacher(),
    "convnext": convnext_teacher(),
    "sam": sam_teacher(),
}

# Published sizes of the modern teachers; `grid` and `channels` are what their configs predict at image_size.
MODERN_TEACHERS: dict[str, TeacherSpec] = {
    "siglip2": siglip2_teacher(grid=(24, 24), channels=1152),  # 384 / 16
    "dinov3": dinov3_teacher(grid=(14, 14), channels=1024),  # 224 / 16
    "dinov3_convnext": dinov3_convnext_teacher(grid=(7, 7), channels=1536),  # 224 / 32
    "aimv2": aimv2_teacher(grid=(16, 16), channels=1024),  # 224 / 14
    "sam2": sam2_teacher(grid=(64, 64), channels=256),  # 1024 / 16
    "sam3": sam3_teacher(grid=(72, 72), channels=256),  # 1008 / 14
    "radio": radio_teacher(grid=(32, 32), channels=1280),  # 512 / 16
}

# The `tiny` set: real architectures at CPU-test sizes, random weights. TINY_CLIP is also the tiny student's
# tower (movekd_hf.models), as the paper's student starts as its CLIP teacher; in training the clip teacher is
# always the student's own initial tower. The other widths differ from the student's (32 wide, 16 tokens), so a
# shape mix-up fails.
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
    hidden_act="quick_gelu",
)
TINY_CONVNEXT = dict(dims=(8, 12, 16, 40), depths=(1, 1, 1, 1))  # 40 channels, stride 32
TINY_SAM = dict(
    hidden_size=28,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_dim=44,
    image_size=64,
    patch_size=8,
    output_channels=20,
    window_size=4,
    global_attn_indexes=[1],
    num_pos_feats=12,
    initializer_range=0.02,
)
TINY_TEACHERS: dict[str, TeacherSpec] = {
    "clip": clip_teacher(TINY_CLIP, model_id="tiny-clip", pretrained=False),
    "convnext": convnext_teacher(TINY_CONVNEXT, model_id="convnext_atto", image_size=64, pretrained=False),
    "sam": sam_teacher(TINY_SAM, model_id="tiny-sam", pretrained=False),
}

# The `tiny-modern` set: the `modern` set's classes (SiglipVisionModel, DINOv3ViTModel, Sam2VisionModel) read as
# its presets read them, at CPU-test sizes with random weights; every width and token count differs from the
# student's and from each other's: siglip2 6x6 x 44, dinov3 5x5 x 48 (+1 CLS, 4 registers), sam2 8x8 x 24.
TINY_SIGLIP2 = dict(
    hidden_size=44,
    intermediate_size=52,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=48,
    patch_size=8,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
TINY_DINOV3 = dict(
    hidden_size=48,
    intermediate_size=60,
    num_hidden_layers=2,
    num_attention_heads=2,  # head width 24: DINOv3's RoPE wants a multiple of 4
    patch_size=8,
    image_size=40,
    num_register_tokens=4,
    layerscale_value=1.0,
    layer_norm_eps=1e-5,
    key_bias=False,
)
TINY_SAM2 = dict(
    backbone_config=dict(
        model_type="sam2_hiera_det_model",
        hidden_size=8,
        num_attention_heads=1,
        embed_dim_per_stage=[8, 16, 28, 36],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        blocks_per_stage=[1, 1, 2, 1],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
        window_size_per_stage=[2, 2, 2, 2],
        image_size=[128, 128],
    ),
    backbone_channel_list=[36, 28, 16, 8],
    backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],  # strides 4, 8, 16 at 128 px
    fpn_hidden_size=24,
)
TINY_MODERN_TEACHERS: dict[str, TeacherSpec] = {
    "clip": TINY_TEACHERS["clip"],
    "siglip2": siglip2_teacher(TINY_SIGLIP2, model_id="tiny-siglip2", pretrained=False, grid=(6, 6), channels=44),
    "dinov3": dinov3_teacher(TINY_DINOV3, model_id="tiny-dinov3", pretrained=False, grid=(5, 5), channels=48),
    "sam2": sam2_teacher(TINY_SAM2, model_id="tiny-sam2", pretrained=False, grid=(8, 8), channels=24),
}

# The `tiny-modern-2` set: the other modern presets' classes (Aimv2VisionModel, DINOv3ConvNextModel,
# Sam3VisionModel, RadioModel) and the paper's EVA-02 ViTDet, read as their presets read them, at CPU-test sizes with
# random weights. Every width and token count differs from the student's (32 x 16) and from each other's: eva 6x6 x 40,
# aimv2 5x5 x 36, dinov3_convnext 3x3 x 28 (+ its pooled token as CLS), sam3 8x8 x 56 (the neck's stride-7 level
# of a 56 px input), radio 7x7 x 52 (+ 3 CLS, 7 registers).
TINY_EVA = dict(
    image_size=48,
    patch_size=8,
    hidden_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,  # head width 20: 2D rotary embeddings want a multiple of 4
    window_size=3,
    global_attn_indexes=(1,),
    pretrain_image_size=32,
    rope_reference_grid=4,
)
TINY_AIMV2 = dict(
    hidden_size=36,
    intermediate_size=44,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=35,
    patch_size=7,
)
TINY_DINOV3_CONVNEXT = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 12, 16, 28], image_size=96)  # stride 32
TINY_SAM3 = dict(
    backbone_config=dict(
        model_type="sam3_vit_model",
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=7,
        window_size=4,
        global_attn_indexes=[1],
        pretrain_image_size=28,
    ),
    fpn_hidden_size=56,  # a multiple of 8: SAM3's detector heads group-normalise it in groups of 8
    backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],  # strides 1.75, 3.5, 7 at 56 px
)
TINY_RADIO = dict(
    hidden_size=52,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=8,
    image_size=56,
    max_img_size=64,
    num_cls_tokens=3,
    num_registers=7,
)
TINY_MODERN_2_TEACHERS: dict[str, TeacherSpec] = {
    "clip": TINY_TEACHERS["clip"],
    "eva": eva_teacher(TINY_EVA, model_id="tiny-eva", pretrained=False, grid=(6, 6), channels=40),
    "aimv2": aimv2_teacher(TINY_AIMV2, model_id="tiny-aimv2", pretrained=False, grid=(5, 5), channels=36),
    "dinov3_convnext": dinov3_convnext_teacher(
        TINY_DINOV3_CONVNEXT, model_id="tiny-dinov3-convnext", pretrained=False, grid=(3, 3), channels=28
    ),
    "sam3": sam3_teacher(TINY_SAM3, model_id="tiny-sam3", pretrained=False, grid=(8, 8), channels=56),
    "radio": radio_teacher(TINY_RADIO, model_id="tiny-radio", pretrained=False, grid=(7, 7), channels=52),
}

# Teacher set name -> its teachers' slugs. Each lists the anchor first as `clip`: in a run it is the student's own
# initial tower, whatever the tower is (training/teacher_source.py `anchor_slug` names it), and has no adapter.
# v1.0 / v1.1 are the paper's; `modern` and `modern-2` issue 17's; `tiny`, `tiny-modern` and `tiny-modern-2` always
# have random weights.
TEACHER_SETS: dict[str, tuple[str, ...]] = {
    "v1.0": ("clip", "eva", "convnext"),
    "v1.1": ("clip", "eva", "convnext", "sam"),
    "tiny": ("clip", "convnext", "sam"),
    # The student's own CLIP (the anchor, as in the paper's sets) with SigLIP 2, DINOv3 and SAM2.
    "modern": ("clip", "siglip2", "dinov3", "sam2"),
    "tiny-modern": ("clip", "siglip2", "dinov3", "sam2"),
    # The other modern teachers into a CLIP student: AIMv2, DINOv3 ConvNeXt, SAM3 and the agglomerated C-RADIO.
    "modern-2": ("clip", "aimv2", "dinov3_convnext", "sam3", "radio"),
    "tiny-modern-2": ("clip", "eva", "aimv2", "dinov3_convnext", "sam3", "radio"),
}
PRESET_TEACHERS: dict[str, TeacherSpec] = {**PAPER_TEACHERS, **MODERN_TEACHERS}
# Sets of test-sized teachers: their own specs, never pretrained weights.
TINY_SETS: dict[str, dict[str, TeacherSpec]] = {
    "tiny": TINY_TEACHERS,
    "tiny-modern": TINY_MODERN_TEACHERS,
    "tiny-modern-2": TINY_MODERN_2_TEACHERS,
}


def teacher_specs(teacher_set: str, pretrained: bool = True, sam_layout: str = "grid") -> list[TeacherSpec]:
    """The specs of a teacher set (a key of `TEACHER_SETS`), in the set's order.

    pretrained: load real weights (paper and modern sets; the `TINY_SETS` never have any). sam_layout
    "faithful" reproduces the authors' SAM reshape (METHOD.md section 6) for adapters trained by them; "grid"
    (default) keeps the true grid.
    """
    if teacher_set not in TEACHER_SETS:
        raise ValueError(f"unknown teacher set {teacher_set!r}; expected one of {sorted(TEACHER_SETS)}")
    presets = TINY_SETS.get(teacher_set, PRESET_TEACHERS)
    specs = []
    for slug in TEACHER_SETS[teacher_set]:
        spec = presets[slug]
        if teacher_set not in TINY_SETS:
            spec = replace(spec, pretrained=pretrained)
        if slug == "sam":
            spec = replace(spec, sam_layout=sam_layout)
        specs.append(spec)
    return specs
