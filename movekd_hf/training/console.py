"""Training logs on the console: one line per log, numbers rounded to 4 significant digits and written through
tqdm, so the progress bar neither overwrites nor cuts a line. Only what is printed is rounded: `log_history`,
trainer_state.json and the `report_to` integrations keep full precision.

`MoVEKDTrainer` puts `ConsoleLogCallback` in place of the Trainer's `ProgressCallback` (and
`ConsolePrinterCallback` in place of `PrinterCallback` under `disable_tqdm`). A line reads

    step 20 | loss 5.841 | grad_norm 3.371 | learning_rate 0.001 | lm_loss 5.566 | kd/sam_loss 2.65 | ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import PrinterCallback, ProgressCallback

SIGNIFICANT_DIGITS = 4
MAX_TEXT = 100  # longer strings are shortened, as ProgressCallback does
HIDDEN = ("total_flos",)  # an accumulated FLOP count, meaningless to read mid-run


def format_value(value: Any) -> str:
    """A float to 4 significant digits (`5.841`, `5.007e-05`); whole numbers (steps, parameter counts, a float
    that holds an integer) in full; anything else as `str`, shortened past 100 characters."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"... ({len(text)} characters)"


def format_logs(logs: Mapping[str, Any], step: int) -> str:
    """`step N | key value | ...` in the order the trainer logged the keys."""
    parts = [f"{key} {format_value(value)}" for key, value in logs.items() if key not in HIDDEN]
    return " | ".join([f"step {step}", *parts])


class ConsoleLogCallback(ProgressCallback):
    """The Trainer's progress bars, with `format_logs` lines written above the bar (`tqdm.write`), also when no
    training bar is open (an `evaluate()` outside `train()`, which ProgressCallback leaves unprinted)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_logs(logs, state.global_step)
        (self.training_bar.write if self.training_bar is not None else tqdm.write)(line)


class ConsolePrinterCallback(PrinterCallback):
    """`disable_tqdm`: `format_logs` lines printed on each node's first process, as PrinterCallback prints."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_logs(logs, state.global_step), flush=True)


@contextmanager
def logging_above_bars(enabled: bool = True) -> Iterator[None]:
    """Console log records (warnings of skipped steps, transformers' notices) written through tqdm while a run
    shows progress bars, so a bar redraw cannot cut them; handlers to files are left as they are."""
    if not enabled:
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("transformers")]):
        yield
