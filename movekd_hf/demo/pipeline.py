"""`run(out_dir, quick)`: every step of the demo, writing one run folder.

The question the demo answers: does distillation move a teacher's knowledge into the student? The world carries
an attribute (stripe orientation) that the `convnext` teacher's tokens carry and the initial student's do not;
the gap is measured first, then every arm (no KD, the authors' faithful MoVE-KD, and one anchor option each) is
trained for several seeds, and the student's tokens are probed (linear probes per object), its answers scored by
question type, and the KD loss decrease split between the adapters and the student. Every comparison is paired
with the no-KD arm of the same seed, with intervals from `movekd_hf.evaluation.compare`.

RUN/
  data/                 world images, pretrain.json (stage 1), finetune.json (stage 2)
  teachers/<slug>/      the pretrained teachers (loaded back through `build_teacher`)
  teacher_cache/        every teacher's features of the training images, written once, read by every arm and seed
  init/                 vision encoder, LLM, and the untrained VLM (faithful MoLE; every arm starts from it)
  arms/<arm>/seed<k>/stage{1,2}  trainer output folders, log_history.json, answers.json
  checkpoint/           the faithful MoVE-KD model of seed 0: loadable through remote code, with README.md (card)
  eval/results.json     its scores ({benchmark: {metric: value}}, the run-dir contract of movekd_hf.hub_cards)
  plots/*.png           losses, teacher weights, expert use, CLS-attention heatmap
  results.md, results.json, train_config.json, training_args.json, final_check.json
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..distill.cache import CachedTeachers
from ..distill.cache_writer import cache_teacher_features, dataset_items
from ..distill.losses import token_weights_from_cls_attention
from ..hub_cards.card import write_card
from ..isolated import run_without_package
from ..modeling import MoVEKDForConditionalGeneration, MoVEKDProcessor
from ..training.checkpoint import DISTILLER_FILE
from ..training.data import load_source
from ..training.teacher_source import build_teachers, teacher_cache_settings, teacher_shapes
from . import assemble, plots, probes, report, world
from .arms import ARMS, BASELINE_ARM, Arm, StageSettings, build_distiller, run_stage
from .assemble import LLM_CONFIG
from .evaluate import COLUMNS, first_word_answers, prompt, unit_scores
from .teachers import GAP_TEACHER, load_teachers, pretrain_teachers, seed_everything

FINAL_ARM = "faithful"  # the released checkpoint: the authors' setting, seed 0
STUDENT = "student (initial)"


@dataclass(frozen=True)
class DemoSize:
    num_train: int
    num_test: int  # held-out scenes: the probes' and the questions' units
    probe_train: int  # training scenes the probes are fitted on
    teacher_steps: int
    gap_teacher_steps: int  # the convnext teacher needs more to learn the stripe orientation (teachers.py)
    llm_steps: int
    stage1_steps: int
    stage2_steps: int
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of every arm
    arms: tuple[str, ...] = tuple(arm.name for arm in ARMS)
    batch_size: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 2e-3
    loss_batch: int = 128  # training images the KD loss accounting is computed on
    seed: int = 0  # world, teachers and LLM


# Sized for the budget (default < 10 min, --quick ~2 min on 2 CPU cores); see benchmarks/bench_demo.py.
DEFAULT_SIZE = DemoSize(num_train=1000, num_test=400, probe_train=600, teacher_steps=150, gap_teacher_steps=400,
                        llm_steps=150, stage1_steps=30, stage2_steps=120)  # fmt: skip
QUICK_SIZE = DemoSize(num_train=96, num_test=48, probe_train=96, teacher_steps=6, gap_teacher_steps=6, llm_steps=8,
                      stage1_steps=2, stage2_steps=3, seeds=(0, 1), arms=(BASELINE_ARM, FINAL_ARM), batch_size=8,
                      loss_batch=16)  # fmt: skip


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def deterministic(seed: int):
    """Fixed seeds and deterministic kernels for the run; the previous global setting is restored afterwards."""

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextlib.contextmanager
def quiet_libraries():
    """Keep the console to the demo's own lines and progress bars (library bars and warnings off)."""
    import datasets
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()


def _bar(description: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------ steps


def prepare_teachers(run: Path, data: world.DemoData, size: DemoSize):

    train = (world.scene_tensor(data.train.scenes), data.train.scenes)
    test = (world.scene_tensor(data.test.scenes), data.test.scenes)
    bars = []

    def factory(slug: str, total: int):
        bars.append(_bar(f"pretraining teacher {slug}", total))
        return bars[-1].update

    specs, reports = pretrain_teachers(str(run / "teachers"), train, test, size.teacher_steps, size.seed, factory,
                                       gap_steps=size.gap_teacher_steps)  # fmt: skip
    for bar in bars:
        bar.close()
    return specs, reports


def prepare_initial_models(run: Path, data: world.DemoData, specs, size: DemoSize) -> dict:

    texts = assemble.llm_texts(data.finetune_json, data.pretrain_json)
    bar = _bar("pretraining the LLM on world text", size.llm_steps)
    llm, tokenizer, loss = assemble.pretrain_llm(texts, size.llm_steps, seed=size.seed, progress=bar.update)
    bar.close()
    init = run / "init"
    llm_dir = assemble.save_llm(llm, tokenizer, str(init / "llm"))
    clip = load_teachers({"clip": specs["clip"]})["clip"].model
    vision_dir = assemble.save_vision_encoder(clip, str(init / "vision"))
    folder = assemble.initial_checkpoint(vision_dir, llm_dir, str(init / "faithful"), faithful=True)
    return {"folder": folder, "llm_loss": loss}


@dataclass
class ProbeData:
    """The probes' scenes as each encoder reads them: items, the student's pixel values, the teachers' view."""

    train_items: probes.ObjectItems
    test_items: probes.ObjectItems
    student_train: torch.Tensor  # [N, 3, 64, 64] from the VLM's image processor
    student_test: torch.Tensor
    raw_train: torch.Tensor  # [N, 3, 64, 64] in [0, 1] (teachers resize and normalise themselves)
    raw_test: torch.Tensor


def probe_data(data: world.DemoData, processor, size: DemoSize) -> ProbeData:
    train_scenes, test_scenes = data.train.scenes[: size.probe_train], data.test.scenes
    pixels = [processor.image_processor(images=[world.render_scene(s) for s in scenes], return_tensors="pt")
              ["pixel_values"] for scenes in (train_scenes, test_scenes)]  # fmt: skip
    return ProbeData(probes.object_items(train_scenes), probes.object_items(test_scenes), *pixels,
                     world.scene_tensor(train_scenes), world.scene_tensor(test_scenes))  # fmt: skip


def student_probes(vlm, pdata: ProbeData) -> dict[str, np.ndarray]:
    train_map = probes.student_token_map(vlm, pdata.student_train)
    test_map = probes.student_token_map(vlm, pdata.student_test)
    return probes.probe_scenes(train_map, pdata.train_items, test_map, pdata.test_items)


@torch.no_grad()
def gap_probes(vlm, teachers: dict, pdata: ProbeData) -> dict[str, dict[str, np.ndarray]]:
    """Per-scene probe correctness of the initial student and of every teacher (its own grid and tokens)."""
    out = {STUDENT: student_probes(vlm, pdata)}
    for slug, teacher in teachers.items():
        maps = []
        for raw in (pdata.raw_train, pdata.raw_test):
            output = teacher(raw)
            maps.append(probes.token_map(output.tokens.float(), output.grid))
        out[f"{slug} teacher"] = probes.probe_scenes(maps[0], pdata.train_items, maps[1], pdata.test_items)
    return out


def write_teacher_cache(run: Path, data: world.DemoData, init: dict, specs) -> dict:
    """Every teacher's features of every training image, computed once (the anchor copied from the initial VLM,
    as the trainer copies it); returns the cached teacher source, the teachers' shapes and the teachers."""
    vlm = MoVEKDForConditionalGeneration.from_pretrained(init["folder"])
    image_processor = MoVEKDProcessor.from_pretrained(init["folder"]).image_processor
    others = [spec for slug, spec in specs.items() if slug != "clip"]
    teachers = build_teachers(vlm, others, image_processor.image_mean, image_processor.image_std)
    # The demo's recorded results (benchmarks/results/demo.json, the README) were computed from the one float
    # square the teachers saw before per-teacher views; every arm reads this one cache, so the arms stay comparable.
    settings = teacher_cache_settings(vlm.config, image_processor, others, "native", "pad", teacher_inputs="square")
    items = dataset_items(load_source(data.pretrain_json, data.image_folder))
    root = run / "teacher_cache"
    cache_teacher_features(root, list(teachers.values()), settings, items, batch_size=64, progress=False)
    source = CachedTeachers(root, [teacher.spec for teacher in teachers.values()], settings)
    return {"source": source, "shapes": teacher_shapes(vlm, others), "teachers": teachers, "vlm": vlm}


def train_arm(run: Path, arm: Arm, seed: int, data: world.DemoData, init: dict, cache: dict, size: DemoSize) -> dict:
    """Stage 1 then stage 2 of one arm and seed; returns both log histories and the final folder."""

    folder = run / "arms" / arm.name / f"seed{seed}"
    stage1 = StageSettings("stage1", data.pretrain_json, data.image_folder, "plain", size.stage1_steps,
                           size.batch_size, size.stage1_lr, seed)  # fmt: skip
    stage2 = StageSettings("stage2", data.finetune_json, data.image_folder, "v1", size.stage2_steps,
                           size.batch_size, size.stage2_lr, seed)  # fmt: skip
    source, shapes = cache["source"], cache["shapes"]
    first = run_stage(stage1, init["folder"], arm, str(folder / "stage1"), source, shapes)
    second = run_stage(stage2, str(folder / "stage1"), arm, str(folder / "stage2"), source, shapes,
                       previous=str(folder / "stage1"))  # fmt: skip
    return {"histories": [first["history"], second["history"]], "folder": str(folder / "stage2"), "last": second}


@torch.no_grad()
def kd_losses(distiller, student_tokens: torch.Tensor, grid: tuple[int, int], outputs: dict) -> dict[str, float]:
    """Per-teacher KD loss L_t (batch mean, unscaled) of `distiller` in eval mode for these student tokens."""
    distiller.eval()
    per_teacher = distiller(student_tokens, grid, outputs)["per_teacher_loss"].mean(dim=0)
    return {name: float(value) for name, value in zip(distiller.teacher_names, per_teacher)}


def loss_accounts(arm: Arm, trained: dict, vlm, init_tokens: torch.Tensor, loss_batch: dict, shapes, seed: int):
    """Per teacher: the KD loss at the start of training (first logged window), of the initial student under the
    final adapters, and of the final student under them (`report.loss_accounting`)."""
    distiller = build_distiller(arm, shapes, vlm, seed)
    distiller.load_state_dict(load_file(str(Path(trained["folder"]) / DISTILLER_FILE)))
    final_tokens = probes.student_token_map(vlm, loss_batch["pixels"])
    grid = tuple(final_tokens.shape[-2:])
    flat = lambda maps: maps.flatten(2).transpose(1, 2)  # noqa: E731  [B, D, h, w] -> [B, h*w, D]
    initial = kd_losses(distiller, flat(init_tokens), grid, loss_batch["outputs"])
    final = kd_losses(distiller, flat(final_tokens), grid, loss_batch["outputs"])
    first = next(entry for entry in trained["histories"][0] if "kd_loss" in entry)
    return {name: report.loss_accounting(first[f"kd/{name}_loss"], initial[name], final[name]) for name in initial}


def evaluate_arm(folder: str, data: world.DemoData, images: dict, pdata: ProbeData, label: str) -> dict:

    model = MoVEKDForConditionalGeneration.from_pretrained(folder)
    processor = MoVEKDProcessor.from_pretrained(folder)
    questions = data.test.questions
    bar = _bar(f"evaluating {label}", len(questions))
    answers = first_word_answers(model, processor, questions, images, progress=bar.update)
    bar.close()
    Path(folder, "answers.json").write_text(json.dumps(answers, indent=1), encoding="utf-8")
    return {"model": model, "processor": processor, "units": unit_scores(answers, questions),
            "probes": student_probes(model, pdata)}  # fmt: skip


@torch.no_grad()
def expert_use(model, processor, data: world.DemoData, num_images: int = 32) -> list[list[float]]:
    """Share of held-out image tokens routed to each expert (argmax of the router), per encoder layer."""

    questions = [q for q in data.test.questions if q.kind == "count"][:num_images]
    images = [world.render_scene(data.test.scenes[q.scene]) for q in questions]
    inputs = processor(text=[prompt(q) for q in questions], images=images, padding=True, return_tensors="pt")
    outputs = model(**inputs)
    shares = []
    for logits in outputs.router_logits:  # [B, N, E] per layer
        counts = torch.bincount(logits.argmax(-1).flatten(), minlength=logits.shape[-1]).float()
        shares.append((counts / counts.sum()).tolist())
    return shares


# ------------------------------------------------------------------------------------------ results and card


def _jsonable(value):
    if isinstance(value, report.Interval):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_results(run: Path, results: dict, labels: dict, size: DemoSize) -> list[str]:
    """results.md / results.json (every table and the verdict) and eval/results.json (the released arm)."""
    gap = results["gap"]
    lines = ["# MoVE-KD demo: does distillation move the teacher's knowledge into the student?", "",
             f"## 1. Gap check (linear probes per object, {size.probe_train} training / {size.num_test} held-out "
             "scenes, before any training)", "", *report.gap_lines(gap, STUDENT, f"{GAP_TEACHER} teacher"), "",
             f"## 2. Student's tokens after training: linear probes ({len(size.seeds)} seeds per arm; difference "
             "from no KD paired by seed, bootstrap over held-out scenes per seed, t-interval over seeds)", "",
             *report.probe_lines(results["probes"], labels), "",
             "## 3. VLM answers by question type (accuracy %, mean over seeds)", "",
             *report.qa_lines(results["qa"], labels, BASELINE_ARM), "",
             "## 4. Where the KD loss went (mean over seeds; the student's part is what training the student "
             "removed with the final adapters held fixed)", "", *report.loss_lines(results["losses"], labels), "",
             "## 5. Verdict", "", *results["verdict"], ""]  # fmt: skip
    text = "\n".join(lines)
    (run / "results.md").write_text(text, encoding="utf-8")
    summary = {"size": asdict(size), "labels": labels, **{k: v for k, v in results.items() if k != "units"}}
    (run / "results.json").write_text(json.dumps(_jsonable(summary), indent=1), encoding="utf-8")
    final = results["qa"][FINAL_ARM]["accuracy"]
    card_results = {f"world-{kind}": {"accuracy": float(np.mean(final[kind]))} for kind in COLUMNS if kind in final}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "results.json").write_text(json.dumps(card_results, indent=1), encoding="utf-8")
    return lines


def make_plots(run: Path, arms: dict, specs) -> list[str]:
    """Figures of seed 0 of every arm."""
    from skimage import data as skdata

    labels = {arm.name: arm.label for arm in ARMS if arm.name in arms}
    histories = {name: arms[name]["histories"] for name in labels}
    folder = run / "plots"
    shown = f"movekd-hf demo, run {run.name}: training seed 0 of every arm"
    paths = [
        plots.plot_losses(histories, labels, str(folder / "loss_components.png"), shown),
        plots.plot_teacher_weights(histories, labels, str(folder / "teacher_weights.png"), shown),
        plots.plot_experts(
            np.array(arms[FINAL_ARM]["expert_use"]),
            histories,
            labels,
            str(folder / "expert_utilisation.png"),
            f"movekd-hf demo, run {run.name}: {labels[FINAL_ARM]}, seed 0",
        ),
    ]
    photo = skdata.astronaut()
    clip = load_teachers({"clip": specs["clip"]})["clip"]
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].float().div(255.0)  # [1, 3, 512, 512]
    row = clip(images).cls_attention  # [1, N]
    weights = token_weights_from_cls_attention(row)["token_weights"]
    paths.append(
        plots.plot_cls_attention(
            photo, row[0], weights[0], str(folder / "cls_attention_astronaut.png"),
            f"movekd-hf demo, run {run.name}: the pretrained clip teacher (the student's starting tower)",
        )
    )  # fmt: skip
    return paths


def publish_checkpoint(run: Path, arms: dict) -> Path:
    """Copy the released arm's loadable files to RUN/checkpoint and write the card from the run folder."""

    checkpoint = run / "checkpoint"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    shutil.copytree(arms[FINAL_ARM]["folder"], checkpoint,
                    ignore=shutil.ignore_patterns(DISTILLER_FILE, "answers.json", "log_history.json", "README.md",
                                                  "training_args.bin", ".eval_results"))  # fmt: skip
    last = arms[FINAL_ARM]["last"]
    teachers = [{"name": slug, "model_id": model_id} for slug, model_id in TEACHER_IDS.items()]
    config = {**last["train_config"], "teachers": teachers, "license": "apache-2.0"}
    (run / "train_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (run / "training_args.json").write_text(json.dumps(last["training_args"], indent=1), encoding="utf-8")
    write_card(run)
    return checkpoint


TEACHER_IDS = {
    "clip": "demo CLIP ViT (student's initial tower, pretrained here on shapes)",
    "convnext": "demo timm ConvNeXt (pretrained here on stripe orientation per cell)",
    "sam": "demo SAM image encoder (pretrained here on segmentation)",
}

_FINAL_CHECK = """
import json, sys
try:
    import movekd_hf
    raise SystemExit("movekd_hf must not be importable here")
except ImportError:
    pass
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
folder, image_path, question = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
pipe = pipeline("image-text-to-text", model=model, processor=processor)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                         {"type": "text", "text": question}]}]
out = pipe(text=messages, max_new_tokens=3, return_full_text=False, generate_kwargs={"do_sample": False})
print(json.dumps({"model_class": type(model).__name__, "module": type(model).__module__,
                  "processor_class": type(processor).__name__, "answer": out[0]["generated_text"].strip()}))
"""


def final_check(run: Path, checkpoint: Path, data: world.DemoData) -> dict:
    """Reload the checkpoint where `movekd_hf` is not importable (Auto class + pipeline) and ask one question."""

    question = next(q for q in data.test.questions if q.kind == "colour")
    image_path = run / "final_check.png"
    world.render_scene(data.test.scenes[question.scene]).save(image_path)
    text = f"{question.text} {world.SHORT_ANSWER}"
    argv = [str(checkpoint.resolve()), str(image_path.resolve()), text]
    code = f"import sys; sys.argv = [''] + {argv!r}\n" + _FINAL_CHECK
    result = run_without_package(code)
    result.update(question=text, expected=question.answer, correct=result["answer"].lower() == question.answer)
    (run / "final_check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


# ------------------------------------------------------------------------------------------------------- run


def run(out_dir: str, quick: bool = False) -> int:
    """Run the whole demo into `out_dir`; prints the gap check, the tables and the verdict. Returns 0."""
    size = QUICK_SIZE if quick else DEFAULT_SIZE
    arms = [arm for arm in ARMS if arm.name in size.arms]
    labels = {arm.name: arm.label for arm in arms}
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with deterministic(size.seed), quiet_libraries():
        _say(f"[1/8] drawing the world: {size.num_train} training and {size.num_test} held-out scenes")
        data = world.build_world(str(run_dir / "data"), size.num_train, size.num_test, size.seed)
        _say("[2/8] pretraining three teachers on their own signals")
        specs, teacher_reports = prepare_teachers(run_dir, data, size)
        for slug, entry in teacher_reports.items():
            _say(f"      {slug:<9} {entry['task']}: held-out accuracy {entry['test_accuracy']:.1f}%")
        _say("[3/8] pretraining the LLM on world text and assembling the student VLM")
        init = prepare_initial_models(run_dir, data, specs, size)
        _say("[4/8] caching the teachers' features once (shared by every arm and seed)")
        cache = write_teacher_cache(run_dir, data, init, specs)
        processor = MoVEKDProcessor.from_pretrained(init["folder"])
        pdata = probe_data(data, processor, size)
        _say("[5/8] gap check: linear probes on the initial student's and the teachers' tokens")
        gap = report.gap_check(gap_probes(cache["vlm"], cache["teachers"], pdata), STUDENT, f"{GAP_TEACHER} teacher")
        for line in report.gap_lines(gap, STUDENT, f"{GAP_TEACHER} teacher"):
            _say("      " + line)
        ids = [f"scene-{index:05d}" for index in range(min(size.loss_batch, size.num_train))]
        loss_scenes = data.train.scenes[: len(ids)]
        loss_batch = {"outputs": cache["source"]({"sample_ids": ids}),
                      "pixels": processor.image_processor(images=[world.render_scene(s) for s in loss_scenes],
                                                          return_tensors="pt")["pixel_values"]}  # fmt: skip
        init_tokens = probes.student_token_map(cache["vlm"], loss_batch["pixels"])
        images = {index: world.render_scene(scene) for index, scene in enumerate(data.test.scenes)}
        per_scene = {arm.name: [] for arm in arms}
        units = {arm.name: [] for arm in arms}
        losses = {arm.name: {} for arm in arms if arm.kd_preset != "none"}
        first_seed = {}
        for seed in size.seeds:
            for index, arm in enumerate(arms, start=1):
                _say(f"[6/8] seed {seed}, arm {index}/{len(arms)}: {arm.label}")
                trained = train_arm(run_dir, arm, seed, data, init, cache, size)
                evaluated = evaluate_arm(trained["folder"], data, images, pdata, f"{arm.name} seed {seed}")
                per_scene[arm.name].append(evaluated["probes"])
                units[arm.name].append(evaluated["units"])
                if arm.kd_preset != "none":
                    accounts = loss_accounts(arm, trained, evaluated["model"], init_tokens, loss_batch,
                                             cache["shapes"], seed)  # fmt: skip
                    for teacher, account in accounts.items():
                        losses[arm.name].setdefault(teacher, []).append(account)
                if seed == size.seeds[0]:
                    first_seed[arm.name] = {
                        **trained,
                        "expert_use": expert_use(evaluated["model"], evaluated["processor"], data),
                    }
        _say("[7/8] statistics, plots and model card")
        results = {"teachers": teacher_reports, "gap": gap, "probes": report.probe_statistics(per_scene, BASELINE_ARM),
                   "qa": report.qa_statistics(units, BASELINE_ARM), "losses": losses}  # fmt: skip
        results["verdict"] = report.verdict(gap, results["probes"], results["qa"], labels, BASELINE_ARM)
        lines = write_results(run_dir, results, labels, size)
        make_plots(run_dir, first_seed, specs)
        checkpoint = publish_checkpoint(run_dir, first_seed)
        _say("[8/8] reloading the checkpoint without movekd_hf (AutoModelForImageTextToText + pipeline)")
        check = final_check(run_dir, checkpoint, data)
    _say("")
    for line in lines[2:]:
        _say(line)
    # What this shows is the loading path; how often the tiny model answers right is in the QA table above.
    _say(f"Final check: {check['module']}.{check['model_class']}, loaded through remote code and the "
         f"image-text-to-text pipeline, answered {check['answer']!r} to {check['question']!r} (the sample's answer: "
         f"{check['expected']!r}).")  # fmt: skip
    _say(f"Run folder: {run_dir} ({time.perf_counter() - start:.0f} s)")
    return 0


def init_llm_label() -> str:

    return f"{LLM_CONFIG['num_hidden_layers']}x{LLM_CONFIG['hidden_size']}"
