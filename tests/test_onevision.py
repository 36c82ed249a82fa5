"""`movekd-hf init --onevision`: MoLE added to a stock LLaVA-OneVision (SigLIP tower on AnyRes tiles, Qwen2 LLM)
keeps every weight and the processor, computes what the stock model computes at init, and reports the student's
tokens per tile. Loading in the transformers version matrix is in tests/test_remote_code.py."""

from __future__ import annotations

import json

import pytest
import torch
from _model_fixtures import perturb_lora
from _onevision_fixtures import (
    PINPOINTS,
    QWEN_CHAT_TEMPLATE,
    TINY_SIGLIP,
    onevision_photo,
    rewrite_in_hub_layout,
    save_stock_onevision,
)
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from movekd_hf.cli import main
from movekd_hf.cli.model import plan_rows
from movekd_hf.modeling import (
    MoLEMLP,
    MoVEKDOnevisionConfig,
    MoVEKDOnevisionForConditionalGeneration,
    MoVEKDOnevisionProcessor,
)
from movekd_hf.models import build_tiny_model, from_onevision

GRID = (TINY_SIGLIP["image_size"] // TINY_SIGLIP["patch_size"]) ** 2  # 16 patches per tile
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A stock tiny LLaVA-OneVision saved with its processor, and `init --onevision` run on it."""
    root = tmp_path_factory.mktemp("onevision")
    stock = save_stock_onevision(root / "stock")
    assert main(["init", "--onevision", str(stock), "--out", str(root / "out"), "--lora-rank", "4"]) == 0
    return stock, root / "out"


@pytest.fixture(scope="module")
def models(folders):
    stock, out = folders
    return (
        LlavaOnevisionForConditionalGeneration.from_pretrained(stock).eval(),
        MoVEKDOnevisionForConditionalGeneration.from_pretrained(out).eval(),
    )


def _inputs(processor, images):
    """Two samples, one image each: the astronaut (base view + 4 tiles) and coffee at 40 x 30 px (base + 2 tiles)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def images(second_photo):
    return [onevision_photo(), second_photo.resize((40, 30))]


def _mole_key(name: str) -> bool:
    return ".lora_" in name or ".router." in name


def test_every_stock_weight_arrives_unchanged_and_only_mole_keys_are_new(folders, models):
    stock, ours = models
    expected, state = stock.state_dict(), ours.state_dict()
    assert set(expected) <= set(state)
    new = set(state) - set(expected)
    assert new and all(_mole_key(name) for name in new)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    layers = ours.model.vision_tower.config.num_hidden_layers
    assert sum(isinstance(module, MoLEMLP) for module in ours.modules()) == layers  # every SigLIP MLP carries MoLE
    config = json.loads((folders[1] / "config.json").read_text())
    assert config["model_type"] == "movekd_llava_onevision" and config["lora_rank"] == 4
    assert config["image_grid_pinpoints"] == PINPOINTS and config["vision_aspect_ratio"] == "anyres_max_9"
    assert config["auto_map"]["AutoModelForVision2Seq"] == config["auto_map"]["AutoModelForImageTextToText"]
    assert config["auto_map"]["AutoModel"] == "modeling_movekd.MoVEKDOnevisionModel"


def test_a_checkpoint_in_the_hub_key_layout_keeps_every_weight(tmp_path, models):
    stock, _ = models
    folder = save_stock_onevision(tmp_path / "hub")
    rewrite_in_hub_layout(folder)
    assert main(["init", "--onevision", str(folder), "--out", str(tmp_path / "out")]) == 0
    state = MoVEKDOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_a_siglip_tower_under_default_is_switched_to_full_in_model_and_processor(tmp_path, images):
    # "default" drops the first token, a real patch of a SigLIP tile: 15 of 16 would reach the LLM and be distilled.
    folder = save_stock_onevision(tmp_path / "default", strategy="default")
    model, processor = from_onevision(str(folder), lora_rank=4)
    assert model.config.vision_feature_select_strategy == processor.vision_feature_select_strategy == "full"
    inputs = _inputs(processor, images)
    with torch.no_grad():
        output = model(**inputs)  # the image tokens the processor wrote match the features the model packs
    assert output.vision_hidden_states.shape[:2] == (8, GRID)


def test_the_processor_is_the_checkpoints_own(folders, images):
    stock, out = (AutoProcessor.from_pretrained(folder) for folder in folders)
    assert type(out) is MoVEKDOnevisionProcessor
    assert out.chat_template == stock.chat_template == QWEN_CHAT_TEMPLATE
    assert out.num_image_tokens == GRID and out.vision_feature_select_strategy == "full"
    assert out.image_processor.image_grid_pinpoints == PINPOINTS
    assert out.tokenizer.get_vocab() == stock.tokenizer.get_vocab()
    ours, theirs = _inputs(out, images), _inputs(stock, images)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # transformers 4.x reads the tokenizer config transformers 5 wrote (`portable_tokenizer_config`).
    tokenizer_config = json.loads((folders[1] / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<image>" in tokenizer_config["additional_special_tokens"]


def test_at_init_the_logits_equal_the_stock_models_on_anyres_tiles(folders, models, images):
    stock, ours = models
    inputs = _inputs(AutoProcessor.from_pretrained(folders[1]), images)
    assert inputs["pixel_values"].shape[:2] == (2, 5)  # padded to the astronaut's 5 tiles; coffee has 3
    assert inputs["image_sizes"].tolist() == [[60, 96], [30, 40]]
    with torch.no_grad():
        expected, got = stock(**inputs).logits, ours(**inputs).logits
    assert torch.equal(got, expected)


def test_vision_hidden_states_hold_one_row_per_tile_the_tower_saw(folders, models, images):
    stock, ours = models
    inputs = _inputs(AutoProcessor.from_pretrained(folders[1]), images)
    tiles = torch.cat([inputs["pixel_values"][0, :5], inputs["pixel_values"][1, :3]])  # the padding row is not run
    with torch.no_grad():
        output = ours(**inputs)
        tower = stock.model.vision_tower(tiles, output_hidden_states=True)
    assert output.vision_hidden_states.shape == (8, GRID, TINY_SIGLIP["hidden_size"])
    # The projector input: the last layer's tokens of each tile, images in batch order, base view first.
    torch.testing.assert_close(output.vision_hidden_states, tower.hidden_states[-1], rtol=0, atol=1e-6)
    assert len(output.router_logits) == TINY_SIGLIP["num_hidden_layers"]
    assert all(logits.shape == (8, GRID, ours.config.num_experts) for logits in output.router_logits)


def test_trained_mole_changes_the_answer_and_every_expert_gets_a_gradient(folders, models, images):
    stock, _ = models
    model = MoVEKDOnevisionForConditionalGeneration.from_pretrained(folders[1])
    perturb_lora(model, seed=3, scale=0.2)
    inputs = _inputs(AutoProcessor.from_pretrained(folders[1]), images)
    model.train()
    output = model(**inputs, labels=inputs["input_ids"])
    output.loss.backward()
    with torch.no_grad():
        assert not torch.allclose(model.eval()(**inputs).logits, stock(**inputs).logits)
    for name, param in model.named_parameters():
        if _mole_key(name):  # vision_feature_layer -1: every layer's LoRA reaches the LM loss
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("movekd-hf init: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_folder_that_is_not_llava_onevision_is_one_line(tmp_path, capsys):
    model, processor = build_tiny_model()
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    capsys.readouterr()
    code = main(["init", "--onevision", str(tmp_path / "llava"), "--out", str(tmp_path / "out")])
    _one_line_error(code, capsys.readouterr().err, "--onevision", "'movekd_llava'", "'llava_onevision'", "--llava")
    code = main(["init", "--onevision", str(tmp_path / "llava"), "--vision", "x", "--llm", "y", "--out", "o"])
    _one_line_error(code, capsys.readouterr().err, "--onevision already has a vision tower")
    code = main(["init", "--preset", "onevision-qwen2-7b", "--out", str(tmp_path / "out")])
    _one_line_error(code, capsys.readouterr().err, "--onevision llava-hf/llava-onevision-qwen2-7b-ov-hf")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse: --onevision and --llava are one choice
        main(["init", "--onevision", "a", "--llava", "b", "--out", "o"])


# Qwen2's published sizes (Qwen2-0.5B: 494,032,768 with tied embeddings; Qwen2-7B: 7,615,616,512) plus the 64 rows
# llava-hf's conversion padded the vocabulary by (in the embeddings, and in the untied LM head of the 7B).
@pytest.mark.parametrize(
    ("preset", "llm_parameters"),
    [("onevision-qwen2-0.5b", 494_032_768 + 64 * 896), ("onevision-qwen2-7b", 7_615_616_512 + 2 * 64 * 3584)],
)
def test_full_size_presets_plan_on_the_meta_device(preset, llm_parameters):
    plan = plan_rows(preset)
    assert plan["components"]["llm"] == llm_parameters
    assert plan["tiles_per_image"] == 10
    from movekd_hf.models import build_config

    config = build_config(preset)
    assert isinstance(config, MoVEKDOnevisionConfig)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (384, 14)
    assert config.vision_config.num_hidden_layers == 26 and not config.vision_config.vision_use_head
