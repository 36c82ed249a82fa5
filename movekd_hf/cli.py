"""The `movekd-hf` command. Each subcommand lives next to the code it drives and is imported lazily, so
`movekd-hf --help` stays fast and an optional dependency only matters to the subcommand that needs it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing `add_parser(subparsers)`, which registers their subcommands, each setting
# `func(args) -> int | None`. Keep these modules' top-level imports light (torch inside `func`).
COMMAND_MODULES: list[str] = [
    "movekd_hf.commands",
    "movekd_hf.distill.commands",
    "movekd_hf.evaluation.commands",
    "movekd_hf.hub_cards.commands",
    "movekd_hf.training.commands",
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
