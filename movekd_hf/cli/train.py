"""`movekd-hf train CONFIG.yaml [--key value ...]` (one process; use `accelerate launch -m movekd_hf.train` for
several) and `movekd-hf merge CKPT OUT` (fold a `lora_llm` checkpoint's LoRA into the LLM)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    # Everything after `train` goes to the training parser (movekd_hf.training.arguments), `--help` included:
    # no option of its own ("+" is a prefix nobody types), so argparse passes `--key value` pairs through as they are.
    train = subparsers.add_parser(
        "train",
        help="Train one stage from a YAML config; later `--key value` pairs override it (`train --help`: options).",
        add_help=False,
        prefix_chars="+",
    )
    train.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG.yaml [--key value ...]")
    train.set_defaults(func=run_train)

    merge = subparsers.add_parser("merge", help="Merge a checkpoint's LLM LoRA (llm_lora/) into a plain checkpoint.")
    merge.add_argument("checkpoint", help="A checkpoint folder of a `lora_llm: true` run (it holds llm_lora/).")
    merge.add_argument(
        "output_dir", help="Where to write the merged, plain checkpoint (LLM weights with LoRA folded in)."
    )
    merge.set_defaults(func=run_merge)


def run_train(args: argparse.Namespace) -> int:
    # The entry at the package's top (movekd_hf/train.py), as `accelerate launch -m movekd_hf.train` runs it: it
    # adds the Hub model card, which training itself does not import.
    from movekd_hf.train import main

    return main(args.args)


def run_merge(args: argparse.Namespace) -> int:
    import sys

    from movekd_hf.training.merge import merge_lora_checkpoint

    try:
        print(merge_lora_checkpoint(args.checkpoint, args.output_dir))
    except ValueError as error:
        print(f"movekd-hf merge: {error}", file=sys.stderr)
        return 2
    return 0
