"""`movekd-hf cache-teachers`: run the teachers once over a dataset and store their features (distill/cache.py),
or with `--estimate` print what such a cache costs per image and in total. Heavy imports stay inside `run`."""

from __future__ import annotations

import argparse
import json


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """["eva=512", ...] -> {"eva": "512"}."""
    pairs = {}
    for value in values or []:
        slug, sep, setting = value.partition("=")
        if not sep or not slug or not setting:
            raise ValueError(f"{option} expects SLUG=VALUE, got {value!r}")
        pairs[slug] = setting
    return pairs


def _grid(value: str) -> tuple[int, int]:
    height, _, width = value.lower().partition("x")
    return int(height), int(width or height)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache-teachers",
        help="store the teachers' features for a dataset (or --estimate the cache size)",
        description=__doc__,
    )
    parser.add_argument("--data-path", help="LLaVA .json/.jsonl, a save_to_disk folder or a local dataset folder")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--cache-dir", help="root folder; each teacher gets <slug>-<hash12>/ inside it")
    parser.add_argument(
        "--teacher-set", default="v1.1", help="v1.0 or v1.1 (the paper's), or tiny (random, CPU-sized)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the student checkpoint training starts from: teachers, grid and view then follow the trainer's rules "
        "(the clip teacher is the student's own tower), so `teacher_source: cached` finds this cache",
    )
    parser.add_argument("--seed", type=int, default=42, help="with --model: the training seed (random teachers)")
    parser.add_argument("--teachers-json", default=None, help="a JSON list of TeacherSpec fields instead")
    parser.add_argument("--sam-layout", default="grid", choices=("grid", "faithful"))
    parser.add_argument("--random-weights", action="store_true", help="build teachers without weights (tests)")
    parser.add_argument("--checkpoint", action="append", metavar="SLUG=PATH", help="local weights for a teacher")
    parser.add_argument("--revision", action="append", metavar="SLUG=REV", help="weights revision, part of the key")
    parser.add_argument("--grid", default="student", choices=("student", "native"))
    parser.add_argument("--student-grid", default="24", type=_grid, help="HxW or H (24 for CLIP-L/336)")
    parser.add_argument("--teacher-image-size", type=int, default=None, help="default: the largest teacher input")
    parser.add_argument("--image-aspect", default="pad", choices=("pad", "resize"))
    parser.add_argument("--background", default=None, help="R,G,B padding colour (default: CLIP mean)")
    parser.add_argument("--compress", action="append", metavar="SLUG=K", help="keep K channels (random projection)")
    parser.add_argument("--compression-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per Arrow shard (the resume unit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--estimate", action="store_true", help="print bytes per image and the total, then stop")
    parser.add_argument("--num-images", type=int, default=558_000, help="images for --estimate (558k: stage 1)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def _specs(args: argparse.Namespace) -> list:
    from dataclasses import replace

    from movekd_hf.distill.presets import teacher_specs
    from movekd_hf.distill.teachers import TeacherSpec

    if args.teachers_json:
        with open(args.teachers_json, encoding="utf-8") as handle:
            specs = [
                TeacherSpec(**{k: tuple(v) if k in ("mean", "std") else v for k, v in d.items()})
                for d in json.load(handle)
            ]
    else:
        specs = teacher_specs(args.teacher_set, pretrained=not args.random_weights, sam_layout=args.sam_layout)
    checkpoints = _pairs(args.checkpoint, "--checkpoint")
    unknown = set(checkpoints) - {s.slug for s in specs}
    if unknown:
        raise ValueError(f"--checkpoint names teachers {sorted(unknown)} not in the set {[s.slug for s in specs]}")
    return [replace(s, checkpoint=checkpoints[s.slug]) if s.slug in checkpoints else s for s in specs]


def _settings(args: argparse.Namespace, specs: list):
    from movekd_hf.distill.cache import CacheSettings
    from movekd_hf.modeling.llava_conventions import CLIP_MEAN_COLOUR

    # The default is what the collator pads with for a CLIP processor.
    background = tuple(int(c) for c in args.background.split(",")) if args.background else CLIP_MEAN_COLOUR
    return CacheSettings(
        student_grid=args.student_grid,
        grid=args.grid,
        teacher_image_size=args.teacher_image_size or max(s.image_size for s in specs),
        image_aspect=args.image_aspect,
        background=background,
        compress={slug: int(k) for slug, k in _pairs(args.compress, "--compress").items()},
        compression_seed=args.compression_seed,
        revisions=_pairs(args.revision, "--revision"),
    )


def _teachers_like_training(args: argparse.Namespace):
    """Teachers and cache settings exactly as `movekd_hf.train` builds them for a run starting from `--model`."""
    from dataclasses import replace

    import torch
    from transformers import AutoProcessor

    from movekd_hf.modeling import MoVEKDForConditionalGeneration
    from movekd_hf.training.teacher_source import build_teachers, run_teacher_specs, teacher_cache_settings

    vlm = MoVEKDForConditionalGeneration.from_pretrained(args.model)
    image_processor = AutoProcessor.from_pretrained(args.model).image_processor
    specs = run_teacher_specs(args.teacher_set, not args.random_weights, _pairs(args.checkpoint, "--checkpoint"))
    torch.manual_seed(args.seed)  # the trainer seeds before building its teachers, in this order
    teachers = build_teachers(vlm, specs, image_processor.image_mean, image_processor.image_std)
    settings = teacher_cache_settings(vlm.config, image_processor, specs, args.grid, args.image_aspect)
    compress = {slug: int(k) for slug, k in _pairs(args.compress, "--compress").items()}
    settings = replace(settings, compress=compress, compression_seed=args.compression_seed)
    return list(teachers.values()), settings


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return str(size)


def print_estimate(estimate: dict) -> None:
    print("| teacher | stored tokens x channels | teacher tokens x channels | bytes per image |")
    print("|---|---|---|---|")
    for slug, t in estimate["teachers"].items():
        print(
            f"| {slug} | {t['tokens']} x {t['channels']} ({t['grid'][0]}x{t['grid'][1]}) | "
            f"{t['teacher_tokens']} x {t['teacher_channels']} | {t['bytes_per_image']:,} ({_human(t['bytes_per_image'])}) |"
        )
    print(f"| all | | | {estimate['bytes_per_image']:,} ({_human(estimate['bytes_per_image'])}) |")
    print(
        f"total for {estimate['num_images']:,} images: {estimate['total_bytes']:,} bytes ({_human(estimate['total_bytes'])})"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from movekd_hf.distill.cache import estimate_cache_size
    from movekd_hf.distill.cache_writer import cache_teacher_features, dataset_items
    from movekd_hf.distill.teachers import build_teacher

    if args.model:
        teachers, settings = _teachers_like_training(args)
        specs = [teacher.spec for teacher in teachers]
    else:
        specs = _specs(args)
        settings = _settings(args, specs)
    if args.estimate:
        print_estimate(estimate_cache_size(specs, settings, args.num_images))
        return 0
    if not args.data_path or not args.cache_dir:
        raise ValueError("cache-teachers needs --data-path and --cache-dir (or --estimate)")
    from movekd_hf.training.data import load_source

    items = dataset_items(load_source(args.data_path, args.image_folder))
    dtype = getattr(torch, args.dtype)
    if not args.model:
        teachers = [build_teacher(spec) for spec in specs]
    teachers = [teacher.to(device=args.device, dtype=dtype) for teacher in teachers]
    report = cache_teacher_features(
        args.cache_dir, teachers, settings, items, args.batch_size, args.shard_size, progress=not args.no_progress
    )
    print(json.dumps(report, indent=1))
    return 0
