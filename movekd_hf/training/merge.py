"""Fold a checkpoint's LLM LoRA (`llm_lora/`, written by `lora_llm` runs) into a plain MoVE-KD checkpoint.

`merge_lora_checkpoint(CKPT, OUT)` (or `movekd-hf merge CKPT OUT`): the base VLM is loaded from CKPT, the peft
adapter from CKPT/llm_lora, `merge_and_unload` adds B A into the LLM's weights, and OUT gets a folder that loads
like any other checkpoint (remote code, processor, card), without peft.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..models import checkpoint_classes
from .checkpoint import LLM_LORA_DIR

CARRIED_FILES = ("README.md", "train_config.json")


def merge_lora_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    from peft import PeftModel

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    lora = checkpoint / LLM_LORA_DIR
    if not (lora / "adapter_config.json").is_file():
        raise ValueError(f"{checkpoint} has no {LLM_LORA_DIR}/adapter_config.json: it is not a `lora_llm` checkpoint")
    if output_dir.resolve() == checkpoint.resolve():
        raise ValueError("merge into a new folder: OUT must differ from CKPT (the checkpoint stays resumable)")
    # The base VLM alone: loading would otherwise attach llm_lora/ already (modeling_movekd.attach_llm_lora).
    model_class, processor_class = checkpoint_classes(str(checkpoint))
    base = model_class.from_pretrained(checkpoint, load_llm_lora=False)
    merged = PeftModel.from_pretrained(base, lora).merge_and_unload()
    merged.save_pretrained(output_dir)
    processor_class.from_pretrained(checkpoint).save_pretrained(output_dir)
    for name in CARRIED_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, output_dir / name)
    return output_dir
