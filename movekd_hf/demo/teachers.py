"""The demo's teachers: three small encoders of real architectures, each pretrained briefly on its own signal so
that each knows something the others do not, then frozen and loaded back through `build_teacher`.

| slug | architecture | input | pretrained on |
|---|---|---|---|
| `clip` | transformers CLIP ViT (the student's architecture) | 64 px, patch 16 | which shape (or background) covers each patch, with colours scrambled (channel shuffles, grey images), so it is colour-blind by design; a dense task, so every image token the VLM reads carries what is there |
| `convnext` | timm ConvNeXt | 64 px, stride 8 (8 x 8 map) | the stripe orientation of the object in each cell (the gap teacher: the student's tokens do not carry it) |
| `sam` | transformers SAM image encoder | 96 px, patch 12 | dense segmentation (background / circle / square / triangle per cell of an 8 x 8 grid): where things are and how many |

The student starts as a copy of the `clip` teacher, as in the paper. These are plain torch loops with small heads
(the teachers are not VLMs); the heads are thrown away after pretraining. The ConvNeXt uses `ls_init_value=1.0`:
with timm's default 1e-6 its blocks start as the identity and, in a short pretraining, it stays nearly linear in
the pixels and cannot learn the stripe orientation (54 % per object in the prototype; 87 % with 1.0). Measured
with this code (1000 scenes, batch 32, seed 1, constant lr 2e-3): 150 steps reach only 55-64 % per object cell
(also at lr 3e-3, seed 0, or with the cosine schedule), 400 steps 95.7 % (a linear probe on its tokens 94.9 %), so
the gap teacher pretrains for `gap_steps` (400 by default) and the others for `steps`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distill.presets import TINY_SAM, clip_teacher, convnext_teacher, sam_teacher
from ..distill.teachers import BACKENDS, Teacher, TeacherSpec, build_teacher, prepare_images
from ..modeling.llava_conventions import student_grid
from . import world

STUDENT_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    projection_dim=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=64,
    patch_size=16,  # 4 x 4 = 16 image tokens: short sequences, and each token sees a whole object
    hidden_act="quick_gelu",
)
# The package's tiny SAM, wider and at 96 px.
SAM_VISION = dict(TINY_SAM, hidden_size=48, mlp_dim=96, image_size=96, patch_size=12, output_channels=40)
# timm ConvNeXt always has 4 stages; output_stride 8 dilates the last two, so 64 px gives an 8 x 8 map.
CONVNEXT_KWARGS = dict(dims=(16, 24, 40, 72), depths=(1, 1, 2, 1), output_stride=8, num_classes=0, ls_init_value=1.0)

GAP_TEACHER = "convnext"  # the teacher whose attribute (stripe orientation) the student's tokens lack
DEMO_TEACHERS: dict[str, TeacherSpec] = {
    "clip": clip_teacher(STUDENT_VISION, model_id="demo-clip", pretrained=False),
    "convnext": convnext_teacher(CONVNEXT_KWARGS, model_id="convnext_atto", image_size=64, pretrained=False),
    "sam": sam_teacher(SAM_VISION, model_id="demo-sam", pretrained=False),
}


# ------------------------------------------------------------------------------------------- supervised signals


def segmentation_targets(scenes: list[world.Scene], grid: int) -> torch.Tensor:
    """[N, 4, grid, grid] soft labels: the fraction of each cell covered by background and by each shape."""
    masks = torch.from_numpy(np.stack([world.render_mask(scene) for scene in scenes]))  # [N, 64, 64]
    one_hot = F.one_hot(masks, 1 + len(world.SHAPES)).permute(0, 3, 1, 2).float()  # [N, 4, 64, 64]
    return F.adaptive_avg_pool2d(one_hot, grid)


def stripe_targets(scenes: list[world.Scene], grid: int, min_cover: float = 0.3) -> torch.Tensor:
    """[N, grid, grid] class per cell: the stripe orientation (index in world.STRIPES) covering most of the cell's
    object pixels where objects cover more than `min_cover` of it, else -1 (ignored)."""
    masks = torch.from_numpy(np.stack([world.render_stripe_mask(scene) for scene in scenes]))  # [N, 64, 64]
    one_hot = F.one_hot(masks, 1 + len(world.STRIPES)).permute(0, 3, 1, 2).float()  # [N, 3, 64, 64]
    cover, label = F.adaptive_avg_pool2d(one_hot, grid)[:, 1:].max(dim=1)  # [N, grid, grid]
    return torch.where(cover > min_cover, label, torch.full_like(label, -1))


def scramble_colours(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shuffle RGB channels per image and turn half the images grey: shape survives, colour does not."""
    order = torch.stack([torch.randperm(3, generator=generator) for _ in range(images.shape[0])])  # [B, 3]
    shuffled = torch.gather(images, 1, order[:, :, None, None].expand_as(images))
    grey = shuffled.mean(dim=1, keepdim=True).expand_as(images)
    use_grey = (torch.rand(images.shape[0], 1, 1, 1, generator=generator) < 0.5).float()
    return use_grey * grey + (1 - use_grey) * shuffled


@dataclass(frozen=True)
class PretrainTask:
    """One teacher's signal: features -> head -> loss, with targets computed from the scenes."""

    name: str
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[], nn.Module]
    targets: Callable[[list[world.Scene]], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    lr: float = 1e-3
    schedule: str = "cosine"  # "cosine" (10 warm-up steps, then cosine to zero) or "constant"


def _token_map(tokens: torch.Tensor) -> torch.Tensor:
    """[B, g*g, D] patch tokens -> [B, D, g, g] map (a dense head reads each patch token)."""
    grid = int(tokens.shape[1] ** 0.5)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)  # probabilities as targets: per-cell class fractions


def _masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=-1)  # class per cell, -1 ignored


PRETRAIN_TASKS: dict[str, PretrainTask] = {
    "clip": PretrainTask(
        "segmentation per patch (colour-scrambled)",
        features=lambda model, x: _token_map(model(pixel_values=x).last_hidden_state[:, 1:]),  # [B, 64, g, g]
        head=lambda: nn.Conv2d(STUDENT_VISION["hidden_size"], 1 + len(world.SHAPES), kernel_size=1),
        targets=lambda scenes: segmentation_targets(scenes, student_grid(STUDENT_VISION)[0]),
        loss=_soft_cross_entropy,
        augment=scramble_colours,
    ),
    "convnext": PretrainTask(
        "stripe orientation per cell",
        features=lambda model, x: model.forward_features(x),  # [B, 72, 8, 8]
        head=lambda: nn.Conv2d(CONVNEXT_KWARGS["dims"][-1], len(world.STRIPES), kernel_size=1),
        targets=lambda scenes: stripe_targets(scenes, DEMO_TEACHERS["convnext"].image_size // 8),
        loss=_masked_cross_entropy,
        lr=2e-3,
        schedule="constant",  # as the prototype (87 % there); see the module docstring for what this code reaches
    ),
    "sam": PretrainTask(
        "segmentation (8 x 8 cells)",
        features=lambda model, x: model(pixel_values=x).last_hidden_state,  # [B, 40, 8, 8]
        head=lambda: nn.Conv2d(SAM_VISION["output_channels"], 1 + len(world.SHAPES), kernel_size=1),
        targets=lambda scenes: segmentation_targets(scenes, SAM_VISION["image_size"] // SAM_VISION["patch_size"]),
        loss=_soft_cross_entropy,
    ),
}


def task_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy in percent: per label for multi-hot targets (float, same shape as logits), per cell (argmax) for
    class-fraction targets (float [N, C, g, g]), per labelled cell for class targets (long [N, g, g], -1 ignored)."""
    if not targets.is_floating_point():
        labelled = targets >= 0
        return 100.0 * (logits.argmax(dim=1)[labelled] == targets[labelled]).float().mean().item()
    if targets.shape == logits.shape and targets.dim() == 2:
        return 100.0 * ((logits > 0).float() == targets).float().mean().item()
    return 100.0 * (logits.argmax(dim=1) == targets.argmax(dim=1)).float().mean().item()


# ------------------------------------------------------------------------------------------ pretraining loop


def _save_transformers(model: nn.Module, folder: str) -> str:
    model.save_pretrained(folder)
    return folder


def _save_timm(model: nn.Module, folder: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, path)
    return path  # a bare weights file: timm's own loader reads it through `pretrained_cfg_overlay`


SAVERS: dict[str, Callable[[nn.Module, str], str]] = {"transformers": _save_transformers, "timm": _save_timm}


def _learning_rate(step: int, steps: int, peak: float, warmup: int = 10) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + float(np.cos(np.pi * progress)))


def pretrain_teacher(
    slug: str,
    train: tuple[torch.Tensor, list[world.Scene]],
    test: tuple[torch.Tensor, list[world.Scene]],
    steps: int,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train teacher `slug` with its task head on (images [N, 3, 64, 64] in [0, 1], scenes); report on `test`."""
    spec, task = DEMO_TEACHERS[slug], PRETRAIN_TASKS[slug]
    lr = task.lr if lr is None else lr
    torch.manual_seed(seed)
    model, head = BACKENDS[spec.backend].load(spec), task.head()
    images, targets = train[0], task.targets(train[1])
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr if task.schedule == "constant" else _learning_rate(step, steps, lr)
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = images[index] if task.augment is None else task.augment(images[index], generator)
        loss = task.loss(head(task.features(model, prepare_images(batch, spec))), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(1)
    model.eval()
    with torch.no_grad():
        logits = head(task.features(model, prepare_images(test[0], spec)))
    accuracy = task_accuracy(logits, task.targets(test[1]))
    report = {"task": task.name, "steps": steps, "final_loss": float(np.mean(losses[-10:])), "test_accuracy": accuracy}
    return model, report


def pretrain_teachers(
    folder: str,
    train: tuple[torch.Tensor, list[world.Scene]],
    test: tuple[torch.Tensor, list[world.Scene]],
    steps: int,
    seed: int = 0,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
    gap_steps: int | None = None,
) -> tuple[dict[str, TeacherSpec], dict[str, dict]]:
    """Pretrain every demo teacher (`steps` each; the gap teacher `convnext` `gap_steps`, default `steps`), save
    it under `folder/<slug>`, and return specs that load the saved weights (`pretrained=True`, `checkpoint=...`)
    through the package's own loaders, plus a report per teacher."""
    specs, reports = {}, {}
    for offset, slug in enumerate(DEMO_TEACHERS):
        count = gap_steps if slug == GAP_TEACHER and gap_steps is not None else steps
        progress = progress_factory(slug, count) if progress_factory else None
        model, reports[slug] = pretrain_teacher(slug, train, test, count, seed=seed + offset, progress=progress)
        spec = DEMO_TEACHERS[slug]
        checkpoint = SAVERS[spec.backend](model, os.path.join(folder, slug))
        specs[slug] = replace(spec, pretrained=True, checkpoint=checkpoint)
    return specs, reports


def load_teachers(specs: dict[str, TeacherSpec]) -> dict[str, Teacher]:
    """Frozen teachers from saved specs, through `build_teacher` (the same path the trainer uses)."""
    return {slug: build_teacher(spec) for slug, spec in specs.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
