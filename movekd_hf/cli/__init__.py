"""The `movekd-hf` command, the package's edge: each subcommand module here parses argv and imports the code it
drives only when it runs, so `movekd-hf --help` stays fast and an optional dependency only matters to the
subcommand that needs it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing `add_parser(subparsers)`, which registers their subcommands, each setting
# `func(args) -> int | None`. Keep these modules' top-level imports light (torch inside `func`).
COMMAND_MODULES: list[str] = [
    "movekd_hf.cli.model",
    "movekd_hf.cli.distill",
    "movekd_hf.cli.evaluate",
    "movekd_hf.cli.hub",
    "movekd_hf.cli.train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="movekd-hf",
        description="MoVE-KD for Hugging Face: start, size, train, evaluate and publish MoVE-KD vision-language models.",
    )
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
    from movekd_hf.modeling.llava_conventions import ImageLoadError

    return (InputError, ImageLoadError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


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
        print(f"movekd-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"movekd-hf {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
