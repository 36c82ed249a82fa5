"""Batched greedy generation over a benchmark's samples, written to a LLaVA answers file (jsonl).

Resumable: a restart reads the keys already in the answers file and generates only the rest. Under
`accelerate launch` each process takes a share of the pending samples and appends its batches to the one answers
file under an inter-process lock (`answers.append_answers`); at the end the main process compacts the file (one
line per question, in sample order). Two runs started on the same file lose nothing either: the later compaction
drops the questions both answered.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..modeling.llava_conventions import IMAGE_TOKEN, expand_to_square, load_image, mean_colour
from .answers import answered_keys, append_answers, compact_answers
from .benchmarks import EvalSample
from .prompts import chat_template_messages, v1_conversation


def load_model_and_processor(path: str | Path, dtype: Any = "auto") -> tuple[Any, Any]:
    """Any LLaVA-like folder through the Auto classes (remote code allowed), in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(path), trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
    return model.eval(), processor


def distributed_state() -> Any:
    """accelerate's `PartialState` for this launch. A multi-process launch on a machine without CUDA gets the
    gloo CPU backend: accelerate only picks it when asked for the CPU, and would otherwise run every process as
    rank 0 of 1 (each answering everything)."""
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available())


def done_keys(answers_file: Path) -> set[str]:
    """Keys already answered in `answers_file` (and in part files left by older versions)."""
    return answered_keys(answers_file)


def _load_image(image: Any, processor: Any, pad: bool) -> Any:
    """A sample's image (path or PIL image) in RGB, padded to a square as training pads it when `pad`."""
    image = load_image(image)
    if pad:  # LLaVA's expand2square with the processor's mean colour, as the training collator pads
        image = expand_to_square(image, mean_colour(processor.image_processor))
    return image


def build_prompt(sample: EvalSample, processor: Any, prompt_format: str) -> str:
    """The text fed to the processor: LLaVA-1.5's `v1` conversation, or the processor's chat template."""
    if prompt_format == "v1":
        return v1_conversation(sample.prompt, getattr(processor, "image_token", IMAGE_TOKEN))
    if prompt_format == "chat_template":
        return processor.apply_chat_template(chat_template_messages(sample.prompt), add_generation_prompt=True)
    raise ValueError(f"prompt_format must be 'v1' or 'chat_template', got {prompt_format!r}")


def generate_batch(
    model: Any, processor: Any, batch: Sequence[EvalSample], prompt_format: str, max_new_tokens: int, pad: bool
) -> list[str]:
    """Greedy answers for one batch, left-padded so every row's new tokens start at the same column."""
    import torch

    processor.tokenizer.padding_side = "left"
    texts = [build_prompt(sample, processor, prompt_format) for sample in batch]
    images = [_load_image(sample.image, processor, pad) for sample in batch]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, T_new]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _answer_line(sample: EvalSample, text: str, model_id: str) -> dict:
    return {"question_id": sample.question_id, "prompt": sample.prompt, "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "metadata": {"key": sample.key, "category": sample.category}}  # fmt: skip


def run_generation(
    model: Any,
    processor: Any,
    samples: Sequence[EvalSample],
    answers_file: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    prompt_format: str = "v1",
    pad_images: bool = True,
    model_id: str = "movekd",
) -> Path:
    """Answer every sample not yet in `answers_file`; returns the file (complete on the main process)."""
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    state = distributed_state()
    answers_file = Path(answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    finished = answered_keys(answers_file)
    pending = [s for s in samples if s.key not in finished]
    # Every rank must split the same pending list: no rank appends before all have read the file.
    state.wait_for_everyone()
    with state.split_between_processes(pending) as mine:
        bar = tqdm(total=len(mine), desc=f"generate[rank {state.process_index}]", position=state.process_index)
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            texts = generate_batch(model, processor, batch, prompt_format, max_new_tokens, pad_images)
            # One locked append per batch: a crash loses at most the batch in flight, never half a line.
            append_answers(answers_file, [_answer_line(s, text, model_id) for s, text in zip(batch, texts)])
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        compact_answers(answers_file, [sample.key for sample in samples])
    state.wait_for_everyone()
    return answers_file


def merge_parts(answers_file: Path, samples: Sequence[EvalSample]) -> None:
    """Compact `answers_file`: one line per sample key, in sample order, leftover part files folded in."""
    compact_answers(answers_file, [sample.key for sample in samples])
