"""`movekd-hf card | push | convert`: the hub_cards subcommands.

Top-level imports stay light; each command imports its module (and torch) only when it runs.
"""

from __future__ import annotations

import argparse
import sys


def _fail(command: str, error: Exception) -> int:
    """Expected failures (bad input, Hub errors) end with their message, not a traceback."""
    print(f"movekd-hf {command}: {error}", file=sys.stderr)
    return 1


def _card(args: argparse.Namespace) -> int:
    from movekd_hf.hub_cards.card import write_card

    try:
        written = write_card(args.run_dir, output_dir=args.output, repo_id=args.repo_id)
    except (FileNotFoundError, ValueError) as error:
        return _fail("card", error)
    for path in written:
        print(f"wrote {path}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from movekd_hf.hub_cards.publish import PushError, push_run

    try:
        url = push_run(args.run_dir, args.repo_id, private=args.private, token=args.token, card_path=args.card)
    except (PushError, FileNotFoundError, ValueError) as error:
        return _fail("push", error)
    print(f"pushed to {url}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from movekd_hf.hub_cards.convert import convert_authors_checkpoint

    vision = args.vision_config
    if vision is not None:
        vision = json.loads(vision if vision.lstrip().startswith("{") else Path(vision).read_text())
    try:
        out = convert_authors_checkpoint(args.src, args.dst, vision_config=vision)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        return _fail("convert", error)
    print(f"wrote {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from movekd_hf.hub_cards.export import export_student_encoder

    try:
        out = export_student_encoder(args.checkpoint, args.out)
    except (OSError, ValueError) as error:
        return _fail("export-encoder", error)
    print(f"wrote {out}: load it with AutoModel.from_pretrained(path, trust_remote_code=True)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    card = subparsers.add_parser("card", help="write the model card (README.md + .eval_results) of a run")
    card.add_argument("run_dir", help="run directory (see movekd_hf.hub_cards.run_dir)")
    card.add_argument("--repo-id", default=None, help="Hub id used in the quick-start code")
    card.add_argument("--output", default=None, help="folder to write into (default: the run's checkpoint)")
    card.set_defaults(func=_card)

    push = subparsers.add_parser("push", help="publish a run (weights, code, processor, card) in one commit")
    push.add_argument("run_dir")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    push.add_argument("--card", default=None, help="upload this README.md instead of rendering the card")
    push.set_defaults(func=_push)

    convert = subparsers.add_parser("convert", help="convert a checkpoint of the authors' MoVE-KD code")
    convert.add_argument("src", help="folder with the authors' checkpoint (config.json, *.bin)")
    convert.add_argument("dst", help="output folder (created; must not exist or be empty)")
    convert.add_argument(
        "--vision-config",
        default=None,
        help="JSON (or a .json file) of CLIP vision config fields the weights cannot tell, e.g. num_attention_heads",
    )
    convert.set_defaults(func=_convert)

    export = subparsers.add_parser("export-encoder", help="save the distilled student encoder as its own model")
    export.add_argument("checkpoint", help="a MoVE-KD checkpoint folder")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_export)
