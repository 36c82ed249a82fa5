"""Paper teacher sets: real ids and sizes, full-size builds on the meta device, and the plan rows."""

from __future__ import annotations

import pytest
import torch

from movekd_hf.distill.plan import teacher_plan_rows
from movekd_hf.distill.presets import PAPER_TEACHERS, TEACHER_SETS, teacher_specs
from movekd_hf.distill.teachers import build_teacher

PAPER_SHAPES = {"clip": (576, 1024), "eva": (4096, 1024), "convnext": (1024, 3072), "sam": (4096, 256)}


@pytest.fixture(scope="module")
def meta_outputs():
    """Every paper teacher built at full size on the meta device and run on one meta image."""
    outs = {}
    for spec in teacher_specs("v1.1", pretrained=False):
        with torch.device("meta"):
            teacher = build_teacher(spec)
            outs[spec.slug] = (teacher, teacher(torch.empty(2, 3, 480, 640)))
    return outs


def test_teacher_sets_and_real_ids():
    assert TEACHER_SETS == {
        "v1.0": ("clip", "eva", "convnext"),
        "v1.1": ("clip", "eva", "convnext", "sam"),
        "tiny": ("clip", "convnext", "sam"),
        "modern": ("clip", "siglip2", "dinov3", "sam2"),
        "tiny-modern": ("clip", "siglip2", "dinov3", "sam2"),
        "modern-2": ("clip", "aimv2", "dinov3_convnext", "sam3", "radio"),
        "tiny-modern-2": ("clip", "eva", "aimv2", "dinov3_convnext", "sam3", "radio"),
    }
    assert PAPER_TEACHERS["clip"].model_id == "openai/clip-vit-large-patch14-336"
    assert (PAPER_TEACHERS["eva"].model_id, PAPER_TEACHERS["eva"].filename) == (
        "Yuxin-CV/EVA-02",
        "eva02/det/eva02_L_coco_det_sys_o365.pth",
    )
    assert PAPER_TEACHERS["convnext"].model_id == "convnext_xxlarge.clip_laion2b_soup"
    assert PAPER_TEACHERS["sam"].model_id == "facebook/sam-vit-large"
    sizes = {slug: spec.image_size for slug, spec in PAPER_TEACHERS.items()}
    assert sizes == {"clip": 336, "eva": 1024, "convnext": 1024, "sam": 1024}
    assert PAPER_TEACHERS["sam"].resize_mode == "pad" and PAPER_TEACHERS["clip"].resize_mode == "crop"
    assert all(spec.pretrained for spec in teacher_specs("v1.0"))
    assert [s.slug for s in teacher_specs("v1.0")] == ["clip", "eva", "convnext"]
    with pytest.raises(ValueError, match="unknown teacher set 'v2'"):
        teacher_specs("v2")


@pytest.mark.parametrize("slug", ["clip", "eva", "convnext", "sam"])
def test_paper_teachers_have_paper_token_shapes_on_meta(meta_outputs, slug):
    teacher, out = meta_outputs[slug]
    assert out.tokens.device.type == "meta"
    assert tuple(out.tokens.shape) == (2, *PAPER_SHAPES[slug])
    side = int(PAPER_SHAPES[slug][0] ** 0.5)
    assert out.grid == (side, side)
    if slug == "clip":
        assert tuple(out.cls.shape) == (2, 1024) and tuple(out.cls_attention.shape) == (2, 576)
    assert all(p.device.type == "meta" and not p.requires_grad for p in teacher.parameters())


def test_faithful_sam_layout_keeps_the_paper_shape_on_meta():
    spec = next(s for s in teacher_specs("v1.1", pretrained=False, sam_layout="faithful") if s.slug == "sam")
    with torch.device("meta"):
        out = build_teacher(spec)(torch.empty(1, 3, 1024, 1024))
    assert spec.sam_layout == "faithful" and tuple(out.tokens.shape) == (1, 4096, 256)


def test_plan_rows_list_frozen_teachers_and_trainable_adapters():
    rows = teacher_plan_rows("v1.1", num_student_tokens=576, student_dim=1024)
    names = [name.split(" ")[0] for name, _, _ in rows]
    assert names == [
        "teacher/clip",
        "teacher/eva",
        "adapter/eva",
        "teacher/convnext",
        "adapter/convnext",
        "teacher/sam",
        "adapter/sam",
    ]
    params = {name.split(" ")[0]: (count, trainable) for name, count, trainable in rows}
    assert params["teacher/clip"] == (303_507_456, False)  # CLIP ViT-L/14-336 vision tower
    assert params["adapter/eva"] == (1024 * 1024 + 1024 + 4096 * 576 + 576, True)
    assert params["adapter/convnext"] == (3072 * 1024 + 1024 + 1024 * 576 + 576, True)
    assert params["adapter/sam"] == (256 * 1024 + 1024 + 4096 * 576 + 576, True)
    assert all(count > 0 for _, count, _ in rows)


def test_factories_fix_the_kind_and_take_sizes_and_fields():
    from movekd_hf.distill.presets import TINY_SAM, clip_teacher, eva_teacher, sam_teacher

    tiny_sam = sam_teacher(TINY_SAM, model_id="tiny-sam", pretrained=False)
    assert (tiny_sam.slug, tiny_sam.model_class, tiny_sam.resize_mode, tiny_sam.output) == (
        "sam",
        "SamVisionModel",
        "pad",
        "feature_map",
    )
    assert tiny_sam.mean == PAPER_TEACHERS["sam"].mean and tiny_sam.image_size == TINY_SAM["image_size"] == 64
    assert tiny_sam.config == {"model_type": "sam_vision_model", **TINY_SAM} and not tiny_sam.pretrained
    # Fields override the preset's, sizes included in the config; the paper's EVA checkpoint file only goes
    # with the paper's repository.
    clip = clip_teacher(image_size=224, feature_layer=-1)
    assert (clip.image_size, clip.feature_layer, clip.config["image_size"]) == (224, -1, 336)
    assert eva_teacher().filename == "eva02/det/eva02_L_coco_det_sys_o365.pth"
    assert eva_teacher({"image_size": 64}, model_id="tiny-eva").filename is None
    with pytest.raises(TypeError, match="unexpected keyword argument 'widht'"):
        sam_teacher(widht=3)


def test_tiny_set_has_random_weights_and_the_tiny_students_clip():
    from movekd_hf.distill.presets import TINY_CLIP
    from movekd_hf.models import build_config

    specs = teacher_specs("tiny", pretrained=True)
    assert [s.slug for s in specs] == ["clip", "convnext", "sam"] and not any(s.pretrained for s in specs)
    assert build_config("tiny").vision_config.hidden_size == TINY_CLIP["hidden_size"] == specs[0].config["hidden_size"]
    assert {s.image_size for s in specs[1:]} == {64}
