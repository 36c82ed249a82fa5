"""`movekd-hf convert` on checkpoints laid out exactly as the MoVE-KD authors' code writes them.

The fixture (`_authors_checkpoint.py`, whose docstring lists the files and lines of github.com/hey-cjj/MoVE-KD it
follows) rebuilds their model classes in miniature: the base CLIP MLP under `mlp.original_module`, `moe_down`
experts on fc1 and `moe_up` on fc2, the router, top-level `<teacher>_adapter_{1,2}`, the `moe` config block,
sharded safetensors or sharded `.bin` with their index, and a slow sentencepiece tokenizer. The numbers are
checked against their maths recomputed here from the original tensors: their MoE-LoRA MLP inside CLIP, their
projector, and a plain `LlamaForCausalLM` holding their LLM weights.

Where the layout is defined (github.com/hey-cjj/MoVE-KD, commit c822da0; details in `_authors_checkpoint.py`):
`llava/model/multimodal_encoder/moe_lora.py` 25-127 (LoRALayer, MoE_LoRA_CLIP: `original_module`, `moe_down` on
fc1, `moe_up` on fc2, router, sparse/dense maths, scaling alpha / rank), `llava/model/language_model/
move_llava_llama.py` 35-56 (the `moe` block), 99-111 and 314-337 (teacher adapters), 115-150 and 474-501 (MoLE
built from the block), `llava/model/multimodal_encoder/clip_encoder.py` 27-40, `llava/model/multimodal_projector/
builder.py` 33-44, `llava/train/train.py` 202-271 (saving) and 943-967 (slow tokenizer, pad = unk).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from _authors_checkpoint import (
    AUTHORS_VISION_PREFIX,
    NUM_PATCHES,
    SP_TEXT,
    TEACHERS,
    TEXT,
    VISION,
    AuthorsVariant,
    build_authors_model,
    clip_transformer,
    write_authors_checkpoint,
)
from safetensors.torch import load_file

from movekd_hf.cli import main
from movekd_hf.errors import InputError, SettingsError, UnsafeFileError
from movekd_hf.hub_cards.convert import (
    ADAPTERS_FILE,
    MissingDependencyError,
    add_special_token_rows,
    convert_authors_checkpoint,
    load_authors_state_dict,
)
from movekd_hf.hub_cards.convert_keys import convert_mole, convert_state_dict, map_plain_key

HEADS = {"num_attention_heads": VISION["num_attention_heads"]}  # a width of 32 does not tell CLIP's head count
HEADS_JSON = json.dumps(HEADS)
VARIANTS = {
    # the released settings (scripts/move-kd/finetune-v1.1.sh): sparse, alpha 1, safetensors shards
    "sparse": AuthorsVariant("sparse"),
    "sparse_alpha": AuthorsVariant("sparse_alpha", lora_alpha=16, lora_rank=8),
    # dense routing, alpha != 1, pickled shards, and a teacher the package does not implement
    "dense": AuthorsVariant(
        "dense",
        dense=True,
        lora_alpha=8,
        num_experts=2,
        lora_rank=6,
        safetensors=False,
        teachers=("sam", "eva", "convnext", "pix2struct"),
    ),  # fmt: skip
    "no_mole": AuthorsVariant("no_mole", moe_encoder=False),
}
IMAGE_ID = TEXT["vocab_size"]  # `<image>` appended after the sentencepiece vocabulary, `<pad>` after it
PROMPT_BEFORE, PROMPT_AFTER = [1, 5, 77, 300], [42, 9, 250, 2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (original tensors, authors' folder, converted folder, conversion result), converted once each."""
    root = tmp_path_factory.mktemp("convert")
    built = {}
    for name, variant in VARIANTS.items():
        original = write_authors_checkpoint(root / name, variant)
        if variant.safetensors:
            result = convert_authors_checkpoint(root / name, root / f"{name}_ours", vision_config=HEADS)
        else:  # the pickled variant goes through the command line and its opt-in
            args = ["convert", str(root / name), str(root / f"{name}_ours"), "--vision-config", HEADS_JSON]
            assert main(args + ["--allow-pickle"]) == 0
            result = None
        built[name] = (original, root / name, root / f"{name}_ours", result)
    return built


def _load_converted(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()


def _authors_reference(variant, original, pixel_values):
    """(patch tokens, projected features, LLM logits, experts chosen in layer 0) from the original tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    authors = build_authors_model(variant, seed=1)  # other random values: everything below comes from `original`
    authors.load_state_dict(original, strict=True)
    tower = clip_transformer(authors.model.vision_tower.vision_tower.vision_model)
    with torch.no_grad():
        hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        patches = hidden[-2][:, 1:]  # mm_vision_select_layer -2, `patch` drops CLS  [B, 16, D]
        projected = authors.model.mm_projector(patches)  # [B, 16, H]
        llm = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
        llm.load_state_dict({k: v for k, v in original.items() if k.startswith(("model.layers", "model.embed",
                                                                                  "model.norm", "lm_head"))})  # fmt: skip
        embed = llm.get_input_embeddings()
        before, after = embed(torch.tensor(PROMPT_BEFORE)), embed(torch.tensor(PROMPT_AFTER))
        # LLaVA splices the image features in place of the image token (llava_arch.py:253-290)
        embeds = torch.stack([torch.cat([before, image, after]) for image in projected])
        logits = llm(inputs_embeds=embeds).logits
    first_mlp = tower.encoder.layers[0].mlp
    chosen = first_mlp.routing.argmax(-1).unique().numel() if variant.moe_encoder else 0
    return patches, projected, logits, chosen


@pytest.mark.parametrize("name", list(VARIANTS))
def test_converted_model_computes_what_the_authors_model_computes(checkpoints, name):
    original, _, dst, _ = checkpoints[name]
    variant = VARIANTS[name]
    pixel_values = torch.randn(
        2, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(3)
    )
    patches, projected, logits, chosen = _authors_reference(variant, original, pixel_values)
    if variant.moe_encoder and not variant.dense:
        assert chosen > 1  # the sparse comparison exercised more than one expert

    model = _load_converted(dst)
    input_ids = torch.tensor([PROMPT_BEFORE + [IMAGE_ID] * NUM_PATCHES + PROMPT_AFTER] * 2)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))
        tower_states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    ours_patches = tower_states[-2][:, 1:]
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_patches, patches, **close)
    if variant.moe_encoder:  # what the distillation loss reads: the same tokens
        torch.testing.assert_close(out.vision_hidden_states, patches, **close)
    features = out.image_hidden_states  # a list of per-image tensors on transformers 5, one tensor on 4.x
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    torch.testing.assert_close(features.reshape(projected.shape), projected, **close)
    torch.testing.assert_close(out.logits[..., : TEXT["vocab_size"]], logits, **close)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_follows_the_moe_block(checkpoints, name):
    from transformers import AutoConfig

    _, _, dst, _ = checkpoints[name]
    variant = VARIANTS[name]
    config = AutoConfig.from_pretrained(dst, trust_remote_code=True)
    files = {p.name for p in dst.iterdir()}
    if not variant.moe_encoder:  # a plain LLaVA: no MoLE, no remote code
        assert config.model_type == "llava" and "modeling_movekd.py" not in files
        assert not any("lora" in k or "router" in k for k in load_file(str(dst / "model.safetensors")))
        return
    assert config.model_type == "movekd_llava" and config.is_faithful
    assert (config.num_experts, config.lora_rank, config.lora_alpha) == (
        variant.num_experts,
        variant.lora_rank,
        float(variant.lora_alpha),
    )
    assert config.mole_routing == ("dense" if variant.dense else "sparse")
    assert config.lora_scaling == variant.lora_alpha / variant.lora_rank
    assert (config.lora_bias, config.lora_dropout) == (True, 0.05)  # nn.Linear halves, p=0.05 in LoRALayer


def test_every_weight_arrives_in_its_place(checkpoints):
    original, _, dst, result = checkpoints["sparse"]
    # in-memory names of the loaded model (transformers 4.x adds a `vision_model.` level to the tower)
    ours = {
        k.replace("vision_tower.vision_model.", "vision_tower."): v
        for k, v in _load_converted(dst).state_dict().items()
    }
    inner = "model.vision_tower.encoder.layers"
    for layer in range(VISION["num_hidden_layers"]):
        theirs = f"{AUTHORS_VISION_PREFIX}encoder.layers.{layer}.mlp"
        mlp = f"{inner}.{layer}.mlp"
        for fc in ("fc1", "fc2"):
            for param in ("weight", "bias"):
                assert torch.equal(ours[f"{mlp}.{fc}.{param}"], original[f"{theirs}.original_module.{fc}.{param}"])
        for expert in range(3):
            for group, side in (("moe_down", "fc1"), ("moe_up", "fc2")):
                for part in ("lora_A", "lora_B"):
                    lora = f"{theirs}.{group}.{expert}.{part}"
                    assert torch.equal(ours[f"{mlp}.{side}.{part}"][expert], original[f"{lora}.weight"])
                    assert torch.equal(ours[f"{mlp}.{side}.{part}_bias"][expert], original[f"{lora}.bias"])
    assert torch.equal(ours["model.multi_modal_projector.linear_2.weight"], original["model.mm_projector.2.weight"])
    assert torch.equal(ours["lm_head.weight"][: TEXT["vocab_size"]], original["lm_head.weight"])
    assert result.dropped == {} and result.adapters == ("convnext", "eva", "sam")


def test_teacher_adapters_load_into_the_distiller(checkpoints, capsys):
    from movekd_hf.distill.distiller import MoVEKDDistiller, TeacherShape
    from movekd_hf.distill.losses import KDLossConfig

    original, src, dst, _ = checkpoints["dense"]
    kept = ("sam", "eva", "convnext")
    shapes = {"clip": TeacherShape(VISION["hidden_size"], NUM_PATCHES)}
    shapes |= {t: TeacherShape(*TEACHERS[t]) for t in kept}
    distiller = MoVEKDDistiller(shapes, VISION["hidden_size"], NUM_PATCHES, KDLossConfig.from_preset("faithful"))
    distiller.load_state_dict(load_file(str(dst / ADAPTERS_FILE)), strict=True)
    for teacher in kept:  # move_llava_llama.py:316-334: adapter_2(gelu(adapter_1(tokens)).T).T
        tokens = torch.randn(2, TEACHERS[teacher][1], TEACHERS[teacher][0], generator=torch.Generator().manual_seed(0))
        w1, b1 = original[f"{teacher}_adapter_1.weight"], original[f"{teacher}_adapter_1.bias"]
        w2, b2 = original[f"{teacher}_adapter_2.weight"], original[f"{teacher}_adapter_2.bias"]
        theirs = (torch.nn.functional.gelu(tokens @ w1.T + b1).transpose(1, 2) @ w2.T + b2).transpose(1, 2)
        with torch.no_grad():
            torch.testing.assert_close(distiller.adapters[teacher](tokens), theirs, rtol=1e-5, atol=1e-5)
    # pix2struct has no teacher here: dropped, and the command line said so
    assert main(["convert", str(src), str(dst.parent / "dense_again"), "--vision-config", HEADS_JSON,
                 "--allow-pickle"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "teacher adapters kept in distill_adapters.safetensors: convnext, eva, sam" in printed
    assert "dropped pix2struct_adapter_2.weight: adapter of a teacher this package does not implement" in printed


def test_slow_tokenizer_is_read_with_sentencepiece(checkpoints):
    import sentencepiece as spm
    from transformers import AutoProcessor

    _, src, dst, _ = checkpoints["sparse"]
    processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
    tokenizer = processor.tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    for text in SP_TEXT + ["unseen wörds 42"]:
        assert tokenizer(text).input_ids == [1] + sp.encode(text)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_ID, IMAGE_ID + 1]
    assert processor.image_token == "<image>" and tokenizer.pad_token == "<pad>"


def test_missing_sentencepiece_is_named(checkpoints, tmp_path, monkeypatch, capsys):
    _, src, _, _ = checkpoints["sparse"]
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if the extra were not installed
    with pytest.raises(MissingDependencyError, match=r"tokenizer\.model.*pip install movekd_hf\[sentencepiece\]"):
        convert_authors_checkpoint(src, tmp_path / "a", vision_config=HEADS)
    assert main(["convert", str(src), str(tmp_path / "b"), "--vision-config", HEADS_JSON]) == 2
    err = capsys.readouterr().err
    assert err.startswith("movekd-hf convert: error: ") and "pip install movekd_hf[sentencepiece]" in err
    assert "tiktoken" not in err


def test_pickles_are_read_only_on_request(checkpoints, tmp_path, capsys):
    _, src, _, _ = checkpoints["dense"]
    with pytest.raises(UnsafeFileError, match=r"pytorch_model-00001-of-0000\d\.bin.*allow_pickle") as caught:
        convert_authors_checkpoint(src, tmp_path / "a", vision_config=HEADS)
    assert "--allow-pickle" in str(caught.value)
    assert main(["convert", str(src), str(tmp_path / "b"), "--vision-config", HEADS_JSON]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-pickle" in err and "pytorch_model-00001" in err
    assert not (tmp_path / "b").exists()
    # with the opt-in, torch.load still runs with weights_only=True: a pickled object other than tensors is refused
    (tmp_path / "objects").mkdir()
    torch.save({"model.norm.weight": torch.ones(2), "note": tmp_path}, tmp_path / "objects" / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="weights_only=True refuses"):
        load_authors_state_dict(tmp_path / "objects", allow_pickle=True)


def _copy(src, dst, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_moe_block_must_agree_with_the_weights(checkpoints, tmp_path):
    _, sparse, _, _ = checkpoints["sparse"]
    _, plain, _, _ = checkpoints["no_mole"]
    cases = [
        (plain, lambda c: c["moe"].update(moe_encoder=True), "moe.moe_encoder", "lack MoLE experts"),
        (sparse, lambda c: c["moe"].update(moe_encoder=False), "moe.moe_encoder", "have MoLE experts"),
        (sparse, lambda c: c.pop("moe"), "moe.moe_encoder", "have MoLE experts"),
        (sparse, lambda c: c["moe"].update(moe_encoder_lora_rank=32), "moe.moe_encoder_lora_rank", "weights have 4"),
        (sparse, lambda c: c["moe"].update(moe_encoder_num_experts=2), "moe.moe_encoder_num_experts", "have 3"),
        (sparse, lambda c: c["moe"].update(moe_encoder_lora_alpha=0), "moe.moe_encoder_lora_alpha", "positive"),
        (sparse, lambda c: c["moe"].update(moe_encoder_dense="no"), "moe.moe_encoder_dense", "true or false"),
        (sparse, lambda c: c.update(mm_patch_merge_type="spatial_unpad"), "mm_patch_merge_type", "'flat'"),
    ]
    for index, (src, edit, field, text) in enumerate(cases):
        folder = _copy(src, tmp_path / f"case{index}", edit)
        with pytest.raises(SettingsError, match=text) as caught:
            convert_authors_checkpoint(folder, tmp_path / f"out{index}", vision_config=HEADS)
        assert caught.value.field == field and caught.value.file == folder / "config.json"


def test_shards_must_match_their_index(checkpoints, tmp_path):
    _, sparse, _, _ = checkpoints["sparse"]
    folder = _copy(sparse, tmp_path / "src")
    (folder / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(InputError, match=r"names shards that are not there: \['model-00002-of-00005"):
        convert_authors_checkpoint(folder, tmp_path / "out", vision_config=HEADS)


def test_key_mapping_edges():
    assert map_plain_key("model.layers.1.self_attn.q_proj.weight") == (
        "model.language_model.layers.1.self_attn.q_proj.weight"
    )
    base = AUTHORS_VISION_PREFIX + "encoder.layers.2.mlp.original_module.fc2.bias"
    assert map_plain_key(base) == "model.vision_tower.encoder.layers.2.mlp.fc2.bias"
    assert map_plain_key(AUTHORS_VISION_PREFIX + "embeddings.position_ids") is None  # buffer, recomputed
    for key in ("model.teacher_encoders.sam.neck.weight", "model.mm_projector.1.weight", "dino_adapter_1.weight"):
        with pytest.raises(InputError, match=f"unknown key '{key}'"):
            convert_state_dict({key: torch.zeros(2)})
    # the same MLP weight twice (under original_module and bare) would silently overwrite: refused
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.0.mlp"
    with pytest.raises(InputError, match="both map to"):
        convert_state_dict({f"{mlp}.original_module.fc1.bias": torch.zeros(3), f"{mlp}.fc1.bias": torch.zeros(3)})


def _one_layer(down_in: int, down_out: int, experts=(0,)) -> dict:
    """fc1 [48, 32], fc2 [32, 48] under original_module; moe_down gets (in, out), moe_up fits fc2."""
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.0.mlp"
    sd = {
        f"{mlp}.original_module.fc1.weight": torch.zeros(48, 32),
        f"{mlp}.original_module.fc2.weight": torch.zeros(32, 48),
    }
    for group, (n_in, n_out) in (("moe_down", (down_in, down_out)), ("moe_up", (48, 32))):
        for expert in experts:
            sd[f"{mlp}.{group}.{expert}.lora_A.weight"] = torch.zeros(4, n_in)
            sd[f"{mlp}.{group}.{expert}.lora_B.weight"] = torch.zeros(n_out, 4)
    return sd


def test_expert_sides_follow_the_authors_names():
    mlp = AUTHORS_VISION_PREFIX + "encoder.layers.0.mlp"
    stacked = convert_mole(_one_layer(32, 48))
    assert stacked[f"{mlp}.fc1.lora_A"].shape == (1, 4, 32) and stacked[f"{mlp}.fc1.lora_B"].shape == (1, 48, 4)
    assert stacked[f"{mlp}.fc2.lora_A"].shape == (1, 4, 48) and stacked[f"{mlp}.fc2.lora_B"].shape == (1, 32, 4)
    with pytest.raises(InputError, match=r"moe_down\.0: LoRA shapes A \[4, 48\] / B \[32, 4\] do not fit fc1"):
        convert_mole(_one_layer(48, 32))  # fc2-shaped tensors named moe_down
    with pytest.raises(InputError, match=r"expert indices are \[0, 2\]"):
        convert_mole(_one_layer(32, 48, experts=(0, 2)))
    no_base = {k: v for k, v in _one_layer(32, 48).items() if "original_module" not in k}
    with pytest.raises(InputError, match="original_module.fc1.weight"):
        convert_mole(no_base)


def test_vocab_grows_without_a_tokenizer(checkpoints, tmp_path):
    from movekd_hf import MoVEKDConfig

    _, sparse, _, _ = checkpoints["sparse"]
    folder = _copy(sparse, tmp_path / "src")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    assert main(["convert", str(folder), str(tmp_path / "ours"), "--vision-config", HEADS_JSON]) == 0
    config = MoVEKDConfig.from_pretrained(tmp_path / "ours")
    vocab = TEXT["vocab_size"]
    assert (config.image_token_index, config.text_config.pad_token_id) == (vocab, vocab + 1)
    assert config.text_config.vocab_size == 384  # 331 + 2 padded to a multiple of 64, as llava-hf does


def test_new_token_rows_are_the_mean():
    embed = torch.randn(5, 3)
    sd = {"model.language_model.embed_tokens.weight": embed, "lm_head.weight": embed * 2}
    add_special_token_rows(sd, 8)
    grown = sd["model.language_model.embed_tokens.weight"]
    assert grown.shape == (8, 3) and torch.equal(grown[:5], embed)
    torch.testing.assert_close(grown[5:], embed.mean(0).expand(3, 3))


def test_output_folder_must_be_new(checkpoints, tmp_path, capsys):
    _, sparse, _, _ = checkpoints["sparse"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", str(sparse), str(tmp_path / "full"), "--vision-config", HEADS_JSON]) == 2
    assert "not empty" in capsys.readouterr().err


def test_converted_checkpoint_is_a_run_dir_for_the_card(checkpoints, tmp_path):
    from movekd_hf.hub_cards.card import write_card

    _, _, dst, _ = checkpoints["dense"]
    write_card(dst, output_dir=tmp_path)  # a converted folder is itself a run dir (config.json at its root)
    card = (tmp_path / "README.md").read_text()
    assert "| MoLE variant | lora_b_init=kaiming, expert_output_scale=none |" in card
    assert "| MoLE (every encoder MLP) | num_experts=2, lora_rank=6, lora_alpha=8.0" in card
