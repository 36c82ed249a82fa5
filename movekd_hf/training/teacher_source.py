"""Where the trainer gets teacher outputs from, and how the frozen teachers of a run are built.

A `TeacherSource` turns a collated batch into `{slug: TeacherOutput}`. `OnlineTeachers` runs the frozen teachers on
the batch's `teacher_images` (the paper's way); a feature cache (distill/cache.py) answers the same call from
`sample_ids`. Teachers are never part of the module the Trainer, DDP or DeepSpeed wrap: they are not saved, not
optimised, not partitioned, and stay in eval mode in the training dtype.

The anchor teacher (METHOD.md section 4) is a frozen copy of the student's own tower as training begins, read at the
student's `vision_feature_layer`. Every teacher set lists it first, as `clip` (`ANCHOR`, the paper's name); in a run
it is named after the student's tower (`anchor_slug`): `clip` for a CLIP tower, `siglip` for a SigLIP one
(SigLIP 2 fixed-resolution checkpoints included: their model_type is "siglip"). A CLIP anchor gives the CLS token
and CLS attention row of the paper's loss; a SigLIP tower has no CLS, so its anchor gives its attention-pooling
head's output and probe attention instead (`pooled`, `pool_attention`; none for a tower without the head), and
`student_kd_defaults` says which loss options replace the CLS-based ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from ..distill.anchor import (
    ANCHOR,
    ANCHOR_TOWERS,
    anchor_slug,
    anchor_teacher_spec,
    has_pooling_head,
    tower_type,
)
from ..distill.anyres_tiles import tile_view_side
from ..distill.cache import CacheSettings
from ..distill.distiller import TeacherShape
from ..distill.losses import KDLossConfig
from ..distill.plan import meta_teacher_shape
from ..distill.presets import teacher_specs
from ..distill.teacher_by_id import teacher_from_pretrained
from ..distill.teacher_views import ViewSettings, view_settings
from ..distill.teachers import Teacher, TeacherOutput, TeacherSpec, build_teacher
from ..errors import SettingsError, loading
from ..modeling.llava_conventions import mean_colour, student_grid
from .anyres import tile_size


class TeacherSource(Protocol):
    """batch (as collated, on device) -> {slug: TeacherOutput}; empty when the batch has no image."""

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, TeacherOutput]: ...


class OnlineTeachers:
    """Runs frozen teachers every step on `inputs["teacher_views"]` ({slug: uint8 [N_img, 3, S_t, S_t]}, each
    teacher's own view, with `teacher_view_sizes` for `pad` views holding padding; what a collator built with
    `view_settings()` gives) or, without views, on `inputs["teacher_images"]` ([N_img, 3, S, S] in [0, 1])."""

    def __init__(self, teachers: Mapping[str, Teacher]):
        self.teachers = dict(teachers)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> OnlineTeachers:
        for teacher in self.teachers.values():
            teacher.to(device=device, dtype=dtype).eval()
        return self

    def view_settings(self) -> dict[str, ViewSettings]:
        """{slug: ViewSettings}: what `MoVEKDDataCollator(teacher_views=...)` needs to give these teachers views."""
        return view_settings(teacher.spec for teacher in self.teachers.values())

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, TeacherOutput]:
        views = inputs.get("teacher_views")
        if views is None:
            images = inputs.get("teacher_images")
            return {} if images is None else {slug: teacher(images) for slug, teacher in self.teachers.items()}
        missing = sorted(set(self.teachers) - set(views))
        if missing:
            raise ValueError(
                f"the batch's teacher_views have no view for {missing}: build the collator with "
                "teacher_views=OnlineTeachers.view_settings()"
            )
        sizes = inputs.get("teacher_view_sizes") or {}
        return {slug: teacher(view=views[slug], valid_size=sizes.get(slug)) for slug, teacher in self.teachers.items()}


@contextlib.contextmanager
def outside_zero3() -> Iterator[None]:
    """Build modules without DeepSpeed ZeRO-3's `zero.Init` partitioning (transformers applies it to every model
    built while a ZeRO-3 config is registered); teachers must stay whole on every rank."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _is_mole_key(name: str) -> bool:
    return ".lora_" in name or ".router." in name


def _gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full copy of `module`'s state, also when ZeRO-3 loaded it partitioned (each rank holding a shard)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def student_kd_defaults(vision_config: Any) -> dict[str, Any]:
    """The `KDLossConfig` overrides a student tower needs, because METHOD.md section 4 reads the anchor's CLS token.

    CLIP: {} (the paper's loss as it is). SigLIP with its attention-pooling head: token weights from the head's
    probe attention (`token_weighting="pool_attention"`) and the head's output as the anchor summary of the teacher
    weights ("pooled"). SigLIP without the head (`vision_use_head=False`, LLaVA-OneVision's towers): uniform token
    weights and the mean anchor token ("mean_token"). Both set `anchor_teacher` to `anchor_slug`. Raises
    `SettingsError` as `anchor_slug` does.
    """
    slug = anchor_slug(vision_config)
    if slug == "clip":
        return {}
    if has_pooling_head(vision_config):
        return {"anchor_teacher": slug, "token_weighting": "pool_attention", "anchor_summary": "pooled"}
    return {"anchor_teacher": slug, "token_weighting": "uniform", "anchor_summary": "mean_token"}


# The loss option values that read something of the anchor's beyond its tokens (a `TeacherOutput` field).
_OPTION_READS = {
    ("token_weighting", "cls_attention"): "cls_attention",
    ("token_weighting", "pool_attention"): "pool_attention",
    ("anchor_summary", "cls"): "cls",
    ("anchor_summary", "pooled"): "pooled",
}


def anchor_outputs(vision_config: Any) -> set[str]:
    """The `TeacherOutput` fields beyond `tokens` the anchor of this student tower fills: CLIP {"cls",
    "cls_attention"}; SigLIP {"pooled", "pool_attention"} with its pooling head, none without it."""
    if anchor_slug(vision_config) == "clip":
        return {"cls", "cls_attention"}
    return {"pooled", "pool_attention"} if has_pooling_head(vision_config) else set()


def _reads(config: KDLossConfig, name: str) -> str | None:
    """The anchor's `TeacherOutput` field that option `name` of `config` reads (None: none)."""
    if name == "anchor_summary" and config.teacher_weighting != "cls_similarity":
        return None  # the summary only scores teachers for the CLS-similarity weights
    return _OPTION_READS.get((name, getattr(config, name)))


def student_kd_config(
    vision_config: Any, kd_preset: str, explicit: Mapping[str, Any] | None = None
) -> tuple[KDLossConfig, dict[str, tuple[Any, Any]]]:
    """The KD loss of `kd_preset` for a student tower, with the user's `explicit` options (`kd_options`).

    Of `student_kd_defaults`, an option the user did not set replaces the preset's value where that value reads
    what this anchor does not give (`anchor_outputs`: a SigLIP anchor has no CLS token), and the anchor's slug
    replaces `anchor_teacher`; options that read nothing (`token_weighting="none"`, the MSE baseline) stay. CLIP
    students get the preset as it is (the faithful loss unchanged). Returns (config, {field: (preset value, new
    value)} for every switched field). Raises `SettingsError` when an option still reads what the anchor does not
    give (e.g. `token_weighting="cls_attention"` set for a SigLIP student).
    """
    explicit = dict(explicit or {})
    config = KDLossConfig.from_preset(kd_preset, **explicit)
    gives = anchor_outputs(vision_config)
    switched = {}
    for name, value in student_kd_defaults(vision_config).items():
        current = getattr(config, name)
        if name in explicit or current == value:
            continue
        if name == "anchor_teacher" or _reads(config, name) not in gives | {None}:
            switched[name] = (current, value)
    config = KDLossConfig.from_preset(kd_preset, **explicit, **{name: new for name, (_old, new) in switched.items()})
    for name in ("token_weighting", "anchor_summary"):
        need = _reads(config, name)
        if need is not None and need not in gives:
            raise SettingsError(
                f"is {getattr(config, name)!r}, which reads the anchor's {need}; the anchor of this "
                f"{tower_type(vision_config)} student gives {sorted(gives) or 'no CLS, pooled output or attention'}",
                field=f"kd_options.{name}",
                expected=f"{[v for (n, v), f in _OPTION_READS.items() if n == name and f in gives]} or a value that "
                "reads no anchor field (token_weighting 'uniform' / 'none', anchor summary 'mean_token')",
            )
    return config, switched


def anchor_teacher_from_student(vlm: nn.Module, image_mean=None, image_std=None) -> Teacher:
    """The anchor teacher: a frozen stock vision model (`CLIPVisionModel` / `SiglipVisionModel`) holding the student
    tower's weights as they are now, minus MoLE (LoRA experts and routers), read at the student's
    `vision_feature_layer`; a CLIP copy with its CLS attention row, a SigLIP copy with its pooling head's output and
    probe row where the tower has the head (`anchor_teacher_spec`). Raises `SettingsError` for a tower
    `anchor_slug` refuses, `ValueError` when the tower's weights do not fit the stock class."""
    import transformers

    vision = vlm.config.vision_config
    anchor_slug(vision)  # an unknown tower is named here, before any copy
    class_name = ANCHOR_TOWERS[vision.model_type][1]
    state = {k: v for k, v in _gathered_state(vlm.model.vision_tower).items() if not _is_mole_key(k)}
    model = getattr(transformers, class_name)(vision)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"student tower does not fit a stock {class_name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return Teacher(anchor_teacher_spec(vlm.config, image_mean, image_std), model)


def teacher_view_size(config, specs: list[TeacherSpec]) -> int:
    """Side of the one raw square view the collator gives every teacher: large enough for the largest input."""
    return max([spec.image_size for spec in specs] + [config.vision_config.image_size])


def teacher_cache_settings(
    config,
    image_processor,
    specs: list[TeacherSpec],
    grid: str,
    image_aspect: str,
    teacher_inputs: str = "views",
    **compression,
):
    """The `CacheSettings` a training run with this student, processor and data view reads its cache with;
    `movekd-hf cache-teachers --model` writes with the same, so the cache keys agree. `compression`: the
    `CacheSettings` compression fields (`compress`, `compression`, `compression_seed`, `calibration_images`,
    `token_dtype`) the cache was written with. `teacher_inputs`: "views" (each teacher's own view, what online
    training gives its teachers by default) or "square" (the one float view of `teacher_image_size`, what caches
    were written from before views existed). Every anchor caches: a CLIP anchor's CLS and CLS row, a SigLIP
    anchor's pooled output and probe row (`pooled`, `pool_attention` columns, distill/cache.py). A LLaVA-OneVision
    student caches its AnyRes tiles (`anyres_cache_settings`). Raises `SettingsError` for a OneVision student with
    `teacher_inputs="square"`."""
    view = {"teacher_image_size": teacher_view_size(config, specs)}
    if getattr(config, "image_grid_pinpoints", None) is not None:  # LLaVA-OneVision: a row per tile, not per image
        view = anyres_cache_settings(config, image_processor, specs, teacher_inputs)
    return CacheSettings(
        student_grid=student_grid(config.vision_config),
        grid=grid,
        image_aspect=image_aspect,
        background=mean_colour(image_processor),
        teacher_inputs=teacher_inputs,
        **view,
        **compression,
    )


def anyres_cache_settings(config, image_processor, specs: list[TeacherSpec], teacher_inputs: str) -> dict:
    """The `CacheSettings` fields of a LLaVA-OneVision student: its image processor's pinpoints and tile side, and
    the side the collator renders the teachers' tiles at (`anyres_tiles.tile_view_side` of every teacher's view,
    the anchor's included), as `teacher_image_size`. Raises `SettingsError` unless `teacher_inputs` is "views"."""
    if teacher_inputs != "views":
        raise SettingsError(
            "is set, but a LLaVA-OneVision student's teacher-feature cache holds each teacher's own view of every "
            "AnyRes tile, not one float square",
            field="teacher_image_size",
            expected="unset (each teacher's own view) for a cached LLaVA-OneVision run",
        )
    anchor = anchor_teacher_spec(config, image_processor.image_mean, image_processor.image_std)
    return {
        "image_grid_pinpoints": tuple(tuple(int(side) for side in p) for p in image_processor.image_grid_pinpoints),
        "tile_size": tile_size(image_processor),
        "teacher_image_size": tile_view_side(view_settings([anchor, *specs]).values()),
    }


def run_teacher_specs(
    teacher_set: str,
    pretrained: bool,
    checkpoints: Mapping[str, str],
    revisions: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> list[TeacherSpec]:
    """Specs of the non-anchor teachers of a set (its `clip` entry is the anchor, the student's own tower: left
    out here, built by `build_teachers`), then the `extra` teachers (slug -> Hub id or local folder, see
    `extra_teacher_specs`), with local checkpoints (slug -> path) and Hub revisions (slug -> branch, tag or
    commit) swapped in. Raises `SettingsError` naming `teacher_checkpoints` / `teacher_revisions` and the slugs
    the set lacks, or `extra_teachers` and what it cannot add."""
    specs = [spec for spec in teacher_specs(teacher_set, pretrained=pretrained) if spec.slug != ANCHOR]
    specs += extra_teacher_specs(extra or {}, [ANCHOR, *(spec.slug for spec in specs)], pretrained, revisions)
    options = {"checkpoint": ("teacher_checkpoints", checkpoints), "revision": ("teacher_revisions", revisions)}
    return override_specs(specs, options)


def extra_teacher_specs(
    sources: Mapping[str, str],
    taken: list[str],
    pretrained: bool = True,
    revisions: Mapping[str, str] | None = None,
    option: str = "extra_teachers",
) -> list[TeacherSpec]:
    """Teachers added to a set by id: for each slug -> source (a transformers or timm vision model's Hub id or
    local folder), `teacher_from_pretrained(source, slug=slug)`, its configs read at the slug's revision if
    `revisions` names one. Raises `SettingsError` naming `option` for a slug in `taken` (the set's own teachers
    and the anchor's name), and `InputError` naming it for a source that cannot be read."""
    clash = sorted(set(sources) & set(taken))
    if clash:
        raise SettingsError(
            f"names {clash}, already teachers of this set (or the anchor)", field=option, expected="new slugs"
        )
    specs = []
    for slug, source in sources.items():
        with loading(f"{option} {slug}", source):
            revision = (revisions or {}).get(slug)
            specs.append(teacher_from_pretrained(source, slug=slug, pretrained=pretrained, revision=revision))
    return specs


def override_specs(specs: list[TeacherSpec], options: Mapping[str, tuple]) -> list[TeacherSpec]:
    """`specs` with per-teacher `TeacherSpec` fields replaced: `options` maps a field name to (the option that
    sets it, {slug: value} or None). A slug not among `specs`, or a `checkpoint` or `revision` for a teacher built
    with random weights (the tiny sets' teachers, `pretrained=False`: nothing would be loaded), raises
    `SettingsError` naming the option."""
    slugs = sorted(spec.slug for spec in specs)
    random = {spec.slug for spec in specs if not spec.pretrained}
    for name, (option, values) in options.items():
        unknown = sorted(set(values or {}) - set(slugs))
        if unknown:
            raise SettingsError(f"names {unknown}, not teachers of this set", field=option, expected=f"one of {slugs}")
        unloaded = sorted(set(values or {}) & random) if name in ("checkpoint", "revision") else []
        if unloaded:
            raise SettingsError(
                f"names {unloaded}, built here with random weights (a tiny set, or random weights asked for), so "
                f"no {name} would be loaded",
                field=option,
                expected="teachers that load their weights (a set other than the tiny ones)",
            )
    return [
        replace(
            spec, **{name: values[spec.slug] for name, (_, values) in options.items() if spec.slug in (values or {})}
        )
        for spec in specs
    ]


def build_teachers(vlm: nn.Module, specs: list[TeacherSpec], image_mean=None, image_std=None) -> dict[str, Teacher]:
    """The anchor teacher (`anchor_slug` of the student's tower, copied from `vlm`, which must still hold its
    initial tower) plus one per spec. Raises `ValueError` when a spec takes the anchor's slug."""
    slug = anchor_slug(vlm.config.vision_config)
    if any(spec.slug in (ANCHOR, slug) for spec in specs):
        raise ValueError(f"no teacher may be named {slug!r} or {ANCHOR!r}: those name the student's own tower")
    with outside_zero3():
        teachers = {slug: anchor_teacher_from_student(vlm, image_mean, image_std)}
        for spec in specs:
            teachers[spec.slug] = build_teacher(spec)
    return teachers


def teacher_shapes(vlm: nn.Module, specs: list[TeacherSpec]) -> dict[str, TeacherShape]:
    """Token width and count of every teacher at its input size (non-anchor ones measured on the meta device)."""
    vision = vlm.config.vision_config
    height, width = student_grid(vision)
    # The anchor has a summary vector (CLS, or a SigLIP head's pooled output) unless its tower has neither.
    summary = bool(anchor_outputs(vision) & {"cls", "pooled"})
    shapes = {
        anchor_slug(vision): TeacherShape(dim=vision.hidden_size, num_tokens=height * width, has_summary=summary)
    }
    for spec in specs:
        with outside_zero3():
            _, (num_tokens, dim, has_summary) = meta_teacher_shape(spec)
        shapes[spec.slug] = TeacherShape(dim=dim, num_tokens=num_tokens, has_summary=bool(has_summary))
    return shapes
