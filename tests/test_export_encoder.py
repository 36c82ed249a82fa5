"""The distilled student encoder exported on its own loads through AutoModel where movekd_hf is absent."""

import json

import torch
from _model_fixtures import chat_inputs, run_side
from transformers import AutoProcessor

from movekd_hf import MoVEKDForConditionalGeneration
from movekd_hf.cli import main

LOAD_ENCODER = """
import json, sys, torch
try:
    import movekd_hf
    raise SystemExit("movekd_hf is importable in the side environment")
except ImportError:
    pass
from transformers import AutoImageProcessor, AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
pixel_values = torch.load(sys.argv[2])
with torch.no_grad():
    hidden = model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
torch.save(hidden, sys.argv[3])
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__,
                  "processor": type(AutoImageProcessor.from_pretrained(sys.argv[1])).__name__}))
"""


def test_exported_encoder_reproduces_the_student_tokens_without_the_package(tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "encoder"
    assert main(["export-encoder", str(tiny_checkpoint), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "movekd_clip_vision" and config["auto_map"]["AutoModel"].endswith(
        "MoVEKDVisionModel"
    )

    vlm = MoVEKDForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    inputs = chat_inputs(AutoProcessor.from_pretrained(tiny_checkpoint), photo)
    with torch.no_grad():
        expected = vlm(**inputs).vision_hidden_states
    torch.save(inputs["pixel_values"], tmp_path / "pixels.pt")
    info = json.loads(
        run_side(".venv-remote", LOAD_ENCODER, str(out), str(tmp_path / "pixels.pt"), str(tmp_path / "tokens.pt"))
    )
    assert info["class"] == "MoVEKDVisionModel" and info["module"].startswith("transformers_modules.")
    assert info["processor"].startswith("CLIPImageProcessor")
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), expected)


def test_export_refuses_a_checkpoint_that_is_not_movekd(tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    ).save_pretrained(tmp_path / "clip")
    assert main(["export-encoder", str(tmp_path / "clip"), str(tmp_path / "out")]) == 2
    # (stderr also holds the setup's save progress bar: the command's own output is its last line)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("movekd-hf export-encoder: error: ")
    assert not (tmp_path / "out").exists()
