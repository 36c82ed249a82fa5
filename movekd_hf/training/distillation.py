"""How a run distils: the teachers it builds (the anchor copied from the student's own tower, the others from their
specs) or the ready source it is given, the distiller (adapters and loss for `kd_preset` and `kd_options`, from
`adapters_from` when set), and what train_config.json records of them. `MoVEKDTrainer` (trainer.py) calls
`distillation_setup` once, before peft or the stage touch the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..distill.anchor import ANCHOR, anchor_slug
from ..distill.distiller import MoVEKDDistiller
from ..distill.teachers import TeacherSpec
from ..errors import SettingsError
from ..modeling.llava_conventions import student_grid, tower_cls_tokens
from .arguments import MoVEKDTrainingArguments
from .checkpoint import DISTILLER_FILE
from .teacher_source import (
    OnlineTeachers,
    TeacherSource,
    build_teachers,
    run_teacher_specs,
    student_kd_config,
    teacher_shapes,
)

logger = logging.getLogger(__name__)

# What `teachers=` takes: a teacher set name ("tiny", "v1.0", "v1.1"), the specs of the teachers besides the anchor
# (`clip` / `siglip`: always the student's own initial tower), or a ready source such as `CachedTeachers` (then with `distiller=`).
Teachers = str | Sequence[str | TeacherSpec] | TeacherSource


def training_dtype(args: MoVEKDTrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def load_adapters(distiller: MoVEKDDistiller, folder: str) -> None:
    """Start the adapters (and standardisers) from a checkpoint's `distill_adapters.safetensors`."""
    from safetensors.torch import load_file

    path = os.path.join(folder, DISTILLER_FILE)
    if not os.path.isfile(path):
        raise SettingsError(
            f"no {DISTILLER_FILE} in {folder!r} (a run without distillation?)",
            field="adapters_from",
            expected="a checkpoint of a distillation run, or `none` for new adapters",
        )
    try:
        distiller.load_state_dict(load_file(path))
    except RuntimeError as error:  # another teacher set or KD preset than this run's
        raise SettingsError(
            f"its adapters do not fit this run's teachers {list(distiller.teacher_names)}: {str(error)[:300]}",
            file=path,
            field="adapters_from",
            expected="adapters of the same teacher set and kd_preset, or `--adapters_from none` for new ones",
        ) from error


def build_distiller(vlm: nn.Module, specs: Sequence[TeacherSpec], args: MoVEKDTrainingArguments) -> MoVEKDDistiller:
    """Adapters for the anchor (the student's own tower, `anchor_slug`: `clip` or `siglip`) plus `specs`, with the
    loss of `args.kd_preset` for this student (`student_kd_config`: a tower without CLS switches the CLS-based
    options, logged as a warning and recorded in train_config.json's `kd_loss`). Seeded with `args.seed`, so they
    start the same whether the teachers run online or are read from a cache."""
    shapes = teacher_shapes(vlm, list(specs))
    vision = vlm.config.vision_config
    height, width = student_grid(vision)
    config, switched = student_kd_config(vision, args.kd_preset, args.kd_option_overrides())  # kd_options win
    if switched:
        logger.warning(
            "the %s student tower has no CLS token for the anchor %r: KD loss options switched from kd_preset %r: %s "
            "(set kd_options to choose others)",
            vision.model_type,
            config.anchor_teacher,
            args.kd_preset,
            ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in switched.items()),
        )
    torch.manual_seed(args.seed)
    return MoVEKDDistiller(shapes, vision.hidden_size, height * width, config)


def _teacher_specs(teachers: Teachers, vision_config) -> list[TeacherSpec] | None:
    """The non-anchor specs `teachers` stands for; None for a ready teacher source. A teacher set's first entry,
    `clip`, stands for the anchor (the student's own tower, `anchor_slug`) whatever the tower; explicit specs may
    take neither that name nor the anchor's slug. A list may mix set names and specs (`["v1.1", spec]`: the
    set's teachers, then one more); a slug given twice is refused."""
    if callable(teachers):
        return None
    specs = []
    for item in [teachers] if isinstance(teachers, str) else list(teachers):
        if isinstance(item, str):
            specs += run_teacher_specs(item, pretrained=True, checkpoints={})
        elif isinstance(item, TeacherSpec):
            specs.append(item)
        else:
            raise TypeError(
                f"`teachers` must be a teacher set name, TeacherSpecs (a list may mix both) or a teacher source; got "
                f"a {type(item).__name__}"
            )
    anchors = sorted({ANCHOR, anchor_slug(vision_config)})
    taken = sorted({spec.slug for spec in specs} & set(anchors))
    if taken:
        raise ValueError(
            f"leave {taken} out of `teachers`: {' and '.join(map(repr, anchors))} "
            f"{'names' if len(anchors) == 1 else 'name'} the anchor, always the student's own tower (a set name "
            "brings its teachers without it)"
        )
    slugs = [spec.slug for spec in specs]
    repeated = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if repeated:
        raise ValueError(f"`teachers` names {repeated} more than once; give each teacher its own slug")
    return specs


def _check_distilled_tokens(config) -> None:
    """Refuse, before any step, a student whose tower has no anchor teacher (`anchor_slug`: an unknown tower, or
    SigLIP 2's NaFlex class, named with its fixed-resolution alternative), and one whose image features are not
    its patch tokens: a tower without a CLS token (SigLIP) under LLaVA's "default" strategy drops a real patch (a
    checkpoint made before the strategy was chosen from the tower), and the distiller would fail at step 1 with
    mismatched token counts."""
    anchor_slug(config.vision_config)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    try:
        cls_tokens = tower_cls_tokens(config.vision_config)
    except ValueError:
        return  # a tower the package does not know: the distiller reports its shapes
    if strategy == "default" and cls_tokens == 0:
        raise SettingsError(
            f"is 'default', which drops the first token of a {config.vision_config.model_type} tower (it has no CLS "
            "token): a real patch",
            field="vision_feature_select_strategy",
            expected="'full' for a tower without CLS (set it in config.json; `movekd-hf init` now chooses it)",
        )


def distillation_setup(vlm, args, teachers, distiller, processing_class):
    """(teacher source, distiller, specs of the online teachers or None) for `args.kd_preset`."""
    if args.kd_preset == "none":
        if teachers is not None or distiller is not None:
            raise ValueError("kd_preset='none' trains the LLaVA baseline: pass no `teachers` and no `distiller`")
        if _adapters_from(args):
            raise ValueError("adapters_from is set, but kd_preset='none' trains without adapters")
        return None, None, None
    _check_distilled_tokens(vlm.config)
    if teachers is None:
        raise ValueError(
            f"kd_preset={args.kd_preset!r} distils, but no `teachers` were given: pass a teacher set name ('tiny', "
            "'v1.1'), TeacherSpecs or a teacher source, or set kd_preset='none' for the LLaVA baseline"
        )
    specs = _teacher_specs(teachers, vlm.config.vision_config)
    source = teachers
    if specs is None and distiller is None:
        raise ValueError("a ready teacher source needs `distiller=` too: the trainer cannot see its teachers' shapes")
    if specs is not None:
        image_processor = getattr(processing_class, "image_processor", None)
        if image_processor is None:
            raise ValueError("building teachers needs `processing_class`: the anchor reads images as the student does")
        torch.manual_seed(args.seed)  # random (tiny) teacher weights follow the seed, the same on every rank
        built = build_teachers(vlm, specs, image_processor.image_mean, image_processor.image_std)
        source = OnlineTeachers(built).to(args.device, training_dtype(args))
        distiller = distiller if distiller is not None else build_distiller(vlm, specs, args)
        missing = sorted(set(distiller.teacher_names) - set(built))
        if missing:
            raise ValueError(f"the distiller distils {missing}, which are not among the teachers {sorted(built)}")
    if _adapters_from(args):
        load_adapters(distiller, args.adapters_from)
    return source, distiller, specs


def _adapters_from(args: MoVEKDTrainingArguments) -> str | None:
    """`args.adapters_from`, with `none` (new adapters, the command line's way to say None) as None."""
    return None if args.adapters_from in (None, "", "none") else args.adapters_from


def recorded_teachers(distiller: MoVEKDDistiller | None, specs: Sequence[TeacherSpec] | None) -> list:
    """train_config.json's `teachers`: `{"name", "model_id", "pretrained"}` (and `"revision"` where one was
    pinned) per teacher the run distils, from the specs it built them from (hub_cards.card.resolve_teachers reads
    this shape). The anchor (`clip`/`siglip`) is the student's own tower as training began: no id of its own
    (`model_id` None), so the card credits it through the run's teacher set. Without specs (a ready teacher
    source), the slugs alone."""
    if distiller is None:
        return []
    if specs is None:
        return list(distiller.teacher_names)
    by_slug = {spec.slug: spec for spec in specs}
    return [
        {"name": slug, "model_id": by_slug[slug].model_id, "pretrained": by_slug[slug].pretrained}
        | ({"revision": by_slug[slug].revision} if by_slug[slug].revision else {})
        if slug in by_slug
        else {"name": slug, "model_id": None, "pretrained": None}
        for slug in distiller.teacher_names
    ]
