"""`movekd-hf cache-teachers`: run the teachers once over a dataset and store their features (distill/cache.py),
or with `--estimate` print what such a cache costs per image and in total. Heavy imports stay inside `run`."""

from __future__ import annotations

import argparse
import json

from movekd_hf.cli.model import TEACHER_SETS, positive_int


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """["eva=512", ...] -> {"eva": "512"}; a malformed entry raises `SettingsError` naming `option`."""
    from movekd_hf.errors import SettingsError

    pairs = {}
    for value in values or []:
        slug, sep, setting = value.partition("=")
        if not sep or not slug or not setting:
            raise SettingsError(f"malformed entry {value!r}", field=option, expected="SLUG=VALUE, e.g. eva=512")
        pairs[slug] = setting
    return pairs


def _grid(value: str) -> tuple[int, int]:
    """argparse type: "24" or "24x24" -> (24, 24)."""
    height, _, width = value.lower().partition("x")
    try:
        grid = int(height), int(width or height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or H (e.g. 24x24 or 24), got {value!r}") from None
    if min(grid) < 1:
        raise argparse.ArgumentTypeError(f"expected a grid of at least 1x1, got {value!r}")
    return grid


def _colour(value: str) -> tuple[int, int, int]:
    """argparse type: "R,G,B" with 0..255 each -> (R, G, B)."""
    try:
        colour = tuple(int(c) for c in value.split(","))
    except ValueError:
        colour = ()
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise argparse.ArgumentTypeError(f"expected R,G,B with each in 0..255 (e.g. 122,116,104), got {value!r}")
    return colour


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache-teachers",
        help="store the teachers' features for a dataset (or --estimate the cache size)",
        description=__doc__,
    )
    parser.add_argument("--data-path", help="LLaVA .json/.jsonl, a save_to_disk folder or a local dataset folder")
    parser.add_argument("--image-folder", default=None, help="folder the data file's image paths are relative to")
    parser.add_argument(
        "--allow-images-outside-folder",
        action="store_true",
        help="accept image paths that leave --image-folder (`../x.png`, absolute paths); refused by default",
    )
    parser.add_argument("--cache-dir", help="root folder; each teacher gets <slug>-<hash12>/ inside it")
    parser.add_argument(
        "--teacher-set",
        default="v1.1",
        choices=TEACHER_SETS,
        help="a teacher set: v1.0 or v1.1 (the paper's; default v1.1), modern, modern-2, or a tiny one (random, "
        "CPU-sized)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the student checkpoint training starts from: teachers, grid and view then follow the trainer's rules "
        "(the clip teacher is the student's own tower), so `teacher_source: cached` finds this cache",
    )
    parser.add_argument("--seed", type=int, default=42, help="with --model: the training seed (random teachers)")
    parser.add_argument("--teachers-json", default=None, help="a JSON list of TeacherSpec fields instead")
    parser.add_argument(
        "--sam-layout",
        default="grid",
        choices=("grid", "faithful"),
        help="grid: SAM's true 64x64 grid (default); faithful: the authors' reshape (METHOD.md section 6)",
    )
    parser.add_argument("--random-weights", action="store_true", help="build teachers without weights (tests)")
    parser.add_argument("--checkpoint", action="append", metavar="SLUG=PATH", help="local weights for a teacher")
    parser.add_argument(
        "--extra-teacher",
        action="append",
        metavar="SLUG=ID",
        help="a teacher added to the set: a transformers or timm vision model's Hub id or local folder "
        "(as training's `extra_teachers`)",
    )
    parser.add_argument(
        "--revision",
        action="append",
        metavar="SLUG=REV",
        help="Hub revision of a teacher's weights (loaded, and keyed)",
    )
    parser.add_argument(
        "--grid",
        default=None,
        choices=("student", "native"),
        help="student: tokens resampled to the student's grid (smaller; only for adapter='resample'); native: the "
        "teacher's own grid (what the default and faithful token_mix adapters need). Default: native with --model "
        "(training's teacher_cache_grid default), else student",
    )
    parser.add_argument("--student-grid", default="24", type=_grid, help="HxW or H (default 24, CLIP-L/336's)")
    parser.add_argument(
        "--teacher-image-size",
        type=positive_int,
        default=None,
        help="teachers run on one float square of this size, as training with `teacher_image_size` set (default: "
        "each teacher's own view, as training by default)",
    )
    parser.add_argument(
        "--image-aspect",
        default="pad",
        choices=("pad", "resize"),
        help="pad: pad to a square with --background first, as LLaVA-1.5 (default); resize: no padding",
    )
    parser.add_argument("--background", default=None, type=_colour, help="R,G,B padding colour (default: CLIP mean)")
    parser.add_argument("--compress", action="append", metavar="SLUG=K", help="keep K channels (see --compression)")
    parser.add_argument(
        "--compression",
        default="random",
        choices=("random", "pca"),
        help="--compress by a seeded random orthogonal projection (default) or a PCA basis fitted on a calibration pass",
    )
    parser.add_argument(
        "--calibration-images", type=positive_int, default=256, help="images the PCA basis is fitted on (default 256)"
    )
    parser.add_argument(
        "--compression-seed", type=int, default=0, help="seed of the random projections / the calibration pick"
    )
    parser.add_argument(
        "--token-dtype",
        default="float16",
        choices=("float16", "int8", "float8_e4m3fn"),
        help="number format of the stored tokens; int8 and float8_e4m3fn keep a float32 scale per token",
    )
    parser.add_argument(
        "--export-repo",
        default=None,
        metavar="FOLDER",
        help="then write the cache as a `datasets` repository (parquet shards + README) in FOLDER",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per teacher forward (default 8)")
    parser.add_argument(
        "--shard-size", type=positive_int, default=1024, help="rows per Arrow shard (the resume unit; default 1024)"
    )
    parser.add_argument("--device", default="cpu", help="torch device the teachers run on (default cpu)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the teachers run in (default float32)",
    )
    parser.add_argument("--estimate", action="store_true", help="print bytes per image and the total, then stop")
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        help="images for --estimate (default: those of --data-path when given, else 558,000: LLaVA-Pretrain)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _read_teachers_json(path: str) -> list:
    """`--teachers-json`: a JSON list of `TeacherSpec` fields -> specs; any fault is a `SettingsError` naming the
    file and the entry."""
    from movekd_hf.cli import existing_path
    from movekd_hf.distill.teachers import TeacherSpec
    from movekd_hf.errors import SettingsError

    existing_path("--teachers-json", path, "file")
    with open(path, encoding="utf-8") as handle:
        try:
            entries = json.load(handle)
        except json.JSONDecodeError as error:
            raise SettingsError(f"is not valid JSON: {error.msg}", file=path, line=error.lineno) from None
    expected = "a JSON list of objects of TeacherSpec fields"
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise SettingsError("is not a list of objects", file=path, field="--teachers-json", expected=expected)
    specs = []
    for index, entry in enumerate(entries):
        fields = {k: tuple(v) if k in ("mean", "std") else v for k, v in entry.items()}
        try:
            specs.append(TeacherSpec(**fields))
        except (TypeError, ValueError) as error:  # an unknown or missing field; a value out of its domain
            sample = f"entry {index} ({entry.get('slug', '?')})"
            raise SettingsError(str(error), file=path, sample=sample, expected=expected) from None
    return specs


def _specs(args: argparse.Namespace) -> list:
    from movekd_hf.distill.presets import teacher_specs

    if args.teachers_json:
        specs = _read_teachers_json(args.teachers_json)
    else:
        specs = teacher_specs(args.teacher_set, pretrained=not args.random_weights, sam_layout=args.sam_layout)
    specs += _extra_teachers(args, [spec.slug for spec in specs])
    return _with_weights_options(specs, args)


def _extra_teachers(args: argparse.Namespace, taken: list[str]) -> list:
    """`--extra-teacher SLUG=ID` as specs (`extra_teacher_specs`, as training reads `extra_teachers`)."""
    from movekd_hf.training.teacher_source import extra_teacher_specs

    sources = _pairs(args.extra_teacher, "--extra-teacher")
    revisions = _pairs(args.revision, "--revision")
    return extra_teacher_specs(sources, taken, not args.random_weights, revisions, option="--extra-teacher")


def _run_specs(args: argparse.Namespace) -> list:
    """The non-anchor specs training builds for `--teacher-set` (`run_teacher_specs`), then the `--extra-teacher`
    ones, with `--checkpoint` and `--revision` applied: what `--model` runs key their cache with."""
    from movekd_hf.distill.anchor import ANCHOR
    from movekd_hf.training.teacher_source import run_teacher_specs

    specs = run_teacher_specs(args.teacher_set, not args.random_weights, {})
    return _with_weights_options(specs + _extra_teachers(args, [ANCHOR, *(spec.slug for spec in specs)]), args)


def _with_weights_options(specs: list, args: argparse.Namespace) -> list:
    """`specs` with `--checkpoint SLUG=PATH` and `--revision SLUG=REV` applied (a `SettingsError` names an option
    that names a teacher `specs` lack)."""
    from movekd_hf.training.teacher_source import override_specs

    options = {"checkpoint": ("--checkpoint", _pairs(args.checkpoint, "--checkpoint")),
               "revision": ("--revision", _pairs(args.revision, "--revision"))}  # fmt: skip
    return override_specs(specs, options)


def _compress(args: argparse.Namespace) -> dict[str, int]:
    """`--compress SLUG=K` -> {slug: K}, K an integer >= 1."""
    from movekd_hf.errors import SettingsError

    compress = {}
    for slug, text in _pairs(args.compress, "--compress").items():
        if not text.isdigit() or int(text) < 1:
            raise SettingsError(f"{slug}={text}", field="--compress", expected="SLUG=K with K an integer >= 1")
        compress[slug] = int(text)
    return compress


def _settings(args: argparse.Namespace, specs: list):
    from movekd_hf.distill.cache import CacheSettings
    from movekd_hf.modeling.llava_conventions import CLIP_MEAN_COLOUR

    return CacheSettings(
        student_grid=args.student_grid,
        grid=args.grid,
        teacher_image_size=args.teacher_image_size or max(s.image_size for s in specs),
        # a view size asked for means the one float square of before; else each teacher's own view (as training)
        teacher_inputs="square" if args.teacher_image_size else "views",
        image_aspect=args.image_aspect,
        # The default is what the collator pads with for a CLIP processor.
        background=args.background or CLIP_MEAN_COLOUR,
        **_compression(args),
    )


def _compression(args: argparse.Namespace) -> dict:
    """The CacheSettings fields of the compression options."""
    return dict(
        compress=_compress(args),
        compression_seed=args.compression_seed,
        compression=args.compression,
        calibration_images=args.calibration_images,
        token_dtype=args.token_dtype,
    )


def _build(spec):
    """`build_teacher(spec)`, its weights' source named in the error if they cannot be loaded (offline, missing)."""
    from movekd_hf.cli import loading
    from movekd_hf.distill.teachers import build_teacher

    if not spec.pretrained:
        return build_teacher(spec)
    source = spec.checkpoint or spec.model_id
    with loading(f"--checkpoint {spec.slug}" if spec.checkpoint else f"teacher {spec.slug}", source):
        return build_teacher(spec)


def _teachers_like_training(args: argparse.Namespace):
    """Teachers and cache settings exactly as `movekd_hf.train` builds them for a run starting from `--model`:
    `training.teacher_source.build_teachers`, one teacher at a time so a failing one is named."""
    import torch
    from transformers import AutoProcessor

    from movekd_hf.cli import loading
    from movekd_hf.models import checkpoint_classes
    from movekd_hf.training.teacher_source import build_teachers

    with loading("--model", args.model):
        vlm = checkpoint_classes(args.model)[0].from_pretrained(args.model)
        image_processor = AutoProcessor.from_pretrained(args.model).image_processor
    specs = _run_specs(args)
    torch.manual_seed(args.seed)  # the trainer seeds before building its teachers, in this order
    # build_teachers with no specs builds the anchor alone; the others follow in the same order, as it would.
    teachers = build_teachers(vlm, [], image_processor.image_mean, image_processor.image_std)
    teachers.update({spec.slug: _build(spec) for spec in specs})
    return list(teachers.values()), _settings_like_training(args, vlm.config, image_processor, specs)


def _specs_like_training(args: argparse.Namespace):
    """The specs and cache settings of `_teachers_like_training` without loading any weights (`--estimate`): the
    student's config alone, and its anchor's spec sized from it so a meta-device pass can shape its output."""
    from transformers import AutoProcessor

    from movekd_hf.cli import loading
    from movekd_hf.distill.anchor import anchor_teacher_spec
    from movekd_hf.models import checkpoint_classes

    with loading("--model", args.model):
        config = checkpoint_classes(args.model)[0].config_class.from_pretrained(args.model)
        image_processor = AutoProcessor.from_pretrained(args.model).image_processor
    specs = _run_specs(args)
    anchor = anchor_teacher_spec(config, image_processor.image_mean, image_processor.image_std, sized=True)
    return [anchor, *specs], _settings_like_training(args, config, image_processor, specs)


def _settings_like_training(args: argparse.Namespace, config, image_processor, specs: list):
    """`teacher_cache_settings` as training computes them for this student, with the compression options."""
    from dataclasses import replace

    from movekd_hf.training.teacher_source import teacher_cache_settings

    inputs = "square" if args.teacher_image_size else "views"  # as training with / without `teacher_image_size`
    settings = teacher_cache_settings(config, image_processor, specs, args.grid, args.image_aspect, inputs)
    return replace(settings, **_compression(args))


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return str(size)


def print_estimate(estimate: dict) -> None:
    unit = "tile" if estimate["rows_per_image"] > 1 else "image"  # AnyRes: a row per tile
    print(f"| teacher | stored tokens x channels | teacher tokens x channels | bytes per {unit} |")
    print("|---|---|---|---|")
    for slug, t in estimate["teachers"].items():
        print(
            f"| {slug} | {t['tokens']} x {t['channels']} ({t['grid'][0]}x{t['grid'][1]}) | "
            f"{t['teacher_tokens']} x {t['teacher_channels']} | {t['bytes_per_image']:,} ({_human(t['bytes_per_image'])}) |"
        )
    print(f"| all | | | {estimate['bytes_per_image']:,} ({_human(estimate['bytes_per_image'])}) |")
    if estimate["rows_per_image"] > 1:
        print(
            f"AnyRes: a row per tile, up to {estimate['rows_per_image']} per image (base view and grid tiles of an "
            "image alone in its sample); the total assumes the most for every image"
        )
    print(
        f"total for {estimate['num_images']:,} images: {estimate['total_bytes']:,} bytes ({_human(estimate['total_bytes'])})"
    )


def run(args: argparse.Namespace) -> int:
    from movekd_hf.cli import existing_path, model_source
    from movekd_hf.errors import SettingsError

    if not args.estimate:  # local inputs first: a typo fails before any teacher is built
        if not args.data_path or not args.cache_dir:
            missing = " and ".join(
                o for o, v in (("--data-path", args.data_path), ("--cache-dir", args.cache_dir)) if not v
            )
            raise SettingsError(f"{missing} not given", field=missing.split()[0],
                                expected="--data-path and --cache-dir, or --estimate")  # fmt: skip
    existing_path("--data-path", args.data_path)
    existing_path("--image-folder", args.image_folder, "folder")
    if args.model:
        model_source("--model", args.model)
    if args.grid is None:  # with --model, what training reads by default (teacher_cache_grid: native)
        args.grid = "native" if args.model else "student"
    import torch

    from movekd_hf.distill.cache import estimate_cache_size
    from movekd_hf.distill.cache_writer import cache_teacher_features, dataset_items, export_cache_repo

    if args.model and args.estimate:
        specs, settings = _specs_like_training(args)
    elif args.model:
        teachers, settings = _teachers_like_training(args)
        specs = [teacher.spec for teacher in teachers]
    else:
        specs = _specs(args)
        settings = _settings(args, specs)
    from movekd_hf.training.data import load_source

    items = None
    if args.data_path and (not args.estimate or args.num_images is None):
        items = dataset_items(load_source(args.data_path, args.image_folder, args.allow_images_outside_folder))
    if args.estimate:
        num_images = args.num_images or (len(items) if items is not None else 558_000)
        print_estimate(estimate_cache_size(specs, settings, num_images))
        return 0
    dtype = getattr(torch, args.dtype)
    if not args.model:
        teachers = [_build(spec) for spec in specs]
    teachers = [teacher.to(device=args.device, dtype=dtype) for teacher in teachers]
    report = cache_teacher_features(
        args.cache_dir, teachers, settings, items, args.batch_size, args.shard_size, progress=not args.no_progress
    )
    if args.export_repo:
        specs = [teacher.spec for teacher in teachers]
        report["export_repo"] = {"folder": args.export_repo, **export_cache_repo(args.cache_dir, specs, settings,
                                 args.export_repo, args.shard_size)}  # fmt: skip
    print(json.dumps(report, indent=1))
    return 0
