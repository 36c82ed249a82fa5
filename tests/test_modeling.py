"""The model contract (HOUSE_STYLE.md "Tests"): shapes, init equality with CLIP, gradients, what trains,
save/load and Auto classes, determinism, batch invariance, attention backends, the LLaVA-NeXT variant."""

import pytest
import torch
from _model_fixtures import chat_inputs, perturb_lora, random_image
from transformers import AutoModel, AutoModelForImageTextToText, CLIPVisionModel

from movekd_hf import MoVEKDForConditionalGeneration, MoVEKDModel
from movekd_hf.modeling import MoVEKDOutputMixin
from movekd_hf.models import build_tiny_model
from movekd_hf.training.stages import apply_stage, component_of


def test_output_shapes_include_router_logits_per_layer(tiny, photo, second_photo):
    model, processor = tiny
    inputs = chat_inputs(processor, [photo, second_photo])
    out = model(**inputs)
    batch, length = inputs["input_ids"].shape
    assert out.logits.shape == (batch, length, 261)
    assert len(out.router_logits) == 3  # one per encoder layer
    assert all(logits.shape == (2, 17, 3) for logits in out.router_logits)  # 16 patches + CLS, 3 experts
    assert out.vision_hidden_states.shape == (2, 16, 32)  # CLS dropped, before the projector
    # The tokens LLaVA selects (hidden state -2 of the tower, CLS dropped), recomputed through the tower alone.
    tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(out.vision_hidden_states, tower.hidden_states[-2][:, 1:])
    assert isinstance(out, MoVEKDOutputMixin) and type(out).__name__.startswith("MoVEKD")
    assert all(torch.isfinite(t).all() for t in (out.logits, out.vision_hidden_states, *out.router_logits))


def test_text_only_forward_has_no_vision_outputs(tiny):
    model, processor = tiny
    out = model(**processor.tokenizer(["just text"], return_tensors="pt"))
    assert out.router_logits is None and out.vision_hidden_states is None


def _plain_clip(model) -> CLIPVisionModel:
    clip = CLIPVisionModel(model.config.vision_config).eval()
    state = {k: v for k, v in model.model.vision_tower.state_dict().items() if ".lora_" not in k and "router" not in k}
    clip.load_state_dict(state)
    return clip


def test_student_equals_plain_clip_at_init_in_default_mode(photo):
    model, processor = build_tiny_model(seed=3)
    inputs = chat_inputs(processor, photo)
    with torch.no_grad():
        student = model(**inputs).vision_hidden_states
        clip = _plain_clip(model)(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(student, clip, rtol=0, atol=0)

    faithful, _ = build_tiny_model(seed=3, faithful=True)
    with torch.no_grad():
        moved = faithful(**inputs).vision_hidden_states
    assert not torch.allclose(moved, clip, atol=1e-4)  # Kaiming-initialised B leaves CLIP at step 0


def test_stock_clip_weights_load_with_only_mole_keys_missing(tmp_path):
    model, _ = build_tiny_model()
    clip = CLIPVisionModel(model.config.vision_config)
    clip.save_pretrained(tmp_path)
    stock = CLIPVisionModel.from_pretrained(tmp_path).state_dict()
    result = model.model.vision_tower.load_state_dict(stock, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".lora_" in k or ".router." in k for k in result.missing_keys)
    assert len(result.missing_keys) == 3 * (2 * 4 + 2)  # 3 layers x (2 fcs x 4 LoRA tensors + router w/b)


def test_every_trainable_parameter_gets_a_gradient(tiny, photo):
    model, processor = tiny
    model.train()
    perturb_lora(model, seed=0, scale=0.1)
    apply_stage(model, "stage2")
    inputs = chat_inputs(processor, photo)
    out = model(**inputs, labels=inputs["input_ids"])
    balance = sum(torch.softmax(logits, -1).square().mean() for logits in out.router_logits)
    (out.loss + balance).backward()
    feature_layer = model.config.vision_config.num_hidden_layers + model.config.vision_feature_layer
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # LLaVA reads hidden state -2, so the last layer's LoRA experts never reach the output; its router
        # still learns from the balance loss.
        unused = f"layers.{feature_layer + 1}." in name and ".lora_" in name
        has_grad = param.grad is not None and param.grad.abs().sum() > 0
        assert has_grad is not unused, name


def test_only_trainable_parameters_change(tiny, photo):
    model, processor = tiny
    model.train()
    counts = apply_stage(model, "stage1")
    assert counts["llm"] == 0 and counts["vision_base"] == 0 and counts["mole"] > 0 and counts["projector"] > 0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = chat_inputs(processor, photo)
    for _ in range(3):
        out = model(**inputs, labels=inputs["input_ids"])
        (out.loss + sum(logits.mean() for logits in out.router_logits)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if component_of(name) in ("llm", "vision_base"):
            assert not changed, name
    trained = dict(model.named_parameters())
    for name in (
        "model.multi_modal_projector.linear_1.weight",
        "model.vision_tower.encoder.layers.0.mlp.router.weight",
    ):
        assert not torch.equal(before[name], trained[name]), name


def test_save_load_and_auto_classes_give_identical_outputs(tmp_path, photo):
    model, processor = build_tiny_model(seed=5)
    perturb_lora(model, seed=2)
    model.save_pretrained(tmp_path)
    inputs = chat_inputs(processor, photo)
    with torch.no_grad():
        expected = model(**inputs)
        for loaded in (
            MoVEKDForConditionalGeneration.from_pretrained(tmp_path),
            AutoModelForImageTextToText.from_pretrained(tmp_path),
        ):
            got = loaded.eval()(**inputs)
            assert torch.equal(got.logits, expected.logits)
            assert all(torch.equal(a, b) for a, b in zip(got.router_logits, expected.router_logits))
        base = AutoModel.from_pretrained(tmp_path)
        assert isinstance(base, MoVEKDModel)
        assert torch.equal(base(**inputs).vision_hidden_states, expected.vision_hidden_states)


def test_deterministic_and_a_sample_is_the_same_alone_or_batched(tiny):
    model, processor = tiny
    perturb_lora(model, seed=4, scale=0.2)
    images = [random_image(1), random_image(2, size=(70, 30))]
    batch = chat_inputs(processor, images)
    with torch.no_grad():
        first, second = model(**batch), model(**batch)
        assert torch.equal(first.logits, second.logits)
        for index, image in enumerate(images):
            alone = model(**chat_inputs(processor, image))
            torch.testing.assert_close(alone.logits[0], first.logits[index], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(alone.vision_hidden_states[0], first.vision_hidden_states[index])


def test_sdpa_equals_eager(tiny_checkpoint, photo):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = chat_inputs(processor, photo)
    outputs = {}
    for backend in ("eager", "sdpa"):
        model = MoVEKDForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=backend).eval()
        assert model.config._attn_implementation == backend
        with torch.no_grad():
            outputs[backend] = model(**inputs).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-4)


def test_sdpa_is_the_default(tiny_checkpoint):
    model = MoVEKDForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert model.config._attn_implementation == "sdpa"


def test_generate_is_greedy_and_repeatable(tiny_checkpoint, photo):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = MoVEKDForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    inputs = chat_inputs(processor, photo)
    first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(first, second) and first.shape[1] == inputs["input_ids"].shape[1] + 6


@pytest.mark.parametrize("routing", ["sparse", "dense"])
def test_llava_next_variant_forward_and_generate(routing, photo):
    from _model_fixtures import TINY_TEXT, TINY_VISION
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from movekd_hf import MoVEKDNextConfig, MoVEKDNextForConditionalGeneration
    from movekd_hf.models import build_byte_tokenizer

    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = MoVEKDNextConfig(
        vision_config=TINY_VISION,
        text_config=TINY_TEXT,
        image_token_index=260,
        image_grid_pinpoints=pinpoints,
        num_experts=3,
        lora_rank=4,
        mole_routing=routing,
    )
    torch.manual_seed(0)
    model = MoVEKDNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_byte_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    inputs = processor(images=photo, text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    tiles = inputs["pixel_values"].shape[1]
    assert out.vision_hidden_states.shape == (tiles, 16, 32)
    assert len(out.router_logits) == 3 and out.router_logits[0].shape == (tiles, 17, 3)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_processor_expands_image_to_one_token_per_patch_and_uses_vicuna_v1(tiny, photo):
    _, processor = tiny
    inputs = chat_inputs(processor, photo, question="Red?")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == 16  # (32 / 8) ** 2 patches, CLS dropped
    text = processor.tokenizer.decode([i for i in ids if i != processor.image_token_id], skip_special_tokens=False)
    assert text.startswith("<s>A chat between a curious user") and text.endswith(" USER: \nRed? ASSISTANT:")


def test_saved_config_names_every_auto_class(tiny_checkpoint):
    import json

    from transformers import AutoModelForMultimodalLM

    auto_map = json.loads((tiny_checkpoint / "config.json").read_text())["auto_map"]
    head = "modeling_movekd.MoVEKDForConditionalGeneration"
    assert auto_map == {
        "AutoConfig": "configuration_movekd.MoVEKDConfig",
        "AutoModel": "modeling_movekd.MoVEKDModel",
        "AutoModelForImageTextToText": head,
        "AutoModelForMultimodalLM": head,
        "AutoModelForVision2Seq": head,
    }
    assert isinstance(AutoModelForMultimodalLM.from_pretrained(tiny_checkpoint), MoVEKDForConditionalGeneration)


def test_package_imports_without_optional_extras():
    import subprocess
    import sys

    # `None` in sys.modules makes `import deepspeed` / `import flash_attn` raise ImportError.
    code = "import sys; sys.modules.update(deepspeed=None, flash_attn=None, bitsandbytes=None); import movekd_hf"
    subprocess.run([sys.executable, "-c", code], check=True)
