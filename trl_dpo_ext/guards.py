"""Non-finite training steps: a NaN or infinite loss, reward, gradient or parameter is reported the step it happens.

transformers' `Trainer` hides a diverged run: it logs a NaN loss as the mean of the finite ones
(`logging_nan_inf_filter`), and keeps saving checkpoints whose weights are NaN. `NonFiniteGuard` (a `TrainerCallback`
the trainer adds) checks every optimizer step:

- the loss and the implicit rewards β·Δ of each row of each micro-batch (`observe_batch`, called by the trainer's
  `_compute_loss`), which names the rows by their dataset index (the `dataset_index` column the collator passes
  through), or by their position in the micro-batch when the batch has none;
- the gradients after clipping, before the optimizer step (`on_pre_optimizer_step`; skipped with `fp16`, whose loss
  scaler skips steps with infinite gradients by design), and a gradient that is exactly zero while the loss is not
  (the model is saturated, e.g. by a far too large learning rate: training goes on and learns nothing);
- the trainable parameters after the optimizer step (`on_step_end`).

It decides in `on_step_end`, which transformers calls before it logs and saves the step: with
`DPOConfig(on_nonfinite="stop")` (the default) every process raises `NonFiniteTrainingError` there, so no checkpoint
of a non-finite step is written; with `"warn"` the main process logs a warning and training goes on. The findings of
all processes are combined by one small all-reduce per step, so every process takes the same decision. A zero
gradient with a non-zero loss is a warning in both modes (the weights are finite; the checkpoint is what was trained).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from .rows import INDEX_COLUMN


if TYPE_CHECKING:
    from accelerate import Accelerator

    from .losses import PreferenceLogps


logger = logging.getLogger(__name__)

ON_NONFINITE = ("stop", "warn")
# Rows and parameters named in one message; the rest are counted
MAX_NAMED = 10


class NonFiniteTrainingError(RuntimeError):
    """Training reached a non-finite loss, reward, gradient or parameter (see `trl_dpo_ext.guards`)."""


def check_on_nonfinite(value: str) -> None:
    """The rule of `DPOConfig.on_nonfinite`, run in its `__post_init__`."""
    if value not in ON_NONFINITE:
        raise ValueError(f"`on_nonfinite` must be one of {list(ON_NONFINITE)}, got {value!r}.")


def _named(items: list, noun: str, limit: int = MAX_NAMED) -> str:
    items = sorted(set(items))
    shown = ", ".join(str(i) for i in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{noun} {shown}{more}"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A process's own shard of a (possibly FSDP2-sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGuard(TrainerCallback):
    """Checks each optimizer step for non-finite values and stops (or warns) before the step is logged and saved.

    Args:
        on_nonfinite (`str`): `"stop"` raises `NonFiniteTrainingError`, `"warn"` logs a warning.
        accelerator (`accelerate.Accelerator`): the trainer's, for the one all-reduce per step.
        check_gradients (`bool`): whether to check the gradients (not under `fp16`, whose scaler skips such steps).
    """

    def __init__(self, on_nonfinite: str, accelerator: Accelerator, check_gradients: bool = True):
        check_on_nonfinite(on_nonfinite)
        self.on_nonfinite = on_nonfinite
        self.accelerator = accelerator
        self.check_gradients = check_gradients
        self.zero_gradient_warned = False
        self._reset()

    def _reset(self) -> None:
        self.loss_rows: list = []  # rows of micro-batches whose loss is non-finite
        self.reward_rows: list = []  # rows with a non-finite implicit reward
        self.loss_sum = 0.0  # Σ |loss| of the step's micro-batches (0 ⇔ nothing left to learn)
        self.nonfinite_gradients: list[str] = []
        self.gradient_sq_norm: float | None = None  # None: no gradient seen (e.g. DeepSpeed keeps its own)
        self.named_by_position = False

    # -------------------------------------------------------------------------------------------- observations

    def observe_batch(self, inputs: dict, loss: torch.Tensor, logps: PreferenceLogps, beta: float) -> None:
        """Record the rows of one training micro-batch whose loss or implicit reward is not finite."""
        mask = logps.rejected_mask
        chosen_bad = ~torch.isfinite(beta * logps.chosen_logratios.detach()).all(dim=1)  # [B]
        rejected_bad = (~torch.isfinite(beta * logps.rejected_logratios.detach()) & mask).any(dim=1)  # [B]
        reward_bad = chosen_bad | rejected_bad
        loss_value, any_reward_bad = torch.stack([loss.detach().float(), reward_bad.any().float()]).tolist()
        if math.isfinite(loss_value) and not any_reward_bad:
            self.loss_sum += abs(loss_value)
            return
        if INDEX_COLUMN in inputs:
            names = inputs[INDEX_COLUMN].tolist()
        else:
            names, self.named_by_position = list(range(mask.size(0))), True
        if not math.isfinite(loss_value):
            self.loss_rows.extend(names)
        self.reward_rows.extend(name for name, bad in zip(names, reward_bad.tolist(), strict=True) if bad)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or not self.check_gradients:
            return
        grads = [(name, _local(p.grad)) for name, p in model.named_parameters() if p.grad is not None]
        if not grads:
            return
        # One float32 norm per tensor (no float32 copy of bf16 gradients), read back in one host sync
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for _, g in grads])
        finite = torch.isfinite(norms)
        self.gradient_sq_norm = norms[finite].double().square().sum().item()
        self.nonfinite_gradients = [name for (name, _), ok in zip(grads, finite.tolist(), strict=True) if not ok]

    # --------------------------------------------------------------------------------------------- decision

    def on_step_end(self, args, state, control, model=None, **kwargs):
        bad_parameters = []
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad] if model is not None else []
        if trainable:
            # A float32 sum per tensor is NaN or infinite if an entry is (or if the weights sum past 3e38, diverged
            # too); one stack, one host sync, no per-entry mask
            sums = torch.stack([_local(p.detach()).sum(dtype=torch.float32) for _, p in trainable])
            finite = torch.isfinite(sums).tolist()
            bad_parameters = [name for (name, _), ok in zip(trainable, finite, strict=True) if not ok]
        local = [
            len(self.loss_rows),
            len(self.reward_rows),
            len(self.nonfinite_gradients),
            len(bad_parameters),
            self.gradient_sq_norm if self.gradient_sq_norm is not None else -1.0,
            self.loss_sum,
        ]
        totals = torch.tensor(local, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        num_loss, num_reward, num_grad, num_param, grad_sq_norm, loss_sum = totals.tolist()
        step = state.global_step
        if num_loss or num_reward or num_grad or num_param:
            findings = {
                "loss": self.loss_rows,
                "reward": self.reward_rows,
                "gradients": self.nonfinite_gradients,
                "parameters": bad_parameters,
                "by_position": self.named_by_position,
            }
            everyone = [findings]
            if self.accelerator.num_processes > 1:
                from accelerate.utils import gather_object

                everyone = gather_object([findings])
            self._reset()
            message = self.message(step, everyone)
            if self.on_nonfinite == "stop":
                raise NonFiniteTrainingError(message)
            if state.is_world_process_zero:
                logger.warning(message)
        elif grad_sq_norm == 0 and loss_sum > 0 and not self.zero_gradient_warned:  # −1 per process without one
            self.zero_gradient_warned = True
            if state.is_world_process_zero:
                logger.warning(
                    f"Step {step}: the gradient is exactly zero while the loss is not ({loss_sum:.4g}): the model "
                    "is saturated and learns nothing (a learning rate far too large does this). Said once per run."
                )
        self._reset()

    def message(self, step: int, everyone: list[dict]) -> str:
        """One message for the non-finite findings of all processes at `step`."""
        merged = {key: [x for f in everyone for x in f[key]] for key in ("loss", "reward", "gradients", "parameters")}
        rows = "positions in the micro-batch" if any(f["by_position"] for f in everyone) else "dataset rows"
        parts = []
        if merged["loss"]:
            parts.append(f"the loss of the micro-batch of {_named(merged['loss'], rows)}")
        if merged["reward"]:
            parts.append(f"the implicit reward β·Δ of {_named(merged['reward'], rows)}")
        if merged["gradients"]:
            parts.append(f"the gradient of {_named(merged['gradients'], 'parameters', 3)}")
        if merged["parameters"]:
            parts.append(f"after the update, {_named(merged['parameters'], 'parameters', 3)}")
        what = "; ".join(parts)
        if self.on_nonfinite == "stop":
            action = (
                "Training stopped before this step is logged or saved (the last checkpoint, if any, is of an earlier "
                "step). Lower `learning_rate`, set `max_grad_norm`, or check these rows; `on_nonfinite='warn'` only "
                "warns."
            )
        else:
            action = (
                "Training goes on (`on_nonfinite='warn'`); the logged `loss` leaves out non-finite values "
                "(`logging_nan_inf_filter`)."
            )
        return f"Step {step}: non-finite values (NaN or infinite) in {what}. {action}"
