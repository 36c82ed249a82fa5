"""Start the demo VLM as LLaVA training starts: a pretrained vision encoder (the `clip` teacher) plus a pretrained
LLM, joined by `movekd_hf.models.from_vision_and_llm` (MoLE and projector new).

The LLM is a small LLaMA pretrained here for a few seconds on the world's text alone (questions, answers and
captions without images), so it knows the words and the conversation format before it ever sees an image, as
Vicuna does before LLaVA training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..modeling.llava_conventions import IMAGE_TOKEN, VICUNA_SYSTEM, vicuna_v1_turn
from ..models import build_image_processor, from_vision_and_llm
from .teachers import STUDENT_VISION, _learning_rate
from .vocab import build_word_tokenizer

LLM_CONFIG = dict(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
MOLE_SETTINGS = dict(num_experts=3, lora_rank=8, lora_alpha=8.0, lora_dropout=0.05)


def llm_texts(finetune_json: str, pretrain_json: str) -> list[str]:
    """Every training conversation as image-free Vicuna v1 text, twice: once with the scene's caption where the
    image goes (so the LLM learns to answer from a description in its context, the skill it needs to answer
    from image tokens later) and once without it (the answer prior); plus every caption."""
    with open(pretrain_json, encoding="utf-8") as handle:
        captions = {record["image"]: record["conversations"][1]["value"] for record in json.load(handle)}
    texts = []
    with open(finetune_json, encoding="utf-8") as handle:
        for record in json.load(handle):
            turns = record["conversations"]
            body = "".join(
                f"{vicuna_v1_turn(q['value'].replace(IMAGE_TOKEN, '').strip())} {a['value']}</s>"
                for q, a in zip(turns[0::2], turns[1::2])
            )
            texts.append(f"{VICUNA_SYSTEM} {body}")
            described = body.replace("USER: ", f"USER: {captions[record['image']]} ", 1)
            texts.append(f"{VICUNA_SYSTEM} {described}")
    return texts + list(captions.values())


def pretrain_llm(
    texts: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable | None = None,
):
    """A small LLaMA trained with next-token prediction on `texts`; returns (model, tokenizer, final loss)."""
    tokenizer = build_word_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3, **LLM_CONFIG)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    tokenizer.padding_side = "right"
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr)
        index = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(1)
    tokenizer.padding_side = "left"  # generation pads on the left
    return model.eval(), tokenizer, sum(losses[-10:]) / min(10, len(losses))


def save_vision_encoder(clip_model: torch.nn.Module, folder: str) -> str:
    """The pretrained `clip` teacher as a stock CLIP vision checkpoint with its image processor."""
    clip_model.save_pretrained(folder)
    build_image_processor(STUDENT_VISION["image_size"]).save_pretrained(folder)
    return folder


def save_llm(model, tokenizer, folder: str) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def initial_checkpoint(vision_dir: str, llm_dir: str, folder: str, faithful: bool) -> str:
    """The untrained MoVE-KD VLM (student tower = the clip teacher), saved where the trainer loads it from."""
    model, processor = from_vision_and_llm(vision_dir, llm_dir, faithful=faithful, **MOLE_SETTINGS)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
