"""Fixtures for the hub_cards tests: run directories on disk, as training and evaluation leave them."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from pathlib import Path

import httpx2
import matplotlib

matplotlib.use("Agg")  # headless: the plots are real PNG files, drawn without a display

import matplotlib.pyplot as plt  # noqa: E402

PAPER_TABLE = {  # MoVE-KD v1.1, Vicuna-7B (METHOD.md section 7), in results.json's shape
    "vqav2": {"accuracy": 79.9},
    "GQA": {"exact_match": 63.9},
    "TextVQA": {"accuracy": 59.6},
    "vizwiz": {"accuracy": 52.7},
    "pope": {"f1": 86.3, "accuracy": 87.1},
    "SQA": {"accuracy": 69.8},
    "MME": {"perception": 1509.1},
    "MMB": {"accuracy": 67.4},
    "my_private_bench": {"score": 0.5},
}

TRAIN_CONFIG = {
    "teachers": ["clip", "eva", "convnext", "sam"],
    "teacher_set": "v1.1",
    "base_model": "liuhaotian/llava-v1.5-7b",
    "vision_tower": "openai/clip-vit-large-patch14-336",
    "license": "llama2",
    "datasets": ["liuhaotian/LLaVA-Pretrain", "liuhaotian/LLaVA-Instruct-150K"],
    "lambda_kd": 0.5,
    "lambda_bal": 0.01,
    "clip_teacher_weight": 0.8,
    "stage": "finetune",
}

TRAINING_ARGS = {
    "learning_rate": 2e-05,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "bf16": True,
    "seed": 42,
    "logging_dir": "runs/xyz",  # not a recipe field: must not reach the card
}


def write_plot(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(2, 1.5))
    axis.plot([0, 1, 2], [3.0, 2.0, 1.5])
    figure.savefig(path)
    plt.close(figure)
    return path


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by relative path (detects any change, add or delete)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class FakeHub:
    """An in-process stand-in for the Hub's HTTP API, installed as huggingface_hub's httpx transport.

    Only the HTTP layer is replaced: `HfApi`, its headers, payload building and error mapping all run for real.
    `fail` maps an endpoint name ("create", "preupload", "commit") to an HTTP status to answer with.
    """

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.fail = fail or {}
        self.requests: list[httpx2.Request] = []
        self.commits: list[list[dict]] = []
        self.created: list[dict] = []

    @staticmethod
    def endpoint(request: httpx2.Request) -> str:
        path = request.url.path
        if path == "/api/repos/create":
            return "create"
        if path == "/api/validate-yaml":
            return "validate-yaml"
        if "/preupload/" in path:
            return "preupload"
        if "/commit/" in path:
            return "commit"
        return "other"

    def _error(self, status: int) -> httpx2.Response:
        headers = {"X-Error-Code": "RepoNotFound"} if status == 404 else {}
        return httpx2.Response(status, json={"error": f"fake hub says {status}"}, headers=headers)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        endpoint = self.endpoint(request)
        if endpoint in self.fail:
            return self._error(self.fail[endpoint])
        if endpoint == "create":
            body = json.loads(request.content)
            self.created.append(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if endpoint == "validate-yaml":
            return httpx2.Response(200, json={})
        if endpoint == "preupload":
            # Every file goes inline ("regular") so the commit payload carries all bytes and no LFS/Xet
            # storage round-trip is needed.
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if endpoint == "commit":
            self.commits.append([json.loads(line) for line in request.content.splitlines() if line])
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/me/x/commit/abc", "commitOid": "abc"}
            )
        # Side requests the library makes on its own (e.g. environment detection) are not part of the upload.
        return httpx2.Response(404, json={"error": f"FakeHub: no route for {request.method} {request.url}"})

    def committed_files(self, index: int = -1) -> dict[str, bytes]:
        """Path in repo -> uploaded bytes of one commit."""
        lines = self.commits[index]
        return {
            line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines
            if line["key"] == "file"
        }


@contextlib.contextmanager
def fake_hub(monkeypatch, fail: dict[str, int] | None = None):
    """Route huggingface_hub's HTTP client to a FakeHub; the tests' HF_HUB_OFFLINE=1 is lifted for its duration."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = FakeHub(fail)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _http.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub.handle),
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
        )
    )
    try:
        yield hub
    finally:
        _http.set_client_factory(_http.default_client_factory)


def tiny_config_dict() -> dict:
    """config.json of a tiny MoVE-KD model, produced by the real config class (distinct sizes)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from movekd_hf.modeling.configuration_movekd import MoVEKDConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14)  # fmt: skip
    text = LlamaConfig(hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300)  # fmt: skip
    config = MoVEKDConfig(vision_config=vision, text_config=text, num_experts=3, lora_rank=4, faithful=True)
    return config.to_dict()


def make_run_dir(root: Path, full: bool = True) -> Path:
    """A run directory: checkpoint under `root/checkpoint`; with `full`, every optional part too."""
    write_json(root / "checkpoint" / "config.json", tiny_config_dict())
    if full:
        write_json(root / "train_config.json", TRAIN_CONFIG)
        write_json(root / "training_args.json", TRAINING_ARGS)
        write_json(root / "eval" / "results.json", PAPER_TABLE)
        write_plot(root / "plots" / "loss.png")
        write_plot(root / "plots" / "router_balance.png")
    return root
