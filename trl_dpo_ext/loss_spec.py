"""`LossSpec`: the loss a trainer minimises, described once.

The loss types and their weights, the reduction over the K rejected, β and every hyper-parameter the formulas of
`trl_dpo_ext.losses` read travel together in one frozen object, built and validated once from the config. The trainer
computes its loss with it and the gradient-weight diagnostics differentiate the same loss, so the two cannot drift
apart, and every rule on which combinations are meaningful lives here and raises when the spec is built (which
`DPOConfig.__post_init__` does).

No TRL import: `LossSpec.from_config` reads the fields of any `trl.DPOConfig`-like object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import (
    BATCH_SORTED_LOSS_TYPES,
    CHOSEN_ONLY_LOSS_TYPES,
    LISTWISE_REDUCTIONS,
    REJECTED_REDUCTIONS,
    REWARD_LISTWISE_REDUCTIONS,
    SUPPORTED_LOSS_TYPES,
    PreferenceLogps,
    multi_rejected_loss,
)


@dataclass(frozen=True)
class LossSpec:
    """Everything that defines the preference loss of one run.

    The loss of a batch is `Σ_t loss_weights[t] · mean_i ℓ_t(i)`, where `ℓ_t(i)` is `multi_rejected_loss` of
    `loss_types[t]` over example i's chosen and K_i rejected, combined by `reduction`. The `"sft"` term (the NLL of
    the chosen tokens) needs the per-token log-probs, so the trainer adds it; it does not depend on the rejected.

    Attributes:
        loss_types (`tuple[str, ...]`): TRL's `loss_type` list.
        loss_weights (`tuple[float, ...]`): one weight per loss type (TRL's `loss_weights`, 1.0 each by default).
        reduction (`str`): `rejected_reduction`, one of `REJECTED_REDUCTIONS`.
        beta (`float`): β of the implicit reward β·log π_θ/π_ref.
        f_divergence_type, f_alpha_divergence_coef, label_smoothing, discopop_tau: as in `trl.DPOConfig`.
        score_temperature (`float`): α of the `infonca`/`nca` targets softmax(scores / α).
        use_weighting (`bool`): WPO pair weights (computed by the forward, passed to `batch_loss`).
        ld_alpha (`float` or `None`): LD-DPO's α (applied to the sequence log-probs, before the loss).
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    reduction: str = "mean"
    beta: float = 0.1
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    score_temperature: float = 1.0
    use_weighting: bool = False
    ld_alpha: float | None = None

    @classmethod
    def from_config(cls, args) -> LossSpec:
        """The spec of a `trl_dpo_ext.DPOConfig` (the trainer upgrades a plain `trl.DPOConfig` to one first)."""
        loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        return cls(
            loss_types=tuple(loss_types),
            loss_weights=tuple(float(w) for w in (args.loss_weights or [1.0] * len(loss_types))),
            reduction=args.rejected_reduction,
            beta=args.beta,
            f_divergence_type=str(getattr(args.f_divergence_type, "value", args.f_divergence_type)),
            f_alpha_divergence_coef=args.f_alpha_divergence_coef,
            label_smoothing=args.label_smoothing,
            discopop_tau=args.discopop_tau,
            score_temperature=args.score_temperature,
            use_weighting=args.use_weighting,
            ld_alpha=args.ld_alpha,
        )

    def __post_init__(self) -> None:
        if self.reduction not in REJECTED_REDUCTIONS:
            raise ValueError(
                f"`rejected_reduction` must be one of {list(REJECTED_REDUCTIONS)}, got {self.reduction!r}."
            )
        unknown = [t for t in self.loss_types if t not in SUPPORTED_LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown `loss_type` {unknown}; supported loss types are {list(SUPPORTED_LOSS_TYPES)}.")
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(
                f"`loss_weights` must have one weight per loss type: got {len(self.loss_weights)} weights for "
                f"{len(self.loss_types)} loss types."
            )
        if self.reduction in LISTWISE_REDUCTIONS:
            self._check_listwise()
        batch_sorted = self.batch_sorted_loss_types
        if batch_sorted and self.reduction != "mean":
            raise ValueError(
                f"`loss_type={batch_sorted}` sorts one margin per example and has no reduction over several rejected; "
                f"got `rejected_reduction='{self.reduction}'`. Leave `rejected_reduction='mean'`, and give one "
                "rejected per example, or use a pairwise loss such as 'sigmoid'."
            )

    def _check_listwise(self) -> None:
        pairwise = [t for t in self.loss_types if t not in CHOSEN_ONLY_LOSS_TYPES]
        if pairwise != ["sigmoid"]:
            raise ValueError(
                f"`rejected_reduction='{self.reduction}'` is the listwise form of the sigmoid loss and replaces it, so "
                f"it needs `loss_type=['sigmoid']` (optionally with 'sft'); got `loss_type={list(self.loss_types)}`. "
                f"To apply {pairwise} to every (chosen, rejected) pair, use `rejected_reduction='mean'`, 'sum' or "
                "'min'."
            )
        if self.reduction in REWARD_LISTWISE_REDUCTIONS and self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"`rejected_reduction='{self.reduction}'` fits the implicit rewards β·log π_θ/π_ref themselves, which "
                f"`f_divergence_type='{self.f_divergence_type}'` has no form for. Use `f_divergence_type='reverse_kl'`, "
                "or `rejected_reduction='softmax'` or 'plackett_luce'."
            )
        if self.score_temperature <= 0:
            raise ValueError(f"`score_temperature` must be positive, got {self.score_temperature}.")
        if self.use_weighting:
            raise ValueError(
                f"`use_weighting=True` weights each (chosen, rejected) pair, which `rejected_reduction="
                f"'{self.reduction}'` does not have. Use `rejected_reduction='mean'`, 'sum' or 'min' with "
                "`use_weighting=True`."
            )

    @property
    def batch_sorted_loss_types(self) -> list[str]:
        return [t for t in self.loss_types if t in BATCH_SORTED_LOSS_TYPES]

    def check_num_rejected(self, num_rejected: list[int], dataset_name: str, precompute_ref_log_probs: bool) -> None:
        """The rules that depend on the data: the number of rejected of each row of a prepared dataset."""
        if max(num_rejected, default=1) <= 1:
            return
        row = next(i for i, k in enumerate(num_rejected) if k > 1)
        if self.batch_sorted_loss_types:
            raise ValueError(
                f"`loss_type={self.batch_sorted_loss_types}` sorts one margin per example, so it needs one rejected "
                f"per row, but row {row} of the {dataset_name} dataset has {num_rejected[row]} in column 'rejected'. "
                "Use a pairwise loss such as 'sigmoid' with several rejected, or keep one rejected per row."
            )
        if self.ld_alpha is not None and precompute_ref_log_probs:
            raise NotImplementedError(
                "`ld_alpha` with `precompute_ref_log_probs=True` is not supported with several rejected per row: the "
                "LD-DPO chosen log-prob depends on the rejected it is paired with. Set `precompute_ref_log_probs=False`"
                " or keep one rejected per row."
            )

    def per_example(
        self,
        loss_type: str,
        logps: PreferenceLogps,
        pair_weights: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-example loss [B] of one of `loss_types` (not `"sft"`)."""
        return multi_rejected_loss(
            loss_type,
            self.reduction,
            logps,
            beta=self.beta,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
            pair_weights=pair_weights,
            scores=scores,
            score_temperature=self.score_temperature,
        )

    def preference_loss(
        self, logps: PreferenceLogps, pair_weights: torch.Tensor | None = None, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`Σ_t loss_weights[t] · mean_i ℓ_t(i)` over the loss types that compare responses (all but `"sft"`)."""
        loss = logps.rejected.new_zeros(())
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type not in CHOSEN_ONLY_LOSS_TYPES:
                loss = loss + self.per_example(loss_type, logps, pair_weights, scores).mean() * loss_weight
        return loss

    @property
    def sft_weight(self) -> float:
        """The weight of the `"sft"` term, 0 when there is none."""
        return sum(w for t, w in zip(self.loss_types, self.loss_weights, strict=True) if t in CHOSEN_ONLY_LOSS_TYPES)
