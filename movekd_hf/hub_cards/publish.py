"""Publish a run to the Hub in one commit: weights, remote code, processor, card, eval results, plots.

Nothing is written locally: the card is rendered in memory and files are read, never moved or rewritten, so a
failed push leaves the run directory exactly as it was.

What is uploaded is decided by one list, `movekd_hf.training.checkpoint.TRAINING_STATE_PATTERNS`, which the
trainer's own pushes use too: every file of the checkpoint folder, sub-folders included (the `lora_llm` adapter in
`llm_lora/`), except training state. The card files (README.md, `.eval_results/`, plots) are rendered fresh.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

from ..training.checkpoint import LLM_LORA_DIR, TRAINING_STATE_PATTERNS
from .card import render_repo_files
from .run_dir import RunDir, read_run_dir

# Card files: what the folder holds of them is replaced by the card rendered for this push.
RENDERED_PATTERNS = ("README.md", ".eval_results/*", "plots/*")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
COMMIT_MESSAGE = "Upload MoVE-KD model with movekd-hf"


class PushError(RuntimeError):
    """A push that could not happen; the message says why and what to do."""


def _remote_code_files(checkpoint: Path, config: dict) -> list[str]:
    auto_map = config.get("auto_map")
    if not auto_map:
        raise PushError(
            f"{checkpoint / 'config.json'} has no `auto_map`: save the model with `save_pretrained` from "
            "movekd_hf so its remote code (*.py) is written next to the weights."
        )
    modules = set()
    for reference in auto_map.values():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if reference:
            modules.add(reference.split("--")[-1].rsplit(".", 1)[0] + ".py")
    missing = sorted(name for name in modules if not (checkpoint / name).is_file())
    if missing:
        raise PushError(f"Remote code named in config.json's auto_map is missing from {checkpoint}: {missing}.")
    return sorted(modules)


def _check_weights(checkpoint: Path) -> None:
    index = checkpoint / "model.safetensors.index.json"
    if (checkpoint / "model.safetensors").is_file():
        return
    if not index.is_file():
        raise PushError(f"No weights in {checkpoint}: expected model.safetensors or model.safetensors.index.json.")
    shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    missing = sorted(shard for shard in shards if not (checkpoint / shard).is_file())
    if missing:
        raise PushError(f"Weight shards listed in {index} are missing: {missing}.")


def _check_processor(checkpoint: Path) -> None:
    for group, label in ((PROCESSOR_FILES, "image processor"), (TOKENIZER_FILES, "tokenizer")):
        if not any((checkpoint / name).is_file() for name in group):
            raise PushError(
                f"No {label} files in {checkpoint} (expected one of {list(group)}): save the processor with "
                "`processor.save_pretrained(checkpoint)` before pushing."
            )


def is_training_state(path_in_folder: str) -> bool:
    """Whether a file (its POSIX path inside the checkpoint folder) is training state, never published. The same
    test as `copy_loadable_files` and the trainer's `upload_folder(ignore_patterns=TRAINING_STATE_PATTERNS)`."""
    return any(fnmatch.fnmatch(path_in_folder, pattern) for pattern in TRAINING_STATE_PATTERNS)


def loadable_files(checkpoint: Path) -> dict[str, Path]:
    """The checkpoint folder's model files, sub-folders included, keyed by POSIX path inside it. Lock files (the
    empty `<answers>.lock` an evaluation leaves for its inter-process lock) are nobody's model file."""
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        relative = path.relative_to(checkpoint).as_posix()
        if path.is_file() and not is_training_state(relative) and not path.name.endswith(".lock"):
            files[relative] = path
    return files


def _check_llm_lora(checkpoint: Path) -> None:
    lora = checkpoint / LLM_LORA_DIR
    if lora.is_dir() and not all(
        (lora / name).is_file() for name in ("adapter_config.json", "adapter_model.safetensors")
    ):
        raise PushError(
            f"{lora} is incomplete (expected adapter_config.json and adapter_model.safetensors): without it the "
            "model would load as the untrained language model. Push the folder the trainer saved, or "
            "`movekd-hf merge` a complete one."
        )


def collect_upload_files(run: RunDir, repo_id: str, card_path: str | Path | None = None) -> dict[str, Path | bytes]:
    """Everything the commit will hold, keyed by path in the repo (local files as paths, rendered ones as bytes)."""
    checkpoint = run.checkpoint
    _remote_code_files(checkpoint, run.config)
    _check_weights(checkpoint)
    _check_processor(checkpoint)
    _check_llm_lora(checkpoint)
    files: dict[str, Path | bytes] = {
        name: path
        for name, path in loadable_files(checkpoint).items()
        if not any(fnmatch.fnmatch(name, pattern) for pattern in RENDERED_PATTERNS)
    }
    for path_in_repo, text in render_repo_files(run, repo_id).items():
        files[path_in_repo] = text.encode("utf-8")
    if card_path is not None:
        files["README.md"] = Path(card_path).read_bytes()
    for plot in run.plots:
        files[f"plots/{plot.name}"] = plot
    return files


def _commit(api: HfApi, repo_id: str, private: bool, operations: list[CommitOperationAdd]) -> str:
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=COMMIT_MESSAGE, repo_type="model")
    except RepositoryNotFoundError as error:
        raise PushError(
            f"Repository {repo_id!r} was not found, or your token cannot write to it (HTTP 404). Check the "
            "namespace and that the token has write access. Nothing was uploaded."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no response"
        raise PushError(
            f"Upload to {repo_id!r} failed (HTTP {status}): {error}. Nothing was committed; the local run "
            "directory is unchanged, so the same command can be retried."
        ) from error
    except OfflineModeIsEnabled as error:
        raise PushError(
            f"Cannot upload to {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1). Nothing was uploaded."
        ) from error
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise PushError(
            f"Cannot reach the Hub to upload to {repo_id!r} ({type(error).__name__}: {error}). Nothing was "
            "uploaded; the same command can be retried."
        ) from error
    return info.commit_url


def _is_network_error(error: BaseException) -> bool:
    """A connection or timeout error of the HTTP client huggingface_hub uses (httpx's `TransportError` family,
    requests' `ConnectionError`, the builtin ones), whichever client version raised it."""
    names = {"TransportError", "ConnectionError", "TimeoutException", "Timeout", "TimeoutError"}
    return any(kind.__name__ in names for kind in type(error).__mro__)


def push_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    card_path: str | Path | None = None,
    overrides: dict | None = None,
) -> str:
    """Create `repo_id` if needed and upload the run in a single commit; returns the commit URL. `overrides`
    replace train_config.json entries for the card (`license`, `datasets`, `base_model`)."""
    run = read_run_dir(run_dir, overrides)
    files = collect_upload_files(run, repo_id, card_path)
    token = token or get_token()
    if not token:
        raise PushError(
            "No Hugging Face token found: run `hf auth login`, set the HF_TOKEN environment variable, or pass "
            "--token. Nothing was uploaded."
        )
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in files.items()
    ]
    return _commit(HfApi(token=token), repo_id, private, operations)
