"""What a training checkpoint folder holds, and how the trainer writes and reads it.

A checkpoint folder is a loadable VLM first (`save_pretrained` of `MoVEKDForConditionalGeneration`: config with
`auto_map`, weights, the remote-code `*.py`, processor, model card), plus the training state the Trainer adds
(optimizer, scheduler, RNG, trainer state) and ours:

- `distill_adapters.safetensors`: the distiller (teacher adapters, feature standardisers). Never in the VLM.
- `llm_lora/`: with `lora_llm`, the peft adapter of the LLM (`adapter_config.json`, `adapter_model.safetensors`).
  The folder's own weights are then the base VLM (MoLE, projector trained; LLM as it started), so it still loads
  as a plain VLM; `movekd-hf merge` folds the adapter in. It is a sub-folder, not the top level, because
  transformers treats a top-level `adapter_config.json` as "load the base model named inside, then the adapter".

Teacher weights are never written: teachers live outside the trained module.

Reliability (the trainer's side is in trainer_saving.py):
- A checkpoint is written under `_incomplete/checkpoint-N` and renamed to `checkpoint-N` once every file (every
  rank's) is in: a folder named `checkpoint-N` is complete, whatever killed the run while saving.
- Resuming "from the newest" (`resume_from_checkpoint: true`) takes the newest folder that holds weights and
  `trainer_state.json` (`newest_complete_checkpoint`), naming the ones it skipped.
- The RNG state is `rng_state.safetensors` (`rng_state_<rank>.safetensors` with several processes), not the
  Trainer's pickled `rng_state.pth`; pickles found in a checkpoint (`.bin`, `.pth`) load only with `allow_pickle`.
- `StopOnSignalCallback`: SIGTERM finishes the current optimizer step, saves a checkpoint and stops the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..errors import NonFiniteError, SettingsError, UnsafeFileError

logger = logging.getLogger(__name__)

DISTILLER_FILE = "distill_adapters.safetensors"
LLM_LORA_DIR = "llm_lora"
TRAIN_CONFIG_FILE = "train_config.json"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_ARGS_JSON = "training_args.json"  # readable twin of the Trainer's pickled training_args.bin
STAGING_DIR = "_incomplete"  # checkpoints are written in here, then renamed into the output folder
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Any one of these makes a folder's weights present (a sharded save has the index; ZeRO-3 without a 16-bit
# gather keeps its weights in DeepSpeed's `global_step*/`, named by `latest`).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "latest")
PICKLE_SUFFIXES = (".bin", ".pth")
# Training state: kept in checkpoints for resuming, never uploaded as part of the model.
TRAINING_STATE_PATTERNS = (
    "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "rng_state*.safetensors", "trainer_state.json",
    "training_args.bin", TRAINING_ARGS_JSON, DISTILLER_FILE, "global_step*", "zero_to_fp32.py", "latest", "_*",
    "checkpoint-*", "runs/*",
)  # fmt: skip

_PEFT_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
_PEFT_PREFIX = "base_model.model."


def split_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """The trained module's state (`vlm.*`, `distiller.*`) -> (VLM state, distiller state), prefixes dropped."""
    vlm, distiller = {}, {}
    for key, value in state_dict.items():
        if key.startswith("vlm."):
            vlm[key[4:]] = value
        elif key.startswith("distiller."):
            distiller[key[10:]] = value
        else:
            raise ValueError(f"state key {key!r} belongs to neither `vlm` nor `distiller`")
    return vlm, distiller


def base_state_from_peft(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-wrapped VLM's state -> the plain VLM's keys: peft's LoRA tensors dropped, `.base_layer` folded away.

    MoLE's own `lora_A`/`lora_B` parameters (`...mlp.fc1.lora_A`) are kept: peft's keys carry an adapter name
    (`...q_proj.lora_A.default.weight`), MoLE's do not.
    """
    base = {}
    for key, value in state_dict.items():
        if _PEFT_LORA_KEY.search(key):
            continue
        base[key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return base


def save_training_folder(
    output_dir: str,
    module,
    state_dict: Mapping[str, torch.Tensor] | None,
    processor=None,
    train_config: Mapping | None = None,
) -> None:
    """Write the loadable VLM, the distiller and (with peft) the LLM adapter of a `MoVEKDTrainingModule`."""
    os.makedirs(output_dir, exist_ok=True)
    state_dict = state_dict if state_dict else module.state_dict()
    vlm_state, distiller_state = split_state(state_dict)
    vlm = module.base_vlm()
    if module.is_peft:
        from peft import get_peft_model_state_dict

        lora_dir = os.path.join(output_dir, LLM_LORA_DIR)
        os.makedirs(lora_dir, exist_ok=True)
        lora_state = get_peft_model_state_dict(module.vlm, state_dict=vlm_state)
        save_file(_contiguous(lora_state), os.path.join(lora_dir, "adapter_model.safetensors"))
        module.vlm.peft_config["default"].save_pretrained(lora_dir)
        vlm_state = base_state_from_peft(vlm_state)
    vlm.save_pretrained(output_dir, state_dict=vlm_state)
    if distiller_state:
        save_file(_contiguous(distiller_state), os.path.join(output_dir, DISTILLER_FILE))
    if processor is not None:
        processor.save_pretrained(output_dir)
    if train_config is not None:
        Path(output_dir, TRAIN_CONFIG_FILE).write_text(json.dumps(dict(train_config), indent=2), encoding="utf-8")


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a detached contiguous copy per tensor is always accepted.
    return {key: value.detach().contiguous() for key, value in state.items()}


def load_training_folder(folder: str, module, allow_pickle: bool = False) -> None:
    """Load what `save_training_folder` wrote back into a live `MoVEKDTrainingModule` (resume, no DeepSpeed).

    The VLM's weights go through `from_pretrained`, so the key conversions of transformers' saving are undone by
    the same code that applies them; the loaded tensors are then copied into the live model. Only safetensors
    weights load unless `allow_pickle` (a folder with only `pytorch_model.bin` raises `UnsafeFileError`).
    """
    if not allow_pickle and not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES[:2]):
        pickles = sorted(Path(folder).glob("pytorch_model*.bin"))
        if pickles:
            raise _unsafe(pickles[0])
    loaded = (
        type(module.base_vlm())
        .from_pretrained(folder, dtype=torch.float32, use_safetensors=None if allow_pickle else True)
        .state_dict()
    )
    target = module.base_vlm()
    live = target.state_dict()
    state = {}
    for key, value in loaded.items():
        name = key if key in live else _base_layer_name(key)
        if name not in live:
            raise ValueError(f"{folder}: weight {key!r} has no place in the model being resumed")
        state[name] = value
    missing = [key for key in live if key not in state and not _PEFT_LORA_KEY.search(key)]
    if missing:
        raise ValueError(f"{folder}: no saved value for {missing[:5]}")
    target.load_state_dict(state, strict=False)
    if module.is_peft:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(
            module.vlm, load_file(os.path.join(folder, LLM_LORA_DIR, "adapter_model.safetensors"))
        )
    distiller_path = os.path.join(folder, DISTILLER_FILE)
    if module.distiller is not None:
        if not os.path.isfile(distiller_path):
            raise ValueError(f"{folder} has no {DISTILLER_FILE}: it was not saved by a distillation run")
        module.distiller.load_state_dict(load_file(distiller_path))


def _base_layer_name(key: str) -> str:
    head, _, leaf = key.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def copy_loadable_files(source: str, destination: str) -> None:
    """Copy a checkpoint's model files (everything but training state) into `destination` for an upload."""
    from fnmatch import fnmatch

    for path in Path(source).rglob("*"):
        relative = path.relative_to(source).as_posix()
        if path.is_file() and not any(fnmatch(relative, pattern) for pattern in TRAINING_STATE_PATTERNS):
            target = Path(destination, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


# ------------------------------------------------------------------------------ complete checkpoints only


def _unsafe(path) -> UnsafeFileError:
    return UnsafeFileError(
        "is a pickle file, and loading a pickle can run any code",
        file=str(path),
        expected="safetensors files, or `allow_pickle: true` (--allow_pickle true) if you trust this checkpoint",
    )


def refuse_pickle(path, allow_pickle: bool) -> None:
    """Raise `UnsafeFileError` naming `path` when it is a pickle (`.bin`, `.pth`) and `allow_pickle` is off."""
    if str(path).endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise _unsafe(path)


def checkpoint_problem(folder: str | Path) -> str | None:
    """What makes `folder` unusable for resuming (a missing file), or None for a complete checkpoint: weights
    (`WEIGHT_FILES`) and `trainer_state.json`, the file the Trainer writes last."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        return "no model.safetensors"
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_FILE)):
        return f"no {TRAINER_STATE_FILE}"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest (smallest N) first; staged ones are not among them."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [path for _, path in sorted(found) if path.is_dir()]


def newest_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete `checkpoint-N` of `output_dir` or None, [(newer incomplete folder, what it lacks)])."""
    skipped = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def resume_folder(resume: str | bool | None, output_dir: str, warn: bool = True) -> str | None:
    """The folder `Trainer.train(resume_from_checkpoint=resume)` should load, or None to start at step 0.

    `True` (or "true"): the newest complete checkpoint of `output_dir`, logging each newer incomplete one skipped
    (none at all: start at step 0, with a warning, so a preempted job can always be re-run with the same line).
    None/False: start over; when `output_dir` already holds checkpoints, one warning says so (`warn`: this rank
    logs). A folder: used as given, if complete (`SettingsError` otherwise).
    """
    if isinstance(resume, str) and resume.lower() in ("true", "false") and not os.path.isdir(resume):
        resume = resume.lower() == "true"
    if resume is True:
        found, skipped = newest_complete_checkpoint(output_dir)
        for folder, problem in skipped:
            logger.warning("skipping incomplete checkpoint %s (%s)", folder, problem)
        if found is None:
            logger.warning(
                "resume_from_checkpoint=true: %s holds no complete checkpoint; starting at step 0", output_dir
            )
            return None
        logger.info("resuming from %s", found)
        return str(found)
    if not resume:
        existing = list_checkpoints(output_dir)
        if existing and warn:
            newest, _ = newest_complete_checkpoint(output_dir)
            logger.warning(
                "%s already holds %s (newest complete: %s); this run starts at step 0 and its checkpoints replace "
                "those of the same step: pass `--resume_from_checkpoint true` to continue instead",
                output_dir, ", ".join(p.name for p in existing), newest.name if newest else "none",
            )  # fmt: skip
        return None
    problem = "no such folder" if not os.path.isdir(resume) else checkpoint_problem(resume)
    if problem is not None:
        raise SettingsError(
            f"is not a complete checkpoint: {problem}",
            file=str(resume),
            field="resume_from_checkpoint",
            expected="a checkpoint-N folder, or `true` for the newest complete one in output_dir",
        )
    return str(resume)


def publish_checkpoint(staged: str, final: str) -> None:
    """Rename the fully written `staged` folder to `final` (one rename on one file system). A `final` already
    there (the same step saved by an earlier attempt) is moved aside first and deleted after."""
    aside = None
    if os.path.exists(final):
        aside = f"{staged}.replaced"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staged, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------------ finiteness


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """(name, value) of the first tensor holding a NaN or infinity, or None.

    One reduction and one host sync when all are finite (the per-step cost); the search runs only after a hit.
    """
    named = [(name, tensor.detach()) for name, tensor in named if tensor is not None and tensor.numel() > 0]
    if not named:
        return None
    device = named[0][1].device
    flags = torch.stack([torch.isfinite(tensor).all().to(device) for _, tensor in named])
    if bool(flags.all()):
        return None
    for name, tensor in named:
        bad = tensor[~torch.isfinite(tensor)]
        if bad.numel():
            return name, float(bad.flatten()[0])
    return None  # unreachable: some flag was False


def check_finite_weights(module: torch.nn.Module, step: int) -> None:
    """Raise `NonFiniteError(step, "weight <name>", value)` if any parameter holds a NaN or infinity: such weights
    are never saved. One reduction over all parameters (one host sync per save)."""
    hit = first_nonfinite(module.named_parameters())
    if hit is not None:
        raise NonFiniteError(step, f"weight {hit[0]}", hit[1])


# -------------------------------------------------------------------------------- RNG as safetensors


def rng_state_file(process_index: int | None) -> str:
    """`rng_state.safetensors`, or `rng_state_<rank>.safetensors` for one of several processes."""
    return "rng_state.safetensors" if process_index is None else f"rng_state_{process_index}.safetensors"


def save_rng_state(path: str, all_cuda_devices: bool) -> None:
    """The Python, NumPy, torch CPU and CUDA generators' states as tensors in a safetensors file.

    Python's Mersenne Twister state is 625 32-bit words (stored as int64) plus the cached Gaussian; NumPy's is
    624 words plus position and Gaussian cache, kept in the metadata as text. `all_cuda_devices`: every device's
    CUDA state (one process using all GPUs), else this process's device only (one process per GPU).
    """
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        states = torch.cuda.random.get_rng_state_all() if all_cuda_devices else [torch.cuda.random.get_rng_state()]
        tensors.update({f"cuda.{index}": state for index, state in enumerate(states)})
    metadata = {
        "python_version": str(version), "python_gauss": repr(gauss), "numpy_kind": kind, "numpy_pos": str(pos),
        "numpy_has_gauss": str(has_gauss), "numpy_cached_gaussian": repr(float(cached)),
    }  # fmt: skip
    save_file(tensors, path, metadata=metadata)


def load_rng_state(path: str, all_cuda_devices: bool) -> None:
    """Restore what `save_rng_state` wrote into this process's generators."""
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    gauss = None if meta["python_gauss"] == "None" else float(meta["python_gauss"])
    random.setstate((int(meta["python_version"]), tuple(tensors["python"].tolist()), gauss))
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state(
        (meta["numpy_kind"], keys, int(meta["numpy_pos"]), int(meta["numpy_has_gauss"]),
         float(meta["numpy_cached_gaussian"]))
    )  # fmt: skip
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        if all_cuda_devices and len(cuda) == torch.cuda.device_count():
            torch.cuda.random.set_rng_state_all(cuda)
        else:
            torch.cuda.random.set_rng_state(cuda[0])


# ------------------------------------------------------------------------------------- SIGTERM


class StopOnSignalCallback(TrainerCallback):
    """On SIGTERM (a scheduler's preemption notice, `kill PID`): finish the optimizer step under way, save a
    checkpoint and stop training (`control.should_save`, `control.should_training_stop` at the step's end).

    The trainer installs the handler for the duration of `train()` (`installed()`; the main thread only, where
    Python delivers signals) and restores the previous one after. `received` names the signal once one came.
    With several processes the ranks agree at every step's end (one all-reduce of a flag), so all save and
    stop at the same step even when only some got the signal.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: str | None = None

    def _handle(self, signum, frame) -> None:  # runs between two bytecodes of the main thread: only set a flag
        self.received = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _agreed(self, args) -> bool:
        flag = self.received is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor([float(flag)], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
            self.received = self.received or ("SIGTERM" if flag else None)
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args):
            logger.warning(
                "%s received: saving a checkpoint at step %d and stopping", self.received, state.global_step
            )
            control.should_save = True
            control.should_training_stop = True
        return control
