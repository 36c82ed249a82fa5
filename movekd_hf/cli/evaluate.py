"""`movekd-hf score`, `movekd-hf eval` and `movekd-hf submission`. Heavy imports (torch, transformers) happen inside
the commands. Each prints one JSON object on stdout (metrics, the answers file's counts, and how the number
relates to the paper's column) and a small table on stderr. docs/DATA.md describes the `--data` folders."""

from __future__ import annotations

import argparse
import json
import sys
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
# LLaVA question files used by default when `--data` holds them: TextVQA's carries the OCR tokens the paper's
# column was measured with; POPE's gives LLaVA's prompts and split-unique question ids.
DEFAULT_QUESTIONS: dict[str, str] = {"textvqa": "llava_textvqa_val_v051_ocr.jsonl", "pope": "llava_pope_test.jsonl"}
# `eval --server`: (question file answered, question file the server wants every id of, image folder) inside --data.
SERVER_LAYOUT: dict[str, tuple[str, str, str]] = {
    "vqav2": ("llava_vqav2_mscoco_test-dev2015.jsonl", "llava_vqav2_mscoco_test2015.jsonl", "test2015"),
    "vizwiz": ("llava_test.jsonl", "llava_test.jsonl", "test"),
}
RESULTS_JSON = "results.json"  # read by hub_cards from RUN_DIR/eval/results.json
RESULTS_TABLE = "results.md"


def add_parser(subparsers: Any) -> None:
    score = subparsers.add_parser("score", help="score a LLaVA answers file; prints one JSON object")
    score.add_argument("--benchmark", required=True, help="vqav2, gqa, textvqa, vizwiz, pope, scienceqa, mme, mmbench")
    score.add_argument("--predictions", required=True, help="answers jsonl (LLaVA answers-file format)")
    score.add_argument("--annotations", required=True, help="the benchmark's annotation file or folder")
    score.add_argument("--questions", help="LLaVA question jsonl, to map its question ids to keys")
    score.add_argument("--allow-partial", action="store_true", help=PARTIAL_HELP)
    score.set_defaults(func=run_score)

    submission = subparsers.add_parser("submission", help="write the file a benchmark's server scores (VQAv2 "
                                       "test-dev, VizWiz test: EvalAI JSON; MMBench dev: upload sheet)")  # fmt: skip
    submission.add_argument("--benchmark", required=True, help="vqav2, vizwiz or mmbench")
    submission.add_argument("--predictions", required=True, help="answers jsonl (LLaVA answers-file format)")
    submission.add_argument("--questions", required=True, help="VQAv2: llava_vqav2_mscoco_test2015.jsonl (all "
                            "test ids); VizWiz: llava_test.jsonl; MMBench: mmbench_dev_20230712.tsv")  # fmt: skip
    submission.add_argument("--out", required=True, help="submission file to write (.json; MMBench: .tsv)")
    submission.add_argument("--allow-partial", action="store_true", help=PARTIAL_HELP)
    submission.set_defaults(func=run_submission)

    evaluate = subparsers.add_parser("eval", help="generate answers with a model and score them")
    evaluate.add_argument("--model", required=True, help="model folder or Hub id (LLaVA-like)")
    evaluate.add_argument(
        "--benchmark",
        required=True,
        metavar="NAME",
        help="one of vqav2, gqa, textvqa, vizwiz, pope, scienceqa, mme, mmbench (case-insensitive; the paper's "
        "column names such as SQA-IMG or MMB also work)",
    )
    evaluate.add_argument("--data", required=True, help="benchmark folder (LLaVA layout) or a saved datasets folder")
    evaluate.add_argument(
        "--out", required=True, help="output folder for answers and results (RUN_DIR/eval for the card)"
    )
    evaluate.add_argument("--annotations", help="override the annotation file inside --data")
    evaluate.add_argument("--images", help="override the image folder inside --data")
    evaluate.add_argument("--questions", help="LLaVA question jsonl whose prompts are used verbatim (default for "
                          "TextVQA: llava_textvqa_val_v051_ocr.jsonl in --data, the paper's OCR prompts)")  # fmt: skip
    evaluate.add_argument("--server", action="store_true", help="VQAv2 / VizWiz: answer the split the paper reports "
                          "(test-dev / test) and write the EvalAI file instead of a local score")  # fmt: skip
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=128, help="longest answer in tokens, greedy decoding (default 128)"
    )
    evaluate.add_argument(
        "--prompt-format",
        choices=("v1", "chat_template"),
        default="v1",
        help="v1: LLaVA-1.5's vicuna_v1 prompt text (the paper's); chat_template: the processor's chat template",
    )
    evaluate.add_argument("--no-pad", action="store_true", help="do not pad images to square (LLaVA-1.5 pads)")
    evaluate.add_argument("--limit", type=int, help="only the first N samples (smoke runs)")
    evaluate.set_defaults(func=run_eval)


PARTIAL_HELP = ("score an answers file with unreadable, id-less, repeated or unknown lines, leaving them out and "
                "reporting their counts (default: stop at the first, exit 2)")  # fmt: skip


def run_score(args: argparse.Namespace) -> int:
    from movekd_hf.evaluation.readers import score_answers_file

    metrics, report = score_answers_file(args.benchmark, args.predictions, args.annotations, args.questions,
                                         allow_partial=args.allow_partial)  # fmt: skip
    print_result(metrics, report)
    return 0


def run_submission(args: argparse.Namespace) -> int:
    from movekd_hf.errors import SettingsError
    from movekd_hf.evaluation import submission
    from movekd_hf.evaluation.benchmarks import SERVER_SCORED, canonical_name
    from movekd_hf.evaluation.readers import read_jsonl

    name = canonical_name(args.benchmark)
    if name not in submission.SUBMISSION_BENCHMARKS:
        raise SettingsError(f"{name} is scored locally, not by a server", field="--benchmark",
                            expected=f"one of {', '.join(submission.SUBMISSION_BENCHMARKS)}")  # fmt: skip
    if name == "mmbench":
        columns, rows, counts = submission.mmbench_sheet(args.predictions, args.questions, args.allow_partial)
        entries: Any = (columns, rows)
    else:
        write = submission.vqav2_submission if name == "vqav2" else submission.vizwiz_submission
        entries, counts = write(args.predictions, read_jsonl(Path(args.questions)), allow_partial=args.allow_partial)
    out = submission.write_submission(name, entries, args.out)
    report = {"benchmark": name, "submission": str(out), "server": SERVER_SCORED[name], "answers": counts}
    print(json.dumps(report, sort_keys=True))
    print(format_table({}, report), file=sys.stderr)
    return 0


def resolve_data(name: str, data: Path, annotations: str | None, images: str | None) -> tuple[Path, Path | None]:
    """Annotation path and image folder for `name` inside `data` (docs/DATA.md), honouring explicit overrides.

    Raises FileNotFoundError naming the files looked for."""
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder")
    if (data / "dataset_info.json").is_file() or (data / "dataset_dict.json").is_file():
        return data, None
    candidates, image_dir = DATA_LAYOUT[name]
    if annotations is None:
        found = [data / c for c in candidates if (data / c).exists()]
        if name == "pope":  # the folder that actually holds the coco_pope_*.json files
            found = [p for p in found if p.is_dir() and any(p.glob("coco_pope_*.json"))]
        if not found:
            raise FileNotFoundError(f"{name}: none of {list(candidates)} found in {data} (see docs/DATA.md); "
                                    "pass --annotations")  # fmt: skip
        annotations = str(found[0])
    return Path(annotations), Path(images) if images else data / image_dir


def resolve_questions(name: str, data: Path, questions: str | None) -> Path | None:
    """The LLaVA question file: `--questions`, else the default one (`DEFAULT_QUESTIONS`) when `data` holds it."""
    if questions is not None:
        if not Path(questions).is_file():
            raise FileNotFoundError(f"--questions {questions} does not exist")
        return Path(questions)
    default = data / DEFAULT_QUESTIONS[name] if name in DEFAULT_QUESTIONS else None
    return default if default is not None and default.is_file() else None


def _number(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(int(value)) if key.split("/")[-1].startswith("num_") or isinstance(value, int) else f"{value:.1f}"


def format_table(metrics: dict[str, float], report: dict[str, Any]) -> str:
    """A small table for people: the paper's number first, every metric (percentages and scores to 1 decimal,
    counts as integers), the answers file's counts, and the notes on comparability."""
    rows: list[tuple[str, str]] = []
    if "paper_metric" in report:
        label = f"{report['paper_column']} ({report['paper_metric']}, the paper's column)"
        rows.append((label, _number("", report["paper_value"])))
    rows += [(key, _number(key, value)) for key, value in sorted(metrics.items())]
    rows += [(f"answers: {key}", str(value)) for key, value in report.get("answers", {}).items()]
    for key in ("prompt_set", "submission"):
        if key in report:
            rows.append((key, str(report[key])))
    width = max((len(key) for key, _ in rows), default=6)
    lines = [f"{report.get('benchmark', '')}".strip() or "result"]
    lines += [f"  {key:<{width}}  {value:>8}" for key, value in rows]
    if "comparable_with_paper" in report:
        lines.append(f"  comparable with the paper: {'yes' if report['comparable_with_paper'] else 'no'}")
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def print_result(metrics: dict[str, float], report: dict[str, Any]) -> None:
    """The JSON object on stdout (metrics at the top level, then the report's keys), the table on stderr."""
    print(json.dumps({**metrics, **report}, sort_keys=True))
    print(format_table(metrics, report), file=sys.stderr)


def card_metrics(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a model card shows: the paper's number first, then the other overall values (no per-split /
    per-category breakdowns, no counts)."""
    from movekd_hf.evaluation.benchmarks import HEADLINE_METRIC

    headline = HEADLINE_METRIC[name]
    rest = {k: v for k, v in metrics.items() if k != headline and "/" not in k and not k.startswith("num_")}
    return {headline: metrics[headline], **rest}


def write_results(
    out_dir: Path,
    name: str,
    metrics: dict[str, float],
    model: str,
    limit: int | None = None,
    num_samples: int | None = None,
) -> dict[str, dict[str, float]]:
    """Write `<name>.json` (every metric, the `--limit` used and the number of samples asked) and update the
    combined `results.json` (`{benchmark: {metric: value}}`, the run-dir contract the model card reads from
    `RUN_DIR/eval/`) and `results.md` (the paper's columns). The card publishes a benchmark result only for a
    record whose `limit` is null (the whole benchmark ran)."""
    from movekd_hf.evaluation.benchmarks import HEADLINE_METRIC, PAPER_COLUMNS

    headline = HEADLINE_METRIC[name]
    entry = {"benchmark": name, "metric": headline, "value": metrics[headline], "metrics": metrics, "model": model,
             "limit": limit, "num_samples": num_samples}  # fmt: skip
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
    from movekd_hf.errors import SettingsError, loading, model_source
    from movekd_hf.evaluation import submission
    from movekd_hf.evaluation.answers import read_answers
    from movekd_hf.evaluation.benchmarks import SERVER_SCORED, canonical_name, paper_report
    from movekd_hf.evaluation.readers import load_benchmark, read_jsonl
    from movekd_hf.evaluation.runner import distributed_state, load_model_and_processor, run_generation

    name, data = canonical_name(args.benchmark), Path(args.data)
    if args.server and name not in SERVER_LAYOUT:
        raise SettingsError(f"{name} has no server split", field="--server", expected=f"one of {list(SERVER_LAYOUT)}")
    if args.server:
        benchmark, all_questions = server_benchmark(name, data, args.questions, args.images)
    else:
        annotations, images = resolve_data(name, data, args.annotations, args.images)
        benchmark = load_benchmark(name, annotations, images, resolve_questions(name, data, args.questions))
    subset = None
    if args.limit is not None and args.limit < len(benchmark.samples):
        subset = f"--limit {args.limit}: the first {args.limit} of the {len(benchmark.samples)} samples"
        keep = {s.key for s in benchmark.samples[: args.limit]}
        benchmark.samples = [s for s in benchmark.samples if s.key in keep]
        benchmark.truth = _restrict_truth(benchmark.truth, keep)
    model_source("--model", args.model)  # a mistyped path: one line naming it, before anything is written
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with loading("--model", args.model):
        model, processor = load_model_and_processor(args.model)
    state = distributed_state()
    model.to(state.device)
    answers = run_generation(model, processor, benchmark.samples, out_dir / f"{name}_answers.jsonl",
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             prompt_format=args.prompt_format, pad_images=not args.no_pad,
                             model_id=Path(args.model).name)  # fmt: skip
    if not state.is_main_process:
        return 0
    if args.server:
        write = submission.vqav2_submission if name == "vqav2" else submission.vizwiz_submission
        entries, counts = write(answers, read_jsonl(all_questions), allow_partial=args.limit is not None)
        out = submission.write_submission(name, entries, out_dir / f"{name}_submission.json")
        notes = [f"upload {out.name}: the paper's column is {SERVER_SCORED[name]}"] + ([subset] if subset else [])
        report = {"benchmark": name, "submission": str(out), "answers": counts,
                  "comparable_with_paper": subset is None, "notes": notes}  # fmt: skip
        print(json.dumps(report, sort_keys=True))
        print(format_table({}, report), file=sys.stderr)
        return 0
    texts, answers_report = read_answers(answers, benchmark.samples, name=name, check_prompts=name == "pope",
                                         ignored_ids=benchmark.info.get("ignored_ids", ()))  # fmt: skip
    metrics = benchmark.score(texts)
    report = {"benchmark": name, **paper_report(name, metrics, benchmark.info.get("prompt_set"), subset),
              "answers": answers_report.counts()}  # fmt: skip
    if name == "mmbench" and annotations.suffix == ".tsv":  # the paper's MMB is the server's: write its sheet too
        columns, rows, _ = submission.mmbench_sheet(answers, annotations, allow_partial=True)
        report["submission"] = str(
            submission.write_submission(name, (columns, rows), out_dir / "mmbench_submission.tsv")
        )
    write_results(out_dir, name, metrics, str(args.model), limit=args.limit, num_samples=len(benchmark.samples))
    print_result(metrics, report)
    return 0


def server_benchmark(name: str, data: Path, questions: str | None, images: str | None) -> tuple[Any, Path]:
    """VQAv2 test-dev / VizWiz test as LLaVA-1.5 answers them: samples from LLaVA's question file (no ground
    truth) -> (benchmark, the question file listing every id the server wants)."""
    from movekd_hf.evaluation.benchmarks import Benchmark, EvalSample
    from movekd_hf.evaluation.readers import llava_prompt, read_jsonl

    answered, everything, image_dir = SERVER_LAYOUT[name]
    path = Path(questions) if questions else data / answered
    if not path.is_file():
        raise FileNotFoundError(f"{name} --server: question file {path} does not exist (see docs/DATA.md)")
    all_questions = data / everything if (data / everything).is_file() else path
    folder = Path(images) if images else data / image_dir
    samples = [EvalSample(str(line["question_id"]), line["question_id"], str(folder / line["image"]),
                          llava_prompt(line, path, number))
               for number, line in enumerate(read_jsonl(path), 1)]  # fmt: skip
    return Benchmark(name, samples, {}), all_questions


def _restrict_truth(truth: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """Ground truth limited to the kept keys (for `--limit`)."""
    return {field: {k: v for k, v in value.items() if k in keep} if isinstance(value, dict) else value
            for field, value in truth.items()}  # fmt: skip
