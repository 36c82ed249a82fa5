"""A saved checkpoint loads where `movekd_hf` is not installed, through remote code: in a separate
environment on transformers 5 (Auto class and `pipeline`) and on transformers 4.57 (`AutoModelForVision2Seq`)."""

import json

import pytest
import torch
from _model_fixtures import chat_inputs, run_side
from transformers import AutoProcessor, pipeline

from movekd_hf import MoVEKDForConditionalGeneration

# Runs in the side environment: loads the folder with trust_remote_code, saves logits and greedy tokens.
LOAD_AND_RUN = """
import json, sys, torch, transformers
try:
    import movekd_hf
    raise SystemExit("movekd_hf is importable in the side environment")
except ImportError:
    pass
from PIL import Image
from skimage import data
from transformers import AutoProcessor
folder, auto_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
auto = getattr(transformers, auto_name)
model = auto.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.fromarray(data.astronaut())], text=[prompt], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
torch.save({"logits": logits, "tokens": tokens, "input_ids": inputs["input_ids"]}, out)
print(json.dumps({"version": transformers.__version__, "class": type(model).__name__,
                  "module": type(model).__module__, "processor": type(processor).__name__}))
"""

PIPELINE = """
import json, sys
try:
    import movekd_hf
    raise SystemExit("movekd_hf is importable in the side environment")
except ImportError:
    pass
from PIL import Image
from skimage import data
from transformers import pipeline
pipe = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
image = Image.fromarray(data.astronaut())
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in the picture?"}]}]
out = pipe(text=messages, max_new_tokens=8, return_full_text=False, generate_kwargs={"do_sample": False})
print(json.dumps({"answer": out[0]["generated_text"], "module": type(pipe.model).__module__}))
"""


@pytest.fixture(scope="module")
def local_reference(tiny_checkpoint, photo):
    model = MoVEKDForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = chat_inputs(processor, photo)
    with torch.no_grad():
        return {
            "logits": model(**inputs).logits,
            "tokens": model.generate(**inputs, max_new_tokens=8, do_sample=False),
            "input_ids": inputs["input_ids"],
        }


def test_loads_through_remote_code_without_the_package(tiny_checkpoint, local_reference, tmp_path):
    out = tmp_path / "remote.pt"
    info = json.loads(
        run_side(".venv-remote", LOAD_AND_RUN, str(tiny_checkpoint), "AutoModelForImageTextToText", str(out))
    )
    assert info["version"].startswith("5.")
    assert info["class"] == "MoVEKDForConditionalGeneration" and info["module"].startswith("transformers_modules.")
    assert info["processor"] == "MoVEKDProcessor"
    remote = torch.load(out)
    assert torch.equal(remote["input_ids"], local_reference["input_ids"])
    assert torch.equal(remote["logits"], local_reference["logits"])
    assert torch.equal(remote["tokens"], local_reference["tokens"])


def test_pipeline_answers_about_a_real_photo_through_remote_code(tiny_checkpoint, photo):
    remote = json.loads(run_side(".venv-remote", PIPELINE, str(tiny_checkpoint)))
    assert remote["module"].startswith("transformers_modules.")
    local = pipeline("image-text-to-text", model=str(tiny_checkpoint), trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": photo}, {"type": "text", "text": "What is in the picture?"}],
        }
    ]
    expected = local(text=messages, max_new_tokens=8, return_full_text=False, generate_kwargs={"do_sample": False})
    assert remote["answer"] == expected[0]["generated_text"]
    assert len(remote["answer"]) > 0


def test_transformers_4_loads_through_auto_model_for_vision2seq(tiny_checkpoint, local_reference, tmp_path):
    out = tmp_path / "tf4.pt"
    info = json.loads(run_side(".venv-tf4", LOAD_AND_RUN, str(tiny_checkpoint), "AutoModelForVision2Seq", str(out)))
    assert info["version"].startswith("4.57")
    assert info["class"] == "MoVEKDForConditionalGeneration"
    remote = torch.load(out)
    assert torch.equal(remote["input_ids"], local_reference["input_ids"])
    # 4.57 computes attention slightly differently (max |diff| ~5e-4 seen); the greedy tokens must agree exactly.
    torch.testing.assert_close(remote["logits"], local_reference["logits"], rtol=1e-3, atol=1e-3)
    assert torch.equal(remote["tokens"], local_reference["tokens"])
