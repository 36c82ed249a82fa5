"""SigLIP (and SigLIP 2 fixed-resolution) students: the anchor teacher is the student's own initial tower, named
`siglip`, and the loss options that read a CLS token are replaced by the tower's attention-pooling head (or uniform
weights without it). The CLIP student's path does not move.

Tiny towers: 32 px images in 8 px patches (a 4 x 4 grid), 36 wide, 3 heads; the `tiny` teacher set besides the
anchor (convnext, sam).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from _model_fixtures import TINY_TEXT, perturb_lora
from _train_fixtures import TINY_STAGE1
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from movekd_hf import MoVEKDConfig, MoVEKDForConditionalGeneration
from movekd_hf.cli import main
from movekd_hf.distill.anchor import anchor_slug, anchor_teacher_spec
from movekd_hf.distill.losses import KDLossConfig
from movekd_hf.distill.presets import TINY_CLIP, clip_teacher
from movekd_hf.distill.teachers import Teacher, TeacherSpec, prepare_images
from movekd_hf.errors import SettingsError
from movekd_hf.hub_cards.card import resolve_teachers, student_tower_id
from movekd_hf.hub_cards.run_dir import RunDir
from movekd_hf.models import build_byte_tokenizer, from_vision_and_llm
from movekd_hf.training.arguments import MoVEKDTrainingArguments
from movekd_hf.training.distillation import build_distiller
from movekd_hf.training.teacher_source import (
    anchor_teacher_from_student,
    student_kd_config,
    student_kd_defaults,
    teacher_shapes,
)

TINY_SIGLIP = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3)
TINY_SIGLIP.update(image_size=32, patch_size=8, layer_norm_eps=1e-6)
HALF = (0.5, 0.5, 0.5)


def _student(use_head: bool = True) -> MoVEKDForConditionalGeneration:
    vision = SiglipVisionConfig(**TINY_SIGLIP, vision_use_head=use_head)
    config = MoVEKDConfig(
        vision_config=vision, text_config=TINY_TEXT, vision_feature_select_strategy="full", image_seq_length=16
    )
    torch.manual_seed(0)
    return MoVEKDForConditionalGeneration(config)


# ------------------------------------------------------------------------ the pooling head's attention row


def test_pool_attention_is_the_heads_own_attention_over_the_final_tokens():
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP))
    spec = TeacherSpec(slug="siglip", backend="transformers", model_id="tiny", image_size=32, mean=HALF, std=HALF,
                       resize_mode="squash", pretrained=False, pool_attention=True)  # fmt: skip
    teacher = Teacher(spec, model)
    images = torch.rand(3, 3, 40, 48)
    out = teacher(images)
    with torch.no_grad():  # independently: the head's nn.MultiheadAttention itself, weights returned
        reference = model(pixel_values=prepare_images(images, spec), output_hidden_states=True)
        final = reference.last_hidden_state  # [B, 16, 36], the head's input
        _, weights = model.head.attention(model.head.probe.expand(3, -1, -1), final, final, need_weights=True)
    assert out.pool_attention.shape == (3, 16) and out.pooled.shape == (3, 36)
    torch.testing.assert_close(out.pool_attention, weights[:, 0], rtol=1e-5, atol=1e-7)  # head mean, softmax over N
    torch.testing.assert_close(out.pool_attention.sum(-1), torch.ones(3))
    torch.testing.assert_close(out.pooled, reference.pooler_output)
    torch.testing.assert_close(out.tokens, reference.hidden_states[-2])  # tokens at feature_layer, no prefix
    assert out.cls is None and out.cls_attention is None


def test_pool_attention_needs_a_pooling_head_and_no_prefix_tokens():
    with pytest.raises(ValueError, match="pool_attention needs a transformers"):
        TeacherSpec(slug="x", backend="transformers", model_id="x", image_size=32, num_prefix_tokens=1,
                    pool_attention=True)  # fmt: skip
    headless = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP, vision_use_head=False))
    spec = TeacherSpec(slug="x", backend="transformers", model_id="x", image_size=32, pool_attention=True)
    with pytest.raises(TypeError, match="no attention-pooling head"):
        Teacher(spec, headless)(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ the anchor


def test_the_anchor_of_a_siglip_student_is_its_initial_tower_without_mole():
    vlm = _student()
    perturb_lora(vlm, seed=1)  # MoLE weights that would change the tokens if they were copied
    tower = {k: v.clone() for k, v in vlm.model.vision_tower.state_dict().items()}
    anchor = anchor_teacher_from_student(vlm)
    assert type(anchor.model) is SiglipVisionModel and anchor.slug == "siglip"
    state = anchor.model.state_dict()
    assert not any(".lora_" in key or ".router." in key for key in state)
    assert state.keys() == {k for k in tower if ".lora_" not in k and ".router." not in k}
    assert all(torch.equal(state[key], tower[key]) for key in state)  # the student's weights, the head included
    with torch.no_grad():
        next(vlm.model.vision_tower.parameters()).add_(1.0)  # the student trains on; its anchor is a copy
    assert all(torch.equal(anchor.model.state_dict()[key], tower[key]) for key in state)
    spec = anchor.spec
    assert (spec.feature_layer, spec.pool_attention, spec.mean, spec.resize_mode) == (-2, True, HALF, "squash")
    assert not any(p.requires_grad for p in anchor.parameters())


def test_student_kd_defaults_follow_the_tower():
    assert student_kd_defaults(CLIPVisionConfig(**TINY_CLIP)) == {}
    assert student_kd_defaults(SiglipVisionConfig(**TINY_SIGLIP)) == {
        "anchor_teacher": "siglip", "token_weighting": "pool_attention", "anchor_summary": "pooled",
    }  # fmt: skip
    assert student_kd_defaults({**TINY_SIGLIP, "model_type": "siglip_vision_model", "vision_use_head": False}) == {
        "anchor_teacher": "siglip", "token_weighting": "uniform", "anchor_summary": "mean_token",
    }  # fmt: skip
    # What reads nothing of the anchor stays (the MSE baseline); an explicit option that needs a CLS is refused.
    baseline, switched = student_kd_config(SiglipVisionConfig(**TINY_SIGLIP), "mse_baseline")
    assert switched == {"anchor_teacher": ("clip", "siglip")} and baseline.token_weighting == "none"
    with pytest.raises(SettingsError, match=r"field 'kd_options.token_weighting'.*reads the anchor's cls_attention"):
        student_kd_config(SiglipVisionConfig(**TINY_SIGLIP), "default", {"token_weighting": "cls_attention"})


def test_a_users_kd_options_win_over_the_towers_defaults(tmp_path, caplog):
    vlm = _student()
    args = MoVEKDTrainingArguments(output_dir=str(tmp_path), kd_preset="default", report_to="none",
                                   kd_options={"token_weighting": "uniform"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="movekd_hf.training.trainer"):
        config = build_distiller(vlm, [], args).config
    assert (config.token_weighting, config.anchor_summary, config.anchor_teacher) == ("uniform", "pooled", "siglip")
    assert "anchor_summary 'cls' -> 'pooled'" in caplog.text and "token_weighting" not in caplog.text
    args.kd_options = {"anchor_summary": "cls"}  # the anchor of a SigLIP tower has no CLS token to give
    with pytest.raises(SettingsError, match=r"field 'kd_options.anchor_summary'.*reads the anchor's cls"):
        build_distiller(vlm, [], args)


def test_siglip2_naflex_is_refused_with_the_fixed_resolution_alternative():
    with pytest.raises(SettingsError, match=r"NaFlex.*google/siglip2-so400m-patch14-384"):
        anchor_slug(Siglip2VisionConfig(hidden_size=32, num_attention_heads=4))
    assert anchor_slug({"model_type": "siglip_vision_model"}) == "siglip"  # SigLIP 2 fixed-resolution checkpoints


def test_init_refuses_a_naflex_tower_in_one_line(tmp_path, capsys):
    """`init --vision` with SigLIP 2's NaFlex tower (LLaVA cannot run it) names the option and the alternative."""
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                           num_attention_heads=4, num_patches=16)).save_pretrained(tmp_path / "naflex")  # fmt: skip
    _save_parts(tmp_path, use_head=True)
    argv = ["init", "--vision", str(tmp_path / "naflex"), "--llm", str(tmp_path / "llm"), "--out", str(tmp_path / "o")]
    capsys.readouterr()  # the fixtures' own save messages
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "field '--vision'" in line and "NaFlex" in line and "google/siglip2-so400m-patch14-384" in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="NaFlex"):  # the Python builder refuses it too
        from_vision_and_llm(str(tmp_path / "naflex"), str(tmp_path / "llm"))


def test_the_clip_student_keeps_the_faithful_loss_and_the_clip_anchor(tmp_path):
    vision = CLIPVisionConfig(**TINY_CLIP)
    config = MoVEKDConfig(vision_config=vision, text_config=TINY_TEXT)
    vlm = MoVEKDForConditionalGeneration(config)
    args = MoVEKDTrainingArguments(output_dir=str(tmp_path), kd_preset="faithful", report_to="none")
    assert build_distiller(vlm, [], args).config == KDLossConfig.from_preset("faithful")
    assert list(teacher_shapes(vlm, [])) == ["clip"]
    old = clip_teacher(slug="clip", model_id="student-initial-vision-tower", image_size=32, feature_layer=-2,
                       pretrained=False, config={})  # fmt: skip
    assert anchor_teacher_spec(config) == old  # the spec the CLIP-only releases built, field for field


# ---------------------------------------------------------------------------------------- the model card


def test_the_card_credits_a_siglip_anchor_to_the_students_own_tower(tmp_path):
    tower = "google/siglip-so400m-patch14-384"
    run = RunDir(root=tmp_path, checkpoint=tmp_path, config={"vision_config": {"_name_or_path": tower}})
    train_config = {"teacher_set": "v1.1", "kd_loss": {"anchor_teacher": "siglip"},
                    "teachers": [{"name": "siglip", "model_id": None}, {"name": "sam", "model_id": None}]}  # fmt: skip
    siglip, sam = resolve_teachers(train_config, student_tower_id(run))
    assert tower in siglip.model_id and "student's own vision tower" in siglip.model_id
    assert "openai" not in siglip.model_id and sam.model_id == "facebook/sam-vit-large"


# ----------------------------------------------------------------------------------- `init` then `train`


def _save_parts(tmp_path, use_head: bool) -> None:
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP, vision_use_head=use_head)).save_pretrained(tmp_path / "tower")
    text = {k: v for k, v in TINY_TEXT.items() if k not in ("vocab_size", "pad_token_id")}
    LlamaForCausalLM(LlamaConfig(vocab_size=256 + 3, **text)).save_pretrained(tmp_path / "llm")
    build_byte_tokenizer(special_tokens=("<unk>", "<s>", "</s>")).save_pretrained(tmp_path / "llm")


@pytest.mark.parametrize(
    ("use_head", "weighting", "summary"), [(True, "pool_attention", "pooled"), (False, "uniform", "mean_token")]
)
def test_init_and_train_a_siglip_student_through_the_cli(tmp_path, capsys, caplog, use_head, weighting, summary):
    _save_parts(tmp_path, use_head)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    assert main(["init", "--vision", str(tmp_path / "tower"), "--llm", str(tmp_path / "llm"), "--out", str(ckpt)]) == 0
    argv = [TINY_STAGE1, "--model_name_or_path", str(ckpt), "--output_dir", str(run), "--data_path", "toy:pretrain:8",
            "--teacher_set", "tiny", "--kd_preset", "default", "--per_device_train_batch_size", "4",
            "--warmup_steps", "0", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2",
            "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="movekd_hf.training.trainer"):
        assert main(["train", *argv]) == 0, capsys.readouterr().err[-3000:]
    assert f"token_weighting 'cls_attention' -> '{weighting}'" in caplog.text  # the switch is said once, loudly
    history = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "kd_loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        per_teacher = [entry[f"kd/{slug}_loss"] for slug in ("siglip", "convnext", "sam")]
        assert all(math.isfinite(value) for value in [entry["kd_loss"], *per_teacher]), entry
        assert "kd/clip_loss" not in entry and entry["kd/siglip_weight"] == pytest.approx(0.8)
    recorded = json.loads((run / "train_config.json").read_text())
    assert [t["name"] for t in recorded["teachers"]] == ["siglip", "convnext", "sam"]
    loss = recorded["kd_loss"]
    assert (loss["anchor_teacher"], loss["token_weighting"], loss["anchor_summary"]) == ("siglip", weighting, summary)
    assert "the student's own vision tower as training began" in (run / "README.md").read_text()
