"""Gradient weights of the DPO update: which (chosen, rejected) pairs drive each step.

The DPO gradient (Rafailov et al. 2023, arXiv 2305.18290, §4 "What does the DPO update do?") is

    ∇L = −β E[ σ(r̂(x, y_l) − r̂(x, y_w)) · (∇log π_θ(y_w|x) − ∇log π_θ(y_l|x)) ],   r̂(x, y) = β·log π_θ(y|x)/π_ref(y|x)

so every pair's update is scaled by σ(r̂_l − r̂_w): near 1 where the implicit reward model ranks the pair wrongly, near 0
where the pair is already learned. Two weights are computed for every pair (i, k) of a batch, from the log-ratios the
loss already holds (no extra forward pass, everything detached):

- ``w_ik = σ(r̂_lk − r̂_w) = σ(β·(Δ_lk − Δ_w))``: the paper's factor, whatever the loss.
- the *effective* weight ``e_ik = (B/β)·∂L/∂Δ_lk``, with ``L`` the batch loss the trainer minimises (every `loss_type`
  times its `loss_weights` entry, mean over the B examples, the K pairs of an example combined by
  `rejected_reduction`), taken by autograd on detached copies of the log-ratios. The update moves log π_θ(y_lk|x)
  along ``−(β/B)·e_ik``, so ``e_ik`` is the weight that really multiplies that pair's gradient, on the scale of ``w``:
  ``w/K_i`` for `sigmoid` with `"mean"`, ``w`` with `"sum"`, ``w`` on the hardest rejected and 0 elsewhere with
  `"min"`, the softmax probability ``e^{βΔ_lk} / (e^{βΔ_w} + Σ_j e^{βΔ_lj})`` with `"softmax"`; for IPO, hinge, ...
  whatever their derivative is (it may be negative, e.g. for `sppo_hard`).

Symbols and shapes as in `trl_dpo_ext.losses`: B examples, K the largest number of rejected in the batch; weights are
[B, K] tensors holding NaN where example i has no k-th rejected.

Logged keys (each averaged over the steps of a logging window by TRL's `log()`), for ``P`` = ``grad_weight`` (w) and
``grad_weight_eff`` (e): ``P/mean``, ``P/max``, ``P/p10``, ``P/p50``, ``P/p90`` (quantiles over the pairs of all
processes), ``P/frac_above_0.5``, ``P/frac_below_0.05``, and ``P/rank_k``, the mean over the examples that have a k-th
rejected, when K > 1; and ``P/nonfinite``, the number of real pairs (the pair mask tells them from the padding) whose
weight is NaN or infinite, left out of the others. Every key is defined in ``docs/diagnostics.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from .grad_weight_record import GradWeightRecordCallback, append_record, format_record, record_path
from .loss_spec import LossSpec
from .losses import PreferenceLogps
from .rows import INDEX_COLUMN


if TYPE_CHECKING:
    from accelerate import Accelerator


GRAD_WEIGHT_PREFIX = "grad_weight"
EFFECTIVE_PREFIX = "grad_weight_eff"
QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}
# A pair above this weight is ranked wrongly by the implicit reward (w > 0.5 ⇔ r̂_l > r̂_w)
WRONG_THRESHOLD = 0.5
# A pair below this weight is learned: it hardly moves the policy any more
LEARNED_THRESHOLD = 0.05
HISTOGRAM_REPORTERS = ("tensorboard", "wandb", "trackio")


# ----------------------------------------------------------------------------------------------------- weights


def grad_weights(logps: PreferenceLogps, beta: float) -> torch.Tensor:
    """The DPO weight w = σ(r̂_lk − r̂_w) = σ(β·(Δ_lk − Δ_w)) of every pair, detached, float32 [B, K]; NaN where
    there is no k-th rejected."""
    margin = beta * (logps.rejected_logratios.detach().float() - logps.chosen_logratios.detach().float())
    return torch.sigmoid(margin).masked_fill(~logps.rejected_mask, float("nan"))


def effective_grad_weights(
    logps: PreferenceLogps,
    spec: LossSpec,
    pair_weights: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """The effective weight e = (B/β)·∂L/∂Δ_lk of every pair under the configured loss, float32 [B, K]; NaN where
    there is no k-th rejected.

    `L = spec.preference_loss(logps, pair_weights, scores)`, the trainer's loss (its `"sft"` term does not depend on
    the rejected and adds nothing). The gradient is taken by autograd on detached float32 copies, so it works under
    `torch.no_grad()` and leaves the training graph untouched.
    """
    batch_size = logps.rejected_mask.size(0)

    def fresh(value: Any) -> Any:
        # A clone outside inference mode, so that autograd may save it even when the caller runs in inference mode
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach()
        return (value.float() if value.is_floating_point() else value).clone()

    with torch.inference_mode(False), torch.enable_grad():
        rejected = fresh(logps.rejected).requires_grad_(True)
        # Δ_lk = rejected − ref_rejected with a constant reference: ∂L/∂(log π_θ(y_lk)) = ∂L/∂Δ_lk
        leaf = PreferenceLogps(*(fresh(value) for value in logps))._replace(rejected=rejected)
        loss = spec.preference_loss(leaf, fresh(pair_weights), fresh(scores))
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, rejected)
        else:  # only chosen-only losses: no pair carries a gradient
            grad = torch.zeros_like(rejected)
    return (grad.detach() * (batch_size / spec.beta)).masked_fill(~logps.rejected_mask, float("nan"))


# -------------------------------------------------------------------------------------------------- statistics


def weight_statistics(
    weights: torch.Tensor, prefix: str = GRAD_WEIGHT_PREFIX, present: torch.Tensor | None = None
) -> dict[str, float]:
    """Summary of one [N, K] tensor of pair weights: mean, max, quantiles, the shares of wrongly ranked (> 0.5) and
    learned (< 0.05) pairs, and the mean at each rejected position k when K > 1. Keys are `prefix/...`.

    `present` (bool [N, K]) marks the real pairs; the others are padding. With it, a real pair whose weight is NaN or
    infinite (a diverged step) is not padding: it is counted in `prefix/nonfinite` (always returned) and left out of
    the other statistics. Without it, NaN marks the padding (the public helpers' convention).

    Returns no other key when there is no finite pair. Everything is reduced on the weights' device and read back in
    one transfer (one host sync per call, where indexing the present pairs and reading each value would cost one each).
    """
    weights = weights.detach().double()
    nonfinite = None
    if present is not None:
        nonfinite = (present & ~torch.isfinite(weights)).sum().double()
        weights = weights.masked_fill(~(present & torch.isfinite(weights)), float("nan"))
    present = ~torch.isnan(weights)
    count = present.sum()
    filled = weights.nan_to_num(0.0)
    levels = torch.tensor(list(QUANTILES.values()), dtype=weights.dtype, device=weights.device)
    quantiles = torch.nanquantile(weights.flatten(), levels)
    totals = torch.stack(
        [
            count.double(),
            filled.sum() / count,
            torch.where(present, weights, float("-inf")).max(),
            *quantiles,
            ((weights > WRONG_THRESHOLD) & present).sum() / count,
            ((weights < LEARNED_THRESHOLD) & present).sum() / count,
            *([] if nonfinite is None else [nonfinite]),
        ]
    )
    ranks = filled.sum(dim=0) / present.sum(dim=0)  # NaN where no example has a k-th rejected
    host = torch.cat([totals, ranks]).tolist()
    names = ["mean", "max", *QUANTILES, f"frac_above_{WRONG_THRESHOLD}", f"frac_below_{LEARNED_THRESHOLD}"]
    counts = {} if nonfinite is None else {f"{prefix}/nonfinite": host[1 + len(names)]}
    if host[0] == 0:
        return counts
    stats = {f"{prefix}/{name}": value for name, value in zip(names, host[1 : 1 + len(names)], strict=True)}
    if weights.size(1) > 1:
        for k, value in enumerate(host[len(totals) :]):
            if not math.isnan(value):
                stats[f"{prefix}/rank_{k}"] = value
    return {**stats, **counts}


def gather_pair_values(
    accelerator: Accelerator, values: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather the [B, K, C] per-pair values (NaN = no pair) and the [B] dataset indices of every process.

    Processes may hold different K (and B): the values are padded to the largest with NaN and the indices with −1
    before the gather, and the rows that are padding are dropped, so the result [N, K_max, C] holds the union of all
    processes' pairs, in process order.
    """
    if accelerator.num_processes == 1:  # nothing to pad nor drop (and no host sync to find the real rows)
        return values.detach().float(), (index.detach() if index is not None else None)
    values = accelerator.pad_across_processes(values.detach().float(), dim=1, pad_index=float("nan"))
    # Without an index, zeros mark the real rows (padding gets −1); int64 keeps any index exact, on any device
    rows = torch.zeros(values.size(0), dtype=torch.long, device=values.device) if index is None else index.detach()
    values = accelerator.pad_across_processes(values, dim=0, pad_index=float("nan"))
    rows = accelerator.pad_across_processes(rows.to(device=values.device, dtype=torch.long), dim=0, pad_index=-1)
    values, rows = accelerator.gather((values, rows))
    real = rows >= 0
    return values[real], (rows[real] if index is not None else None)


# --------------------------------------------------------------------------------------------------- histogram


class GradWeightHistogramCallback(TrainerCallback):
    """Histograms of the weights of the pairs seen since the last log, sent at each log to TensorBoard, W&B and
    trackio when they are in `report_to` (a reporter whose package is not installed is skipped).

    `add` is called by the trainer at every training step with the gathered [N, K] weights.
    """

    def __init__(self, report_to: Sequence[str], callback_handler=None):
        self.reporters = [name for name in HISTOGRAM_REPORTERS if name in report_to]
        self.callback_handler = callback_handler
        self.buffers: dict[str, list[torch.Tensor]] = {GRAD_WEIGHT_PREFIX: [], EFFECTIVE_PREFIX: []}

    def add(self, weights: torch.Tensor, effective: torch.Tensor) -> None:
        for name, values in ((GRAD_WEIGHT_PREFIX, weights), (EFFECTIVE_PREFIX, effective)):
            values = values.detach().float().flatten().cpu()
            self.buffers[name].append(values[torch.isfinite(values)])

    def _drain(self) -> dict[str, torch.Tensor]:
        values = {name: torch.cat(parts) for name, parts in self.buffers.items() if parts}
        for parts in self.buffers.values():
            parts.clear()
        return {name: v for name, v in values.items() if v.numel() > 0}

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = self._drain()
        if not values or not state.is_world_process_zero:
            return
        step = state.global_step
        if "tensorboard" in self.reporters:
            from transformers.integrations import TensorBoardCallback

            callbacks = self.callback_handler.callbacks if self.callback_handler is not None else []
            for callback in callbacks:
                writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
                if writer is not None:
                    for name, v in values.items():
                        writer.add_histogram(f"train/{name}", v.numpy(), step)
                    writer.flush()
        if "wandb" in self.reporters:
            from transformers.integrations import is_wandb_available

            if is_wandb_available():
                import wandb

                if wandb.run is not None:
                    histograms = {f"train/{name}": wandb.Histogram(v.numpy()) for name, v in values.items()}
                    wandb.log({**histograms, "train/global_step": step})
        if "trackio" in self.reporters:
            from transformers.integrations import is_trackio_available

            if is_trackio_available():
                import trackio

                trackio.log({f"train/{name}": trackio.Histogram(v.numpy()) for name, v in values.items()}, step=step)


# ------------------------------------------------------------------------------------------------- the trainer's


class GradWeightDiagnostics:
    """The gradient-weight diagnostics of one trainer: owns its callbacks, the gather across processes and the record.

    At every step of `_compute_loss` the trainer calls `step`, which computes w and e of every pair of the batch
    (detached), gathers them from all processes, feeds the histogram callback and appends the per-row record, and
    returns the `grad_weight/...` and `grad_weight_eff/...` metrics of the batch.

    Args:
        spec (`LossSpec`): the trainer's loss, differentiated for the effective weights.
        report_to (`list[str]`): the run's reporters; histograms go to those in `HISTOGRAM_REPORTERS`.
        output_dir (`str`): where the record is written, when `record` is True.
        record (`bool`): whether to write the per-row record (`DPOConfig.grad_weight_record`).
        callback_handler: the trainer's, so that the histogram callback finds TensorBoard's writer.
    """

    def __init__(self, spec: LossSpec, report_to: Sequence[str], output_dir: str, record: bool, callback_handler=None):
        self.spec = spec
        self.histogram = None
        if any(name in (report_to or []) for name in HISTOGRAM_REPORTERS):
            self.histogram = GradWeightHistogramCallback(report_to, callback_handler)
        self.record_path = record_path(output_dir) if record else None

    def callbacks(self) -> list[TrainerCallback]:
        callbacks: list[TrainerCallback] = [] if self.histogram is None else [self.histogram]
        if self.record_path is not None:
            callbacks.append(GradWeightRecordCallback(self.record_path))
        return callbacks

    def step(
        self,
        accelerator: Accelerator,
        mode: str,
        inputs: dict,
        logps: PreferenceLogps,
        pair_weights: torch.Tensor | None,
        state,
    ) -> dict[str, float]:
        """Weights of every pair of one batch: the metrics, the histogram, and the record (training only). `mode`
        is `"train"` or `"eval"`, `state` the trainer's `TrainerState` (its step and epoch name the record's rows)."""
        train = mode == "train"
        weights = grad_weights(logps, self.spec.beta)
        effective = effective_grad_weights(logps, self.spec, pair_weights, inputs.get("scores"))
        record = train and self.record_path is not None
        if record and INDEX_COLUMN not in inputs:
            raise ValueError(
                f"`grad_weight_record=True` needs each row's dataset index in the batch (key '{INDEX_COLUMN}'), which "
                f"`DataCollatorForMultiRejectedPreference` adds; the batch has keys {sorted(inputs)}. Use the default "
                "collator, or a collator that passes the 'dataset_index' column through."
            )
        # The mask travels with the weights: a NaN weight of a real pair (a diverged step) is not padding
        present = logps.rejected_mask.to(weights.dtype)
        pairs, index = gather_pair_values(
            accelerator, torch.stack([weights, effective, present], dim=2), inputs[INDEX_COLUMN] if record else None
        )
        present = pairs[..., 2] == 1  # padding added by the gather is NaN
        metrics = {
            **weight_statistics(pairs[..., 0], GRAD_WEIGHT_PREFIX, present),
            **weight_statistics(pairs[..., 1], EFFECTIVE_PREFIX, present),
        }
        if train and self.histogram is not None:
            self.histogram.add(pairs[..., 0], pairs[..., 1])
        if record and accelerator.is_main_process:
            # The update this batch enters is step global_step + 1; a resumed run truncates the steps after its own
            step, epoch = state.global_step + 1, int(state.epoch or 0)
            text = format_record(index, step, epoch, pairs[..., 0], pairs[..., 1], present)
            append_record(self.record_path, text)
        return metrics
