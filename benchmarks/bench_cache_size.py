"""Benchmark: what a compressed teacher cache saves and what it costs, side by side in one run.

1. Size (arithmetic, no weights): bytes per image and the LLaVA-Pretrain total (558,128 images) for the v1.1
   teachers at their real shapes (meta-device forward, `estimate_cache_size`), per storage setting.
2. Fidelity and KD loss (measured): the demo's three small teachers (`movekd_hf.demo.teachers`: CLIP ViT 64 ch,
   ConvNeXt 72 ch, SAM encoder 40 ch) write real caches with each setting; on held-out images (not in the PCA
   calibration set) the features read back are compared with the uncompressed float16 cache (relative MSE,
   mean per-token cosine), and the package's KD loss (`MoVEKDDistiller`, resample adapters) is computed on the
   same student tokens from both. Twice: with random weights (features without low-rank structure: PCA has
   nothing to find) and after the demo's short supervised pretraining (features with a decaying spectrum, as
   trained teachers have). The ranks mirror v1.1's ratios: ConvNeXt 72 -> 6 (ConvNeXt-XXL 3072 -> 256, 12x),
   SAM 40 -> 10 (standing in for EVA-02-L 1024 -> 256, 4x); the anchor clip is never projected.

    .venv/bin/python benchmarks/bench_cache_size.py [--quick] [--teacher-steps 150]
"""

from __future__ import annotations

import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, write_result  # noqa: E402

from movekd_hf.distill import KDLossConfig, MoVEKDDistiller, TeacherShape, build_teacher  # noqa: E402
from movekd_hf.distill.cache import CachedTeachers, CacheSettings, estimate_cache_size  # noqa: E402
from movekd_hf.distill.cache_writer import CacheItem, cache_teacher_features, calibration_items  # noqa: E402
from movekd_hf.distill.presets import teacher_specs  # noqa: E402

LLAVA_PRETRAIN_IMAGES = 558_128
V11_RANKS = {"eva": 256, "convnext": 256}
DEMO_RANKS = {"convnext": 6, "sam": 10}

# name -> CacheSettings fields on top of the base (ranks filled in per teacher set).
SETTINGS = {
    "uncompressed, float16": dict(),
    "random-k, float16": dict(compression="random"),
    "PCA-k, float16": dict(compression="pca"),
    "PCA-k, int8": dict(compression="pca", token_dtype="int8"),
    "PCA-k, float8 e4m3": dict(compression="pca", token_dtype="float8_e4m3fn"),
    "uncompressed, int8": dict(token_dtype="int8"),
}


def with_ranks(fields: dict, ranks: dict) -> dict:
    return {**fields, "compress": ranks} if "compression" in fields else fields


def size_rows() -> list[dict]:
    specs = teacher_specs("v1.1", pretrained=False)
    rows = []
    for name, fields in SETTINGS.items():
        estimate = estimate_cache_size(specs, CacheSettings(**with_ranks(fields, V11_RANKS)), LLAVA_PRETRAIN_IMAGES)
        per = {slug: t["bytes_per_image"] for slug, t in estimate["teachers"].items()}
        rows.append({"setting": name, **{f"{s} B/img": v for s, v in per.items()},
                     "MB per image": estimate["bytes_per_image"] / 1e6, "LLaVA-Pretrain TB": estimate["total_bytes"] / 1e12})  # fmt: skip
    return rows


def demo_images(folder: Path, count: int, seed: int) -> list[CacheItem]:
    from movekd_hf.demo import world

    rng, items = random.Random(seed), []
    for index in range(count):
        path = folder / f"scene-{index:04d}.png"
        world.render_scene(world.sample_scene(rng)).save(path)
        items.append(CacheItem(f"scene-{index:04d}", 0, {"path": str(path), "bytes": None}, path.name))
    return items


def demo_teachers(pretrain_steps: int, folder: Path, seed: int) -> dict:
    from movekd_hf.demo import world
    from movekd_hf.demo.teachers import DEMO_TEACHERS, load_teachers, pretrain_teachers

    if pretrain_steps == 0:
        torch.manual_seed(seed)
        return {slug: build_teacher(spec) for slug, spec in DEMO_TEACHERS.items()}
    rng = random.Random(seed + 1)
    train_scenes = [world.sample_scene(rng) for _ in range(400)]
    test_scenes = [world.sample_scene(rng) for _ in range(100)]
    train = (world.scene_tensor(train_scenes), train_scenes)
    test = (world.scene_tensor(test_scenes), test_scenes)
    specs, reports = pretrain_teachers(str(folder), train, test, pretrain_steps, seed=seed)
    print({slug: round(r["test_accuracy"], 3) for slug, r in reports.items()}, flush=True)
    return load_teachers(specs)


def fidelity(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    rel = float((got - want).square().sum() / want.square().sum())
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=-1).mean())
    return {"rel_mse": rel, "cosine": cosine}


def measure(teachers: dict, items: list[CacheItem], calibration: int, folder: Path) -> list[dict]:
    base = CacheSettings(student_grid=(4, 4), grid="native", teacher_image_size=96, calibration_images=calibration)
    held_out_ids = {it.sample_id for it in items} - {it.sample_id for it in calibration_items(items, base)}
    held_out = {"sample_ids": sorted(held_out_ids)}
    specs, outputs = [t.spec for t in teachers.values()], {}
    for name, fields in SETTINGS.items():
        settings = replace(base, **with_ranks(fields, DEMO_RANKS))
        root = folder / name.replace(" ", "").replace(",", "_")
        cache_teacher_features(root, list(teachers.values()), settings, items, batch_size=16, progress=False)
        outputs[name] = CachedTeachers(root, specs, settings)(held_out)
    reference = outputs["uncompressed, float16"]
    shapes = {slug: TeacherShape(out.tokens.shape[-1], out.tokens.shape[1]) for slug, out in reference.items()}
    torch.manual_seed(0)
    kd = MoVEKDDistiller(shapes, 64, 16, KDLossConfig(adapter="resample")).eval()
    # The student starts as the clip teacher: its tokens plus a perturbation, as early in training.
    clip = reference["clip"].tokens
    student = clip + 0.3 * clip.std() * torch.randn(clip.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = kd(student, (4, 4), reference)
        rows = []
        for name, out in outputs.items():
            got = kd(student, (4, 4), out)
            row = {"setting": name}
            for slug in reference:
                f = fidelity(out[slug].tokens, reference[slug].tokens)
                row[f"{slug} rel MSE"], row[f"{slug} cos"] = f["rel_mse"], f["cosine"]
            row["KD loss"] = float(got["loss"])
            row["KD rel diff"] = float((got["loss"] - want["loss"]).abs() / want["loss"])
            rows.append(row)
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images cached per setting (default 128)")
    parser.add_argument("--calibration", type=int, default=64, help="PCA calibration images among them (64)")
    parser.add_argument("--teacher-steps", type=int, default=150, help="demo pretraining steps (its default, 150)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.calibration, args.teacher_steps = 24, 12, 3
    sizes = size_rows()
    size_columns = list(sizes[0])
    print(format_table(sizes, size_columns), flush=True)
    result = {"size": sizes, "images": args.images, "calibration": args.calibration, "fidelity": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        items = demo_images(tmp / "images", args.images, seed=7)
        for family, steps in (("random weights", 0), (f"pretrained {args.teacher_steps} steps", args.teacher_steps)):
            teachers = demo_teachers(steps, tmp / f"teachers-{steps}", seed=0)
            rows = measure(teachers, items, args.calibration, tmp / f"caches-{steps}")
            result["fidelity"][family] = rows
            print(f"\n{family} (held-out images: {args.images - args.calibration})")
            print(format_table(rows, list(rows[0])), flush=True)
    print(write_result("cache_size", result, args.out, args.quick))


if __name__ == "__main__":
    main()
