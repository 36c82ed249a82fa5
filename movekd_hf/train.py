"""The training entry: `accelerate launch -m movekd_hf.train CONFIG.yaml [--key value ...]` (or `movekd-hf train`).

The edge of the package: argv becomes the trainer's objects in movekd_hf/training/from_config.py, and the Hub model
card of movekd_hf.hub_cards (which sits above training) is plugged in here, written into every saved folder.
Then: train (or resume) -> final save -> push when `push_to_hub` is set. SIGTERM: a checkpoint at the end of the
step under way, one line saying where, exit 0.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from movekd_hf import cli
from movekd_hf.hub_cards.card import render_repo_files
from movekd_hf.hub_cards.run_dir import RunDir
from movekd_hf.training import from_config as training


def write_model_card(trainer, folder: str) -> None:
    """README.md (and eval-result files) for a folder the trainer saved, built by movekd_hf.hub_cards."""
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    run = RunDir(
        root=Path(trainer.args.output_dir),
        checkpoint=Path(folder),
        config=config,
        train_config=trainer.train_config or None,
        training_args=json.loads(trainer.args.to_json_string()),
    )
    for path_in_repo, text in render_repo_files(run, trainer.args.hub_model_id).items():
        target = Path(folder, path_in_repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def build_trainer(argv: list[str], **trainer_kwargs):
    """The trainer this entry runs for `argv`: movekd_hf.training.from_config.build_trainer with the Hub model card.
    `trainer_kwargs` (e.g. `callbacks`) go to `MoVEKDTrainer`."""
    return training.build_trainer(argv, card_writer=write_model_card, **trainer_kwargs)


def run(trainer) -> int:
    """Train (resuming from `resume_from_checkpoint` when set: a folder, or `true` for the newest complete
    checkpoint), save the final model, push it if asked. Stopped by SIGTERM: the trainer saved a checkpoint at the
    end of the step under way; say where, skip the final save, and exit 0."""
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    if trainer.stop_on_signal.received is not None:
        print(
            f"movekd-hf train: {trainer.stop_on_signal.received} received: saved checkpoint {trainer.last_checkpoint} "
            f"at step {trainer.state.global_step}; continue with --resume_from_checkpoint true",
            flush=True,
        )
        end_distributed()
        return 0
    trainer.save_model()
    if trainer.args.push_to_hub:
        trainer.push_to_hub()
    end_distributed()
    return 0


def end_distributed() -> None:
    """Every rank done: a barrier, then destroy the process group (PyTorch asks for this at the end of a training
    script), and have the entry's `cli.exit_process` skip the interpreter's teardown, where gloo's worker threads
    can still be freeing work and abort the rank (see there)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        cli.skip_interpreter_teardown()  # gloo's workers may still free work objects: see `cli.exit_process`


def main(argv: list[str] | None = None) -> int:
    import transformers

    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    return run(build_trainer(argv))


if __name__ == "__main__":
    # Through the command's error handling, so `accelerate launch -m movekd_hf.train` and `python -m
    # movekd_hf.train` print a user error as the one line `movekd-hf train: error: ...` (exit 2), as
    # `movekd-hf train` does; `--debug` shows the traceback.
    cli.exit_process(cli.main(["train", *sys.argv[1:]]))
