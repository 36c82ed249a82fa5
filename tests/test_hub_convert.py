"""`movekd-hf convert`: the authors' checkpoint format (synthetic, their key names and shapes) into ours."""

from __future__ import annotations

import pytest
import torch
from _hub_fixtures import (
    AUTHORS_EXPERTS,
    AUTHORS_RANK,
    AUTHORS_TEXT,
    AUTHORS_VISION,
    AUTHORS_VISION_PREFIX,
    make_authors_checkpoint,
)
from safetensors.torch import load_file

from movekd_hf.cli import main
from movekd_hf.hub_cards.convert import ADAPTERS_FILE, add_special_token_rows, convert_authors_checkpoint
from movekd_hf.hub_cards.convert_keys import convert_mole, convert_state_dict, map_plain_key

VISION_OVERRIDES = {"num_attention_heads": AUTHORS_VISION["num_attention_heads"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(original tensors by the authors' keys, converted folder, loaded converted model), built once."""
    from movekd_hf import MoVEKDForConditionalGeneration

    root = tmp_path_factory.mktemp("convert")
    original = make_authors_checkpoint(root / "authors")
    dst = convert_authors_checkpoint(root / "authors", root / "ours", vision_config=VISION_OVERRIDES)
    model = MoVEKDForConditionalGeneration.from_pretrained(dst).eval()
    return original, dst, model


def test_plain_key_mapping():
    assert map_plain_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert (
        map_plain_key("model.layers.1.self_attn.q_proj.weight")
        == "model.language_model.layers.1.self_attn.q_proj.weight"
    )
    assert map_plain_key("model.norm.weight") == "model.language_model.norm.weight"
    assert map_plain_key("lm_head.weight") == "lm_head.weight"
    assert map_plain_key("model.mm_projector.0.bias") == "model.multi_modal_projector.linear_1.bias"
    assert map_plain_key("model.mm_projector.2.weight") == "model.multi_modal_projector.linear_2.weight"
    tower = AUTHORS_VISION_PREFIX + "encoder.layers.3.mlp.router.weight"
    assert map_plain_key(tower) == "model.vision_tower.encoder.layers.3.mlp.router.weight"
    assert map_plain_key(AUTHORS_VISION_PREFIX + "embeddings.position_ids") is None  # buffer, recomputed
    assert map_plain_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize(
    "key",
    ["model.teacher_encoders.sam.neck.weight", "model.mm_projector.1.weight", "model.vision_tower.vision_tower.foo"],
)
def test_unknown_key_stops_with_its_name(key):
    with pytest.raises(ValueError, match=f"Unknown key '{key}'"):
        convert_state_dict({key: torch.zeros(2)})


def _one_layer_mole(up_in: int, up_out: int) -> dict:
    """fc1 [48, 32], fc2 [32, 48] and one expert per side; moe_up gets the given (in, out) shapes."""
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.0.mlp"
    sd = {f"{mlp}.fc1.weight": torch.zeros(48, 32), f"{mlp}.fc2.weight": torch.zeros(32, 48)}
    for group, (n_in, n_out) in (("moe_up", (up_in, up_out)), ("moe_down", (48, 32))):
        sd[f"{mlp}.{group}.0.lora_A.weight"] = torch.zeros(4, n_in)
        sd[f"{mlp}.{group}.0.lora_B.weight"] = torch.zeros(n_out, 4)
    return sd


def test_expert_side_is_decided_by_shape():
    stacked = convert_mole(_one_layer_mole(32, 48))
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.0.mlp"
    assert stacked[f"{mlp}.fc1.lora_A"].shape == (1, 4, 32) and stacked[f"{mlp}.fc1.lora_B"].shape == (1, 48, 4)
    assert stacked[f"{mlp}.fc2.lora_A"].shape == (1, 4, 48) and stacked[f"{mlp}.fc2.lora_B"].shape == (1, 32, 4)
    # moe_up carrying fc2-shaped tensors: the name and the shapes disagree
    with pytest.raises(ValueError, match=r"moe_up\.0: its name says fc1 but its shapes .* fit fc2"):
        convert_mole(_one_layer_mole(48, 32))
    with pytest.raises(ValueError, match=r"moe_up\.0: LoRA shapes A \[4, 37\] / B \[48, 4\] fit neither"):
        convert_mole(_one_layer_mole(37, 48))


def test_expert_sets_must_be_complete():
    sd = _one_layer_mole(32, 48)
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.0.mlp"
    sd[f"{mlp}.moe_up.2.lora_A.weight"] = torch.zeros(4, 32)
    sd[f"{mlp}.moe_up.2.lora_B.weight"] = torch.zeros(48, 4)
    with pytest.raises(ValueError, match=r"moe_up: expert indices must be 0\.\.E-1, got \[0, 2\]"):
        convert_mole(sd)


def test_converted_folder(converted):
    original, dst, model = converted
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_movekd.py", "configuration_movekd.py", "mole.py"} <= names
    assert {"processor_config.json", "tokenizer.json", ADAPTERS_FILE} <= names
    config = model.config
    assert config.is_faithful and config.lora_b_init == "kaiming" and config.expert_output_scale == "none"
    assert (config.num_experts, config.lora_rank, config.lora_alpha, config.lora_bias) == (
        AUTHORS_EXPERTS,
        AUTHORS_RANK,
        1.0,
        True,
    )
    assert config.vision_config.num_attention_heads == 4 and config.vision_config.image_size == 32
    assert config.image_token_index == 260 and config.text_config.vocab_size == AUTHORS_TEXT["vocab_size"]
    adapters = load_file(str(dst / ADAPTERS_FILE))  # training state, kept apart from the VLM
    assert set(adapters) == {k for k in original if "encoder_adapter" in k}
    assert all(torch.equal(adapters[k], original[k]) for k in adapters)
    assert not any("encoder_adapter" in k or "moe_" in k for k in model.state_dict())


def test_every_weight_arrives_unchanged(converted):
    original, _, model = converted
    ours = model.state_dict()
    checked = 0
    for key, tensor in original.items():
        if "moe_" in key or "encoder_adapter" in key or key.endswith("position_ids"):
            continue
        assert torch.equal(ours[map_plain_key(key)], tensor), key
        checked += 1
    assert checked == len(ours) - 4 * 2 * AUTHORS_VISION["num_hidden_layers"]  # all but the stacked LoRA tensors
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.1.mlp"
    ours_mlp = "model.vision_tower.encoder.layers.1.mlp"
    for expert in range(AUTHORS_EXPERTS):
        assert torch.equal(ours[f"{ours_mlp}.fc1.lora_A"][expert], original[f"{mlp}.moe_up.{expert}.lora_A.weight"])
        assert torch.equal(
            ours[f"{ours_mlp}.fc2.lora_B_bias"][expert], original[f"{mlp}.moe_down.{expert}.lora_B.bias"]
        )


def _authors_mole_forward(sd: dict, layer: int, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """The authors' MoLE MLP written plainly: top-1 expert per token, unscaled by its probability."""
    mlp = f"{AUTHORS_VISION_PREFIX}encoder.layers.{layer}.mlp"

    def linear(name, v):
        return sd[f"{name}.weight"] @ v + sd[f"{name}.bias"]

    outputs = []
    for token in x:  # [D]
        expert = int(torch.softmax(linear(f"{mlp}.router", token), dim=-1).argmax())
        up, down = f"{mlp}.moe_up.{expert}", f"{mlp}.moe_down.{expert}"
        h = linear(f"{mlp}.fc1", token) + scaling * linear(f"{up}.lora_B", linear(f"{up}.lora_A", token))
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        y = linear(f"{mlp}.fc2", h) + scaling * linear(f"{down}.lora_B", linear(f"{down}.lora_A", h))
        outputs.append(y)
    return torch.stack(outputs)


def test_mole_forward_equals_the_authors(converted):
    from movekd_hf.modeling.modeling_movekd import vision_encoder_layers

    original, _, model = converted
    scaling = 1.0 / AUTHORS_RANK  # lora_alpha / r
    x = torch.randn(2, 7, AUTHORS_VISION["hidden_size"], generator=torch.Generator().manual_seed(1))
    for layer, encoder_layer in enumerate(vision_encoder_layers(model.model.vision_tower)):
        with torch.no_grad():
            ours = encoder_layer.mlp(x)
        expected = _authors_mole_forward(original, layer, x.reshape(-1, x.shape[-1]), scaling).view_as(ours)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        chosen = encoder_layer.mlp.router_logits.argmax(-1)
        assert chosen.unique().numel() > 1  # the comparison exercised more than one expert


def test_converted_model_generates(converted):
    from PIL import Image
    from transformers import AutoProcessor

    _, dst, model = converted
    processor = AutoProcessor.from_pretrained(dst)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (40, 30), (200, 10, 10)), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 16  # (32 / 8) ** 2 patches
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all() and len(out.router_logits) == AUTHORS_VISION["num_hidden_layers"]


def test_converted_checkpoint_is_a_run_dir_for_the_card(converted, tmp_path):
    from movekd_hf.hub_cards.card import write_card

    _, dst, _ = converted
    write_card(dst, output_dir=tmp_path)  # a converted folder is itself a run dir (config.json at its root)
    card = (tmp_path / "README.md").read_text()
    assert "| MoLE variant | lora_b_init=kaiming, expert_output_scale=none |" in card
    assert "| MoLE (every encoder MLP) | num_experts=3, lora_rank=4, lora_alpha=1.0" in card


def test_vocab_grows_without_a_tokenizer(tmp_path):
    make_authors_checkpoint(tmp_path / "authors", with_tokenizer=False)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "authors"),
                str(tmp_path / "ours"),
                "--vision-config",
                '{"num_attention_heads": 4}',
            ]
        )
        == 0
    )
    from movekd_hf import MoVEKDConfig

    config = MoVEKDConfig.from_pretrained(tmp_path / "ours")
    vocab = AUTHORS_TEXT["vocab_size"]
    assert (config.image_token_index, config.text_config.pad_token_id) == (vocab, vocab + 1)
    assert config.text_config.vocab_size == 320  # 261 + 2 padded to a multiple of 64, as llava-hf does


def test_new_token_rows_are_the_mean():
    embed = torch.randn(5, 3)
    sd = {"model.language_model.embed_tokens.weight": embed, "lm_head.weight": embed * 2}
    add_special_token_rows(sd, 8)
    grown = sd["model.language_model.embed_tokens.weight"]
    assert grown.shape == (8, 3) and torch.equal(grown[:5], embed)
    torch.testing.assert_close(grown[5:], embed.mean(0).expand(3, 3))


def test_errors_name_the_problem(tmp_path, capsys):
    make_authors_checkpoint(tmp_path / "authors", with_tokenizer=False)
    with pytest.raises(ValueError, match="width 32 is not a multiple of 64"):
        convert_authors_checkpoint(tmp_path / "authors", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_authors_checkpoint(tmp_path / "authors", tmp_path / "full", vision_config=VISION_OVERRIDES)
    extra = torch.load(tmp_path / "authors" / "encoder_adapter.bin", weights_only=True)
    extra["model.teacher.sam.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "authors" / "encoder_adapter.bin")
    with pytest.raises(ValueError, match="Unknown key 'model.teacher.sam.weight'"):
        convert_authors_checkpoint(tmp_path / "authors", tmp_path / "b", vision_config=VISION_OVERRIDES)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "authors"),
                str(tmp_path / "c"),
                "--vision-config",
                '{"num_attention_heads": 4}',
            ]
        )
        == 1
    )
    assert "movekd-hf convert: Unknown key 'model.teacher.sam.weight'" in capsys.readouterr().err
