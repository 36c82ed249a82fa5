"""`movekd-hf push`: one real `HfApi` commit against an in-process fake Hub (only the HTTP transport is replaced)."""

from __future__ import annotations

import json
import socket

import pytest
from _hub_fixtures import fake_hub, folder_digest, make_run_dir

from movekd_hf.cli import main
from movekd_hf.hub_cards.publish import PushError, push_run

REPO_ID = "me/movekd-tiny"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A real tiny checkpoint folder (weights, remote code, processor), saved once for the module."""
    from movekd_hf.models import build_tiny_model

    folder = tmp_path_factory.mktemp("saved")
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def run_dir(tmp_path, saved_model):
    root = make_run_dir(tmp_path / "run")
    checkpoint = root / "checkpoint"
    for path in saved_model.iterdir():
        (checkpoint / path.name).write_bytes(path.read_bytes())
    # training leftovers that must not be published
    (checkpoint / "optimizer.pt").write_bytes(b"optimizer state")
    (checkpoint / "distill_adapters.safetensors").write_bytes(b"adapters")
    (checkpoint / "global_step10").mkdir()
    (checkpoint / "global_step10" / "zero_state.pt").write_bytes(b"zero")
    (checkpoint / "eval").mkdir()  # `movekd-hf eval --out RUN/eval` into the checkpoint folder leaves its lock
    (checkpoint / "eval" / "pope_answers.jsonl.lock").write_bytes(b"")
    return root


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    return "hf_fake_token_for_tests"


def test_push_uploads_everything_in_one_commit(run_dir, token, monkeypatch):
    before = folder_digest(run_dir)
    with fake_hub(monkeypatch) as hub:
        url = push_run(run_dir, REPO_ID, private=True)
    assert url == "https://huggingface.co/me/x/commit/abc"
    assert hub.created == [{"name": "movekd-tiny", "organization": "me", "visibility": "private", "type": "model"}]
    assert len(hub.commits) == 1  # one commit holds the whole model
    files = hub.committed_files()
    checkpoint = run_dir / "checkpoint"
    expected_local = {
        "config.json", "model.safetensors", "generation_config.json", "configuration_movekd.py",
        "modeling_movekd.py", "mole.py", "mole_sorted.py", "processing_movekd.py", "llava_conventions.py", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    }  # fmt: skip
    expected = expected_local | {"README.md", "plots/loss.png", "plots/router_balance.png"}
    expected |= {
        f".eval_results/{b}.yaml" for b in ("vqav2", "gqa", "textvqa", "vizwiz", "pope", "scienceqa", "mme", "mmbench")
    }
    assert set(files) == expected
    for name in expected_local:  # uploaded bytes are the local bytes
        assert files[name] == (checkpoint / name).read_bytes(), name
    assert files["plots/loss.png"] == (run_dir / "plots" / "loss.png").read_bytes()
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in files["README.md"].decode()
    header = hub.commits[0][0]
    assert header["key"] == "header" and "movekd-hf" in header["value"]["summary"]
    upload_requests = [r for r in hub.requests if hub.endpoint(r) != "other"]
    assert [hub.endpoint(r) for r in upload_requests] == ["create", "validate-yaml", "preupload", "commit"]
    assert {r.headers.get("authorization") for r in upload_requests} == {f"Bearer {token}"}
    assert folder_digest(run_dir) == before  # nothing written locally (the card lives in memory)


def test_push_command_uses_existing_card(run_dir, token, monkeypatch, tmp_path, capsys):
    card = tmp_path / "MY_CARD.md"
    card.write_text("---\nlicense: mit\n---\n# hand-edited\n")
    with fake_hub(monkeypatch) as hub:
        code = main(["push", str(run_dir), "--repo-id", REPO_ID, "--card", str(card)])
    assert code == 0 and "pushed to" in capsys.readouterr().out
    assert hub.committed_files()["README.md"] == card.read_bytes()
    assert hub.created[0]["visibility"] == "public"


def test_no_token_is_a_clear_error_and_no_request(run_dir, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    before = folder_digest(run_dir)
    with fake_hub(monkeypatch) as hub, pytest.raises(PushError, match="No Hugging Face token found"):
        push_run(run_dir, REPO_ID)
    assert hub.requests == []
    assert folder_digest(run_dir) == before


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        ({"preupload": 404}, r"Repository 'me/movekd-tiny' was not found, or your token cannot write to it"),
        ({"commit": 500}, r"(?s)Upload to 'me/movekd-tiny' failed \(HTTP 500\).*Nothing was committed"),
        ({"create": 403}, r"Upload to 'me/movekd-tiny' failed \(HTTP 403\)"),
    ],
)
def test_hub_errors_are_clear_and_leave_folder_untouched(run_dir, token, monkeypatch, capsys, fail, message):
    before = folder_digest(run_dir)
    with fake_hub(monkeypatch, fail=fail) as hub, pytest.raises(PushError, match=message):
        push_run(run_dir, REPO_ID)
    assert hub.commits == []
    assert folder_digest(run_dir) == before
    with fake_hub(monkeypatch, fail=fail):  # the CLI turns it into exit code 2 and a one-line message
        assert main(["push", str(run_dir), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert err.startswith("movekd-hf push: error: ") and err.count("\n") == 1


def test_an_unreachable_hub_is_one_line_and_nothing_is_uploaded(run_dir, token, monkeypatch, capsys):
    from huggingface_hub import constants

    # The tests run with HF_HUB_OFFLINE=1: huggingface_hub refuses before any request.
    assert main(["push", str(run_dir), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"movekd-hf push: error: Cannot upload to {REPO_ID!r}: offline mode is on (HF_HUB_OFFLINE=1). "
        "Nothing was uploaded.\n"
    )
    # Online, but no Hub answers: a real connection to a port nothing listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["push", str(run_dir), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"movekd-hf push: error: Cannot reach the Hub to upload to {REPO_ID!r} (")
        and err.count("\n") == 1
    ), err


def test_incomplete_checkpoint_is_refused_before_any_request(run_dir, token, monkeypatch):
    checkpoint = run_dir / "checkpoint"
    (checkpoint / "mole.py").unlink()
    (checkpoint / "modeling_movekd.py").unlink()
    with fake_hub(monkeypatch) as hub, pytest.raises(PushError, match=r"auto_map is missing .*modeling_movekd\.py"):
        push_run(run_dir, REPO_ID)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["auto_map"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(PushError, match="has no `auto_map`"):
        push_run(run_dir, REPO_ID)
    assert hub.requests == []


def test_missing_processor_is_refused(run_dir, token, monkeypatch):
    (run_dir / "checkpoint" / "processor_config.json").unlink()
    with fake_hub(monkeypatch) as hub, pytest.raises(PushError, match="No image processor files"):
        push_run(run_dir, REPO_ID)
    assert hub.requests == []


@pytest.mark.slow
def test_uploaded_files_load_where_the_package_is_absent(run_dir, token, monkeypatch, tmp_path):
    """What the commit carries is a complete repo: written out, it loads through its own remote code alone."""
    from movekd_hf.isolated import run_without_package

    with fake_hub(monkeypatch) as hub:
        push_run(run_dir, REPO_ID)
    repo = tmp_path / "repo"
    for name, content in hub.committed_files().items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    code = f"""
import json, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(repo)!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(repo)!r}, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "hi"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.new("RGB", (32, 32)), text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({{"model": type(model).__module__, "processor": type(processor).__name__,
                  "finite": bool(torch.isfinite(logits).all())}}))
"""
    result = run_without_package(code)
    assert result["model"].startswith("transformers_modules.") and result["finite"]
    assert result["processor"] == "MoVEKDProcessor"
