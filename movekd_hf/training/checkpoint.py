"""What a training checkpoint folder holds, and how the trainer writes and reads it.

A checkpoint folder is a loadable VLM first (`save_pretrained` of `MoVEKDForConditionalGeneration`: config with
`auto_map`, weights, the remote-code `*.py`, processor, model card), plus the training state the Trainer adds
(optimizer, scheduler, RNG, trainer state) and ours:

- `distill_adapters.safetensors`: the distiller (teacher adapters, feature standardisers). Never in the VLM.
- `llm_lora/`: with `lora_llm`, the peft adapter of the LLM (`adapter_config.json`, `adapter_model.safetensors`).
  The folder's own weights are then the base VLM (MoLE, projector trained; LLM as it started), so it still loads
  as a plain VLM; `movekd-hf merge` folds the adapter in. It is a sub-folder, not the top level, because
  transformers treats a top-level `adapter_config.json` as "load the base model named inside, then the adapter".

Teacher weights are never written: teachers live outside the trained module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling import MoVEKDForConditionalGeneration

DISTILLER_FILE = "distill_adapters.safetensors"
LLM_LORA_DIR = "llm_lora"
TRAIN_CONFIG_FILE = "train_config.json"
# Training state: kept in checkpoints for resuming, never uploaded as part of the model.
TRAINING_STATE_PATTERNS = (
    "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin",
    DISTILLER_FILE, "global_step*", "zero_to_fp32.py", "latest", "_*", "checkpoint-*", "runs/*",
)  # fmt: skip

_PEFT_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
_PEFT_PREFIX = "base_model.model."


def split_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """The trained module's state (`vlm.*`, `distiller.*`) -> (VLM state, distiller state), prefixes dropped."""
    vlm, distiller = {}, {}
    for key, value in state_dict.items():
        if key.startswith("vlm."):
            vlm[key[4:]] = value
        elif key.startswith("distiller."):
            distiller[key[10:]] = value
        else:
            raise ValueError(f"state key {key!r} belongs to neither `vlm` nor `distiller`")
    return vlm, distiller


def base_state_from_peft(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-wrapped VLM's state -> the plain VLM's keys: peft's LoRA tensors dropped, `.base_layer` folded away.

    MoLE's own `lora_A`/`lora_B` parameters (`...mlp.fc1.lora_A`) are kept: peft's keys carry an adapter name
    (`...q_proj.lora_A.default.weight`), MoLE's do not.
    """
    base = {}
    for key, value in state_dict.items():
        if _PEFT_LORA_KEY.search(key):
            continue
        base[key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return base


def save_training_folder(
    output_dir: str,
    module,
    state_dict: Mapping[str, torch.Tensor] | None,
    processor=None,
    train_config: Mapping | None = None,
) -> None:
    """Write the loadable VLM, the distiller and (with peft) the LLM adapter of a `MoVEKDTrainingModule`."""
    os.makedirs(output_dir, exist_ok=True)
    state_dict = state_dict if state_dict else module.state_dict()
    vlm_state, distiller_state = split_state(state_dict)
    vlm = module.base_vlm()
    if module.is_peft:
        from peft import get_peft_model_state_dict

        lora_dir = os.path.join(output_dir, LLM_LORA_DIR)
        os.makedirs(lora_dir, exist_ok=True)
        lora_state = get_peft_model_state_dict(module.vlm, state_dict=vlm_state)
        save_file(_contiguous(lora_state), os.path.join(lora_dir, "adapter_model.safetensors"))
        module.vlm.peft_config["default"].save_pretrained(lora_dir)
        vlm_state = base_state_from_peft(vlm_state)
    vlm.save_pretrained(output_dir, state_dict=vlm_state)
    if distiller_state:
        save_file(_contiguous(distiller_state), os.path.join(output_dir, DISTILLER_FILE))
    if processor is not None:
        processor.save_pretrained(output_dir)
    if train_config is not None:
        Path(output_dir, TRAIN_CONFIG_FILE).write_text(json.dumps(dict(train_config), indent=2), encoding="utf-8")


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a detached contiguous copy per tensor is always accepted.
    return {key: value.detach().contiguous() for key, value in state.items()}


def load_training_folder(folder: str, module) -> None:
    """Load what `save_training_folder` wrote back into a live `MoVEKDTrainingModule` (resume, no DeepSpeed).

    The VLM's weights go through `from_pretrained`, so the key conversions of transformers' saving are undone by
    the same code that applies them; the loaded tensors are then copied into the live model.
    """

    loaded = MoVEKDForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()
    target = module.base_vlm()
    live = target.state_dict()
    state = {}
    for key, value in loaded.items():
        name = key if key in live else _base_layer_name(key)
        if name not in live:
            raise ValueError(f"{folder}: weight {key!r} has no place in the model being resumed")
        state[name] = value
    missing = [key for key in live if key not in state and not _PEFT_LORA_KEY.search(key)]
    if missing:
        raise ValueError(f"{folder}: no saved value for {missing[:5]}")
    target.load_state_dict(state, strict=False)
    if module.is_peft:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(
            module.vlm, load_file(os.path.join(folder, LLM_LORA_DIR, "adapter_model.safetensors"))
        )
    distiller_path = os.path.join(folder, DISTILLER_FILE)
    if module.distiller is not None:
        if not os.path.isfile(distiller_path):
            raise ValueError(f"{folder} has no {DISTILLER_FILE}: it was not saved by a distillation run")
        module.distiller.load_state_dict(load_file(distiller_path))


def _base_layer_name(key: str) -> str:
    head, _, leaf = key.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def copy_loadable_files(source: str, destination: str) -> None:
    """Copy a checkpoint's model files (everything but training state) into `destination` for an upload."""
    from fnmatch import fnmatch

    for path in Path(source).rglob("*"):
        relative = path.relative_to(source).as_posix()
        if path.is_file() and not any(fnmatch(relative, pattern) for pattern in TRAINING_STATE_PATTERNS):
            target = Path(destination, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
