"""`movekd-hf init` (preset, vision + LLM, existing LLaVA) and `movekd-hf plan` at paper scale on meta."""

import json

import pytest
import torch
from _model_fixtures import TINY_TEXT, TINY_VISION, chat_inputs
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from movekd_hf import MoVEKDForConditionalGeneration
from movekd_hf.cli import main
from movekd_hf.cli.model import plan_rows
from movekd_hf.models import build_byte_tokenizer, build_image_processor, build_processor


def _mole_key(name: str) -> bool:
    return ".lora_" in name or ".router." in name


def test_init_tiny_preset_writes_a_loadable_checkpoint(tmp_path, photo, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path), "--faithful"]) == 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_movekd.py",
        "mole.py",
        "mole_sorted.py",
        "configuration_movekd.py",
    } <= files
    assert {"processing_movekd.py", "processor_config.json", "tokenizer.json"} <= files
    model = MoVEKDForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.is_faithful
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters < 2_000_000 and f"{parameters:,} parameters" in capsys.readouterr().out
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert torch.isfinite(model(**chat_inputs(processor, photo)).logits).all()
    # The LLM's config, its generation config and the tokenizer agree on <s>, </s> and <pad> (the Trainer warns
    # and rewrites the configs otherwise, and generation would stop at the wrong token).
    tokenizer, text = processor.tokenizer, model.config.text_config
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (257, 258, 259)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == ids
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id


def test_init_from_an_hf_llava_checkpoint_keeps_every_llava_weight(tmp_path):
    config = LlavaConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, image_token_index=260, image_seq_length=16)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(tmp_path / "llava")
    build_processor(config, build_byte_tokenizer()).save_pretrained(tmp_path / "llava")
    expected = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").state_dict()

    assert main(["init", "--llava", str(tmp_path / "llava"), "--out", str(tmp_path / "out")]) == 0
    model = MoVEKDForConditionalGeneration.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    assert set(state) - set(expected) == {k for k in state if _mole_key(k)}
    assert set(expected) <= set(state)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_init_from_vision_model_and_llm(tmp_path):
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    vision.save_pretrained(tmp_path / "clip")
    build_image_processor(32).save_pretrained(tmp_path / "clip")
    text = {k: v for k, v in TINY_TEXT.items() if k != "vocab_size"}
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=256 + 3, **{**text, "pad_token_id": None}))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer = build_byte_tokenizer(special_tokens=("<unk>", "<s>", "</s>"))  # no <image>, no <pad>
    tokenizer.save_pretrained(tmp_path / "llm")

    args = ["init", "--vision", str(tmp_path / "clip"), "--llm", str(tmp_path / "llm"), "--out", str(tmp_path / "out")]
    assert main([*args, "--lora-rank", "6"]) == 0
    model = MoVEKDForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.lora_rank == 6
    tower = model.model.vision_tower.state_dict()
    for name, tensor in vision.state_dict().items():
        assert torch.equal(tower[name], tensor), name
    for name, tensor in llm.model.state_dict().items():
        got = model.model.language_model.state_dict()[name]
        rows = tensor.shape[0] if name.endswith("embed_tokens.weight") else None
        assert torch.equal(got[:rows] if rows else got, tensor), name
    assert model.config.image_token_id == AutoProcessor.from_pretrained(
        tmp_path / "out"
    ).tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == 320  # 259 + <image> + <pad>, padded to 64 as llava-hf does
    assert model.config.image_token_id == 259


def test_init_rejects_bad_combinations(tmp_path, capsys):
    # Expected user errors end in one line on stderr and exit code 2 (the traceback only with --debug).
    assert main(["init", "--vision", "x", "--out", str(tmp_path)]) == 2
    assert "--vision needs --llm" in capsys.readouterr().err
    assert main(["init", "--preset", "llava-1.5-7b", "--out", str(tmp_path)]) == 2
    assert "starts from pretrained weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--preset", "gpt", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "invalid choice: 'gpt'" in capsys.readouterr().err


def mole_hand_count(layers=24, experts=3, rank=32, hidden=1024, mlp=4096) -> int:
    """METHOD.md section 2: per layer, E experts of LoRA-with-bias on fc1 and fc2, plus a router with bias."""
    lora = lambda fan_in, fan_out: (fan_in * rank + rank) + (rank * fan_out + fan_out)  # noqa: E731
    return layers * (experts * (lora(hidden, mlp) + lora(mlp, hidden)) + (hidden * experts + experts))


def test_plan_counts_match_the_hand_count_at_paper_scale():
    plan = plan_rows("llava-1.5-7b")
    parts = plan["components"]
    assert parts["mole"] == mole_hand_count() == 24_040_008
    assert parts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert parts["vision_base"] == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert 6.7e9 < parts["llm"] < 6.8e9
    assert plan["stages"]["stage1"] == parts["mole"] + parts["projector"]
    assert plan["stages"]["stage2"] == parts["llm"] + parts["mole"] + parts["projector"]


@pytest.mark.parametrize(("preset", "width", "layers"), [("llava-1.5-13b", 5120, 40), ("mobilellama-1.4b", 2048, 24)])
def test_other_paper_presets_build_on_meta_with_their_shapes(preset, width, layers):
    from movekd_hf.models import build_config

    config = build_config(preset)
    with torch.device("meta"):
        model = MoVEKDForConditionalGeneration(config)
    assert model.lm_head.weight.shape == (32064, width)
    assert len(model.model.language_model.layers) == layers
    assert model.mole_mlps()[0].fc1.lora_A.shape == (3, 32, 1024)
    assert plan_rows(preset)["components"]["mole"] == mole_hand_count()


def test_plan_command_prints_table_and_json(capsys):
    assert main(["plan", "--preset", "tiny"]) == 0
    table = capsys.readouterr().out
    assert "mole" in table and "stage1: trains mole, projector, adapters" in table and "GiB" in table
    assert main(["plan", "--preset", "tiny", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["components"]["mole"] == 3 * (
        3 * ((32 * 4 + 4) + (4 * 48 + 48) + (48 * 4 + 4) + (4 * 32 + 32)) + 32 * 3 + 3
    )


def test_plan_with_teachers_adds_frozen_teachers_and_trainable_adapters(capsys):
    plan = plan_rows("llava-1.5-7b", teachers="v1.1")
    parts = plan["components"]
    assert parts["teachers (frozen)"] > 1e9  # EVA-02-L + ConvNeXt-XXL + SAM-L + CLIP-L
    # faithful adapters: Linear(C_t -> 1024) + Linear(N_t -> 576) per non-clip teacher (METHOD.md section 3)
    adapter = lambda c, n: (c * 1024 + 1024) + (n * 576 + 576)  # noqa: E731
    assert parts["adapters"] == adapter(1024, 4096) + adapter(3072, 1024) + adapter(256, 4096)
    assert plan["stages"]["stage1"] == parts["mole"] + parts["projector"] + parts["adapters"]
    assert main(["plan", "--preset", "llava-1.5-7b", "--teachers", "v1.0"]) == 0
    table = capsys.readouterr().out
    assert "teacher/eva" in table and "adapter/convnext" in table and "teacher/sam" not in table
