"""One `<image>` becomes one token per patch of every vision tower, and distillation gets the patch tokens.

LLaVA's `vision_feature_select_strategy` "default" drops the first token: CLS on CLIP, a real patch on SigLIP
(which has no CLS). The builders pick the strategy from the tower (CLIP "default", SigLIP "full"); whatever the
strategy, the student tokens handed to the distiller are the tower's patch tokens (CLS dropped), so they match the
teachers' target grid. Tiny towers: 32 px images in 8 px patches, a 4 x 4 grid of 16 patches, 32 wide.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _model_fixtures import TINY_TEXT, TINY_VISION, chat_inputs
from _train_fixtures import TINY_STAGE2, build
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers import SiglipModel as SiglipWholeModel

from movekd_hf import MoVEKDConfig, MoVEKDForConditionalGeneration
from movekd_hf.cli import main
from movekd_hf.errors import SettingsError
from movekd_hf.models import (
    build_byte_tokenizer,
    build_image_processor,
    build_processor,
    from_llava,
    from_vision_and_llm,
)
from movekd_hf.training.arguments import MoVEKDTrainingArguments
from movekd_hf.training.data_args import num_image_tokens
from movekd_hf.training.trainer import MoVEKDTrainer

TINY_SIGLIP = {k: TINY_VISION[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
TINY_SIGLIP.update(num_attention_heads=TINY_VISION["num_attention_heads"], image_size=32, patch_size=8)
PATCHES = 16  # (32 // 8) ** 2
WIDTH = TINY_VISION["hidden_size"]
TOWERS = {"clip": (CLIPVisionConfig, TINY_VISION), "siglip": (SiglipVisionConfig, TINY_SIGLIP)}


def _save_tower(folder, kind: str) -> None:
    """A tiny pretrained tower as `--vision` finds it: config and weights only (no image processor config), or for
    `siglip-whole` a whole SiglipModel (text half too, init takes its vision half) with its image processor, as a
    Hub SigLIP repository has them."""
    torch.manual_seed(0)
    if kind == "siglip-whole":
        text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
        SiglipWholeModel(SiglipConfig(vision_config=TINY_SIGLIP, text_config=text)).save_pretrained(folder)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(folder)
    else:
        CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(folder)


def _save_llm(folder) -> None:
    """A tiny LLaMA and a byte tokenizer without `<image>` or `<pad>` (init adds both)."""
    text = {k: v for k, v in TINY_TEXT.items() if k != "vocab_size"}
    LlamaForCausalLM(LlamaConfig(vocab_size=256 + 3, **{**text, "pad_token_id": None})).save_pretrained(folder)
    build_byte_tokenizer(special_tokens=("<unk>", "<s>", "</s>")).save_pretrained(folder)


def _init_vision(tmp_path, kind: str):
    _save_tower(tmp_path / kind, kind)
    _save_llm(tmp_path / "llm")
    out = tmp_path / f"{kind}-movekd"
    assert main(["init", "--vision", str(tmp_path / kind), "--llm", str(tmp_path / "llm"), "--out", str(out)]) == 0
    return out


def _image_tokens(model, processor, photo):
    """(`<image>` tokens in the prompt, image features the projector makes, the forward's output) for one photo."""
    inputs = chat_inputs(processor, photo)
    features = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: features.append(out))
    with torch.no_grad():
        outputs = model(**inputs)
    hook.remove()
    return int((inputs["input_ids"] == model.config.image_token_id).sum()), features[0].shape[1], outputs


# ------------------------------------------------------------------------------------ the strategy of each tower


@pytest.mark.parametrize(
    ("kind", "strategy"), [("clip", "default"), ("siglip", "full"), ("siglip-whole", "full")], ids=str
)
def test_init_vision_gives_one_image_token_per_patch(tmp_path, photo, kind, strategy):
    out = _init_vision(tmp_path, kind)
    model = MoVEKDForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vision_feature_select_strategy == strategy
    assert processor.vision_feature_select_strategy == strategy
    assert processor.num_additional_image_tokens == (1 if kind == "clip" else 0)  # CLIP's CLS; SigLIP has none
    expanded, features, outputs = _image_tokens(model, processor, photo)
    assert expanded == features == num_image_tokens(processor) == model.config.image_seq_length == PATCHES
    assert outputs.vision_hidden_states.shape == (1, PATCHES, WIDTH)


def test_from_vision_and_llm_picks_full_for_siglip_and_runs_as_built(tmp_path, photo):
    _save_tower(tmp_path / "siglip", "siglip")
    _save_llm(tmp_path / "llm")
    model, processor = from_vision_and_llm(str(tmp_path / "siglip"), str(tmp_path / "llm"), lora_rank=4)
    assert model.config.vision_feature_select_strategy == "full"
    # The folder has no image processor: SigLIP's own preprocessing (square resize, [-1, 1]), not CLIP's crop.
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    expanded, features, built = _image_tokens(model, processor, photo)  # in memory, before any save
    assert expanded == features == num_image_tokens(processor) == PATCHES
    model.save_pretrained(tmp_path / "out")
    reloaded = MoVEKDForConditionalGeneration.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        again = reloaded(**chat_inputs(processor, photo))
    torch.testing.assert_close(again.logits, built.logits)  # the built model's rotary and position buffers are real


@pytest.mark.parametrize(
    ("kind", "strategy", "projector_tokens"),
    [("clip", "default", PATCHES), ("clip", "full", PATCHES + 1), ("siglip", "full", PATCHES)],
    ids=str,
)
def test_student_tokens_are_the_patch_tokens_whatever_the_strategy(photo, kind, strategy, projector_tokens):
    config_class, sizes = TOWERS[kind]
    config = MoVEKDConfig(
        vision_config=config_class(**sizes),
        text_config=TINY_TEXT,
        image_token_index=260,
        vision_feature_select_strategy=strategy,
        image_seq_length=projector_tokens,
        num_experts=3,
        lora_rank=4,
    )
    torch.manual_seed(0)
    model = MoVEKDForConditionalGeneration(config).eval()
    processor = build_processor(config)
    expanded, features, outputs = _image_tokens(model, processor, photo)
    assert expanded == features == num_image_tokens(processor) == projector_tokens
    pixels = chat_inputs(processor, photo)["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]  # [1, P(+CLS), D]
    patches = hidden[:, 1:] if kind == "clip" else hidden
    torch.testing.assert_close(outputs.vision_hidden_states, patches, rtol=0, atol=0)


def test_from_llava_gives_a_siglip_tower_under_default_every_patch(tmp_path, photo, caplog):
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**TINY_SIGLIP),
        text_config=TINY_TEXT,
        image_token_index=260,
        image_seq_length=PATCHES - 1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    build_processor(config).save_pretrained(tmp_path / "llava")
    with caplog.at_level(logging.WARNING, logger="movekd_hf.models"):
        model, processor = from_llava(str(tmp_path / "llava"), lora_rank=4)
    assert "drops the first token, a real patch" in caplog.text
    assert model.config.vision_feature_select_strategy == processor.vision_feature_select_strategy == "full"
    expanded, features, outputs = _image_tokens(model, processor, photo)
    assert expanded == features == model.config.image_seq_length == PATCHES
    assert outputs.vision_hidden_states.shape == (1, PATCHES, WIDTH)


def test_init_vision_refuses_a_tower_without_a_token_rule(tmp_path, capsys):
    config = Dinov2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    _save_llm(tmp_path / "llm")
    args = ["init", "--vision", str(tmp_path / "dino"), "--llm", str(tmp_path / "llm"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'dinov2'" in err and "expected a CLIP or SigLIP vision model" in err
    assert "field '--vision'" in err  # the option that named the tower, checked before any weights load
    assert not (tmp_path / "o").exists()


def test_processor_counts_siglip_images_without_a_crop():
    vision = SiglipVisionConfig(**{**TINY_SIGLIP, "image_size": 48})  # 6 x 6 patches, resized, never cropped
    image_processor = build_image_processor(48, vision)
    assert getattr(image_processor, "crop_size", None) is None
    config = MoVEKDConfig(vision_config=vision, text_config=TINY_TEXT, vision_feature_select_strategy="full")
    assert num_image_tokens(build_processor(config, image_processor=image_processor)) == 36


# ----------------------------------------------------------------------------------- stage 2 with distillation


def _distiller_inputs(trainer) -> list[tuple[int, ...]]:
    """Shapes of the student tokens the distiller gets, recorded at its call."""
    shapes = []
    trainer.model.distiller.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def _kd_losses(trainer) -> list[float]:
    return [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]


def test_stage2_distils_a_llava_that_feeds_cls_to_its_projector(tmp_path):
    config = LlavaConfig(
        vision_config=TINY_VISION,
        text_config=TINY_TEXT,
        image_token_index=260,
        image_seq_length=PATCHES + 1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    build_processor(config).save_pretrained(tmp_path / "llava")
    assert main(["init", "--llava", str(tmp_path / "llava"), "--out", str(tmp_path / "ckpt")]) == 0
    assert AutoProcessor.from_pretrained(tmp_path / "ckpt").vision_feature_select_strategy == "full"  # kept

    trainer = build(
        TINY_STAGE2, tmp_path / "run", "--model_name_or_path", str(tmp_path / "ckpt"), "--data_path",
        "toy:finetune:8", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
    )  # fmt: skip
    shapes = _distiller_inputs(trainer)
    trainer.train()
    assert trainer.state.global_step == 2
    assert shapes and all(shape[1:] == (PATCHES, WIDTH) for shape in shapes)  # CLS dropped, 17 -> 16
    assert len(_kd_losses(trainer)) == 2 and all(math.isfinite(loss) for loss in _kd_losses(trainer))


def test_stage2_distils_a_siglip_student(tmp_path):
    """A SigLIP student distils through the command line's path: its anchor is a frozen copy of its own SigLIP
    tower (named `siglip`, training/teacher_source.py), beside the tiny set's other teachers."""
    checkpoint = _init_vision(tmp_path, "siglip")
    trainer = build(TINY_STAGE2, tmp_path / "run", "--model_name_or_path", str(checkpoint), "--data_path",
                    "toy:finetune:8", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no")  # fmt: skip
    assert trainer.model.distiller.teacher_names == ["siglip", "convnext", "sam"]
    shapes = _distiller_inputs(trainer)
    trainer.train()
    assert trainer.state.global_step == 2
    assert shapes and all(shape[1:] == (PATCHES, WIDTH) for shape in shapes)  # every patch, none dropped
    assert len(_kd_losses(trainer)) == 2 and all(math.isfinite(loss) for loss in _kd_losses(trainer))


def test_a_siglip_student_under_default_is_refused_before_training(tmp_path):
    """A checkpoint made before the strategy came from the tower (SigLIP under "default": one patch dropped) is
    refused when the trainer is built, naming the field, instead of failing at step 1 in the distiller."""
    checkpoint = _init_vision(tmp_path, "siglip")
    model = MoVEKDForConditionalGeneration.from_pretrained(checkpoint)
    model.config.vision_feature_select_strategy = "default"
    args = MoVEKDTrainingArguments(output_dir=str(tmp_path / "run"), stage="stage2", kd_preset="default",
                                   max_steps=1, report_to="none")  # fmt: skip
    with pytest.raises(SettingsError, match=r"field 'vision_feature_select_strategy'.*expected 'full'"):
        MoVEKDTrainer(
            model=model, args=args, teachers="tiny", processing_class=AutoProcessor.from_pretrained(checkpoint)
        )
