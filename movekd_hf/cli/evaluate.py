"""`movekd-hf score` and `movekd-hf eval`. Heavy imports (torch, transformers) happen inside the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Default file names inside `--data` (the layout of LLaVA-1.5's playground/data/eval/<benchmark>/ folders).
DATA_LAYOUT: dict[str, tuple[tuple[str, ...], str]] = {
    "vqav2": (("v2_mscoco_val2014_annotations.json",), "val2014"),
    "gqa": (("testdev_balanced_questions.json",), "images"),
    "textvqa": (("TextVQA_0.5.1_val.json",), "train_images"),
    "vizwiz": (("val.json",), "val"),
    "pope": (("coco", "."), "val2014"),
    "scienceqa": (("problems.json",), "test"),
    "mme": (("MME_Benchmark_release_version",), "."),
    "mmbench": (("mmbench_dev_20230712.tsv", "mmbench_dev_en_20231003.tsv"), "."),
}
RESULTS_JSON = "results.json"  # read by hub_cards from RUN_DIR/eval/results.json
RESULTS_TABLE = "results.md"


def add_parser(subparsers: Any) -> None:
    score = subparsers.add_parser("score", help="score a LLaVA answers file; prints one JSON object")
    score.add_argument("--benchmark", required=True, help="vqav2, gqa, textvqa, vizwiz, pope, scienceqa, mme, mmbench")
    score.add_argument("--predictions", required=True, help="answers jsonl (LLaVA answers-file format)")
    score.add_argument("--annotations", required=True, help="the benchmark's annotation file or folder")
    score.add_argument("--questions", help="LLaVA question jsonl, to map its question ids to keys")
    score.set_defaults(func=run_score)

    evaluate = subparsers.add_parser("eval", help="generate answers with a model and score them")
    evaluate.add_argument("--model", required=True, help="model folder or Hub id (LLaVA-like)")
    evaluate.add_argument("--benchmark", required=True)
    evaluate.add_argument("--data", required=True, help="benchmark folder (LLaVA layout) or a saved datasets folder")
    evaluate.add_argument(
        "--out", required=True, help="output folder for answers and results (RUN_DIR/eval for the card)"
    )
    evaluate.add_argument("--annotations", help="override the annotation file inside --data")
    evaluate.add_argument("--images", help="override the image folder inside --data")
    evaluate.add_argument("--questions", help="LLaVA question jsonl whose prompts are used verbatim")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-new-tokens", type=int, default=128)
    evaluate.add_argument("--prompt-format", choices=("v1", "chat_template"), default="v1")
    evaluate.add_argument("--no-pad", action="store_true", help="do not pad images to square (LLaVA-1.5 pads)")
    evaluate.add_argument("--limit", type=int, help="only the first N samples (smoke runs)")
    evaluate.set_defaults(func=run_eval)


def run_score(args: argparse.Namespace) -> int:
    from movekd_hf.evaluation.readers import score_files

    metrics = score_files(args.benchmark, args.predictions, args.annotations, args.questions)
    print(json.dumps(metrics, sort_keys=True))
    return 0


def resolve_data(name: str, data: Path, annotations: str | None, images: str | None) -> tuple[Path, Path | None]:
    """Annotation path and image folder for `name` inside `data`, honouring explicit overrides."""
    if (data / "dataset_info.json").is_file() or (data / "dataset_dict.json").is_file():
        return data, None
    candidates, image_dir = DATA_LAYOUT[name]
    if annotations is None:
        found = [data / c for c in candidates if (data / c).exists()]
        if name == "pope":  # the folder that actually holds the coco_pope_*.json files
            found = [p for p in found if p.is_dir() and any(p.glob("coco_pope_*.json"))]
        if not found:
            raise ValueError(f"{name}: none of {list(candidates)} found in {data}; pass --annotations")
        annotations = str(found[0])
    return Path(annotations), Path(images) if images else data / image_dir


def card_metrics(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a model card shows: the paper's number first, then the other overall values (no per-split /
    per-category breakdowns, no counts)."""
    from movekd_hf.evaluation.benchmarks import HEADLINE_METRIC

    headline = HEADLINE_METRIC[name]
    rest = {k: v for k, v in metrics.items() if k != headline and "/" not in k and not k.startswith("num_")}
    return {headline: metrics[headline], **rest}


def write_results(out_dir: Path, name: str, metrics: dict[str, float], model: str) -> dict[str, dict[str, float]]:
    """Write `<name>.json` (every metric) and update the combined `results.json` (`{benchmark: {metric: value}}`,
    the run-dir contract the model card reads from `RUN_DIR/eval/`) and `results.md` (the paper's columns)."""
    from movekd_hf.evaluation.benchmarks import HEADLINE_METRIC, PAPER_COLUMNS

    headline = HEADLINE_METRIC[name]
    entry = {"benchmark": name, "metric": headline, "value": metrics[headline], "metrics": metrics, "model": model}
    (out_dir / f"{name}.json").write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    combined_path = out_dir / RESULTS_JSON
    combined = json.loads(combined_path.read_text()) if combined_path.is_file() else {}
    combined[name] = card_metrics(name, metrics)
    combined_path.write_text(json.dumps(combined, indent=2) + "\n")
    columns = [n for n in PAPER_COLUMNS if n in combined]
    values = [combined[n][HEADLINE_METRIC[n]] for n in columns]
    table = ["| model | " + " | ".join(PAPER_COLUMNS[n] for n in columns) + " |",
             "|---|" + "---|" * len(columns),
             f"| {model} | " + " | ".join(f"{v:.1f}" for v in values) + " |"]  # fmt: skip
    (out_dir / RESULTS_TABLE).write_text("\n".join(table) + "\n")
    return combined


def run_eval(args: argparse.Namespace) -> int:
    from movekd_hf.evaluation.benchmarks import canonical_name, read_predictions
    from movekd_hf.evaluation.readers import load_benchmark
    from movekd_hf.evaluation.runner import distributed_state, load_model_and_processor, run_generation

    name = canonical_name(args.benchmark)
    annotations, images = resolve_data(name, Path(args.data), args.annotations, args.images)
    benchmark = load_benchmark(name, annotations, images, args.questions)
    if args.limit is not None:
        keep = {s.key for s in benchmark.samples[: args.limit]}
        benchmark.samples = [s for s in benchmark.samples if s.key in keep]
        benchmark.truth = _restrict_truth(benchmark.truth, keep)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model_and_processor(args.model)
    state = distributed_state()
    model.to(state.device)
    answers = run_generation(model, processor, benchmark.samples, out_dir / f"{name}_answers.jsonl",
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             prompt_format=args.prompt_format, pad_images=not args.no_pad,
                             model_id=Path(args.model).name)  # fmt: skip
    if state.is_main_process:
        metrics = benchmark.score(read_predictions(answers, name, benchmark.samples))
        write_results(out_dir, name, metrics, str(args.model))
        print(json.dumps(metrics, sort_keys=True))
    return 0


def _restrict_truth(truth: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """Ground truth limited to the kept keys (for `--limit`)."""
    return {field: {k: v for k, v in value.items() if k in keep} if isinstance(value, dict) else value
            for field, value in truth.items()}  # fmt: skip
