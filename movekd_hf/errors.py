"""The package's error types for bad input: one clear message naming where (file, line, sample), the field, and what
was expected. The command line turns every `InputError` into one line on stderr and exit code 2 (the traceback only
with `--debug`); Python callers catch them as `ValueError`.

`existing_path`, `model_source` and `loading(option, value)` turn "this path does not exist" and "this model id or
path cannot be loaded" (huggingface_hub's, transformers' and timm's errors) into one such error naming the option.

The bottom layer: imports nothing from the package. (The remote-code files under `movekd_hf/modeling` cannot import
it, so `modeling.llava_conventions.ImageLoadError` is its own `ValueError`; the command line treats it alike.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InputError(ValueError):
    """Input the package refuses, located precisely.

    Args:
        problem: what is wrong, in a few words ("is not valid JSON", "is NaN").
        file: the file that holds the input (path as the user gave it).
        line: 1-based line number in `file` (JSONL lines, JSON parse position).
        sample: how the sample is named (its `id` and row, a question id).
        field: the field or option at fault (`conversations`, `--lambda_kd`).
        expected: what would have been accepted ("a finite number >= 0").
        reason: a short machine-readable kind (e.g. a `BAD_SAMPLE_REASONS` entry), for counting.

    The message reads `FILE:LINE: sample S: field F: PROBLEM; expected E`, leaving out the parts not given.
    Instances pickle with all their fields (errors cross process boundaries in data-loader workers).
    """

    def __init__(
        self,
        problem: str,
        *,
        file: Any = None,
        line: int | None = None,
        sample: str | None = None,
        field: str | None = None,
        expected: str | None = None,
        reason: str | None = None,
    ):
        self.problem, self.file, self.line, self.sample = problem, file, line, sample
        self.field, self.expected, self.reason = field, expected, reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.file}" if self.file is not None else ""
        if self.line is not None:
            where += f"{':' if where else 'line '}{self.line}"
        parts = [where] if where else []
        if self.sample is not None:
            parts.append(f"sample {self.sample}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        text = ": ".join(parts + [self.problem])
        return f"{text}; expected {self.expected}" if self.expected else text

    def __reduce__(self):
        fields = dict(
            file=self.file, line=self.line, sample=self.sample, field=self.field, expected=self.expected,
            reason=self.reason,
        )  # fmt: skip
        return _rebuild, (type(self), self.problem, fields)


def _rebuild(cls: type[InputError], problem: str, fields: dict[str, Any]) -> InputError:
    return cls(problem, **fields)


class DataFileError(InputError):
    """A training or evaluation data file (LLaVA JSON/JSONL, messages) that cannot be read as the format defines it."""


class SettingsError(InputError):
    """An option, YAML key or saved config value out of its domain (NaN, out of range, unknown name)."""


class AnswersFileError(InputError):
    """An answers file for `score`/`eval` that is not one JSON object per line with unique, known `question_id`s."""


class UnsafeFileError(InputError):
    """A pickle file (`.bin`, `.pth`, `.pt`) met without `allow_pickle=True`: loading pickles can run code, so the
    package reads safetensors unless the user opts in, naming the file."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, loss component or gradient norm. Names the step and the component."""

    def __init__(self, step: int, component: str, value: float):
        self.step, self.component, self.value = step, component, value
        super().__init__(
            f"non-finite {component} ({value}) at step {step}: training stopped before the optimizer step; "
            "no checkpoint with these weights was written (lower the learning rate, or set "
            "`nonfinite_policy: skip_step` to skip such steps)"
        )

    def __reduce__(self):
        return type(self), (self.step, self.component, self.value)


# ------------------------------------------------------------------ loading a model by path or Hub id


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages of other libraries joined with "; ")."""
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def existing_path(option: str, value: str | os.PathLike | None, kind: str = "file or folder") -> None:
    """Raise `InputError` naming `option` unless `value` (when given) exists as `kind` ("file", "folder" or
    "file or folder"). Local inputs are checked before anything heavy is imported or loaded."""
    if value is None:
        return
    path = os.fspath(value)
    found = {"file": os.path.isfile, "folder": os.path.isdir}.get(kind, os.path.exists)(path)
    if not found:
        what = f"is not a {kind}" if os.path.exists(path) else "does not exist"
        raise InputError(what, file=path, field=option, expected=f"an existing {kind}")


def model_source(option: str, value: str) -> None:
    """Raise `InputError` naming `option` unless `value` is an existing local path or a Hub id that can be loaded:
    spelled like one (`huggingface_hub.utils.validate_repo_id`) and, under HF_HUB_OFFLINE=1, with its
    `config.json` in the local cache. Checked before anything heavy is imported or loaded, so a mistyped path or an
    uncached id fails at once, not after other models were loaded."""
    from huggingface_hub import constants, try_to_load_from_cache

    if os.path.exists(value):
        return
    if not _is_repo_id(value):
        raise InputError(
            "no such file or folder, and not a Hub id", file=value, field=option, expected="a local folder or a Hub id"
        )
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(value, "config.json"), str):
        raise InputError(
            f"{value!r} is no local folder, and as a Hub id it is not in the local cache (HF_HUB_OFFLINE=1)",
            field=option,
            expected=_load_expected(value),
        )


def _is_repo_id(value: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


@contextmanager
def loading(option: str, value: str) -> Iterator[None]:
    """Turn the errors of loading `value` (a local folder or a Hub id, given as `option`) into one `InputError`
    naming both: offline or not-found Hub errors from huggingface_hub, transformers or timm, and a checkpoint
    whose files or config the loader refuses (OSError / ValueError). `InputError`s pass through unchanged."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError) as error:
        raise InputError(_load_problem(value, error), field=option, expected=_load_expected(value)) from error


def _load_problem(value: str, error: BaseException) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 20:  # a cycle would be a bug elsewhere; do not hang on it
            break
    kinds = {type(e) for e in chain}

    def seen(*classes) -> bool:
        return any(issubclass(kind, classes) for kind in kinds)

    local = os.path.exists(value)
    if not local and not _is_repo_id(value):
        return f"{value!r} is no such file or folder, and not a Hub id"
    offline = constants.HF_HUB_OFFLINE or seen(OfflineModeIsEnabled)
    if not local and offline and (seen(OfflineModeIsEnabled, LocalEntryNotFoundError) or isinstance(error, OSError)):
        return f"{value!r} is no local folder, and as a Hub id it is not in the local cache (HF_HUB_OFFLINE=1)"
    if not local and seen(GatedRepoError):
        return f"Hub repository {value!r} is gated: accept its terms on the Hub and log in (`hf auth login`)"
    if not local and seen(RepositoryNotFoundError):
        return f"{value!r} is no local folder, and no Hub repository of that name exists (or it is private)"
    if not local and seen(RevisionNotFoundError):
        return f"Hub repository {value!r} has no such revision"
    if not local and seen(LocalEntryNotFoundError):
        return f"{value!r} is no local folder, and as a Hub id it is not cached and the Hub could not be reached"
    return f"cannot load {value!r}: {one_line(error)}"


def _load_expected(value: str) -> str:
    if os.path.exists(value):
        return "a checkpoint folder written by save_pretrained (config.json and weights)"
    return "a local folder, or a Hub id that is cached or reachable"


__all__ = [
    "AnswersFileError",
    "DataFileError",
    "InputError",
    "NonFiniteError",
    "SettingsError",
    "UnsafeFileError",
    "existing_path",
    "loading",
    "model_source",
    "one_line",
]
