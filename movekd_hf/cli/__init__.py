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
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
