"""The `movekd-hf` command, the package's edge: each subcommand module here parses argv and imports the code it
drives only when it runs, so `movekd-hf --help` stays fast and an optional dependency only matters to the
subcommand that needs it.

Errors: a wrong option (argparse) or a wrong input (`movekd_hf.errors.InputError` and kin) ends in one line on
stderr, `movekd-hf COMMAND: error: ...`, and exit code 2; `--debug` shows the traceback instead. Subcommands turn
"this model id or path cannot be loaded" into such an error with `loading(option, value)` (movekd_hf.errors).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# Re-exported: the subcommands check and load their inputs through these.
from movekd_hf.errors import existing_path, loading, model_source, one_line  # noqa: F401

# Modules exposing `add_parser(subparsers)`, which registers their subcommands, each setting
# `func(args) -> int | None`. Keep these modules' top-level imports light (torch inside `func`).
COMMAND_MODULES: list[str] = [
    "movekd_hf.cli.model",
    "movekd_hf.cli.distill",
    "movekd_hf.cli.evaluate",
    "movekd_hf.cli.compare",
    "movekd_hf.cli.hub",
    "movekd_hf.cli.train",
]
DISTRIBUTION = "movekd_hf"


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line (`PROG: error: MESSAGE`) and exit code 2, like every
    other user error of the command; `PROG --help` still prints the usage. Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class VersionAction(argparse.Action):
    """`--version`: the installed distribution's version, read only when asked (keeps `--help` light)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())  # stdout, as argparse's own "version" action prints
        parser.exit()


def version_line() -> str:
    """`movekd-hf X.Y.Z`, X.Y.Z from the installed metadata (`importlib.metadata`). An editable install whose
    metadata lags the source (`movekd_hf.__version__`) says so, since its entry points may be stale too."""
    from importlib.metadata import PackageNotFoundError, version

    from movekd_hf import __version__

    try:
        installed = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return f"movekd-hf {__version__} (not installed)"
    if installed != __version__:
        return f"movekd-hf {installed} (source {__version__}; reinstall with `pip install -e .`)"
    return f"movekd-hf {installed}"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="movekd-hf",
        description="MoVE-KD for Hugging Face: start, size, train, evaluate and publish MoVE-KD vision-language models.",
    )
    parser.add_argument("--version", action=VersionAction, help="Print the installed package version and exit.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="Show the full traceback of an error instead of its one-line summary (also accepted after COMMAND).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input was wrong", not "the package is broken": shown as one line, exit 2."""
    from movekd_hf.errors import InputError

    errors = [InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError]
    # An ImageLoadError can only come from a loaded module; importing it otherwise would import torch just to
    # print a one-line error.
    conventions = sys.modules.get("movekd_hf.modeling.llava_conventions")
    if conventions is not None:
        errors.append(conventions.ImageLoadError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Expected user errors (`movekd_hf.errors.InputError` and kin) end in one line on stderr,
    `movekd-hf COMMAND: error: ...`, and exit code 2; a non-finite training run exits 1 likewise. `--debug`
    (anywhere on the line) re-raises them with their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    args = build_parser().parse_args(argv)
    if debug:
        return int(args.func(args) or 0)
    from movekd_hf.errors import NonFiniteError

    try:
        return int(args.func(args) or 0)
    except user_errors() as error:
        print(f"movekd-hf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"movekd-hf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1


# Set once a distributed run has ended on every rank (`movekd_hf.train.end_distributed`): `exit_process` then
# leaves without the interpreter's teardown.
_skip_teardown = False


def skip_interpreter_teardown() -> None:
    """Make `exit_process` end the process without the interpreter's teardown (see there)."""
    global _skip_teardown
    _skip_teardown = True


def exit_process(code: int) -> NoReturn:
    """End the process with exit status `code`: the last call of every entry that may train on several ranks (the
    `movekd-hf` console script, `python -m movekd_hf.cli`, `python -m movekd_hf.train`).

    Once a distributed run has ended (`skip_interpreter_teardown`), the process ends by `os._exit` after logging,
    stdout and stderr are flushed: no atexit handlers, no interpreter teardown. Why: gloo's worker threads free
    finished collectives on their own; one whose tensors still have Python objects needs the GIL, and if it asks
    after `Py_FinalizeEx` has begun, CPython ends that thread with `pthread_exit`, whose unwinding through a C++
    destructor calls `std::terminate`. The rank then dies with SIGABRT ("terminate called without an active
    exception") after a run that succeeded (a core dump of a 2-rank ZeRO-3 CPU launch showed exactly this stack;
    pytorch/pytorch#190489). By then every rank has passed a barrier, the model is saved and the process group is
    destroyed, so the teardown has nothing left to do.
    """
    if not _skip_teardown:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, a closed pipe or file: nothing more can be written
            pass
    os._exit(code)


def console_main() -> NoReturn:
    """The `movekd-hf` console script: `main`, then `exit_process`."""
    exit_process(main())


# ------------------------------------------------------------------------------------- helpers for subcommands


if __name__ == "__main__":
    sys.exit(main())
