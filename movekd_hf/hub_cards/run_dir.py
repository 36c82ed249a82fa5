"""The run-dir contract: what training and evaluation leave behind, and what `card` / `push` read.

A run directory ``RUN_DIR`` holds:

- a loadable checkpoint folder (required): either ``RUN_DIR`` itself (it has ``config.json``) or
  ``RUN_DIR/checkpoint``. It is what ``save_pretrained`` of the model and processor writes: ``config.json``,
  ``model.safetensors`` (or shards + ``model.safetensors.index.json``), the remote-code ``*.py`` files named in
  the config's ``auto_map``, the processor files (``preprocessor_config.json``, ``processor_config.json``,
  tokenizer files, ``chat_template.jinja``) and optionally ``generation_config.json``.
- ``train_config.json`` (optional): the run's MoVE-KD settings. Keys read here:
  ``teachers`` (a list of slugs, a ``{slug: model_id}`` dict, or a list of ``{"name", "model_id", "license"}``
  dicts), ``teacher_set`` (e.g. ``"v1.1"``), ``base_model`` (the LLaVA / LLM Hub id the run started from),
  ``vision_tower`` (the student's Hub id), ``license`` (the released weights' licence), ``datasets``
  (Hub ids of the training data; other entries are left out of the metadata). Optional too: ``base_model_is_local``
  (the base model was a local folder, whatever its name looks like) and ``toy`` (why the model is a toy, e.g. the
  demo). Every other scalar entry is listed as a hyper-parameter. Read from ``RUN_DIR`` or, failing that, from the
  checkpoint folder (where the trainer writes it).
- ``training_args.json`` (optional): ``TrainingArguments.to_dict()``; the usual recipe fields are listed. Same
  places as ``train_config.json``. (``training_args.bin`` is a pickle and is never read.)
- ``eval/results.json`` (optional): the combined table ``{benchmark: {metric: value}}``.
- ``eval/<benchmark>.json`` (optional): the record ``movekd-hf eval`` writes per benchmark (``metrics``, and
  ``limit`` / ``num_samples`` when it records them). A benchmark with a record is published as a benchmark result
  only when the record says the whole benchmark ran (``"limit": null``); a limited or unverified run shows in the
  card with its sample count, marked as such. Results without a record are taken as given.
- ``eval/compare/*.json`` (optional): paired comparisons written by ``movekd-hf compare --json`` (the
  intervals of this run against another, per question type); the card shows them.
- ``plots/*.png`` (optional): figures shown in the card and uploaded next to it.

The card is written from whatever exists; missing optional parts are left out, never invented.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT_SUBDIR = "checkpoint"
TRAIN_CONFIG_FILE = "train_config.json"
TRAINING_ARGS_FILE = "training_args.json"
EVAL_RESULTS_FILE = "eval/results.json"
EVAL_DIR = "eval"
COMPARE_DIR = "eval/compare"
PLOTS_DIR = "plots"


@dataclass
class RunDir:
    """What a run directory holds, read once. Optional parts are `None` / empty when absent."""

    root: Path
    checkpoint: Path
    config: dict[str, Any]
    train_config: dict[str, Any] | None = None
    training_args: dict[str, Any] | None = None
    eval_results: dict[str, dict[str, float]] | None = None
    plots: list[Path] = field(default_factory=list)
    # `eval/<benchmark>.json` records keyed by file stem, each with `answer_lines` added when the answers file exists.
    eval_records: dict[str, dict[str, Any]] = field(default_factory=dict)
    # `eval/compare/*.json` (`movekd-hf compare --json`), keyed by file stem.
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)


def find_checkpoint(root: Path) -> Path:
    """The checkpoint folder of a run: `root` itself if it has `config.json`, else `root/checkpoint`."""
    for candidate in (root, root / CHECKPOINT_SUBDIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"No checkpoint found in run directory {root}: expected {root / 'config.json'} or "
        f"{root / CHECKPOINT_SUBDIR / 'config.json'} (a folder written by `save_pretrained`)."
    )


def _read_json(path: Path, expected: type) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, expected):
        raise ValueError(f"{path} must hold a JSON {expected.__name__}, got {type(data).__name__}.")
    return data


def validate_eval_results(results: dict[str, Any], source: str) -> dict[str, dict[str, float]]:
    """Check the `{benchmark: {metric: number}}` shape, naming the first offending entry."""
    for benchmark, metrics in results.items():
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f"{source}: benchmark {benchmark!r} must map to a non-empty {{metric: value}} dict.")
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: {benchmark}.{metric} must be a number, got {value!r}.")
    return results


def _first_json(*paths: Path) -> dict[str, Any] | None:
    return next((_read_json(path, dict) for path in paths if path.is_file()), None)


def read_eval_records(folder: Path) -> dict[str, dict[str, Any]]:
    """`eval/<benchmark>.json` records (not results.json), with the line count of `<benchmark>_answers.jsonl`."""
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name == Path(EVAL_RESULTS_FILE).name:
            continue
        record = _read_json(path, dict)
        answers = folder / f"{path.stem}_answers.jsonl"
        if answers.is_file():
            with answers.open(encoding="utf-8") as handle:
                record["answer_lines"] = sum(1 for line in handle if line.strip())
        records[path.stem] = record
    return records


def read_run_dir(path: str | Path, overrides: dict[str, Any] | None = None) -> RunDir:
    """Read a run directory following the contract in this module's docstring. `overrides` (e.g. `license`,
    `datasets`, `base_model` from the command line) replace the same keys of `train_config.json`."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Run directory {root} does not exist.")
    checkpoint = find_checkpoint(root)
    results_path = root / EVAL_RESULTS_FILE
    eval_results = None
    if results_path.is_file():
        eval_results = validate_eval_results(_read_json(results_path, dict), str(results_path))
    plots_dir = root / PLOTS_DIR
    plots = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    train_config = _first_json(root / TRAIN_CONFIG_FILE, checkpoint / TRAIN_CONFIG_FILE)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if given:
        train_config = {**(train_config or {}), **given}
    return RunDir(
        root=root,
        checkpoint=checkpoint,
        config=_read_json(checkpoint / "config.json", dict),
        train_config=train_config,
        training_args=_first_json(root / TRAINING_ARGS_FILE, checkpoint / TRAINING_ARGS_FILE),
        eval_results=eval_results,
        plots=plots,
        eval_records=read_eval_records(root / EVAL_DIR),
        comparisons={path.stem: _read_json(path, dict) for path in sorted((root / COMPARE_DIR).glob("*.json"))},
    )
