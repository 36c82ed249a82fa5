"""A `lora_llm` checkpoint (base VLM + `llm_lora/`) is never published or loaded without its LoRA: it loads as
trained through its remote code (transformers' peft integration), refuses without peft naming `movekd-hf merge`,
and both the trainer's push and `movekd-hf push` upload the adapter, from one file list."""

from __future__ import annotations

import json

import pytest
import torch
from _hub_fixtures import fake_hub
from _train_fixtures import TINY_STAGE2, build

from movekd_hf.hub_cards.publish import collect_upload_files, loadable_files, push_run
from movekd_hf.hub_cards.run_dir import read_run_dir
from movekd_hf.isolated import run_without_package
from movekd_hf.training.checkpoint import LLM_LORA_DIR

REPO_ID = "me/movekd-tiny-lora"
CARD_FILES = ("README.md", ".eval_results/")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A real 2-step `lora_llm` stage-2 run that pushes its final folder to a fake Hub; the trained peft model's
    logits on one fixed input are the reference every load must give."""
    root = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        with fake_hub(monkeypatch) as hub:
            trainer = build(
                TINY_STAGE2, root / "run", "--lora_llm", "true", "--max_steps", "2", "--save_steps", "2",
                "--warmup_steps", "0", "--learning_rate", "0.05", "--push_to_hub", "true", "--hub_model_id", REPO_ID,
                "--hub_strategy", "end", "--hub_token", "hf_fake_token_for_tests",
            )  # fmt: skip
            trainer.train()
            trainer.push_to_hub()
    vlm = trainer.model.vlm.eval()
    generator = torch.Generator().manual_seed(3)
    image = torch.full((1, 16), vlm.config.image_token_index)
    text = torch.randint(0, 250, (1, 7), generator=generator)
    input_ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    pixel_values = torch.rand(1, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = vlm(input_ids=input_ids, pixel_values=pixel_values).logits  # peft model: base + B A
    return {"folder": root / "run", "hub": hub, "inputs": (input_ids, pixel_values), "expected": expected}


@pytest.fixture(scope="module")
def remote_loads(lora_run, tmp_path_factory):
    """In ONE interpreter where movekd_hf is not importable (remote code only): the run's folder and the repo that
    `movekd-hf push` committed, each loaded and run on the reference input; then the folder again with peft made
    unimportable (`sys.modules["peft"] = None` is what a missing package looks like to `importlib`)."""
    repo = tmp_path_factory.mktemp("pushed") / "repo"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        with fake_hub(monkeypatch) as hub:
            push_run(lora_run["folder"], REPO_ID)
    pushed = hub.committed_files()
    for name, content in pushed.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    input_ids, pixel_values = lora_run["inputs"]
    code = f"""
import json, sys, torch
from transformers import AutoModelForImageTextToText
def run(folder):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor({input_ids.tolist()}), pixel_values=torch.tensor({pixel_values.tolist()})).logits
    return {{"logits": logits.tolist(), "module": type(model).__module__,
            "adapters": sum(".default." in name for name, _ in model.named_parameters())}}
result = {{"folder": run({str(lora_run["folder"])!r}), "repo": run({str(repo)!r})}}
sys.modules["peft"] = None
try:
    run({str(lora_run["folder"])!r})
except ImportError as error:
    result["no_peft_error"] = str(error)
print(json.dumps(result))
"""
    return {"pushed": pushed, **run_without_package(code)}


def test_checkpoint_loads_as_trained_through_remote_code(lora_run, remote_loads):
    from movekd_hf.modeling import MoVEKDForConditionalGeneration

    folder, expected = lora_run["folder"], lora_run["expected"]
    assert (folder / LLM_LORA_DIR / "adapter_model.safetensors").is_file()
    result = remote_loads["folder"]
    assert result["module"].startswith("transformers_modules.") and result["adapters"] > 0
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-5)
    # The LoRA matters: the base VLM alone (what loading gave before) answers differently.
    input_ids, pixel_values = lora_run["inputs"]
    base = MoVEKDForConditionalGeneration.from_pretrained(folder, load_llm_lora=False).eval()
    with torch.no_grad():
        assert (base(input_ids=input_ids, pixel_values=pixel_values).logits - expected).abs().max() > 1e-3


def test_pushed_repo_loads_with_its_lora(lora_run, remote_loads):
    torch.testing.assert_close(
        torch.tensor(remote_loads["repo"]["logits"]), lora_run["expected"], rtol=1e-4, atol=1e-5
    )


def test_without_peft_loading_refuses_and_names_merge(remote_loads):
    error = remote_loads.get("no_peft_error", "")
    assert "llm_lora/" in error and "movekd-hf merge" in error and "pip install peft" in error


def test_trainer_push_and_movekd_hf_push_upload_the_same_files(lora_run, remote_loads):
    folder = lora_run["folder"]
    trainer_files, pushed = lora_run["hub"].committed_files(), remote_loads["pushed"]
    assert {f"{LLM_LORA_DIR}/adapter_config.json", f"{LLM_LORA_DIR}/adapter_model.safetensors"} <= set(trainer_files)

    def model_files(files):
        return {name for name in files if not name.startswith(CARD_FILES)}

    assert model_files(pushed) == model_files(trainer_files) == set(loadable_files(folder)) - {"README.md"}
    for name in model_files(pushed):
        assert pushed[name] == trainer_files[name] == (folder / name).read_bytes(), name
    card = pushed["README.md"].decode()
    assert "## LLM LoRA" in card and "movekd-hf merge" in card and "peft must be installed" in card


def test_incomplete_lora_folder_is_refused(lora_run, tmp_path):
    import shutil

    from movekd_hf.hub_cards.publish import PushError

    folder = tmp_path / "ckpt"
    shutil.copytree(lora_run["folder"], folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    (folder / LLM_LORA_DIR / "adapter_model.safetensors").unlink()
    with pytest.raises(PushError, match="llm_lora is incomplete"):
        collect_upload_files(read_run_dir(folder), REPO_ID)


def test_card_of_the_run_is_true_and_keeps_its_recipe(lora_run, tmp_path):
    """`movekd-hf card` on the trainer's folder: the tiny teachers are not credited as the paper's, the model is
    called a toy, `base_model` (a random preset) is left out, the hyper-parameters stay (training_args.json)."""
    from huggingface_hub import ModelCard

    from movekd_hf.cli import main

    out = tmp_path / "card"
    assert main(["card", str(lora_run["folder"]), "--output", str(out)]) == 0
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model is None and card.data.license is None
    assert "A toy model" in text and "openai/clip-vit-large-patch14-336" not in text and "| MIT |" not in text
    assert "| `learning_rate` | 0.05 |" in text and "| `lora_llm` | True |" in text
    assert "## LLM LoRA" in text
    assert json.loads((lora_run["folder"] / "training_args.json").read_text())["learning_rate"] == 0.05
