"""`MoVEKDTrainer`: the Hugging Face Trainer with the MoVE-KD loss L = L_lm + lambda_kd L_kd + lambda_bal L_bal.

What the Trainer (and DDP / DeepSpeed under it) wraps is `MoVEKDTrainingModule`: the VLM plus the distiller
(teacher adapters and standardisers). Both train, so both must sit inside the wrapped module: that is what gets
their gradients all-reduced under DDP, partitioned and optimised under DeepSpeed, and moved and cast with the
model. Saving undoes the pairing: a checkpoint folder is the plain VLM (`save_pretrained`, loadable through
remote code) plus `distill_adapters.safetensors` (checkpoint.py). Teachers stay outside, in a `TeacherSource`.

Gradient accumulation: the Trainer counts the label tokens of the whole accumulated batch (`num_items_in_batch`,
over all ranks) and the VLM returns sum / count, so the LM term needs no division. The KD and balance terms are
per-image means; they are rescaled here to per-image sums over the images of the whole accumulated batch
(also counted over all ranks), so accumulating k micro-batches gives the gradient of one k-times larger batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import HubStrategy

from ..distill.distiller import MoVEKDDistiller
from ..distill.losses import mole_balance_loss
from ..modeling.mole import upcast
from .checkpoint import (
    TRAINING_STATE_PATTERNS,
    copy_loadable_files,
    load_training_folder,
    save_training_folder,
)
from .teacher_source import TeacherSource

logger = logging.getLogger(__name__)

# Collator keys that are not VLM inputs: they feed the teachers (or a feature cache) and the loss scaling.
NON_MODEL_KEYS = ("images_per_sample", "teacher_images", "teacher_pixel_values", "sample_ids")


class MoVEKDTrainingModule(nn.Module):
    """The trained module: `vlm` (a `MoVEKDForConditionalGeneration`, possibly inside a peft `PeftModel`) and
    `distiller` (None for the no-KD baseline). `forward` returns the loss components, unweighted."""

    # The Trainer reads this to pass `num_items_in_batch` (label tokens of the accumulated batch).
    accepts_loss_kwargs = True
    main_input_name = "input_ids"

    def __init__(self, vlm: nn.Module, distiller: MoVEKDDistiller | None = None):
        super().__init__()
        self.vlm = vlm
        self.distiller = distiller
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        self.student_grid = (side, side)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.vlm, "peft_config")

    def base_vlm(self) -> nn.Module:
        """The `MoVEKDForConditionalGeneration` itself (peft's base model when LoRA wraps it)."""
        return self.vlm.get_base_model() if self.is_peft else self.vlm

    @property
    def config(self):
        return self.base_vlm().config

    @property
    def generation_config(self):
        return self.base_vlm().generation_config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        vlm = self.base_vlm()
        if hasattr(vlm, "activation_checkpointing_enable"):  # transformers >= 5.24
            vlm.activation_checkpointing_enable(
                activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                every_n_layers=every_n_layers,
                offload=offload,
            )
        else:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        if self.is_peft:  # frozen embeddings give checkpointed LoRA blocks no input that requires grad
            vlm.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """What the Trainer of transformers < 5.24 calls; 5.24 renamed it `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def forward(self, teacher_outputs: dict | None = None, num_items_in_batch=None, **batch) -> dict[str, Any]:
        """batch: the VLM's inputs (input_ids, attention_mask, labels, pixel_values). Returns {"lm_loss",
        "kd" (distiller output or None), "balance" (mole_balance_loss output or None), "num_images"}."""
        if num_items_in_batch is not None:
            batch["num_items_in_batch"] = num_items_in_batch
        outputs = self.vlm(**batch)
        result = {"lm_loss": outputs.loss, "kd": None, "balance": None, "num_images": 0}
        if outputs.router_logits is not None:
            result["balance"] = mole_balance_loss(outputs.router_logits)
            result["num_images"] = outputs.router_logits[0].shape[0]
        if self.distiller is not None and teacher_outputs and outputs.vision_hidden_states is not None:
            result["kd"] = self.distiller(outputs.vision_hidden_states, self.student_grid, teacher_outputs)
        return result


class MoVEKDTrainer(Trainer):
    """Trainer for a `MoVEKDTrainingModule` with `MoVEKDTrainingArguments` (lambda_kd, lambda_bal).

    teacher_source: `{slug: TeacherOutput}` per batch (None: no distillation). trainable_counts: parameters per
    component, logged once. train_config: the run's MoVE-KD settings, saved as train_config.json and shown in the
    model card. train_sampler: replaces the Trainer's random sampler (LLaVA's modality-length grouping).
    """

    loss_is_scaled_for_ga = True  # see the module docstring

    def __init__(
        self,
        model: MoVEKDTrainingModule,
        args,
        teacher_source: TeacherSource | None = None,
        trainable_counts: dict[str, int] | None = None,
        train_config: dict[str, Any] | None = None,
        train_sampler=None,
        **kwargs,
    ):
        if not isinstance(model, MoVEKDTrainingModule):
            raise TypeError(f"MoVEKDTrainer trains a MoVEKDTrainingModule, got {type(model).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_source = teacher_source
        self.train_config = dict(train_config or {})
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._pending_logs = {f"trainable_params/{k}": float(v) for k, v in (trainable_counts or {}).items()}
        self._window_images: torch.Tensor | None = None
        self._train_sampler = train_sampler

    def _get_train_sampler(self, train_dataset=None):
        # LLaVA's modality-length grouping (image and text-only samples in separate batches) when configured.
        return self._train_sampler if self._train_sampler is not None else super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------------------ loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Images in the whole accumulated batch, counted like the Trainer counts label tokens.
        images = sum(int(b["images_per_sample"].sum()) for b in batch_samples if "images_per_sample" in b)
        images = torch.tensor(images, device=device, dtype=torch.float32)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            images = self.accelerator.gather(images.reshape(1)).sum()
        self._window_images = images
        return batch_samples, num_items_in_batch

    def _aux_scale(self, num_images: int, num_items_in_batch) -> float | torch.Tensor:
        """Factor turning a per-image mean of this micro-batch into its share of the accumulated-batch mean."""
        if num_items_in_batch is None or self._window_images is None or not self.model.training:
            return 1.0
        scale = num_images / self._window_images.clamp(min=1.0)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            scale = scale * self.accelerator.num_processes  # DDP/DeepSpeed average gradients over ranks
        return scale

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        extras = {key: inputs.pop(key, None) for key in NON_MODEL_KEYS}
        teacher_outputs = None
        if self.teacher_source is not None and inputs.get("pixel_values") is not None:
            teacher_outputs = self.teacher_source({**inputs, **extras})
        out = model(**inputs, teacher_outputs=teacher_outputs, num_items_in_batch=num_items_in_batch)
        loss = out["lm_loss"] if out["lm_loss"] is not None else torch.zeros((), device=self.args.device)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does for the LM loss
        scale = self._aux_scale(out["num_images"], num_items_in_batch)
        if out["kd"] is not None and self.args.lambda_kd > 0:
            loss = loss + self.args.lambda_kd * scale * out["kd"]["loss"]
        if out["balance"] is not None and self.args.lambda_bal > 0:
            loss = loss + self.args.lambda_bal * scale * out["balance"]["loss"]
        if model.training:
            self._record(out, inputs.get("labels"), num_items_in_batch)
        return (loss, out) if return_outputs else loss

    @torch.no_grad()
    def _record(self, out: dict, labels, num_items_in_batch) -> None:
        """Per-micro-batch means of every component, averaged over the logging window in `log`."""
        if out["lm_loss"] is not None:
            lm = upcast(out["lm_loss"].detach())
            if num_items_in_batch is not None and labels is not None:  # back from sum / window-count to a mean
                local = labels[..., 1:].ne(-100).sum().clamp(min=1)
                lm = lm * torch.as_tensor(num_items_in_batch, dtype=lm.dtype) / local
            self._metrics["lm_loss"].append(lm.item())
        kd = out["kd"]
        if kd is not None:
            self._metrics["kd_loss"].append(kd["loss"].item())
            names = self.model.distiller.teacher_names
            per_teacher = kd.get("per_teacher_loss")
            per_teacher = upcast(per_teacher).mean(0) if per_teacher is not None else kd["per_teacher"]
            weights = kd.get("teacher_weights")
            for index, name in enumerate(names):
                self._metrics[f"kd/{name}_loss"].append(per_teacher[index].item())
                if weights is not None:
                    self._metrics[f"kd/{name}_weight"].append(upcast(weights[:, index]).mean().item())
        balance = out["balance"]
        if balance is not None:
            self._metrics["balance_loss"].append(balance["loss"].item())
            for expert, share in enumerate(balance["load"].mean(0).tolist()):  # fraction of tokens per expert
                self._metrics[f"mole/expert_{expert}_tokens"].append(share)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the window's component means (rank-local values)
            logs.update({key: sum(values) / len(values) for key, values in self._metrics.items() if values})
            self._metrics.clear()
            logs.update(self._pending_logs)
            self._pending_logs = {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- save and load

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        module = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_training_folder(output_dir, module, state_dict, self.processing_class, self.train_config)
        self.write_model_card(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_training_folder(resume_from_checkpoint, module)

    def write_model_card(self, folder: str) -> None:
        """README.md (and eval-result files) for a saved folder, built by movekd_hf.hub_cards."""
        from ..hub_cards.card import render_repo_files
        from ..hub_cards.run_dir import RunDir

        config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
        run = RunDir(
            root=Path(self.args.output_dir),
            checkpoint=Path(folder),
            config=config,
            train_config=self.train_config or None,
            training_args=json.loads(self.args.to_json_string()),
        )
        for path_in_repo, text in render_repo_files(run, self.args.hub_model_id).items():
            target = Path(folder, path_in_repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")

    def create_model_card(self, *args, **kwargs) -> None:
        # Our card (written with every save) replaces the Trainer's generic one.
        if self.is_world_process_zero():
            self.write_model_card(self.args.output_dir)

    # ------------------------------------------------------------------------------------------------ Hub

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Upload a loadable folder (weights, config, remote code, processor, card) at every save.

        The Trainer's own version copies only weights and config to `output_dir` before uploading it, so the
        remote-code `.py` files, the card and the LoRA folder were missing from intermediate pushes.
        """
        from transformers.trainer import PushInProgress, hf_api

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
