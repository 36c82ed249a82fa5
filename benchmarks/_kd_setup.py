"""A small MoVE-KD training setup for the step benchmarks, built from the package's pieces (no trainer).

Sizes keep the paper's proportions roughly: the LLM's step costs ~25x the student encoder's (Vicuna-7B over 600+
tokens against CLIP-L at 577 tokens), and the four teachers (clip, eva, convnext, sam at 2.3x the student's
resolution, patch 16 / stride 32) cost about half of the LLM's forward, as EVA-L, ConvNeXt-XXL and SAM-L at
1024 px do against a 7B LLM. `quick` is tiny: it only checks that the scripts run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from movekd_hf import MoVEKDConfig, MoVEKDForConditionalGeneration
from movekd_hf.distill import KDLossConfig, MoVEKDDistiller, Teacher, TeacherShape, TeacherSpec, build_teacher
from movekd_hf.distill.losses import mole_balance_loss
from movekd_hf.distill.presets import clip_teacher, convnext_teacher, eva_teacher, sam_teacher
from movekd_hf.modeling.llava_conventions import student_grid as vision_grid
from movekd_hf.training.stages import apply_stage

SIZES = {
    "small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        image_size=112,
        patch_size=14,
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),
        vocab_size=1000,
        text_tokens=192,
        lora_rank=8,
        teacher_image_size=256,
        teacher_width=256,
        teacher_layers=4,
        batch=2,
    ),
    "quick": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_size=28,
        patch_size=14,
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2),
        vocab_size=300,
        text_tokens=12,
        lora_rank=4,
        teacher_image_size=64,
        teacher_width=32,
        teacher_layers=2,
        batch=2,
    ),
}
LAMBDA_KD, LAMBDA_BAL = 0.5, 0.01


def model_config(sizes: dict, **overrides) -> MoVEKDConfig:
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        **sizes["vision"], image_size=sizes["image_size"], patch_size=sizes["patch_size"], hidden_act="quick_gelu"
    )
    text = LlamaConfig(vocab_size=sizes["vocab_size"], max_position_embeddings=1024, pad_token_id=0, **sizes["text"])
    grid, _ = vision_grid(sizes)
    settings = dict(num_experts=3, lora_rank=sizes["lora_rank"], lora_dropout=0.05)
    settings.update(overrides)
    return MoVEKDConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=sizes["vocab_size"] - 1,
        image_seq_length=grid * grid,
        **settings,
    )


def build_movekd(sizes: dict, stage: str = "stage2", **overrides) -> nn.Module:
    torch.manual_seed(0)
    model = MoVEKDForConditionalGeneration(model_config(sizes, **overrides)).train()
    apply_stage(model, stage)
    return model


def build_plain_llava(sizes: dict) -> nn.Module:
    """Stock transformers LLaVA of the same sizes; LLaVA-1.5 stage 2 trains the LLM and projector only."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = model_config(sizes)
    plain = LlavaConfig(
        vision_config=config.vision_config,
        text_config=config.text_config,
        image_token_index=config.image_token_index,
        image_seq_length=config.image_seq_length,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(plain).train()
    for name, param in model.named_parameters():
        param.requires_grad_("vision_tower" not in name)
    return model


def teacher_specs(sizes: dict) -> list[TeacherSpec]:
    """clip (the student's architecture), and scaled-down eva (ViTDet), convnext (timm) and sam teachers."""
    size, width, layers = sizes["teacher_image_size"], sizes["teacher_width"], sizes["teacher_layers"]
    heads = max(2, width // 64)
    clip = dict(
        **sizes["vision"], image_size=sizes["image_size"], patch_size=sizes["patch_size"], hidden_act="quick_gelu"
    )
    eva = dict(
        image_size=size,
        patch_size=16,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        window_size=4,
        global_attn_indexes=(layers - 1,),
        pretrain_image_size=size // 2,
        rope_reference_grid=size // 32,
    )
    sam = dict(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_dim=4 * width,
        image_size=size,
        patch_size=16,
        output_channels=width // 4,
        window_size=4,
        global_attn_indexes=[layers - 1],
        num_pos_feats=width // 8,
        initializer_range=0.02,
    )
    return [
        clip_teacher(clip, model_id="bench-clip", pretrained=False),
        eva_teacher(eva, model_id="bench-eva", pretrained=False),
        convnext_teacher(model_id="convnext_atto", image_size=size, pretrained=False),
        sam_teacher(sam, model_id="bench-sam", pretrained=False),
    ]  # fmt: skip


def build_teachers(sizes: dict) -> list[Teacher]:
    torch.manual_seed(1)
    return [build_teacher(spec) for spec in teacher_specs(sizes)]


def student_grid(sizes: dict) -> tuple[int, int]:
    return vision_grid(sizes)


def build_distiller(sizes: dict, teachers: list[Teacher], images: torch.Tensor, adapter: str) -> MoVEKDDistiller:
    outputs = {t.slug: t(images[:1]) for t in teachers}
    shapes = {slug: TeacherShape(out.tokens.shape[-1], out.tokens.shape[1]) for slug, out in outputs.items()}
    grid = student_grid(sizes)
    torch.manual_seed(2)
    return MoVEKDDistiller(shapes, sizes["vision"]["hidden_size"], grid[0] * grid[1], KDLossConfig(adapter=adapter))


def make_batch(sizes: dict, seed: int = 0) -> dict:
    """input_ids/labels with one image's tokens per sample, pixel_values, teacher_images, sample_ids."""
    generator = torch.Generator().manual_seed(seed)
    batch, image_tokens = sizes["batch"], math.prod(vision_grid(sizes))
    vocab = sizes["vocab_size"]
    text = torch.randint(1, vocab - 1, (batch, sizes["text_tokens"]), generator=generator)
    image = torch.full((batch, image_tokens), vocab - 1)
    input_ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)  # [B, L]
    labels = input_ids.clone()
    labels[:, : 4 + image_tokens] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, sizes["image_size"], sizes["image_size"], generator=generator),
        "teacher_images": torch.rand(batch, 3, sizes["teacher_image_size"], sizes["teacher_image_size"], generator=generator),
        "sample_ids": [f"sample-{i}" for i in range(batch)],
        "images_per_sample": torch.ones(batch, dtype=torch.long),
    }  # fmt: skip


MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass
class StepParts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    distiller: MoVEKDDistiller | None = None
    teacher_source: Callable[[dict], dict] | None = None


def optimizer_for(*modules: nn.Module) -> torch.optim.Optimizer:
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5)


def online_source(teachers: list[Teacher]) -> Callable[[dict], dict]:
    return lambda inputs: {t.slug: t(inputs["teacher_images"]) for t in teachers}


def training_step(parts: StepParts, batch: dict, grid: tuple[int, int]) -> torch.Tensor:
    """One step: LM loss (+ lambda_kd * KD + lambda_bal * balance when a distiller is given), backward, AdamW."""
    outputs = parts.model(**{k: batch[k] for k in MODEL_KEYS})
    loss = outputs.loss
    if parts.distiller is not None:
        teacher_outputs = parts.teacher_source(batch)
        kd = parts.distiller(outputs.vision_hidden_states, grid, teacher_outputs)["loss"]
        balance = mole_balance_loss(outputs.router_logits)["loss"]
        loss = loss + LAMBDA_KD * kd + LAMBDA_BAL * balance
    loss.backward()
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return loss.detach()
