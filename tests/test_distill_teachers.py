"""Teachers: one interface over transformers, timm and the ViTDet EVA-02; frozen; real loading paths."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from _distill_fixtures import TINY_CLIP_CONFIG, TINY_CONVNEXT_KWARGS, TINY_SAM_CONFIG, images, tiny_spec

from movekd_hf.distill.teachers import (
    TeacherSpec,
    build_teacher,
    prepare_images,
    sam_faithful_layout,
)
from movekd_hf.modeling.llava_conventions import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def clip_teacher():
    torch.manual_seed(0)
    return build_teacher(tiny_spec("clip"))


def _shared_state(teacher) -> dict:
    """What a test could change in the shared teacher: attention backend, config, train/eval modes, weights."""
    return {
        "attn_implementation": teacher.model.config._attn_implementation,
        "config": teacher.model.config.to_dict(),
        "modes": {name: module.training for name, module in teacher.named_modules()},
        "weights": {name: value.clone() for name, value in teacher.state_dict().items()},
    }


@pytest.fixture(autouse=True)
def clip_teacher_left_as_found(request):
    """`clip_teacher` is shared by this module's tests: each must hand it on unchanged (SDPA attention above all),
    or the tests after it silently check something else."""
    if "clip_teacher" not in request.fixturenames:
        yield
        return
    teacher = request.getfixturevalue("clip_teacher")
    before = _shared_state(teacher)
    yield
    after = _shared_state(teacher)
    assert after["attn_implementation"] == "sdpa", "a test switched the shared clip teacher's attention backend"
    assert after["config"] == before["config"] and after["modes"] == before["modes"]
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(value, before["weights"][name]) for name, value in after["weights"].items())


@pytest.mark.parametrize(
    "slug, tokens, dim, grid, has_cls",
    [
        ("clip", 16, 32, (4, 4), True),
        ("sam", 64, 20, (8, 8), False),
        ("eva", 64, 24, (8, 8), False),
        ("convnext", 4, 40, (2, 2), False),
        ("evaclip", 16, 48, (4, 4), True),
        ("siglip", 16, 36, (4, 4), False),
        ("dinov2", 16, 44, (4, 4), True),
    ],
)
def test_every_teacher_returns_tokens_grid_and_cls(slug, tokens, dim, grid, has_cls):
    torch.manual_seed(0)
    teacher = build_teacher(tiny_spec(slug))
    out = teacher(images())
    assert out.tokens.shape == (2, tokens, dim)
    assert out.grid == grid
    assert (out.cls is not None) == has_cls
    if has_cls:
        assert out.cls.shape == (2, dim)
    assert torch.isfinite(out.tokens).all()


def test_clip_tokens_and_cls_are_hidden_state_minus_two(clip_teacher):
    batch = images()
    out = clip_teacher(batch)
    pixel_values = prepare_images(batch, clip_teacher.spec)
    with torch.no_grad():
        hidden = clip_teacher.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out.tokens, hidden[:, 1:])
    torch.testing.assert_close(out.cls, hidden[:, 0])


def test_clip_cls_attention_equals_eager_attention(clip_teacher):
    """The row recomputed from q/k under SDPA equals eager attention's CLS row (layer -2, head mean)."""
    assert clip_teacher.model.config._attn_implementation == "sdpa"
    # A copy of the config: `_from_config` sets the implementation on the config object it is given, and the
    # shared teacher would run eager from then on.
    config = copy.deepcopy(clip_teacher.model.config)
    eager = type(clip_teacher.model)._from_config(config, attn_implementation="eager")
    eager.load_state_dict(clip_teacher.model.state_dict())
    eager.eval()
    batch = images()
    out = clip_teacher(batch)
    with torch.no_grad():
        attentions = eager(pixel_values=prepare_images(batch, clip_teacher.spec), output_attentions=True).attentions
    # attentions[i] is layer i's; the layer whose output is hidden_states[-2] is the second to last.
    expected = attentions[-2][:, :, 0, 1:].mean(dim=1)
    assert out.cls_attention.shape == (2, 16)
    torch.testing.assert_close(out.cls_attention, expected, rtol=1e-5, atol=1e-6)
    assert (out.cls_attention.sum(-1) < 1).all()  # the CLS key's own share is excluded
    assert eager.config._attn_implementation == "eager"
    assert clip_teacher.model.config._attn_implementation == "sdpa"  # the teacher itself still ran under SDPA


def test_teacher_is_frozen_and_stays_in_eval(clip_teacher):
    clip_teacher.train()
    assert clip_teacher.training and not clip_teacher.model.training
    assert not any(m.training for m in clip_teacher.model.modules())
    assert not any(p.requires_grad for p in clip_teacher.parameters())
    out = clip_teacher(images().requires_grad_())
    assert not out.tokens.requires_grad and not out.cls_attention.requires_grad


def test_prepare_images_crop_matches_resize_then_centre_crop():
    spec = tiny_spec("clip")
    batch = images(height=40, width=52)
    out = prepare_images(batch, spec)
    # Shortest side 40 -> 32, the other truncated as CLIPImageProcessor does: int(32 * 52 / 40) = 41.
    resized = F.interpolate(batch, size=(32, 41), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (resized[..., :, 4:36] - mean) / std)
    tall = prepare_images(images(height=52, width=40), spec)
    assert tall.shape == (2, 3, 32, 32)


def test_prepare_images_pad_keeps_aspect_and_pads_bottom_right_with_zeros():
    spec = tiny_spec("sam")
    out = prepare_images(images(height=40, width=52), spec)  # longest side 52 -> 64, so height 40 -> 49
    assert out.shape == (2, 3, 64, 64)
    assert (out[:, :, 49:] == 0).all()
    assert (out[:, :, :49].abs().sum(dim=(1, 3)) > 0).all()


def test_prepare_images_rejects_wrong_layout():
    with pytest.raises(ValueError, match="expects images"):
        prepare_images(torch.rand(2, 32, 32, 3), tiny_spec("clip"))


def test_sam_faithful_layout_is_the_authors_reshape_at_paper_shape():
    fmap = torch.arange(256 * 64 * 64, dtype=torch.float32).view(1, 256, 64, 64)
    # The authors' sequence of operations, written with their literal shapes (METHOD.md section 6).
    authors = fmap.view(1, 16384, 64).transpose(1, 2).reshape(1, 64, 128, 128)
    authors = F.pixel_unshuffle(authors, 2).reshape(1, 256, 4096).transpose(1, 2)
    ours = sam_faithful_layout(fmap)
    assert torch.equal(ours, authors)
    grid = fmap.flatten(2).transpose(1, 2)
    assert not torch.equal(ours, grid)
    assert torch.equal(ours.flatten().sort().values, grid.flatten().sort().values)  # a permutation


def test_sam_layout_option_changes_only_the_token_order():
    torch.manual_seed(0)
    grid_teacher = build_teacher(tiny_spec("sam"))
    faithful = build_teacher(tiny_spec("sam", sam_layout="faithful"))
    faithful.model.load_state_dict(grid_teacher.model.state_dict())
    a, b = grid_teacher(images()), faithful(images())
    assert a.tokens.shape == b.tokens.shape == (2, 64, 20)
    assert not torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.tokens.flatten(1).sort().values, b.tokens.flatten(1).sort().values)


def test_transformers_teacher_loads_from_a_local_folder(tmp_path, clip_teacher):
    # Saved from a copy: saving writes `architectures` and `dtype` into the config of the model it saves.
    copy.deepcopy(clip_teacher.model).save_pretrained(tmp_path / "clip")
    loaded = build_teacher(tiny_spec("clip", pretrained=True, checkpoint=str(tmp_path / "clip")))
    batch = images()
    torch.testing.assert_close(loaded(batch).tokens, clip_teacher(batch).tokens)


def test_sam_vision_encoder_loads_from_a_full_sam_checkpoint(tmp_path):
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    vision = {k: v for k, v in TINY_SAM_CONFIG.items() if k != "model_type"}
    full = SamModel(SamConfig(vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "sam")
    teacher = build_teacher(tiny_spec("sam", pretrained=True, checkpoint=str(tmp_path / "sam")))
    batch = images()
    with torch.no_grad():
        expected = full.vision_encoder(prepare_images(batch, teacher.spec)).last_hidden_state
    torch.testing.assert_close(teacher(batch).tokens, expected.flatten(2).transpose(1, 2))


def test_timm_teacher_loads_weights_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", pretrained=False, **TINY_CONVNEXT_KWARGS).eval()
    save_file(source.state_dict(), str(tmp_path / "convnext.safetensors"))
    spec = tiny_spec("convnext", pretrained=True, checkpoint=str(tmp_path / "convnext.safetensors"))
    teacher = build_teacher(spec)
    batch = images()
    with torch.no_grad():
        expected = source.forward_features(prepare_images(batch, spec))
    torch.testing.assert_close(teacher(batch).tokens, expected.flatten(2).transpose(1, 2))


def test_timm_teacher_loads_from_a_local_timm_folder(tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", pretrained=False, **TINY_CONVNEXT_KWARGS).eval()
    save_for_hf(source, str(tmp_path / "convnext"), model_args=dict(TINY_CONVNEXT_KWARGS))
    teacher = build_teacher(tiny_spec("convnext", pretrained=True, checkpoint=str(tmp_path / "convnext"), config={}))
    batch = images()
    with torch.no_grad():
        expected = source.forward_features(prepare_images(batch, teacher.spec))
    torch.testing.assert_close(teacher(batch).tokens, expected.flatten(2).transpose(1, 2))


def test_teacher_spec_rejects_bad_fields():
    with pytest.raises(ValueError, match="backend"):
        tiny_spec("clip", backend="onnx")
    with pytest.raises(ValueError, match="sam_layout"):
        tiny_spec("sam", sam_layout="mixed")
    with pytest.raises(ValueError, match="cls_attention"):
        tiny_spec("sam", cls_attention=True)
    with pytest.raises(ValueError, match="lowercase"):
        dataclasses.replace(tiny_spec("clip"), slug="CLIP")
    with pytest.raises(ValueError, match="model_type"):
        build_teacher(tiny_spec("clip", config={k: v for k, v in TINY_CLIP_CONFIG.items() if k != "model_type"}))


def test_teacher_spec_is_plain_data():
    spec = tiny_spec("eva")
    assert isinstance(spec, TeacherSpec) and spec.backend == "vitdet" and spec.sam_layout == "grid"
