"""What training uploads (the Hub's HTTP seam alone replaced) and the LoRA-on-LLM variant's merge."""

from __future__ import annotations

import json

import pytest
import torch
from _hub_fixtures import fake_hub
from _train_fixtures import TINY_STAGE1, TINY_STAGE2, build

from movekd_hf.cli import main as cli_main
from movekd_hf.training.checkpoint import LLM_LORA_DIR

REPO_ID = "me/movekd-tiny-run"
LOADABLE = {
    "config.json", "model.safetensors", "generation_config.json", "configuration_movekd.py", "modeling_movekd.py",
    "mole.py", "mole_sorted.py", "processing_movekd.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "README.md",
}  # fmt: skip
NEVER_UPLOADED = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "distill_adapters.safetensors",
)


def test_every_push_uploads_a_loadable_folder_with_remote_code_and_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    with fake_hub(monkeypatch) as hub:
        trainer = build(
            TINY_STAGE1, tmp_path / "run", "--max_steps", "2", "--save_steps", "1", "--push_to_hub", "true",
            "--hub_model_id", REPO_ID, "--hub_strategy", "every_save", "--hub_token", "hf_fake_token_for_tests",
            "--hub_always_push", "true",  # never skip a push because the previous one is still uploading
        )  # fmt: skip
        trainer.train()
        trainer.push_to_hub()
    assert hub.created and hub.created[0]["name"] == "movekd-tiny-run"
    assert len(hub.commits) == 3  # two intermediate saves and the final push
    for index in range(len(hub.commits)):
        files = hub.committed_files(index)
        assert LOADABLE <= set(files), f"commit {index} lacks {LOADABLE - set(files)}"
        assert not [
            name for name in files if name.endswith(NEVER_UPLOADED) or name.startswith(("checkpoint-", "toy_data"))
        ]
        config = json.loads(files["config.json"])
        modules = {ref.split(".")[0] + ".py" for ref in config["auto_map"].values()}
        assert modules <= set(files)
        card = files["README.md"].decode()
        assert "2501.01709" in card and "custom_code" in card


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    trainer = build(
        TINY_STAGE2, root / "run", "--lora_llm", "true", "--max_steps", "2", "--save_steps", "2",
        "--warmup_steps", "0", "--learning_rate", "0.05",
    )  # fmt: skip
    trainer.train()
    return trainer, root / "run" / "checkpoint-2"


def _inputs(vlm):
    generator = torch.Generator().manual_seed(3)
    image = torch.full((1, 16), vlm.config.image_token_index)
    text = torch.randint(0, 250, (1, 7), generator=generator)
    return torch.cat([text[:, :2], image, text[:, 2:]], dim=1), torch.rand(1, 3, 32, 32, generator=generator)


def test_lora_checkpoint_holds_base_vlm_plus_adapter(lora_run):
    from movekd_hf.modeling import MoVEKDForConditionalGeneration

    trainer, checkpoint = lora_run
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (checkpoint / LLM_LORA_DIR).iterdir()
    }
    assert not (checkpoint / "adapter_config.json").exists()  # would make transformers load a different base
    base = MoVEKDForConditionalGeneration.from_pretrained(checkpoint, load_llm_lora=False)
    live = trainer.model.vlm.get_base_model()
    for name, param in base.named_parameters():  # MoLE and projector trained, LLM base untouched
        live_name = name if name in dict(live.named_parameters()) else name.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(param, dict(live.named_parameters())[live_name], rtol=0, atol=0)


def test_merge_folds_the_lora_into_a_checkpoint_that_loads_through_remote_code(lora_run, tmp_path):
    from movekd_hf.isolated import run_without_package
    from movekd_hf.modeling import MoVEKDForConditionalGeneration

    trainer, checkpoint = lora_run
    out = tmp_path / "merged"
    assert cli_main(["merge", str(checkpoint), str(out)]) == 0
    assert not (out / LLM_LORA_DIR).exists() and (out / "modeling_movekd.py").is_file()
    input_ids, pixel_values = _inputs(trainer.model)
    vlm = trainer.model.vlm.eval()
    with torch.no_grad():
        expected = vlm(input_ids=input_ids, pixel_values=pixel_values).logits  # peft model: base + B A
    code = f"""
import json, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor({input_ids.tolist()}), pixel_values=torch.tensor({pixel_values.tolist()})).logits
print(json.dumps({{"logits": logits.tolist(), "peft": any("lora_A.default" in n for n, _ in model.named_parameters())}}))
"""
    result = run_without_package(code)
    assert result["peft"] is False
    with torch.no_grad():  # the LoRA matters: the unmerged base VLM answers differently
        base = MoVEKDForConditionalGeneration.from_pretrained(checkpoint, load_llm_lora=False).eval()
        assert not torch.allclose(base(input_ids=input_ids, pixel_values=pixel_values).logits, expected, atol=1e-4)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-5)


def test_merge_refuses_a_checkpoint_without_lora(lora_run, tmp_path):
    from movekd_hf.training.merge import merge_lora_checkpoint

    _, checkpoint = lora_run
    with pytest.raises(ValueError, match="not a `lora_llm` checkpoint"):
        merge_lora_checkpoint(checkpoint / LLM_LORA_DIR, tmp_path / "out")


def test_qlora_without_a_gpu_fails_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU error path does not apply")
    from movekd_hf.training.from_config import qlora_config

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        qlora_config()
