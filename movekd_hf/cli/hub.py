"""`movekd-hf card | push | convert | export-encoder | config-path`: the hub_cards subcommands, and where the packaged
configs are.

Top-level imports stay light; each command imports its module (and torch) only when it runs.
"""

from __future__ import annotations

import argparse
import sys


def _fail(command: str, error: Exception) -> int:
    """Expected failures (bad input, Hub errors, a missing optional dependency) end in one line and exit code 2,
    as every subcommand's user errors do (movekd_hf/cli/__init__.py)."""
    message = " ".join(str(error).split())
    print(f"movekd-hf {command}: error: {message}", file=sys.stderr)
    return 2


def _overrides(args: argparse.Namespace) -> dict:
    """Card metadata given on the command line; they replace the run's train_config.json entries."""
    return {"license": args.license, "datasets": args.dataset, "base_model": args.base_model}


def _add_metadata_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--license", default=None, help="Hub licence id of the weights (e.g. apache-2.0, llama2)")
    parser.add_argument(
        "--dataset", action="append", default=None, help="Hub id of a training dataset (repeat for several)"
    )
    parser.add_argument("--base-model", default=None, help="Hub id of the model the run started from")


def _card(args: argparse.Namespace) -> int:
    from movekd_hf.hub_cards.card import write_card

    try:
        written = write_card(args.run_dir, output_dir=args.output, repo_id=args.repo_id, overrides=_overrides(args))
    except (FileNotFoundError, ValueError) as error:
        return _fail("card", error)
    for path in written:
        print(f"wrote {path}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from movekd_hf.hub_cards.publish import PushError, push_run

    try:
        url = push_run(
            args.run_dir,
            args.repo_id,
            private=args.private,
            token=args.token,
            card_path=args.card,
            overrides=_overrides(args),
        )
    except (PushError, FileNotFoundError, ValueError) as error:
        return _fail("push", error)
    print(f"pushed to {url}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from movekd_hf.hub_cards.convert import MissingDependencyError, convert_authors_checkpoint

    vision = args.vision_config
    if vision is not None:
        vision = json.loads(vision if vision.lstrip().startswith("{") else Path(vision).read_text())
    # Bad input (InputError, FileNotFoundError) reaches `main`: one line, exit 2, traceback with --debug.
    try:
        result = convert_authors_checkpoint(args.src, args.dst, vision_config=vision, allow_pickle=args.allow_pickle)
    except MissingDependencyError as error:
        return _fail("convert", error)
    for line in result.summary():
        print(line)
    print(f"wrote {result.path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from movekd_hf.hub_cards.export import export_student_encoder

    try:
        out = export_student_encoder(args.checkpoint, args.out)
    except (OSError, ValueError) as error:
        return _fail("export-encoder", error)
    print(f"wrote {out}: load it with AutoModel.from_pretrained(path, trust_remote_code=True)")
    return 0


def _config_path(args: argparse.Namespace) -> int:
    from movekd_hf import configs

    if args.name is None:
        print("\n".join(configs.names()))
        return 0
    print(configs.path(args.name))  # FileNotFoundError: one line from the CLI, exit 2
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    card = subparsers.add_parser("card", help="write the model card (README.md + .eval_results) of a run")
    card.add_argument(
        "run_dir",
        help="run directory: a checkpoint folder (a training output_dir), or a folder "
        "holding one as checkpoint/ (see movekd_hf.hub_cards.run_dir)",
    )
    card.add_argument("--repo-id", default=None, help="Hub id used in the quick-start code")
    card.add_argument("--output", default=None, help="folder to write into (default: the checkpoint folder)")
    _add_metadata_options(card)
    card.set_defaults(func=_card)

    push = subparsers.add_parser("push", help="publish a run (weights, code, processor, card) in one commit")
    push.add_argument(
        "run_dir",
        help="run directory: a checkpoint folder, or a folder holding one as checkpoint/ "
        "(that folder is uploaded, with the card)",
    )
    push.add_argument("--repo-id", required=True, help="Hub repository to create or update, `owner/name`")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    push.add_argument("--card", default=None, help="upload this README.md instead of rendering the card")
    _add_metadata_options(push)
    push.set_defaults(func=_push)

    convert = subparsers.add_parser("convert", help="convert a checkpoint of the authors' MoVE-KD code")
    convert.add_argument(
        "src", help="folder with the authors' checkpoint (config.json, model*.safetensors or pytorch_model*.bin)"
    )
    convert.add_argument("dst", help="output folder (created; must not exist or be empty)")
    convert.add_argument(
        "--vision-config",
        default=None,
        help="JSON (or a .json file) of CLIP vision config fields the weights cannot tell, e.g. num_attention_heads",
    )
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin (pickle) weight files, with torch.load(weights_only=True); without it only safetensors",
    )
    convert.set_defaults(func=_convert)

    export = subparsers.add_parser("export-encoder", help="save the distilled student encoder as its own model")
    export.add_argument("checkpoint", help="a MoVE-KD checkpoint folder")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_export)

    config_path = subparsers.add_parser(
        "config-path", help="print the path of a packaged config (train, accelerate, deepspeed); none: list them"
    )
    config_path.add_argument("name", nargs="?", help="e.g. train/tiny_stage1.yaml, tiny_stage1, deepspeed_zero2")
    config_path.set_defaults(func=_config_path)
