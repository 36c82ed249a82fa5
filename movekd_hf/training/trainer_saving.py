"""Saving, resuming and Hub uploads for `MoVEKDTrainer` (trainer.py), as a mixin ahead of `Trainer` in its bases.

- A checkpoint is written under `_incomplete/checkpoint-N` and renamed into place once every rank has written its
  part, so a `checkpoint-N` folder is always complete; it holds the plain VLM (`save_pretrained`, loadable through
  remote code), the distillation adapters, the model card and the RNG states as safetensors (checkpoint.py).
- `train(resume_from_checkpoint=True)` resumes from the newest complete checkpoint; SIGTERM saves one at the end of
  the step under way and stops.
- Every save uploads a loadable folder (weights, config, remote code, processor, card), not only weights and config
  as the Trainer's own push does; `push_to_hub` uploads the final one. Training state is never uploaded.

The trainer provides `stop_on_signal` (a `StopOnSignalCallback` it has added), `card_writer`, `train_config`,
`last_checkpoint`, and `_staging = None` / `_push_staged = False` from its construction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, rotate_checkpoints
from transformers.training_args import ParallelMode

from .checkpoint import (
    STAGING_DIR,
    TRAINING_ARGS_JSON,
    TRAINING_STATE_PATTERNS,
    check_finite_weights,
    copy_loadable_files,
    load_rng_state,
    load_training_folder,
    publish_checkpoint,
    refuse_pickle,
    resume_folder,
    rng_state_file,
    save_rng_state,
    save_training_folder,
)
from .console import logging_above_bars


class CheckpointingMixin:
    """`Trainer` overrides for staged checkpoints, safetensors RNG states, resuming and whole-folder Hub uploads."""

    # ------------------------------------------------------------------------------------- save and load

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, with `resume_from_checkpoint=True` (or "true") meaning the newest COMPLETE checkpoint of
        `output_dir` (none there: start at step 0, with a warning), SIGTERM saving and stopping at the end of the
        step under way (`self.stop_on_signal.received` tells afterwards), and a warning when a run starts over in
        a folder that holds checkpoints."""
        resume = resume_folder(resume_from_checkpoint, self.args.output_dir, warn=self.is_world_process_zero())
        with self.stop_on_signal.installed(), logging_above_bars(not self.args.disable_tqdm):
            return super().train(resume_from_checkpoint=resume, trial=trial, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """The Trainer's checkpoint, written under `_incomplete/checkpoint-N` and renamed to `checkpoint-N` once
        every rank has written its part: a `checkpoint-N` folder is always complete. Rotation (save_total_limit)
        and the Hub upload then see the final folder."""
        check_finite_weights(self.accelerator.unwrap_model(self.model), self.state.global_step)
        run_dir = super()._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging, self._push_staged = staging_root, False
        try:
            super()._save_checkpoint(model, trial)  # rotates nothing: the staging folder holds this one only
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's RNG state and DeepSpeed shards are in
        if self.args.should_save:
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            publish_checkpoint(staged, final)
            with contextlib.suppress(OSError):  # only when empty: another process may be staging a step there
                os.rmdir(staging_root)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = final
        if self._push_staged:
            self._push_from_checkpoint(final)

    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        module = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        check_finite_weights(module, self.state.global_step)
        save_training_folder(output_dir, module, state_dict, self.processing_class, self.train_config)
        if self.card_writer is not None:
            self.card_writer(self, output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # for transformers' own tools
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as handle:
            handle.write(self.args.to_json_string())

    def _rng_file(self, folder: str) -> str:
        return os.path.join(folder, rng_state_file(self.args.process_index if self.args.world_size > 1 else None))

    def _save_rng_state(self, output_dir: str) -> None:
        # safetensors instead of the Trainer's pickled rng_state.pth (CPU and CUDA generators; others: the Trainer).
        if self.args.device.type not in ("cpu", "cuda"):
            return super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        save_rng_state(self._rng_file(output_dir), self.args.parallel_mode == ParallelMode.DISTRIBUTED)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = self._rng_file(checkpoint)
        if os.path.isfile(path):
            return load_rng_state(path, self.args.parallel_mode == ParallelMode.DISTRIBUTED)
        pickled = path.removesuffix(".safetensors") + ".pth"
        if os.path.isfile(pickled):  # a checkpoint written by the plain Trainer
            refuse_pickle(pickled, self.args.allow_pickle)
        return super()._load_rng_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_training_folder(resume_from_checkpoint, module, allow_pickle=self.args.allow_pickle)

    def create_model_card(self, *args, **kwargs) -> None:
        # The card writer's card (written with every save) replaces the Trainer's generic one.
        if self.card_writer is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self.card_writer(self, self.args.output_dir)

    # ------------------------------------------------------------------------------------------------ Hub

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Upload a loadable folder (weights, config, remote code, processor, card) at every save.

        The Trainer's own version copies only weights and config to `output_dir` before uploading it, so the
        remote-code `.py` files, the card and the LoRA folder were missing from intermediate pushes.
        """
        from transformers.trainer import PushInProgress, hf_api

        if self._staging is not None:  # called inside the Trainer's save: upload once the folder is in place
            self._push_staged = True
            return
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        # Copy first: the checkpoint folder may be rotated away while the upload runs in the background.
        copy_loadable_files(checkpoint_folder, self.args.output_dir)
        message = f"Training in progress, step {self.state.global_step}"
        upload = dict(repo_id=self.hub_model_id, token=self.args.hub_token, run_as_future=True)
        jobs = [
            hf_api().upload_folder(
                folder_path=self.args.output_dir,
                commit_message=message,
                ignore_patterns=list(TRAINING_STATE_PATTERNS),
                revision=self.args.hub_revision,
                **upload,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            name = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            )
            jobs.append(
                hf_api().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo=name,
                    commit_message=message + ", checkpoint",
                    revision=self.args.hub_revision,
                    **upload,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):  # fmt: skip
        """Save the final model into `output_dir` and upload it (training state left out)."""
        from transformers.trainer import hf_api

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            ignore_patterns=list(TRAINING_STATE_PATTERNS),
            revision=revision if revision is not None else self.args.hub_revision,
        )
