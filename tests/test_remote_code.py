"""A saved checkpoint loads where `movekd_hf` is not installed, through remote code, on every transformers release
of the version matrix (`REMOTE_MATRIX`: 4.57.6, the oldest 5.x, the locked release, the newest one), and there
computes what the package computes here: logits, the loss and its gradients, greedy tokens, the pipeline's
answer and the chat template's prompt.

One side process per environment does all of it (`SIDE_RUN`) and saves one file; each check below is its own
test reading that result, so a failure names what broke and in which environment (`test_x[tf5-oldest]`)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from _model_fixtures import chat_inputs, locked_version, remote_matrix_params, run_side
from packaging.version import Version
from transformers import AutoProcessor, pipeline

from movekd_hf import MoVEKDForConditionalGeneration

QUESTION = "What is in the picture?"
MAX_NEW_TOKENS = 8

# Runs in the side environment. Each step records its traceback instead of stopping the run, so the tests of
# the other steps still see their results; steps after a failed load have nothing to work on and fail too.
SIDE_RUN = r"""
import json, re, sys, traceback
import torch, transformers
folder, auto_name, out, question, max_new_tokens = sys.argv[1:6]
result = {"errors": {}, "version": transformers.__version__}
tensors = {}
state = {}


def step(name):
    def run(function):
        try:
            function()
        except BaseException:
            result["errors"][name] = traceback.format_exc()
    return run


@step("isolation")
def _():
    try:
        import movekd_hf  # noqa: F401
        result["movekd_hf_importable"] = True
    except ImportError:
        result["movekd_hf_importable"] = False


@step("load")
def _():
    from transformers import AutoProcessor
    auto = getattr(transformers, auto_name)
    model, info = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    state.update(model=model.eval(), processor=processor)
    result.update(model_class=type(model).__name__, model_module=type(model).__module__,
                  processor_class=type(processor).__name__,
                  missing_keys=sorted(info.get("missing_keys", ())),
                  unexpected_keys=sorted(info.get("unexpected_keys", ())),
                  mismatched_keys=sorted(str(key) for key in info.get("mismatched_keys", ())))


@step("chat_template")
def _():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    result["prompt"] = state["processor"].apply_chat_template(messages, add_generation_prompt=True)


@step("inputs")
def _():
    from PIL import Image
    from skimage import data
    state["image"] = Image.fromarray(data.astronaut())
    inputs = state["processor"](images=[state["image"]], text=[result["prompt"]], return_tensors="pt", padding=True)
    state["inputs"] = inputs
    tensors["input_ids"] = inputs["input_ids"]


@step("forward")
def _():
    with torch.no_grad():
        tensors["logits"] = state["model"](**state["inputs"]).logits


@step("generate")
def _():
    with torch.no_grad():
        tensors["tokens"] = state["model"].generate(**state["inputs"], max_new_tokens=int(max_new_tokens),
                                                    do_sample=False)


@step("backward")
def _():
    model, inputs = state["model"], state["inputs"]
    model.train()
    model.zero_grad()
    output = model(**inputs, labels=inputs["input_ids"])
    output.loss.backward()
    model.eval()
    tensors["loss"] = output.loss.detach()
    grads = {}
    for name, param in model.named_parameters():
        match = re.search(r"encoder\.layers\.\d+\.mlp\..*", name)
        if match and (".lora_" in name or ".router." in name):
            grads[match.group(0)] = None if param.grad is None else param.grad.detach().clone()
    tensors["grads"] = grads


@step("pipeline")
def _():
    from transformers import pipeline
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": state["image"]},
                                             {"type": "text", "text": question}]}]
    answer = pipe(text=messages, max_new_tokens=int(max_new_tokens), return_full_text=False,
                  generate_kwargs={"do_sample": False})
    result.update(pipeline_answer=answer[0]["generated_text"], pipeline_module=type(pipe.model).__module__)


torch.save({"result": result, "tensors": tensors}, out)
"""


# Loads the processor alone, in a fresh module cache: transformers copies only the files the processor's module
# imports itself, so a sibling they import in turn (and the model's files, copied when the model loads first) is
# not there.
PROCESSOR_ALONE = r"""
import os, sys
os.environ["HF_MODULES_CACHE"] = sys.argv[2]  # read when transformers is imported
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
print(type(processor).__module__, processor.apply_chat_template(messages, add_generation_prompt=True), sep="\n")
"""


@pytest.mark.parametrize("env", remote_matrix_params())
def test_processor_loads_alone_from_a_fresh_module_cache(env, tiny_checkpoint, tmp_path):
    module, prompt = run_side(env, PROCESSOR_ALONE, str(tiny_checkpoint), str(tmp_path / "modules")).split("\n", 1)
    assert module.startswith("transformers_modules.") and module.endswith("processing_movekd"), module
    assert prompt.strip().endswith("USER: <image>\nHi? ASSISTANT:")


def _exact(side: dict) -> bool:
    """Bit-for-bit agreement is expected within the main environment's major release (5.0.0 and 5.24.0 compute
    the same float32 values here). 4.57 routes the same weights through its own LLaVA/CLIP/LLaMA code (attention
    and mask handling, the order of additions), which moves results by rounding (max |diff| 5e-4 on the logits,
    2e-6 on the loss, 0.08 % of the largest gradient entry), so there the checks allow a tolerance."""
    return Version(side["result"]["version"]).major == Version(transformers.__version__).major


def _close(actual, expected, side: dict, tolerance: float = 1e-3, what: str = "", scaled: bool = False) -> None:
    """Bit for bit on the main environment's release, else within `tolerance` (of the largest |expected| when
    `scaled`: gradients are ~1e-3 here, so an absolute tolerance would say nothing)."""
    if _exact(side):
        if not torch.equal(actual, expected):
            diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else "shape"
            pytest.fail(
                f"{what}: not bit for bit equal within the main environment's major release (max |diff| {diff})"
            )
    else:
        atol = tolerance * float(expected.abs().max()) if scaled else tolerance
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def local_reference(tiny_checkpoint, photo) -> dict:
    """What the package itself computes on the saved checkpoint, in the same steps as `SIDE_RUN`."""
    model = MoVEKDForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = chat_inputs(processor, photo, QUESTION)
    reference = {"prompt": processor.apply_chat_template(messages, add_generation_prompt=True)}
    with torch.no_grad():
        reference["logits"] = model(**inputs).logits
        reference["tokens"] = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    model.train()
    output = model(**inputs, labels=inputs["input_ids"])
    output.loss.backward()
    reference["loss"] = output.loss.detach()
    reference["grads"] = {
        re.search(r"encoder\.layers\.\d+\.mlp\..*", name).group(0): param.grad
        for name, param in model.named_parameters()
        if ".lora_" in name or ".router." in name
    }
    reference["input_ids"] = inputs["input_ids"]
    # Encoder layers whose output reaches the LM loss: up to the deepest `vision_feature_layer` (-2 in LLaVA:
    # the last layer's LoRA is never read, and its router learns only from the balance loss, which is not here).
    num_layers, feature_layers = model.config.vision_config.num_hidden_layers, model.config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    reference["layers_in_loss"] = max(layer if layer >= 0 else num_layers + 1 + layer for layer in feature_layers)
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": QUESTION}]}]
    answer = pipe(
        text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False, generate_kwargs={"do_sample": False}
    )
    reference["pipeline_answer"] = answer[0]["generated_text"]
    return reference


@pytest.fixture(scope="module", params=remote_matrix_params())
def side(request, tiny_checkpoint, tmp_path_factory) -> dict:
    """The side environment's run of `SIDE_RUN` on the saved checkpoint: `result` (JSON-like) and `tensors`."""
    env = request.param
    out = tmp_path_factory.mktemp(f"remote-{env.name}") / "side.pt"
    run_side(env, SIDE_RUN, str(tiny_checkpoint), env.auto_class, str(out), QUESTION, str(MAX_NEW_TOKENS))
    return {"env": env, **torch.load(out)}


def _step(side: dict, *steps: str) -> None:
    """Fail with the side environment's own traceback if one of `steps` failed there."""
    for name in steps:
        error = side["result"]["errors"].get(name)
        if error is not None:
            env = side["env"]
            pytest.fail(f"{env.name} (transformers {side['result']['version']}), step {name!r}:\n{error}")


def test_runs_the_release_under_test_without_the_package(side):
    _step(side, "isolation")
    expected = side["env"].expected_transformers
    if expected is not None:
        assert side["result"]["version"] == expected
    else:  # tf-latest: the newest release, at least the locked one
        assert Version(side["result"]["version"]) >= Version(locked_version("transformers"))
    assert side["result"]["movekd_hf_importable"] is False, "movekd_hf is importable in the side environment"


def test_loads_the_checkpoints_own_code_through_the_auto_classes(side):
    _step(side, "load")
    result = side["result"]
    assert result["model_class"] == "MoVEKDForConditionalGeneration"
    assert result["model_module"].startswith("transformers_modules."), result["model_module"]
    assert result["processor_class"] == "MoVEKDProcessor"


def test_every_weight_of_the_checkpoint_loads(side):
    _step(side, "load")
    result = side["result"]
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = result[kind]
        assert not keys, f"{len(keys)} {kind.replace('_', ' ')}, e.g. {keys[:4]}"


def test_chat_template_renders_the_same_prompt(side, local_reference):
    _step(side, "load", "chat_template")
    assert side["result"]["prompt"] == local_reference["prompt"]


def test_processor_gives_the_same_input_ids(side, local_reference):
    _step(side, "load", "chat_template", "inputs")
    ids, expected = side["tensors"]["input_ids"], local_reference["input_ids"]
    assert torch.equal(ids, expected), f"{ids.tolist()} != {expected.tolist()}"


def test_logits_match(side, local_reference):
    _step(side, "load", "chat_template", "inputs", "forward")
    _close(side["tensors"]["logits"], local_reference["logits"], side, what="logits")


def test_greedy_generate_gives_the_same_tokens(side, local_reference):
    # Exact everywhere: the rounding differences above are far below the gaps between the top logits.
    _step(side, "load", "chat_template", "inputs", "generate")
    tokens, expected = side["tensors"]["tokens"], local_reference["tokens"]
    new = expected.shape[1] - local_reference["input_ids"].shape[1]
    assert torch.equal(tokens, expected), f"new tokens {tokens[:, -new:].tolist()} != {expected[:, -new:].tolist()}"


def test_loss_with_labels_matches(side, local_reference):
    _step(side, "load", "chat_template", "inputs", "backward")
    loss = side["tensors"]["loss"]
    assert torch.isfinite(loss), f"loss {loss}"
    _close(loss, local_reference["loss"], side, what="loss")


def test_backward_reaches_every_lora_expert_and_router_in_the_loss(side, local_reference):
    _step(side, "load", "chat_template", "inputs", "backward")
    grads = side["tensors"]["grads"]
    assert set(grads) == set(local_reference["grads"])
    layers_in_loss = local_reference["layers_in_loss"]
    checked = 0
    for name, grad in grads.items():
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        if layer >= layers_in_loss:
            continue  # never read by LLaVA (the last layer's LoRA; its router only has the balance loss)
        total = None if grad is None else grad.abs().sum().item()
        assert total is not None and total > 0, f"{name} got no gradient (sum of |grad|: {total})"
        checked += 1
    assert checked > 0


def test_gradients_match(side, local_reference):
    _step(side, "load", "chat_template", "inputs", "backward")
    for name, expected in local_reference["grads"].items():
        grad = side["tensors"]["grads"][name]
        if expected is None:
            assert grad is None or not grad.any(), f"{name}: a gradient where the package computes none"
        else:
            assert grad is not None, f"{name}: no gradient"
            # Off the main release: within 0.5 % of the tensor's largest entry (4.57.6: 0.08 % seen).
            _close(grad, expected, side, tolerance=5e-3, what=name, scaled=True)


def test_pipeline_gives_the_same_answer(side, local_reference):
    _step(side, "load", "pipeline")
    result = side["result"]
    assert result["pipeline_module"].startswith("transformers_modules."), result["pipeline_module"]
    assert result["pipeline_answer"] == local_reference["pipeline_answer"]
    assert len(result["pipeline_answer"]) > 0
