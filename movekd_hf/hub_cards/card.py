"""Model cards for MoVE-KD checkpoints, built with `huggingface_hub.ModelCard` / `ModelCardData`.

Evaluation results are written twice: as `model-index` metadata in the card (the long-standing format) and as
`.eval_results/<benchmark>.yaml` files (the Hub's newer format: a YAML list of `{dataset: {id, task_id}, value,
source, notes}` entries per benchmark dataset, built with `huggingface_hub.EvalResultEntry`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, EvalResultEntry, ModelCard, ModelCardData, eval_result_entries_to_yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..distill.presets import TEACHER_SETS, TINY_SETS
from ..evaluation.benchmarks import benchmark_key
from ..training.checkpoint import LLM_LORA_DIR
from .card_template import CARD_TEMPLATE
from .run_dir import RunDir, read_run_dir

ARXIV_ID = "2501.01709"
PAPER_URL = f"https://arxiv.org/abs/{ARXIV_ID}"
CITATION = """@inproceedings{cao2025movekd,
  title         = {MoVE-KD: Knowledge Distillation for VLMs with Mixture of Visual Encoders},
  author        = {Cao, Jiajun and Zhang, Yuan and Huang, Tao and Lu, Ming and Zhang, Qizhe and
                   An, Ruichuan and Ma, Ningning and Zhang, Shanghang},
  booktitle     = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year          = {2025},
  eprint        = {2501.01709},
  archivePrefix = {arXiv}
}"""
EXAMPLE_IMAGE = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"
PLACEHOLDER_REPO_ID = "<namespace>/<model-name>"
CARD_TAGS = ["movekd", "llava", "knowledge-distillation", "mixture-of-experts", "lora", "custom_code"]
EVAL_NOTES = "movekd-hf evaluation: LLaVA-1.5 prompts, greedy decoding"


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    model_id: str
    license: str


# The paper's teachers (METHOD.md section 1), credited to slugs only in runs of a paper teacher set (v1.0, v1.1).
# A run may name others; their licence is then "not recorded".
KNOWN_TEACHERS: dict[str, TeacherInfo] = {
    "clip": TeacherInfo("clip", "openai/clip-vit-large-patch14-336", "MIT"),
    "eva": TeacherInfo("eva", "Yuxin-CV/EVA-02 `eva02/det/eva02_L_coco_det_sys_o365.pth` (EVA-02-L ViTDet)", "MIT"),
    "convnext": TeacherInfo(
        "convnext",
        "timm/convnext_xxlarge.clip_laion2b_soup (open_clip laion2B-s34B-b82K-augreg-soup)",
        "MIT (weights); LAION-2B dataset terms apply",
    ),
    "sam": TeacherInfo("sam", "facebook/sam-vit-large", "Apache-2.0"),
}


@dataclass(frozen=True)
class BenchmarkInfo:
    pretty_name: str
    dataset_id: str


# Benchmarks of the paper (METHOD.md section 7) with the Hub datasets that host them (lmms-lab mirrors).
KNOWN_BENCHMARKS: dict[str, BenchmarkInfo] = {
    "vqav2": BenchmarkInfo("VQAv2", "lmms-lab/VQAv2"),
    "gqa": BenchmarkInfo("GQA", "lmms-lab/GQA"),
    "textvqa": BenchmarkInfo("TextVQA", "lmms-lab/textvqa"),
    "vizwiz": BenchmarkInfo("VizWiz", "lmms-lab/VizWiz-VQA"),
    "pope": BenchmarkInfo("POPE", "lmms-lab/POPE"),
    "scienceqa": BenchmarkInfo("ScienceQA-IMG", "lmms-lab/ScienceQA"),
    "mme": BenchmarkInfo("MME", "lmms-lab/MME"),
    "mmbench": BenchmarkInfo("MMBench", "lmms-lab/MMBench"),
}

# Recipe fields worth showing from a `TrainingArguments.to_dict()` dump (it has ~100 entries).
TRAINING_ARG_FIELDS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "optim", "bf16", "fp16",
    "gradient_checkpointing", "deepspeed", "seed",
)  # fmt: skip
# train_config.json keys with their own place in the card, so not repeated as hyper-parameters.
_TRAIN_CONFIG_SPECIAL = {
    "teachers", "teacher_set", "base_model", "base_model_is_local", "vision_tower", "license", "datasets", "toy",
}  # fmt: skip
NOT_RECORDED = "not recorded"
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml", ".zip", ".tar")
RANDOM_WEIGHTS = "none (random weights, nothing downloaded)"
# The `modern` set's teachers (movekd_hf.distill.presets.MODERN_TEACHERS), credited in runs of that set.
MODERN_TEACHER_INFO: dict[str, TeacherInfo] = {
    "siglip2": TeacherInfo("siglip2", "google/siglip2-so400m-patch16-384", "Apache-2.0"),
    "dinov3": TeacherInfo("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m", "DINOv3 License (gated on the Hub)"),
    "sam2": TeacherInfo("sam2", "facebook/sam2.1-hiera-large", "Apache-2.0"),
    # The `modern-2` set's: licences as each model page states them; check the page before publishing.
    "dinov3_convnext": TeacherInfo(
        "dinov3_convnext", "facebook/dinov3-convnext-large-pretrain-lvd1689m", "DINOv3 License (gated on the Hub)"
    ),
    "aimv2": TeacherInfo("aimv2", "apple/aimv2-large-patch14-224", "see the model page (Apple AMLR)"),
    "sam3": TeacherInfo("sam3", "facebook/sam3", "see the model page (SAM License, gated on the Hub)"),
    "radio": TeacherInfo("radio", "nvidia/C-RADIOv4-H", "see the model page (NVIDIA license)"),
}
# Teacher sets whose models are toys: a card of such a run says so at the top.
TOY_TEACHER_SETS = {
    "tiny": "Its teachers are the `tiny` set: real architectures at test sizes with random weights",
    "tiny-modern": "Its teachers are the `tiny-modern` set: real architectures at test sizes with random weights",
    "tiny-modern-2": "Its teachers are the `tiny-modern-2` set: real architectures at test sizes with random weights",
    "demo": "It is the output of `movekd-hf demo`: small teachers and a small LLM trained on synthetic images",
}
# A Hub licence identifier (https://huggingface.co/docs/hub/repositories-licenses): lowercase, e.g. apache-2.0.
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


def teacher_set_members(teacher_set: str | None) -> dict[str, TeacherInfo]:
    """What the slugs of a named teacher set stand for: the paper's weights for v1.0 / v1.1, the modern teachers'
    for `modern`, the random architectures at test size (movekd_hf.distill.presets.TINY_SETS) for `tiny` and
    `tiny-modern`, nothing for any other set. A slug no table knows is "not recorded" (never a guess)."""
    if teacher_set in TINY_SETS:
        return {
            slug: TeacherInfo(slug, f"`{spec.model_id}` architecture at test size, random weights", RANDOM_WEIGHTS)
            for slug, spec in TINY_SETS[teacher_set].items()
        }
    if teacher_set in TEACHER_SETS:
        known = {**KNOWN_TEACHERS, **MODERN_TEACHER_INFO}
        return {
            slug: known.get(slug, TeacherInfo(slug, NOT_RECORDED, NOT_RECORDED)) for slug in TEACHER_SETS[teacher_set]
        }
    return {}


def anchor_info(name: str, student_tower: str | None) -> TeacherInfo:
    """The credit of an anchor teacher the run's teacher set does not describe (a SigLIP student's `siglip`): the
    student's own vision tower as training began, by its Hub id when the run knows it."""
    where = f"`{student_tower}`" if student_tower else "its id not recorded"
    return TeacherInfo(name, f"the student's own vision tower as training began ({where})", "the student encoder's")


def student_tower_id(run: RunDir) -> str | None:
    """The student tower's Hub id: train_config's `vision_tower`, else the `_name_or_path` that `init --vision`
    leaves in config.json's `vision_config`; None for a local folder or nothing recorded."""
    vision = (run.config or {}).get("vision_config") or {}
    for value in ((run.train_config or {}).get("vision_tower"), vision.get("_name_or_path")):
        if hub_repo_id(value, run):
            return value
    return None


def resolve_teachers(train_config: dict[str, Any] | None, student_tower: str | None = None) -> list[TeacherInfo]:
    """The run's teachers from `train_config["teachers"]` (slug list, slug->id dict or list of dicts with `name`,
    optional `model_id`, `license`, `pretrained`).

    A bare slug means what the run's `teacher_set` says it means (`teacher_set_members`); outside a named set its id
    and licence are "not recorded". `pretrained: false` means random weights: no licence applies. The anchor
    (`kd_loss.anchor_teacher`, recorded without an id) is the student's own tower: where the set does not describe
    it (a SigLIP student's `siglip`; the sets' `clip` entry stands for a CLIP tower) it is credited to
    `student_tower` (`anchor_info`)."""
    train_config = train_config or {}
    raw = train_config.get("teachers")
    if raw is None:
        return []
    members = teacher_set_members(train_config.get("teacher_set"))
    anchor = (train_config.get("kd_loss") or {}).get("anchor_teacher")
    if anchor and anchor not in members:
        members = {**members, anchor: anchor_info(anchor, student_tower)}
    if isinstance(raw, dict):
        raw = [{"name": name, "model_id": model_id} for name, model_id in raw.items()]
    if not isinstance(raw, list):
        raise ValueError(f"train_config.json: `teachers` must be a list or a dict, got {type(raw).__name__}.")
    teachers = []
    for item in raw:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"train_config.json: each teacher needs a string `name`, got {item!r}.")
        known = members.get(entry["name"]) or KNOWN_TEACHERS.get(entry["name"])
        if not entry.get("model_id"):
            teachers.append(members.get(entry["name"], TeacherInfo(entry["name"], NOT_RECORDED, NOT_RECORDED)))
            continue
        model_id = entry["model_id"]
        # A known slug keeps its licence only while it points at the known weights.
        same_weights = known is not None and model_id == known.model_id
        license_ = entry.get("license") or (known.license if same_weights else NOT_RECORDED)
        if entry.get("pretrained") is False:
            model_id, license_ = f"`{model_id}` architecture, random weights", RANDOM_WEIGHTS
        teachers.append(TeacherInfo(entry["name"], model_id, license_))
    return teachers


def hub_repo_id(value: Any, run: RunDir | None = None) -> str | None:
    """`value` when it names a Hub repository (huggingface_hub's `validate_repo_id`), else None: presets
    (`preset:tiny`), absolute or relative local paths, data file names and names of folders that exist locally
    are not Hub ids."""
    if not isinstance(value, str) or value.startswith(("/", ".", "~")) or "\\" in value:
        return None
    if value.lower().endswith(DATA_FILE_SUFFIXES):  # `data/llava.json` passes validate_repo_id but is a file
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    local = [Path(value)] + ([run.root / value, run.root.parent / value] if run is not None else [])
    return None if any(path.exists() for path in local) else value


def base_model_id(run: RunDir) -> str | None:
    """The base model's Hub id for the card's `base_model`, or None when the run started from a local folder or a
    random preset (the card body then says so)."""
    train_config = run.train_config or {}
    if train_config.get("base_model_is_local"):
        return None
    return hub_repo_id(train_config.get("base_model"), run)


def describe_base_model(run: RunDir) -> str | None:
    """The base model as the card body shows it, without local paths (they mean nothing to a reader)."""
    value = (run.train_config or {}).get("base_model")
    if not value:
        return None
    if base_model_id(run):
        return f"[`{value}`](https://huggingface.co/{value})"
    if str(value).startswith("preset:"):
        return f"the random `{str(value).removeprefix('preset:')}` preset of movekd-hf (no pretrained weights)"
    return f"a local model folder (`{Path(str(value)).name}`), not on the Hub"


def training_datasets(run: RunDir) -> list[str]:
    """`train_config["datasets"]` entries that are Hub dataset ids; local files and toy data are left out."""
    raw = (run.train_config or {}).get("datasets") or []
    raw = [raw] if isinstance(raw, str) else raw
    return [name for name in raw if hub_repo_id(name, run)]


def card_license(run: RunDir) -> str | None:
    """`train_config["license"]` as a Hub licence id, or None. Raises ValueError for one that is not an id."""
    value = (run.train_config or {}).get("license")
    if value is None:
        return None
    if not isinstance(value, str) or not _LICENSE_ID.match(value):
        raise ValueError(
            f"train_config.json: `license` must be a Hub licence identifier (lowercase, e.g. apache-2.0, llama2, "
            f"mit, other), got {value!r}."
        )
    return value


def toy_reasons(run: RunDir) -> list[str]:
    """Why the model is a toy, when it is one: `train_config["toy"]`, a toy teacher set, a random preset LLM."""
    train_config = run.train_config or {}
    reasons = [str(train_config["toy"])] if train_config.get("toy") else []
    if train_config.get("teacher_set") in TOY_TEACHER_SETS:
        reasons.append(TOY_TEACHER_SETS[train_config["teacher_set"]])
    if str(train_config.get("base_model", "")).startswith("preset:"):
        reasons.append("Its language model and vision encoder are the random `preset` model of movekd-hf")
    return reasons


def has_llm_lora(checkpoint: Path) -> bool:
    """Whether the checkpoint holds an LLM LoRA (`llm_lora/`, from a `lora_llm` run)."""
    return (checkpoint / LLM_LORA_DIR / "adapter_config.json").is_file()


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def collect_hyperparameters(run: RunDir) -> list[tuple[str, str]]:
    """(name, value) rows from `train_config.json` (all scalars) and `training_args.json` (recipe fields)."""
    rows: dict[str, str] = {}
    arguments = run.training_args or {}
    # `max_steps=-1` means "use num_train_epochs"; a positive one overrides it (the Trainer then ignores the
    # epochs), so only the one that decided the run's length is shown.
    by_steps = (arguments.get("max_steps") or -1) > 0
    for name, value in arguments.items():
        hidden = (name == "max_steps" and not by_steps) or (name == "num_train_epochs" and by_steps)
        if name in TRAINING_ARG_FIELDS and value is not None and not hidden:
            rows[name] = _format_value(value)
    for name, value in sorted((run.train_config or {}).items()):
        is_scalar_list = isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)
        if name not in _TRAIN_CONFIG_SPECIAL and (isinstance(value, (str, int, float, bool)) or is_scalar_list):
            rows[name] = _format_value(value)
    return list(rows.items())


def describe_architecture(config: dict[str, Any], run: RunDir) -> list[tuple[str, str]]:
    """(part, description) rows from config.json, the base LLM and student ids when the run recorded them."""
    train_config = run.train_config or {}
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    rows = []
    base_model = describe_base_model(run)
    if base_model:
        rows.append(("base model", base_model))
    llm = f"{text.get('model_type', '?')}, {text.get('num_hidden_layers', '?')} layers"
    rows.append(("language model", f"{llm}, hidden {text.get('hidden_size', '?')}"))
    student = (
        f"{vision.get('model_type', '?')}, {vision.get('num_hidden_layers', '?')} layers, hidden "
        f"{vision.get('hidden_size', '?')}, {vision.get('image_size', '?')} px, patch {vision.get('patch_size', '?')}"
    )
    if hub_repo_id(train_config.get("vision_tower"), run):
        student = f"`{train_config['vision_tower']}` ({student})"
    rows.append(("student encoder", student))
    mole_fields = ("num_experts", "lora_rank", "lora_alpha", "lora_dropout", "mole_routing")
    mole = ", ".join(f"{name}={config[name]}" for name in mole_fields if name in config)
    if mole:
        rows.append(("MoLE (every encoder MLP)", mole))
    faithful_fields = ("lora_b_init", "expert_output_scale")
    if any(name in config for name in faithful_fields):
        rows.append(("MoLE variant", ", ".join(f"{n}={config[n]}" for n in faithful_fields if n in config)))
    if "projector_hidden_act" in config:
        rows.append(("projector", f"Linear, {config['projector_hidden_act']}, Linear"))
    if "vision_feature_layer" in config:
        rows.append(("vision feature layer", str(config["vision_feature_layer"])))
    return rows


@dataclass(frozen=True)
class EvalStatus:
    """How a benchmark's numbers were obtained. `published`: shown as a benchmark result in the card's metadata."""

    samples: int | None
    limit: int | None
    published: bool
    note: str


def comparison_rows(run: RunDir) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, against, question type, n, `diff [low, high]` with "not resolved" where the interval includes
    zero) for every `eval/compare/*.json` the run holds (`movekd-hf compare --json`)."""
    rows = []
    for record in run.comparisons.values():
        against = str(record.get("against") or record.get("b", "?"))
        for kind, value in (record.get("intervals") or {}).items():
            text = f"{value['estimate']:+.1f} [{value['low']:+.1f}, {value['high']:+.1f}]"
            text += "" if value.get("resolved") else " (not resolved)"
            confidence = f"{round(100 * value.get('confidence', 0.95))} %"
            rows.append((str(record.get("benchmark", "?")), against, kind, f"{value['n']} ({confidence})", text))
    return rows


def eval_status(run: RunDir, benchmark: str) -> EvalStatus:
    """What the run's `eval/<benchmark>.json` record says of `benchmark` (see run_dir's contract)."""
    key = benchmark_key(benchmark)
    records = {benchmark_key(str(r.get("benchmark", stem))): r for stem, r in run.eval_records.items()}
    record = records.get(key)
    if record is None:
        return EvalStatus(None, None, True, "as given in eval/results.json")
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    samples = next(
        (int(v) for v in (record.get("num_samples"), metrics.get("num_questions"), record.get("answer_lines")) if v),
        None,
    )
    counted = f"{samples} samples" if samples else "sample count not recorded"
    if "limit" not in record:
        note = f"{counted}; not recorded as a run over the whole benchmark, so not published as a benchmark result"
        return EvalStatus(samples, None, False, note)
    if record["limit"] is not None:
        note = f"limited run ({counted}, `--limit {record['limit']}`): a smoke test, not a benchmark result"
        return EvalStatus(samples, int(record["limit"]), False, note)
    return EvalStatus(samples, None, True, f"whole benchmark, {counted}")


def _pretty(benchmark: str) -> tuple[str, BenchmarkInfo | None]:
    info = KNOWN_BENCHMARKS.get(benchmark_key(benchmark))
    return (info.pretty_name if info else benchmark), info


def _result_rows(run: RunDir) -> list[tuple[str, str, float, str]]:
    rows = []
    for benchmark, metrics in (run.eval_results or {}).items():
        note = eval_status(run, benchmark).note
        for metric, value in metrics.items():
            rows.append((_pretty(benchmark)[0], metric, value, note))
    return rows


def published_results(run: RunDir) -> dict[str, dict[str, float]]:
    """The benchmarks the card's metadata may present as results: runs over the whole benchmark (`eval_status`)."""
    return {name: metrics for name, metrics in (run.eval_results or {}).items() if eval_status(run, name).published}


def model_index_results(results: dict[str, dict[str, float]]) -> list[EvalResult]:
    """One `EvalResult` per (benchmark, metric), for the card's `model-index`."""
    entries = []
    for benchmark, metrics in results.items():
        name, info = _pretty(benchmark)
        for metric, value in metrics.items():
            entries.append(
                EvalResult(
                    task_type="image-text-to-text",
                    dataset_type=info.dataset_id if info else benchmark,
                    dataset_name=name,
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return entries


def eval_results_files(run: RunDir, repo_id: str | None = None) -> dict[str, str]:
    """`.eval_results/<benchmark>.yaml` texts of the published results: one file per benchmark, one entry per metric.

    The format needs a Hub dataset id, so benchmarks outside `KNOWN_BENCHMARKS` are left out here (they still
    appear in `model-index` and in the card's table).
    """
    source_url = f"https://huggingface.co/{repo_id}" if repo_id else None
    files = {}
    for benchmark, metrics in published_results(run).items():
        key = benchmark_key(benchmark)
        info = KNOWN_BENCHMARKS.get(key)
        if info is None:
            continue
        samples = eval_status(run, benchmark).samples
        entries = [
            EvalResultEntry(
                dataset_id=info.dataset_id,
                task_id=metric,
                value=value,
                source_url=source_url,
                source_name="Model card" if source_url else None,
                notes=EVAL_NOTES + (f"; {samples} samples" if samples else ""),
            )
            for metric, value in metrics.items()
        ]
        files[f".eval_results/{key}.yaml"] = yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False)
    return files


def build_card_data(run: RunDir, repo_id: str | None = None) -> ModelCardData:
    """The card's YAML metadata: only fields the run dir supports, each a valid Hub value or left out."""
    model_name = (repo_id or run.root.resolve().name).split("/")[-1]
    results = published_results(run)
    return ModelCardData(
        base_model=base_model_id(run),
        datasets=training_datasets(run) or None,
        license=card_license(run),
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=CARD_TAGS,
        model_name=model_name,
        eval_results=model_index_results(results) if results else None,
    )


def build_model_card(run: RunDir, repo_id: str | None = None) -> ModelCard:
    """Render the card for a run; works offline (no Hub call)."""
    train_config = run.train_config or {}
    card_data = build_card_data(run, repo_id)
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_title=card_data.model_name,
        toy_reasons=toy_reasons(run),
        paper_url=PAPER_URL,
        arxiv_id=ARXIV_ID,
        citation=CITATION,
        repo_id=repo_id or PLACEHOLDER_REPO_ID,
        example_image=EXAMPLE_IMAGE,
        architecture=describe_architecture(run.config, run),
        llm_lora=has_llm_lora(run.checkpoint),
        llm_lora_dir=LLM_LORA_DIR,
        teachers=resolve_teachers(run.train_config, student_tower_id(run)),
        teacher_set=train_config.get("teacher_set"),
        hyperparameters=collect_hyperparameters(run),
        recipe_summary=(
            "MoVE-KD trains in the two LLaVA-1.5 stages, distilling in both: stage 1 trains the MoLE experts, "
            "routers, teacher adapters and projector; stage 2 also trains the LLM. Loss: "
            "`L_lm + lambda_kd * L_kd + lambda_bal * L_bal`. "
            + _STAGE_NOTES.get(train_config.get("stage"), "")
            + "The values below are the ones this run recorded."
        ),
        results=_result_rows(run),
        any_published=bool(published_results(run)),
        comparisons=comparison_rows(run),
        plots=run.plots,
    )


# What the card says of the stage a checkpoint ends (train_config.json's `stage`, as the trainer records it).
_STAGE_NOTES = {
    "stage1": "This checkpoint ends stage 1: its LLM is the one training started from. ",
    "stage2": "This checkpoint ends stage 2. ",
}


def render_repo_files(run: RunDir, repo_id: str | None = None) -> dict[str, str]:
    """Card and eval-results texts keyed by their path in the repo."""
    files = {"README.md": str(build_model_card(run, repo_id)).rstrip("\n") + "\n"}
    if run.eval_results:
        files.update(eval_results_files(run, repo_id))
    return files


def write_card(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    repo_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """Write README.md, `.eval_results/*.yaml` and the plots into `output_dir` (default: the checkpoint).
    `overrides` replace train_config.json entries (`license`, `datasets`, `base_model`)."""
    run = read_run_dir(run_dir, overrides)
    output = Path(output_dir) if output_dir is not None else run.checkpoint
    written = []
    for path_in_repo, text in render_repo_files(run, repo_id).items():
        target = output / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    for plot in run.plots:
        target = output / "plots" / plot.name
        if target.resolve() != plot.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, target)
        written.append(target)
    return written
