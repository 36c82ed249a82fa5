"""`run(out_dir, quick)`: every step of the demo, writing one run folder.

RUN/
  data/                 world images, pretrain.json (stage 1), finetune.json (stage 2)
  teachers/<slug>/      the pretrained teachers (loaded back through `build_teacher`)
  init/                 vision encoder, LLM, and the untrained VLMs (default and faithful MoLE)
  arms/<arm>/stage{1,2} trainer output folders, log_history.json, answers.json
  checkpoint/           the MoVE-KD (improved) model: loadable through remote code, with README.md (model card)
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

import torch

from ..distill.losses import token_weights_from_cls_attention
from ..hub_cards.card import write_card
from ..isolated import run_without_package
from ..modeling import MoVEKDForConditionalGeneration, MoVEKDProcessor
from ..training.checkpoint import DISTILLER_FILE
from . import assemble, plots, world
from .arms import ARMS, Arm, StageSettings, run_stage
from .assemble import LLM_CONFIG
from .evaluate import answer_questions, prompt, score, table_row
from .report import markdown_table, verdict
from .teachers import load_teachers, pretrain_teachers, seed_everything

FINAL_ARM = "movekd_improved"
TRIED = (
    "four arms differing only in the KD setting (none, mse_baseline, faithful, improved) with identical data order "
    "and seeds; complementary teachers (colour-blind CLIP ViT segmenting shapes per patch, colour ConvNeXt at 48 px, "
    "segmentation SAM at 96 px)"
)


@dataclass(frozen=True)
class DemoSize:
    num_train: int
    num_test: int
    teacher_steps: int
    llm_steps: int
    stage1_steps: int
    stage2_steps: int
    batch_size: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    seed: int = 0


# Sized for the budget (default < 10 min, --quick < 2 min on 2 CPU cores); see benchmarks/bench_demo.py.
# Stage 1 trains only the projector (and MoLE) under a frozen LLM, which a tiny LLM cannot be steered through in a
# few steps, so it stays short; the VLM learns to read the image in stage 2, where the LLM trains too.
DEFAULT_SIZE = DemoSize(num_train=1000, num_test=120, teacher_steps=150, llm_steps=150, stage1_steps=50,
                        stage2_steps=500, stage2_lr=2e-3)  # fmt: skip
QUICK_SIZE = DemoSize(num_train=96, num_test=24, teacher_steps=6, llm_steps=8, stage1_steps=3, stage2_steps=4,
                      batch_size=8)  # fmt: skip


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

    specs, reports = pretrain_teachers(str(run / "teachers"), train, test, size.teacher_steps, size.seed, factory)
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
    folders = {
        faithful: assemble.initial_checkpoint(
            vision_dir, llm_dir, str(init / ("faithful" if faithful else "default")), faithful
        )
        for faithful in (False, True)
    }
    return {"folders": folders, "llm_loss": loss}


def train_arm(run: Path, arm: Arm, data: world.DemoData, specs, init: dict, size: DemoSize) -> dict:
    """Stage 1 then stage 2 of one arm; returns both log histories and the final folder."""

    folder = run / "arms" / arm.name
    stage1 = StageSettings("stage1", data.pretrain_json, data.image_folder, "plain", size.stage1_steps,
                           size.batch_size, size.stage1_lr, size.seed)  # fmt: skip
    stage2 = StageSettings("stage2", data.finetune_json, data.image_folder, "v1", size.stage2_steps,
                           size.batch_size, size.stage2_lr, size.seed)  # fmt: skip
    start = init["folders"][arm.faithful_mole]
    first = run_stage(stage1, start, arm.kd_preset, str(folder / "stage1"), specs)
    second = run_stage(
        stage2, str(folder / "stage1"), arm.kd_preset, str(folder / "stage2"), specs, previous=str(folder / "stage1")
    )
    return {"histories": [first["history"], second["history"]], "folder": str(folder / "stage2"), "last": second}


def evaluate_arm(folder: str, data: world.DemoData, label: str) -> dict:

    model = MoVEKDForConditionalGeneration.from_pretrained(folder)
    processor = MoVEKDProcessor.from_pretrained(folder)
    questions = data.test.questions
    bar = _bar(f"evaluating {label}", len(questions))
    answers = answer_questions(model, processor, questions, data.test.scenes, progress=bar.update)
    bar.close()
    Path(folder, "answers.json").write_text(json.dumps(answers, indent=1), encoding="utf-8")
    scores = score(answers, questions)
    return {"scores": scores, "row": table_row(scores), "expert_use": expert_use(model, processor, data)}


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


def write_results(run: Path, arms: dict, teachers: dict, size: DemoSize, llm: str) -> dict:
    """results.md / results.json (every arm) and eval/results.json (the released arm, for the model card)."""

    labels = {arm.name: arm.label for arm in ARMS if arm.name in arms}
    rows = {name: arms[name]["row"] for name in labels}
    table = markdown_table(rows, labels, llm)
    lines = verdict(rows, labels, TRIED)
    teacher_lines = [f"- `{slug}`: {r['task']}, held-out accuracy {r['test_accuracy']:.1f}%" for slug, r in
                     teachers.items()]  # fmt: skip
    text = "\n".join(["# MoVE-KD demo: held-out accuracy (%) by question type", "", table, "", *lines, "",
                      "Teachers:", *teacher_lines, ""])  # fmt: skip
    (run / "results.md").write_text(text, encoding="utf-8")
    summary = {
        "columns": list(next(iter(rows.values()))),
        "arms": {name: {"label": labels[name], "row": rows[name], "scores": arms[name]["scores"]} for name in labels},
        "verdict": lines,
        "teachers": teachers,
        "size": asdict(size),
    }
    (run / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    final = arms[FINAL_ARM]["scores"]
    card_results = {f"world-{kind}": {"accuracy": value} for kind, value in rows[FINAL_ARM].items()
                    if kind not in ("pope", "overall")}  # fmt: skip
    card_results["world-pope"] = {m: final["pope"][m] for m in ("f1", "accuracy", "precision", "recall")}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "results.json").write_text(json.dumps(card_results, indent=1), encoding="utf-8")
    return {"table": table, "verdict": lines}


def make_plots(run: Path, arms: dict, specs) -> list[str]:
    import numpy as np
    from skimage import data as skdata

    labels = {arm.name: arm.label for arm in ARMS if arm.name in arms}
    histories = {name: arms[name]["histories"] for name in labels}
    folder = run / "plots"
    paths = [
        plots.plot_losses(histories, labels, str(folder / "loss_components.png")),
        plots.plot_teacher_weights(histories, labels, str(folder / "teacher_weights.png")),
        plots.plot_experts(
            np.array(arms[FINAL_ARM]["expert_use"]), histories, labels, str(folder / "expert_utilisation.png")
        ),
    ]
    photo = skdata.astronaut()
    clip = load_teachers({"clip": specs["clip"]})["clip"]
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].float().div(255.0)  # [1, 3, 512, 512]
    row = clip(images).cls_attention  # [1, N]
    weights = token_weights_from_cls_attention(row)["token_weights"]
    paths.append(plots.plot_cls_attention(photo, row[0], weights[0], str(folder / "cls_attention_astronaut.png")))
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
    "convnext": "demo timm ConvNeXt (pretrained here on colours)",
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
    """Run the whole demo into `out_dir`; prints the table and the verdict. Returns 0 on success."""
    size = QUICK_SIZE if quick else DEFAULT_SIZE
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with deterministic(size.seed), quiet_libraries():
        _say(f"[1/7] drawing the world: {size.num_train} training and {size.num_test} held-out scenes")
        data = world.build_world(str(run_dir / "data"), size.num_train, size.num_test, size.seed)
        _say("[2/7] pretraining three teachers on complementary signals")
        specs, teacher_reports = prepare_teachers(run_dir, data, size)
        for slug, report in teacher_reports.items():
            _say(f"      {slug:<9} {report['task']}: held-out accuracy {report['test_accuracy']:.1f}%")
        _say("[3/7] pretraining the LLM on world text and assembling the student VLM")
        init = prepare_initial_models(run_dir, data, specs, size)
        arms = {}
        for index, arm in enumerate(ARMS, start=1):
            _say(f"[4/7] arm {index}/{len(ARMS)}: {arm.label}: stage 1, stage 2, evaluation")
            trained = train_arm(run_dir, arm, data, specs, init, size)
            arms[arm.name] = {**trained, **evaluate_arm(trained["folder"], data, arm.label)}
        _say("[5/7] results")
        llm = f"LLaMA {init_llm_label()}"
        results = write_results(run_dir, arms, teacher_reports, size, llm)
        _say("[6/7] plots and model card")
        make_plots(run_dir, arms, specs)
        checkpoint = publish_checkpoint(run_dir, arms)
        _say("[7/7] reloading the checkpoint without movekd_hf (AutoModelForImageTextToText + pipeline)")
        check = final_check(run_dir, checkpoint, data)
    _say("\n" + results["table"] + "\n")
    for line in results["verdict"]:
        _say(line)
    _say(f"Final check: {check['module']}.{check['model_class']} answered {check['answer']!r} to "
         f"{check['question']!r} (expected {check['expected']!r}).")  # fmt: skip
    _say(f"Run folder: {run_dir} ({time.perf_counter() - start:.0f} s)")
    return 0


def init_llm_label() -> str:

    return f"{LLM_CONFIG['num_hidden_layers']}x{LLM_CONFIG['hidden_size']}"
