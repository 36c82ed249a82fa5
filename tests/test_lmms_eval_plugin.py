"""lmms-eval evaluates a MoVE-KD checkpoint through `--model movekd`: found through the `lmms_eval.models` entry
point, answering lmms-eval `Instance` requests with LLaVA-1.5's `v1` prompts and greedy decoding, and scoring
continuations with the model's own log-probabilities.

lmms-eval lives in its own environment (`make .venv-lmms/.installed`, part of `make test`). One side process there
runs every request (`SIDE_RUN`) on a tiny checkpoint and small images saved to tmp; the tests below redo each answer
here, in the main environment, from hand-written prompts and the model's logits."""

from __future__ import annotations

import json
import os
import subprocess

import datasets
import numpy as np
import pytest
import torch
from _model_fixtures import REPO
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

LMMS_VENV = ".venv-lmms"
MAKE_TARGET = f"make {LMMS_VENV}/.installed"
MAX_NEW_TOKENS = 6
SHORT = "Answer the question using a single word or phrase."
# LLaVA's `conv_vicuna_v1` system text, the conversation LLaVA-1.5 evaluates with (llava/conversation.py).
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA-1.5 pads with its image processor's mean as bytes: int(255 * CLIP mean) per channel.
PAD_COLOUR = (122, 116, 104)

# (question, answer, image size or None for a text-only document): prompts of different lengths, so batches
# are reordered by length and must come back in request order.
DOCS = [
    ("Is there a red square in the picture?", "Yes", (37, 53)),
    ("How many?", "two", (61, 29)),
    ("What colour is the sky on a clear day, in one word?", "blue", (45, 45)),
    ("What is two plus two?", "4", None),
]

SIDE_RUN = r"""
import json, sys, time, traceback
from PIL import Image
folder, docs_file, out, max_new_tokens, task_dir = sys.argv[1:6]
max_new_tokens = int(max_new_tokens)
docs = json.load(open(docs_file))
SHORT = "Answer the question using a single word or phrase."
result = {"errors": {}, "seconds": {}}
state = {}


def step(name):
    def run(function):
        start = time.perf_counter()
        try:
            function()
        except BaseException:
            result["errors"][name] = traceback.format_exc()
        result["seconds"][name] = round(time.perf_counter() - start, 2)
    return run


def visuals(doc):
    return [Image.open(doc["image"])] if doc["image"] else []


def request(kind, arguments, doc_id):
    from lmms_eval.api.instance import Instance
    return Instance(kind, arguments, idx=0, metadata={"task": "toy", "doc_id": doc_id, "repeats": 1})


@step("registry")
def _():
    import lmms_eval.models as models
    state["cls"] = models.get_model("movekd")
    cls = state["cls"]
    result["class"] = f"{cls.__module__}.{cls.__name__}"
    alias = models.get_model("movekd_hf")
    result["alias_class"] = f"{alias.__module__}.{alias.__name__}"
    result["listed"] = "movekd" in models.list_available_models()


@step("load")
def _():
    lm = state["cls"].create_from_arg_string(f"pretrained={folder},batch_size=2", {"device": "cpu", "batch_size": None})
    lm.task_dict = {"toy": {"test": docs}}
    state["lm"] = lm
    result["rank_world"] = [lm.rank, lm.world_size]


@step("prompts")
def _():
    lm = state["lm"]
    result["prompts"] = {"one_image": lm.build_prompt("Is it red?", 1), "no_image": lm.build_prompt("Is it red?", 0),
                         "placeholder": lm.build_prompt("<image>\nIs it red?", 1)}
    lm.instruction = "short_answer"
    result["prompts"]["short_added"] = lm.build_prompt("Is it red?", 1)
    result["prompts"]["short_kept"] = lm.build_prompt(f"Is it red?\n{SHORT}", 1)
    lm.instruction = "task"


@step("generate_until")
def _():
    lm = state["lm"]
    kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    requests = [request("generate_until", (f"{d['question']}\n{SHORT}", dict(kwargs), visuals, i, "toy", "test"), i)
                for i, d in enumerate(docs)]
    answers = lm.generate_until(requests)
    result["generate_until"] = answers
    # Stop strings: cut a second run (one batch) at a character its first answer holds.
    stops = [a[1] if len(a) > 1 else "\n\n" for a in answers[:2]]
    result["stops"] = stops
    requests = [request("generate_until", (f"{d['question']}\n{SHORT}", dict(kwargs, until=[stop]), visuals, i,
                                           "toy", "test"), i) for i, (d, stop) in enumerate(zip(docs, stops))]
    result["generate_until_cut"] = lm.generate_until(requests)


@step("loglikelihood")
def _():
    lm = state["lm"]
    target = lambda doc: doc["answer"]  # lmms-eval passes doc_to_target as a string or a function
    requests = [request("loglikelihood", (d["question"], d["answer"] if i % 2 else target, visuals, i, "toy", "test"), i)
                for i, d in enumerate(docs)]
    requests.append(request("loglikelihood", (docs[0]["question"], " No", visuals, 0, "toy", "test"), 0))
    result["loglikelihood"] = [[type(v).__name__ for v in pair] + list(pair) for pair in lm.loglikelihood(requests)]


@step("multi_round")
def _():
    lm = state["lm"]
    contexts = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx >= 2:
            return None, None, True, previous_output, previous_round_info
        context = f"You said {previous_output[-1]!r}. Are you sure?"
        contexts.append(context)
        return visuals(doc), context, False, previous_output, {"round": round_idx}

    requests = [request("generate_until_multi_round", (docs[0]["question"], {"max_new_tokens": max_new_tokens},
                                                       visuals, doc_to_text, 0, "toy", "test"), 0)]
    result["multi_round"] = lm.generate_until_multi_round(requests)
    result["multi_round_contexts"] = contexts


@step("evaluator")
def _():
    # lmms-eval's own evaluator on a task folder: documents from disk, its prompts, its scoring.
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    tasks = TaskManager(include_path=task_dir, include_defaults=False)
    output = simple_evaluate(model=state["lm"], tasks=["movekd_toy"], task_manager=tasks, batch_size=2, device="cpu",
                             log_samples=True, bootstrap_iters=0)
    samples = sorted(output["samples"]["movekd_toy"], key=lambda sample: sample["doc_id"])
    result["evaluator"] = {"answers": [sample["filtered_resps"][0] for sample in samples],
                           "exact": float(output["results"]["movekd_toy"]["exact,none"])}


json.dump(result, open(out, "w"))
"""

# An lmms-eval task as a user writes one (a YAML file and its functions), over documents saved with `datasets`.
TASK_YAML = """task: movekd_toy
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: True
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["\\n\\n"]
process_results: !function toy_utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""
TASK_UTILS = """def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + (lmms_eval_specific_kwargs or {}).get("post_prompt", "")


def process_results(doc, results):
    return {"exact": float(results[0] == doc["answer"])}
"""


@pytest.fixture(scope="module")
def side(tiny_checkpoint, tmp_path_factory):
    """Run `SIDE_RUN` once in the lmms-eval environment; its result plus the documents it answered."""
    python = REPO / LMMS_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: build the lmms-eval environment with `{MAKE_TARGET}` (`make test` does)")
    folder = tmp_path_factory.mktemp("lmms_docs")
    docs = []
    for index, (question, answer, size) in enumerate(DOCS):
        path = None
        if size is not None:
            path = str(folder / f"image{index}.png")
            pixels = np.random.default_rng(index).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        docs.append({"question": question, "answer": answer, "image": path})
    (folder / "docs.json").write_text(json.dumps(docs))
    task_dir = _task_folder(folder, [d for d in docs if d["image"]])
    out = folder / "result.json"
    arguments = [str(tiny_checkpoint), str(folder / "docs.json"), str(out), str(MAX_NEW_TOKENS), str(task_dir)]
    run = subprocess.run(
        [str(python), "-c", SIDE_RUN, *arguments],
        cwd="/",
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(folder / "hf"),
            "PYTHONPATH": "",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and out.exists(), f"{LMMS_VENV} run failed:\n{run.stderr[-4000:]}"
    return json.loads(out.read_text()), docs


def _task_folder(folder, docs: list[dict]):
    """`TASK_YAML` and its functions in a folder, over `docs` saved to disk as a `datasets` DatasetDict."""
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})  # fmt: skip
    dataset = datasets.Dataset.from_list(docs, features=features)
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(folder / "toy_dataset"))
    task_dir = folder / "tasks"
    task_dir.mkdir()
    yaml = TASK_YAML.format(dataset=folder / "toy_dataset", max_new_tokens=MAX_NEW_TOKENS)
    (task_dir / "movekd_toy.yaml").write_text(yaml)
    (task_dir / "toy_utils.py").write_text(TASK_UTILS)
    return task_dir


def _ok(result: dict, *steps: str) -> None:
    failed = {name: result["errors"][name] for name in steps if name in result["errors"]}
    assert not failed, "\n".join(f"[{name}]\n{trace}" for name, trace in failed.items())


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The checkpoint loaded here, in the main environment, for the independent computations."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    return model, processor


def _padded(path: str | None) -> list:
    """LLaVA-1.5's expand2square, written out: the image centred on a square of the mean colour."""
    if path is None:
        return []
    image = Image.open(path).convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), PAD_COLOUR)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return [canvas]


def _v1(text: str, with_image: bool) -> str:
    return f"{SYSTEM} USER: {'<image>' + chr(10) if with_image else ''}{text} ASSISTANT:"


def _inputs(processor, text: str, images: list):
    return processor(images=images or None, text=[text], return_tensors="pt")


def _greedy(reference, text: str, images: list) -> str:
    model, processor = reference
    inputs = _inputs(processor, text, images)
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def test_lmms_eval_finds_movekd_through_the_entry_point(side):
    result, _ = side
    _ok(result, "registry", "load")
    assert result["class"] == result["alias_class"] == "movekd_hf.integrations.lmms_eval.MoVEKDLmmsEval"
    assert result["listed"] and result["rank_world"] == [0, 1]


def test_prompts_are_llava_v1_with_the_image_first(side):
    result, _ = side
    _ok(result, "prompts")
    prompts = result["prompts"]
    assert prompts["one_image"] == prompts["placeholder"] == _v1("Is it red?", True)
    assert prompts["no_image"] == _v1("Is it red?", False)
    # The short-answer instruction is added once, never twice.
    assert prompts["short_added"] == prompts["short_kept"] == _v1(f"Is it red?\n{SHORT}", True)


def test_generate_until_gives_the_greedy_answer_of_each_request(side, reference):
    result, docs = side
    _ok(result, "generate_until")
    answers = result["generate_until"]
    assert len(answers) == len(docs) and all(isinstance(answer, str) for answer in answers)
    # Batches of 2, longest prompt first: each answer must still be its own request's.
    expected = [_greedy(reference, _v1(f"{d['question']}\n{SHORT}", bool(d["image"])), _padded(d["image"]))
                for d in docs]  # fmt: skip
    assert answers == [text.split("\n\n")[0].strip() for text in expected]
    cut = [text.split(stop)[0].strip() for text, stop in zip(expected, result["stops"])]
    assert result["generate_until_cut"] == cut and cut != answers[: len(cut)]  # `until` took effect


def test_loglikelihood_is_the_models_log_probability_of_the_continuation(side, reference):
    result, docs = side
    _ok(result, "loglikelihood")
    model, processor = reference
    pairs = [(d["question"], d["answer"], d["image"]) for d in docs] + [(docs[0]["question"], " No", docs[0]["image"])]
    assert len(result["loglikelihood"]) == len(pairs)
    for (question, answer, image), (float_type, bool_type, log_prob, greedy) in zip(pairs, result["loglikelihood"]):
        assert (float_type, bool_type) == ("float", "bool")
        continuation = answer if answer.startswith(" ") else " " + answer  # the v1 space after "ASSISTANT:"
        inputs = _inputs(processor, _v1(question, bool(image)) + continuation, _padded(image))
        n = len(continuation.encode("utf-8"))  # the tiny tokenizer has one token per byte
        with torch.inference_mode():
            logits = model(**inputs).logits[0].float()  # [T, V]
        targets = inputs["input_ids"][0, -n:]
        expected = torch.log_softmax(logits[-n - 1 : -1], dim=-1).gather(-1, targets[:, None]).sum()
        assert log_prob == pytest.approx(float(expected), abs=1e-5)
        assert log_prob < 0
        assert greedy == bool((logits[-n - 1 : -1].argmax(-1) == targets).all())


def test_multi_round_asks_the_task_for_each_next_turn(side, reference):
    result, docs = side
    _ok(result, "multi_round")
    (rounds,) = result["multi_round"]
    assert len(rounds) == 2 and all(isinstance(text, str) for text in rounds)
    assert result["multi_round_contexts"] == [f"You said {rounds[0]!r}. Are you sure?"]
    images = _padded(docs[0]["image"])
    assert rounds[0] == _greedy(reference, _v1(docs[0]["question"], True), images).strip()
    assert rounds[1] == _greedy(reference, _v1(result["multi_round_contexts"][0], True), images).strip()


def test_lmms_eval_evaluator_runs_a_task_through_the_plugin(side):
    """lmms-eval's evaluator, on a task folder as users write them (same questions and instruction as the requests
    above): its answers are the ones `generate_until` gave, which the test above recomputes independently."""
    result, docs = side
    _ok(result, "evaluator", "generate_until")
    with_image = [i for i, d in enumerate(docs) if d["image"]]
    assert result["evaluator"]["answers"] == [result["generate_until"][i] for i in with_image]
    right = [answer == docs[i]["answer"] for answer, i in zip(result["evaluator"]["answers"], with_image)]
    assert result["evaluator"]["exact"] == pytest.approx(sum(right) / len(right))
