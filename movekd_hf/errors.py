"""The package's error types for bad input: one clear message naming where (file, line, sample), the field, and what
was expected. The command line turns every `InputError` into one line on stderr and exit code 2 (the traceback only
with `--debug`); Python callers catch them as `ValueError`.

The bottom layer: imports nothing from the package. (The remote-code files under `movekd_hf/modeling` cannot import
it, so `modeling.llava_conventions.ImageLoadError` is its own `ValueError`; the command line treats it alike.)
"""

from __future__ import annotations

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


__all__ = ["AnswersFileError", "DataFileError", "InputError", "NonFiniteError", "SettingsError", "UnsafeFileError"]
