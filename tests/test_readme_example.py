"""The README's "distil into an existing Hugging Face LLaVA" example runs as written, on a tiny LLaVA saved the way
llava-hf checkpoints are. Only what a CPU test cannot have is swapped, each by an exact string replacement: the Hub
id and the data files for local tiny ones, the paper teachers for the `tiny` set, bf16 for float32, and one step."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from _model_fixtures import TINY_TEXT, TINY_VISION
from transformers import LlavaConfig, LlavaForConditionalGeneration

from movekd_hf.models import build_byte_tokenizer, build_processor
from movekd_hf.training.toy_data import make_toy_llava_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-example: distil-into-llava"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    after = text[text.index(MARKER) :]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_readme_distils_into_an_existing_llava(tmp_path, monkeypatch):
    config = LlavaConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, image_token_index=260, image_seq_length=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    build_processor(config, build_byte_tokenizer()).save_pretrained(tmp_path / "llava")
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=4)
    code = readme_example()
    swaps = {
        '"llava-hf/llava-1.5-7b-hf"': repr(str(tmp_path / "llava")),
        '"llava_v1_5_mix665k.json"': repr(toy.finetune_json),
        '"data/images"': repr(toy.image_folder),
        'teachers="v1.1"': 'teachers="tiny"',
        "bf16=True": "bf16=False, max_steps=1, report_to='none'",
        "per_device_train_batch_size=8": "per_device_train_batch_size=2",
    }
    for old, new in swaps.items():
        assert code.count(old) == 1, f"the README example no longer has {old}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    assert (tmp_path / "runs" / "my-movekd" / "distill_adapters.safetensors").is_file()
    assert (tmp_path / "runs" / "my-movekd" / "modeling_movekd.py").is_file()  # loadable through remote code
