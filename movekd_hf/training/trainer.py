"""`MoVEKDTrainer`: the Hugging Face Trainer with the MoVE-KD loss L = L_lm + lambda_kd L_kd + lambda_bal L_bal.

Built from objects, as TRL's trainers are; the command line (`movekd-hf train`, train.py) only turns argv into
these objects:

    trainer = MoVEKDTrainer(model=vlm, args=MoVEKDTrainingArguments(output_dir="run", stage="stage1"),
                            teachers="tiny", train_dataset=dataset, processing_class=processor)

`model` is the VLM (`MoVEKDForConditionalGeneration`, or a peft `PeftModel` around it; `peft_config` wraps it here).
Construction copies the anchor teacher (`clip` or `siglip`: teacher_source.anchor_slug) from the student's tower as it
is now, builds the other teachers and the distiller (teacher adapters and standardisers) for `args.kd_preset`, freezes
what `args.stage` does not train, and wraps VLM and distiller in `MoVEKDTrainingModule`. Both train, so both must sit
inside the wrapped module: that is what gets their gradients all-reduced under DDP, partitioned and optimised under
DeepSpeed, and moved and cast with the model. Saving undoes the pairing: a checkpoint folder is the plain VLM
(`save_pretrained`, loadable through remote code) plus `distill_adapters.safetensors` (checkpoint.py). Teachers stay
outside, in a `TeacherSource`.

Gradient accumulation: the Trainer counts the label tokens of the whole accumulated batch (`num_items_in_batch`,
over all ranks) and the VLM returns sum / count, so the LM term needs no division. The KD and balance terms are
per-image means; they are rescaled here to per-image sums over the images of the whole accumulated batch
(also counted over all ranks), so accumulating k micro-batches gives the gradient of one k-times larger batch.

Reliability:
- Non-finite training: every training micro-batch checks the loss and its components (LM, KD per teacher, KD,
  balance) with one reduction, and every step the gradient norm. `args.nonfinite_policy="stop"` (default) raises
  `NonFiniteError(step, component, value)` before the optimizer step; "skip_step" drops the step's gradients so
  the optimizer leaves weights and moments as they were. No checkpoint with non-finite weights is written.
- SIGTERM saves a checkpoint at the end of the step under way and stops (`StopOnSignalCallback`); `train()`
  resumes from the newest complete checkpoint for `resume_from_checkpoint=True`, and says so when it starts over
  in a folder that holds checkpoints. Checkpoints are staged and renamed into place (trainer_saving.py, checkpoint.py).

Evaluation (`eval_dataset`, `eval_strategy`): the Trainer's own `evaluate()` loop, with `prediction_step` computing
L on each held-out batch, teachers included (frozen; the module in eval mode, so the standardisers' running
statistics stay as they are). Besides `eval_loss` (L) it logs the components as training does, prefixed:
`eval_lm_loss` (a mean over all held-out label tokens), `eval_kd_loss`, `eval_kd/<teacher>_loss` and
`eval_balance_loss` (means over all held-out images). The logging of components lives in trainer_metrics.py.

Console: one rounded line per log, written above the progress bar (console.py).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..distill.distiller import MoVEKDDistiller
from ..errors import NonFiniteError, SettingsError
from .anyres import collator_for
from .arguments import MoVEKDTrainingArguments
from .checkpoint import (
    StopOnSignalCallback,
    first_nonfinite,
)
from .collator import MoVEKDDataCollator
from .console import ConsoleLogCallback, ConsolePrinterCallback
from .data_args import image_token_id, num_image_tokens
from .distillation import (
    Teachers,
    distillation_setup,
    recorded_teachers,
)
from .module import MoVEKDTrainingModule, is_peft, prepare_model, trainable_parameters
from .teacher_source import (
    OnlineTeachers,
    TeacherSource,
    teacher_view_size,
)
from .trainer_metrics import LossMetricsMixin
from .trainer_saving import CheckpointingMixin

logger = logging.getLogger(__name__)

# Collator keys that are not VLM inputs: they feed the teachers (or a feature cache) and the loss scaling.
NON_MODEL_KEYS = ("images_per_sample", "teacher_images", "teacher_views", "teacher_view_sizes", "sample_ids")

# Writes the model card into a saved folder; called with (trainer, folder) after every save.
CardWriter = Callable[["MoVEKDTrainer", str], None]


def _default_collator(processing_class, source: TeacherSource | None) -> MoVEKDDataCollator:
    """The collator of `processing_class`, with the per-sample image-token checks `build_train_data`'s has; for
    online teachers it makes each teacher's own uint8 view in the loader workers (issue 18.3), not the float
    `teacher_images` every teacher resizes again on the device."""
    views = source.view_settings() if isinstance(source, OnlineTeachers) else None
    return collator_for(
        processing_class,
        processing_class.tokenizer.pad_token_id,
        teacher_views=views,
        image_token_id=image_token_id(processing_class),
        num_image_tokens=num_image_tokens(processing_class),
    )


def _check_collator(collator, view_size: int | None) -> None:
    gives_views = bool(getattr(collator, "teacher_views", None))
    if view_size is not None and getattr(collator, "teacher_image_size", 0) is None and not gives_views:
        raise ValueError(
            f"the data collator gives the teachers no images (teacher_image_size=None, no teacher_views): build it "
            f"with teacher_views=<the OnlineTeachers>.view_settings() or teacher_image_size={view_size}, or pass no "
            "data_collator and the trainer builds one"
        )


class _CalibrateStandardizers(TrainerCallback):
    """Runs `MoVEKDTrainer.calibrate_standardizers` when training begins: after a resumed checkpoint is loaded (its
    statistics make the pass unnecessary) and before the first step."""

    def __init__(self, trainer: MoVEKDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.calibrate_standardizers()


class MoVEKDTrainer(CheckpointingMixin, LossMetricsMixin, Trainer):
    """Trainer for a MoVE-KD VLM with `MoVEKDTrainingArguments` (stage, kd_preset, lambda_kd, lambda_bal).

    model: a `MoVEKDForConditionalGeneration`, possibly a peft `PeftModel` around it (stage 2 with LoRA on the
        LLM); `peft_config` (e.g. `llm_lora_config()`) wraps it here instead.
    teachers: a teacher set name ("tiny", "v1.0", "v1.1"), specs of the teachers besides the anchor (a frozen
        copy of the student's tower as given), or a ready `TeacherSource` such as `CachedTeachers` (then pass
        `distiller`). None with `kd_preset="none"` (the LLaVA baseline).
    distiller: the adapters and loss; by default built for the teachers with `args.kd_preset`'s loss, and loaded
        from `args.adapters_from` when set.
    data_collator: by default a `MoVEKDDataCollator` of `processing_class` that also gives the teachers their view.
    train_sampler: replaces the Trainer's random sampler (LLaVA's modality-length grouping).
    card_writer: `(trainer, folder) -> None`, writes the model card into every saved folder (the command line
        passes the Hub card of movekd_hf.hub_cards); None writes none.
    train_config: entries for train_config.json (shown in the model card) beyond the ones recorded here, e.g.
        `base_model`, `template`, `teacher_set`.
    Everything else (eval_dataset, callbacks, optimizers, ...) goes to `Trainer`.
    """

    loss_is_scaled_for_ga = True  # see the module docstring

    def __init__(
        self,
        model: nn.Module,
        args: MoVEKDTrainingArguments | None = None,
        teachers: Teachers | None = None,
        distiller: MoVEKDDistiller | None = None,
        train_dataset=None,
        data_collator=None,
        processing_class=None,
        peft_config=None,
        train_sampler=None,
        card_writer: CardWriter | None = None,
        train_config: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        args = args if args is not None else MoVEKDTrainingArguments()
        if not isinstance(args, MoVEKDTrainingArguments):
            raise TypeError(f"MoVEKDTrainer needs MoVEKDTrainingArguments, got {type(args).__name__}")
        base = model.get_base_model() if is_peft(model) else model
        if isinstance(model, MoVEKDTrainingModule) or not hasattr(getattr(base, "config", None), "vision_config"):
            raise TypeError(f"MoVEKDTrainer trains a MoVE-KD VLM (or a peft model of one), got {type(model).__name__}")
        if args.fp16 and args.device.type == "cpu":
            logger.warning(
                "fp16 on the CPU: accelerate autocasts only bf16 there (fp16 gets no autocast and no loss scaling), "
                "so the model trains in float32 and only the teachers run in float16; use `bf16: true` for mixed "
                "precision"
            )
        # Teachers first: the anchor copies the tower before anything (peft, the stage) touches the model.
        source, distiller, specs = distillation_setup(base, args, teachers, distiller, processing_class)
        view_size = teacher_view_size(base.config, specs) if specs is not None else None
        if data_collator is None and processing_class is not None:
            data_collator = _default_collator(processing_class, source)
        _check_collator(data_collator, view_size)
        module = MoVEKDTrainingModule(prepare_model(model, args, peft_config), distiller)
        counts = trainable_parameters(module)
        logger.info("stage %s trains %s parameters per component", args.stage, counts)
        super().__init__(
            model=module,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            **kwargs,
        )
        self.teacher_source = source
        self.card_writer = card_writer
        recorded = self._recorded_config(module, teachers, specs, counts)
        self.train_config = {**recorded, **dict(train_config or {})}
        for stock, ours in ((ProgressCallback, ConsoleLogCallback), (PrinterCallback, ConsolePrinterCallback)):
            if self.pop_callback(stock) is not None:  # same events, rounded lines written above the bar
                self.add_callback(ours)
        self._eval_sums: torch.Tensor | None = None  # [2, K] sums and counts of `_eval_names()`
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._pending_logs = {f"trainable_params/{k}": float(v) for k, v in counts.items()}
        self._window_images: torch.Tensor | None = None
        self._train_sampler = train_sampler
        if args.nonfinite_policy == "skip_step" and self.is_deepspeed_enabled:
            raise SettingsError(
                "cannot skip steps under DeepSpeed (the engine steps inside backward)",
                field="nonfinite_policy",
                expected="`stop`",
            )
        self.stop_on_signal = StopOnSignalCallback()
        self.add_callback(self.stop_on_signal)
        self.add_callback(_CalibrateStandardizers(self))  # PHI-S statistics before step 1
        self.last_checkpoint: str | None = None  # the folder of the newest checkpoint saved
        self._nonfinite: tuple[str, float] | None = None  # skip_step: what spoiled the accumulation window
        self._skipped_steps = 0
        self._staging: str | None = None  # set while a checkpoint is being written
        self._push_staged = False

    def _recorded_config(self, module: MoVEKDTrainingModule, teachers, specs, counts: dict[str, int]) -> dict:
        """What train_config.json records of the run by itself (the model card reads it)."""
        distiller = module.distiller
        return {
            "teacher_set": teachers if isinstance(teachers, str) else None,
            "teachers": recorded_teachers(distiller, specs),
            "kd_preset": self.args.kd_preset,
            "kd_loss": distiller.config.to_dict() if distiller is not None else None,
            "stage": self.args.stage,
            "lambda_kd": self.args.lambda_kd,
            "lambda_bal": self.args.lambda_bal,
            "lora_llm": module.is_peft,
            "qlora": getattr(module.base_vlm(), "hf_quantizer", None) is not None,
            "trainable_parameters": counts,
        }

    def _get_train_sampler(self, train_dataset=None):
        # LLaVA's modality-length grouping (image and text-only samples in separate batches) when configured.
        return self._train_sampler if self._train_sampler is not None else super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------------------ loss

    @torch.no_grad()
    def calibrate_standardizers(self) -> int:
        """Estimate the distiller's PHI-S statistics (`KDLossConfig.feature_standardization="phi_s"`) from the
        teacher outputs (online teachers or a feature cache: `self.teacher_source`) of the first
        `phi_s_calibration_batches` batches of a seeded shuffle of the training set, before step 1.

        Each process reads its own share (`process_index::world_size` of the shuffle) and the float64 sums are
        all-reduced, so every rank ends with the same statistics (and DDP broadcasts buffers from rank 0 anyway).
        The shuffle uses its own generator (`args.seed`): the training order is the same with or without it.
        Skipped when nothing needs statistics (another standardisation, or statistics loaded from `adapters_from`
        or a resumed checkpoint). Returns the batches this process read.
        """
        distiller = self.accelerator.unwrap_model(self.model).distiller
        if distiller is None or self.teacher_source is None or not distiller.needs_calibration():
            return 0
        reduce = None
        if self.args.world_size > 1:
            reduce = functools.partial(self.accelerator.reduce, reduction="sum")
        used = distiller.calibrate(self._calibration_outputs(distiller.config.phi_s_calibration_batches), reduce)
        logger.info("PHI-S statistics estimated on %d batch(es) of this process", used)
        return used

    def _calibration_outputs(self, num_batches: int):
        """{slug: TeacherOutput} of up to `num_batches` training batches (batches without images skipped)."""
        dataset, size = self.train_dataset, self.args.per_device_train_batch_size
        world, rank = self.args.world_size, self.args.process_index
        if hasattr(dataset, "__len__"):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.args.seed))
            samples = [dataset[i] for i in order[: num_batches * size * world][rank::world].tolist()]
        else:  # an iterable dataset: its first batches, the same on every rank
            samples = list(itertools.islice(iter(dataset), num_batches * size))
        for start in range(0, len(samples), size):
            inputs = self._prepare_inputs(self.data_collator(samples[start : start + size]))
            if inputs.get("pixel_values") is not None:
                yield self.teacher_source(inputs)

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
            hit = first_nonfinite(self._loss_components(loss, out))
            if hit is not None:
                self._nonfinite_found(*hit)
            else:
                self._record(out, inputs.get("labels"), num_items_in_batch)
        return (loss, out) if return_outputs else loss

    def _loss_components(self, loss: torch.Tensor, out: dict) -> list[tuple[str, torch.Tensor | None]]:
        """(name, tensor) of every loss term this micro-batch computed, the ones a user would look at first."""
        named = [("lm_loss", out["lm_loss"])]
        kd = out["kd"]
        if kd is not None:
            per_teacher = kd.get("per_teacher_loss")
            per_teacher = per_teacher if per_teacher is not None else kd["per_teacher"]  # [B, T] or [T]
            names = self.accelerator.unwrap_model(self.model).distiller.teacher_names
            named += [(f"kd/{name}_loss", per_teacher[..., index]) for index, name in enumerate(names)]
            named.append(("kd_loss", kd["loss"]))
        if out["balance"] is not None:
            named.append(("balance_loss", out["balance"]["loss"]))
        return [*named, ("loss", loss)]

    def _nonfinite_found(self, component: str, value: float) -> None:
        """`stop`: raise before the optimizer step. `skip_step`: remember it; `_get_grad_norm` drops the step."""
        step = self.state.global_step + 1  # the optimizer step being computed, 1-based as the logs count
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteError(step, component, value)
        if self._nonfinite is None:
            self._nonfinite = (component, value)

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after clipping and before `optimizer.step()`: the place to stop or skip.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(norm):
            self._nonfinite_found("grad_norm", norm)
        if self._nonfinite is not None:
            component, value = self._nonfinite
            self._nonfinite = None
            # torch optimizers pass over parameters without a gradient: no update, no moment, no weight decay.
            model.zero_grad(set_to_none=True)
            self._skipped_steps += 1
            self._pending_logs["nonfinite_skipped_steps"] = float(self._skipped_steps)
            logger.warning(
                "step %d skipped: non-finite %s (%s); %d step(s) skipped so far (nonfinite_policy=skip_step)",
                self.state.global_step + 1, component, value, self._skipped_steps,
            )  # fmt: skip
        return grad_norm
