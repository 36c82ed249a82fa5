"""A saved checkpoint loads where `movekd_hf` is not installed, through remote code, on every transformers release
of the version matrix (`REMOTE_MATRIX`: 4.57.6, the oldest 5.x, the locked release, the newest one), and there
computes what the package computes here: logits, the loss and its gradients, greedy tokens, the pipeline's
answer and the chat template's prompt. The same holds for a LLaVA-OneVision checkpoint written by
`movekd-hf init --onevision` (AnyRes tiles, its own processor), run through the same steps in the same process.

One side process per environment does all of it (`SIDE_RUN`) and saves one file; each check below is its own
test reading that result, so a failure names what broke and in which environment (`test_x[tf5-oldest]`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from _model_fixtures import chat_inputs, locked_version, perturb_lora, remote_matrix_params, run_side
from _onevision_fixtures import TINY_SIGLIP, save_stock_onevision
from packaging.version import Version
from transformers import AutoProcessor, pipeline

from movekd_hf import MoVEKDForConditionalGeneration
from movekd_hf.cli import main
from movekd_hf.modeling import MoVEKDOnevisionForConditionalGeneration

QUESTION = "What is in the picture?"
MAX_NEW_TOKENS = 8

# Runs in the side environment. Each step records its traceback instead of stopping the run, so the tests of
# the other steps still see their results; steps after a failed load have nothing to work on and fail too.
SIDE_RUN = r"""
import json, re, sys, traceback
import torch, transformers
folder, auto_name, out, question, max_new_tokens = sys.argv[1:6]
more_folders = sys.argv[6:]  # further checkpoints (the LLaVA-OneVision one), through the same steps


def run_checkpoint(folder):
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
        tensors["inputs"] = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}

    @step("forward")
    def _():
        with torch.no_grad():
            output = state["model"](**state["inputs"])
        tensors["logits"], tensors["vision_hidden_states"] = output.logits, output.vision_hidden_states

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

    return {"result": result, "tensors": tensors}


runs = [run_checkpoint(path) for path in [folder, *more_folders]]
torch.save({**runs[0], "more": runs[1:]}, out)
"""


# Loads the processor alone, in a fresh module cache: transformers copies only the files the processor's module
# imports itself, so a sibling they import in turn (and the model's files, copied when the model loads first) is
# not there.
PROCESSOR_ALONE = r"""
import json, os, sys
os.environ["HF_MODULES_CACHE"] = sys.argv[1]  # read when transformers is imported
from transformers import AutoProcessor
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
loaded = []
for folder in sys.argv[2:]:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    loaded.append([type(processor).__module__, processor.apply_chat_template(messages, add_generation_prompt=True)])
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("env", remote_matrix_params())
def test_processor_loads_alone_from_a_fresh_module_cache(env, tiny_checkpoint, onevision_checkpoint, tmp_path):
    folders = (str(tiny_checkpoint), str(onevision_checkpoint))
    (module, prompt), (onevision_module, onevision_prompt) = json.loads(
        run_side(env, PROCESSOR_ALONE, str(tmp_path / "modules"), *folders)
    )
    assert module.startswith("transformers_modules.") and module.endswith("processing_movekd"), module
    assert prompt.strip().endswith("USER: <image>\nHi? ASSISTANT:")
    assert onevision_module.startswith("transformers_modules.") and onevision_module.endswith("processing_movekd")
    assert onevision_prompt == "<|im_start|>user\n<image>\nHi?<|im_end|>\n<|im_start|>assistant\n"


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


@pytest.fixture(scope="module")
def onevision_checkpoint(tmp_path_factory) -> Path:
    """`movekd-hf init --onevision` on a tiny stock LLaVA-OneVision (tests/_onevision_fixtures.py), then its MoLE
    given trained-looking weights so it matters in the outputs; the processor files stay as init wrote them."""
    root = tmp_path_factory.mktemp("onevision")
    stock = save_stock_onevision(root / "stock")
    assert main(["init", "--onevision", str(stock), "--out", str(root / "init"), "--lora-rank", "4"]) == 0
    model = MoVEKDOnevisionForConditionalGeneration.from_pretrained(root / "init")
    perturb_lora(model, seed=2, scale=0.3)
    shutil.copytree(root / "init", root / "trained")
    model.save_pretrained(root / "trained")
    return root / "trained"


@pytest.fixture(scope="module", params=remote_matrix_params())
def side(request, tiny_checkpoint, onevision_checkpoint, tmp_path_factory) -> dict:
    """The side environment's run of `SIDE_RUN` on the saved checkpoints: `result` (JSON-like) and `tensors` of the
    LLaVA one, and under `more` the same for the LLaVA-OneVision one."""
    env = request.param
    out = tmp_path_factory.mktemp(f"remote-{env.name}") / "side.pt"
    args = (env.auto_class, str(out), QUESTION, str(MAX_NEW_TOKENS), str(onevision_checkpoint))
    run_side(env, SIDE_RUN, str(tiny_checkpoint), *args)
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


# ------------------------------------------------------------------------------------- LLaVA-OneVision checkpoint


@pytest.fixture(scope="module")
def onevision_side(side) -> dict:
    """The side environment's run on the LLaVA-OneVision checkpoint, in the form of `side`."""
    return {"env": side["env"], **side["more"][0]}


@pytest.fixture(scope="module")
def onevision_local(onevision_checkpoint, photo) -> dict:
    """The package's model, processor and pipeline answer on the LLaVA-OneVision checkpoint."""
    model = MoVEKDOnevisionForConditionalGeneration.from_pretrained(onevision_checkpoint).eval()
    pipe = pipeline("image-text-to-text", model=str(onevision_checkpoint), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": QUESTION}]}]
    answer = pipe(
        text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False, generate_kwargs={"do_sample": False}
    )
    processor = AutoProcessor.from_pretrained(onevision_checkpoint)
    return {"model": model, "processor": processor, "pipeline_answer": answer[0]["generated_text"]}


# Pixel values of the side's processor against the package's: equal on 5.x; on 4.57 a few pixels round to the next
# 8-bit level (measured: max |diff| 2/255 after SigLIP's [-1, 1] normalisation, mean 3e-6).
PIXEL_TOLERANCE = 2 / 255 + 1e-6


def test_onevision_loads_its_own_code_with_every_weight(onevision_side):
    _step(onevision_side, "isolation", "load")
    result = onevision_side["result"]
    assert result["movekd_hf_importable"] is False
    assert result["model_class"] == "MoVEKDOnevisionForConditionalGeneration"
    assert result["model_module"].startswith("transformers_modules."), result["model_module"]
    assert result["processor_class"] == "MoVEKDOnevisionProcessor"
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not result[kind], f"{len(result[kind])} {kind.replace('_', ' ')}, e.g. {result[kind][:4]}"


def test_onevision_processor_gives_the_same_prompt_tokens_and_tiles(onevision_side, onevision_local, photo):
    _step(onevision_side, "load", "chat_template", "inputs")
    processor = onevision_local["processor"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert onevision_side["result"]["prompt"] == prompt
    expected = processor(images=[photo], text=[prompt], return_tensors="pt", padding=True)
    got = onevision_side["tensors"]["inputs"]
    assert torch.equal(got["input_ids"], expected["input_ids"])  # AnyRes image tokens counted alike
    assert torch.equal(got["image_sizes"], expected["image_sizes"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape  # the same tiles
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=PIXEL_TOLERANCE)


def test_onevision_logits_and_tile_tokens_match(onevision_side, onevision_local):
    # On the side's own inputs, so only the models differ.
    _step(onevision_side, "load", "chat_template", "inputs", "forward")
    inputs = onevision_side["tensors"]["inputs"]
    with torch.no_grad():
        expected = onevision_local["model"](**inputs)
    _close(onevision_side["tensors"]["logits"], expected.logits, onevision_side, what="logits")
    tokens = onevision_side["tensors"]["vision_hidden_states"]
    grid = (TINY_SIGLIP["image_size"] // TINY_SIGLIP["patch_size"]) ** 2
    assert tokens.shape == (inputs["pixel_values"].shape[1], grid, TINY_SIGLIP["hidden_size"])  # one row per tile
    _close(tokens, expected.vision_hidden_states, onevision_side, what="vision_hidden_states")


def test_onevision_generates_trains_and_answers_in_the_pipeline(onevision_side, onevision_local):
    _step(onevision_side, "load", "chat_template", "inputs", "generate", "backward", "pipeline")
    inputs = onevision_side["tensors"]["inputs"]
    model = onevision_local["model"]
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert torch.equal(onevision_side["tensors"]["tokens"], tokens)
    assert torch.isfinite(onevision_side["tensors"]["loss"])
    grads = onevision_side["tensors"]["grads"]
    assert len(grads) == TINY_SIGLIP["num_hidden_layers"] * 10  # fc1/fc2 x (A, B, their biases) + router weight, bias
    for name, grad in grads.items():  # vision_feature_layer -1: every layer reaches the LM loss
        assert grad is not None and grad.abs().sum() > 0, name
    result = onevision_side["result"]
    assert result["pipeline_module"].startswith("transformers_modules."), result["pipeline_module"]
    assert result["pipeline_answer"] == onevision_local["pipeline_answer"] and result["pipeline_answer"]
