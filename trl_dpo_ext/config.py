"""`DPOConfig`: `trl.DPOConfig` plus the fields of the one-chosen, K-rejected trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import trl

from .losses import (
    BATCH_SORTED_LOSS_TYPES,
    CHOSEN_ONLY_LOSS_TYPES,
    LISTWISE_REDUCTIONS,
    REJECTED_REDUCTIONS,
    SUPPORTED_LOSS_TYPES,
)


@dataclass
class DPOConfig(trl.DPOConfig):
    r"""
    Configuration class for [`trl_dpo_ext.DPOTrainer`]: every field of [`trl.DPOConfig`], plus those below.

    Each rejected response of an example is paired with its chosen response; every pairwise `loss_type` is applied to
    each (chosen, rejected_k) pair, and the K pair losses are combined by `rejected_reduction`.

    Parameters:
        > Parameters that control the one-chosen, K-rejected loss

        rejected_reduction (`str`, *optional*, defaults to `"mean"`):
            How the K rejected responses of an example enter the loss. Possible values are:

            - `"mean"`: the mean over k of the pair losses, the broadcast loss
              `mean_k −log σ(β·Δ_w − β·Δ_lk)` for `loss_type="sigmoid"`. Every prompt weighs the same.
            - `"sum"`: the sum over k; a prompt weighs in proportion to its number of rejected.
            - `"min"`: only the hardest negative, the pair whose rejected has the highest implicit reward.
            - `"softmax"`: the one-vs-K contrastive loss `−log e^{βΔw} / (e^{βΔw} + Σ_k e^{βΔlk})` (S-DPO, the top-1
              Plackett-Luce term). Only with `loss_type="sigmoid"` (optionally together with `"sft"`).

            With one rejected per example, all four equal the stock pairwise loss.
    """

    rejected_reduction: str = field(
        default="mean",
        metadata={
            "help": "How the K rejected responses of an example enter the loss: 'mean' (the broadcast loss, default), "
            "'sum', 'min' (hardest negative only) or 'softmax' (one-vs-K contrastive, sigmoid loss only).",
            "choices": list(REJECTED_REDUCTIONS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.rejected_reduction not in REJECTED_REDUCTIONS:
            raise ValueError(
                f"`rejected_reduction` must be one of {list(REJECTED_REDUCTIONS)}, got {self.rejected_reduction!r}."
            )
        unknown = [t for t in self.loss_type if t not in SUPPORTED_LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown `loss_type` {unknown}; supported loss types are {list(SUPPORTED_LOSS_TYPES)}.")
        if self.rejected_reduction in LISTWISE_REDUCTIONS:
            pairwise = [t for t in self.loss_type if t not in CHOSEN_ONLY_LOSS_TYPES]
            if pairwise != ["sigmoid"]:
                raise ValueError(
                    f"`rejected_reduction='{self.rejected_reduction}'` is the listwise form of the sigmoid loss and "
                    f"replaces it, so it needs `loss_type=['sigmoid']` (optionally with 'sft'); got "
                    f"`loss_type={self.loss_type}`. To apply {pairwise} to every (chosen, rejected) pair, use "
                    "`rejected_reduction='mean'`, 'sum' or 'min'."
                )
            if self.use_weighting:
                raise ValueError(
                    f"`use_weighting=True` weights each (chosen, rejected) pair, which "
                    f"`rejected_reduction='{self.rejected_reduction}'` does not have. Use `rejected_reduction='mean'`, "
                    "'sum' or 'min' with `use_weighting=True`."
                )
        batch_sorted = [t for t in self.loss_type if t in BATCH_SORTED_LOSS_TYPES]
        if batch_sorted and self.rejected_reduction != "mean":
            raise ValueError(
                f"`loss_type={batch_sorted}` sorts one margin per example and has no reduction over several rejected; "
                f"got `rejected_reduction='{self.rejected_reduction}'`. Leave `rejected_reduction='mean'`, and give "
                "one rejected per example, or use a pairwise loss such as 'sigmoid'."
            )
