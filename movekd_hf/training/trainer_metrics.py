"""What `MoVEKDTrainer` (trainer.py) logs of its loss, as a mixin ahead of `Trainer` in its bases.

- Training: every micro-batch's components (LM, KD and per teacher, teacher weights, the summary term, balance,
  each expert's share of tokens) are kept, and each training log adds their means over the logging window
  (rank-local values) and any pending one-off entries (trainable parameters, skipped steps).
- Evaluation: `prediction_step` computes L on each held-out batch, teachers included, and sums each component
  weighted by its count (label tokens for the LM term, images for the others); `evaluation_loop` reduces the sums
  over ranks once and reports `{prefix}_lm_loss`, `{prefix}_kd_loss`, `{prefix}_kd/<teacher>_loss` and
  `{prefix}_balance_loss` as means over the whole held-out set.

The trainer provides `compute_loss`, and `_metrics` (a `defaultdict(list)`), `_pending_logs` (a dict) and
`_eval_sums = None` from its construction.
"""

from __future__ import annotations

import torch

from ..modeling.mole import upcast


class LossMetricsMixin:
    """Training-log means and held-out sums of the loss components (see the module docstring)."""

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
            if "summary_loss" in kd:  # KDLossConfig.summary_loss_weight > 0: the summary term's own size
                self._metrics["kd/summary_loss"].append(kd["summary_loss"].item())
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

    def _eval_names(self) -> list[str]:
        """The held-out components, the same list on every rank (their sums are reduced together)."""
        distiller = self.accelerator.unwrap_model(self.model).distiller
        teachers = [f"kd/{name}_loss" for name in distiller.teacher_names] if distiller is not None else []
        return ["lm_loss", "kd_loss", *teachers, "balance_loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """L on one held-out batch, teachers included, without gradients; its components are summed for
        `evaluation_loop`. Returns (loss, None, None): no logits are gathered (nothing computes metrics on them).
        The LM term is this batch's token mean (no `num_items_in_batch`), the others per-image means."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        self._add_eval_batch(out, inputs.get("labels"))
        return loss.detach(), None, None

    @torch.no_grad()
    def _add_eval_batch(self, out: dict, labels: torch.Tensor | None) -> None:
        """Add (mean x count, count) of each component: label tokens for the LM term, images for the others."""
        values: dict[str, tuple[torch.Tensor, float | torch.Tensor]] = {}
        if out["lm_loss"] is not None and labels is not None:
            values["lm_loss"] = (out["lm_loss"], labels[..., 1:].ne(-100).sum())
        images = float(out["num_images"])
        kd = out["kd"]
        if kd is not None and images:
            values["kd_loss"] = (kd["loss"], images)
            per_teacher = kd.get("per_teacher_loss")
            per_teacher = upcast(per_teacher).mean(0) if per_teacher is not None else kd["per_teacher"]  # [T]
            for index, name in enumerate(self.accelerator.unwrap_model(self.model).distiller.teacher_names):
                values[f"kd/{name}_loss"] = (per_teacher[index], images)
        if out["balance"] is not None and images:
            values["balance_loss"] = (out["balance"]["loss"], images)
        names = self._eval_names()
        if self._eval_sums is None:
            self._eval_sums = torch.zeros(2, len(names), dtype=torch.float64, device=self.args.device)  # [2, K]
        for index, name in enumerate(names):
            if name in values:
                mean, count = values[name]
                count = torch.as_tensor(count, dtype=torch.float64, device=self._eval_sums.device)
                self._eval_sums[0, index] += upcast(mean.detach()).double() * count
                self._eval_sums[1, index] += count

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):  # fmt: skip
        """The Trainer's loop, plus `{prefix}_lm_loss`, `{prefix}_kd_loss`, `{prefix}_kd/<teacher>_loss` and
        `{prefix}_balance_loss` over the whole held-out set (all ranks; a rank's padding batch counts too)."""
        self._eval_sums = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        names = self._eval_names()
        sums = self._eval_sums
        if sums is None:  # this rank saw no batch: it still joins the reduction
            sums = torch.zeros(2, len(names), dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        self._eval_sums = None
        for index, name in enumerate(names):
            if sums[1, index] > 0:
                output.metrics[f"{metric_key_prefix}_{name}"] = (sums[0, index] / sums[1, index]).item()
        return output
