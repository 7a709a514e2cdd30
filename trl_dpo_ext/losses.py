"""Pure tensor math of the one-chosen, K-rejected DPO losses.

Nothing here imports TRL or touches a model: every function takes sequence log-probabilities and returns losses, so
each can be read and tested on its own.

Symbols (shapes in brackets):

- ``B``: examples in the batch, ``K``: the largest number of rejected responses of an example in the batch.
- ``π_θ(y|x)``, ``π_ref(y|x)``: policy and reference probabilities of a whole completion.
- ``Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x)``  [B, 1] (or [B, K] under LD-DPO, where it depends on the pair);
  ``Δ_lk``, the same for the k-th rejected  [B, K].
- ``r̂(x, y) = β·Δ``: the implicit reward of DPO (Rafailov et al. 2023, Eq. 5).
- ``rejected_mask``  [B, K]: ``True`` where the k-th rejected exists (K may differ from row to row).

The broadcast loss (docs/concepts.md, "The loss") is ``L = mean_k −log σ(β·Δ_w − β·Δ_lk)``. Every pairwise ``loss_type`` of
``trl.DPOTrainer`` is applied to each (chosen, rejected_k) pair and then reduced over k by ``rejected_reduction``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


# Loss types of `trl.DPOTrainer` that are a function of one (chosen, rejected) pair.
PAIRWISE_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
# Sort the whole batch of margins (AOT, arXiv 2406.05882): defined only for one rejected per example.
BATCH_SORTED_LOSS_TYPES = ("aot", "aot_unpaired")
# Does not look at the rejected at all: negative log-likelihood of the chosen tokens.
CHOSEN_ONLY_LOSS_TYPES = ("sft",)
SUPPORTED_LOSS_TYPES = PAIRWISE_LOSS_TYPES + BATCH_SORTED_LOSS_TYPES + CHOSEN_ONLY_LOSS_TYPES

# How the K pair losses of one example are combined.
PAIRWISE_REDUCTIONS = ("mean", "sum", "min")
# Losses over the whole list of responses, which replace the pairwise loss.
LISTWISE_REDUCTIONS = ("softmax", "plackett_luce", "infonca", "nca")
# Listwise losses on the implicit rewards β·Δ themselves, which an f-divergence score does not replace
REWARD_LISTWISE_REDUCTIONS = ("infonca", "nca")
REJECTED_REDUCTIONS = PAIRWISE_REDUCTIONS + LISTWISE_REDUCTIONS


class PreferenceLogps(NamedTuple):
    """Sequence log-probabilities of one chosen and up to K rejected completions per example.

    Attributes:
        chosen (`torch.Tensor`): policy log π_θ(y_w|x), shape [B, 1], or [B, K] when it depends on the pair (LD-DPO).
        rejected (`torch.Tensor`): policy log π_θ(y_lk|x), shape [B, K]; any value where `rejected_mask` is False.
        ref_chosen (`torch.Tensor`): reference log π_ref(y_w|x), shaped like `chosen`.
        ref_rejected (`torch.Tensor`): reference log π_ref(y_lk|x), shape [B, K].
        rejected_mask (`torch.Tensor`): bool [B, K], True where the k-th rejected exists.
        chosen_lengths (`torch.Tensor`, *optional*): completion tokens of the chosen, [B, 1] (IPO, `sigmoid_norm`).
        rejected_lengths (`torch.Tensor`, *optional*): completion tokens of each rejected, [B, K].
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x)."""
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        """Δ_lk = log π_θ(y_lk|x) − log π_ref(y_lk|x), zeroed where no rejected exists."""
        return (self.rejected - self.ref_rejected).masked_fill(~self.rejected_mask, 0.0)


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(π_θ/π_ref) of the f-DPO paper (Wang et al. 2023, arXiv 2309.16240, Table 1), from the log-ratio.

    `reverse_kl` gives the log-ratio itself (standard DPO); `forward_kl` 1 − 1/t; `js_divergence` log(2t/(t+1));
    `alpha_divergence` (t^(α−1) − 1)/(α − 1), where t = π_θ/π_ref.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit α → 1 is the reverse KL
            return logratios
        # Clamp in float32 so that exp stays representable once cast back to the input dtype
        clamp_max = {torch.float16: 11.0}.get(logratios.dtype, 80.0)
        t = torch.clamp(((alpha - 1.0) * logratios).float(), max=clamp_max)
        return (torch.exp(t) - 1.0).to(logratios.dtype) / (alpha - 1.0)
    raise ValueError(
        f"Unknown f_divergence_type: {f_divergence_type!r}. Expected one of 'reverse_kl', 'forward_kl', "
        "'js_divergence', 'alpha_divergence'."
    )


def pairwise_losses(
    loss_type: str,
    logps: PreferenceLogps,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Loss of every (chosen, rejected_k) pair under one of TRL's pairwise `loss_type`s.

    Each formula is the one `trl.DPOTrainer` applies to a single pair (its paper is named below), evaluated with the
    chosen broadcast against every rejected. Returns [B, K]; entries where `rejected_mask` is False are meaningless
    (finite) and must be masked by the caller, as `reduce_over_rejected` does.
    """
    chosen_lr, rejected_lr = logps.chosen_logratios, logps.rejected_logratios
    chosen_scores = f_divergence_scores(chosen_lr, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_lr, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores  # [B, K]

    if loss_type == "sigmoid":  # DPO, Eq. 7 of arXiv 2305.18290
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":  # SLiC, arXiv 2305.10425
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):
        # Both compare per-token averages of the scores, as TRL does (confirmed with the IPO authors)
        chosen_avg = chosen_scores / logps.chosen_lengths.clamp(min=1.0)
        rejected_avg = rejected_scores / logps.rejected_lengths.clamp(min=1.0)
        if loss_type == "ipo":  # Eq. 17 of arXiv 2310.12036, β playing τ
            return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * (chosen_avg - rejected_avg))
    if loss_type == "exo_pair":  # EXO-pref, Eq. 16 of arXiv 2402.00856, with ε = label_smoothing
        log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
        qw, ql = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
        return qw * (F.logsigmoid(beta * delta) - log_pw) + ql * (F.logsigmoid(-beta * delta) - log_pl)
    if loss_type == "nca_pair":  # NCA with K = 1, arXiv 2402.05369
        chosen_rewards, rejected_rewards = beta * chosen_lr, beta * rejected_lr
        return (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "robust":  # rDPO, Eq. 10 of arXiv 2403.00409, label_smoothing = flip rate
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":  # BCO, arXiv 2404.04656
        return -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
    if loss_type == "sppo_hard":  # SPPO with hard 0/1 preference probabilities, Eq. 4.7 of arXiv 2405.00675
        return (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    if loss_type == "apo_zero":  # Eq. 7 of arXiv 2408.06266
        return (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
    if loss_type == "apo_down":  # Eq. 8 of arXiv 2408.06266
        return torch.sigmoid(beta * chosen_lr) + (1 - torch.sigmoid(beta * (chosen_lr - rejected_lr)))
    if loss_type == "discopop":  # Eq. 5 of arXiv 2406.08414
        logits = beta * delta
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    raise ValueError(f"Loss type {loss_type!r} is not a pairwise loss; pairwise losses are {PAIRWISE_LOSS_TYPES}.")


def aot_losses(loss_type: str, logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT (arXiv 2406.05882): sorts the batch's margins, so it needs exactly one rejected per example. Returns [B, 1].

    `aot` matches the sorted policy margins log π_θ(y_w) − log π_θ(y_l) to the sorted reference margins;
    `aot_unpaired` matches the sorted chosen log-ratios to the sorted rejected log-ratios.
    """
    if logps.rejected.size(1) != 1 or logps.chosen.size(1) != 1:
        raise ValueError(f"`{loss_type}` sorts one margin per example; got {logps.rejected.size(1)} rejected.")
    if loss_type == "aot":
        policy_margins, _ = torch.sort(logps.chosen - logps.rejected, dim=0)
        ref_margins, _ = torch.sort(logps.ref_chosen - logps.ref_rejected, dim=0)
        delta = policy_margins - ref_margins
    elif loss_type == "aot_unpaired":
        chosen_sorted, _ = torch.sort(logps.chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(logps.rejected_logratios, dim=0)
        delta = chosen_sorted - rejected_sorted
    else:
        raise ValueError(f"Unknown batch-sorted loss type {loss_type!r}.")
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def hardest_rejected_index(logps: PreferenceLogps) -> torch.Tensor:
    """Index [B] of the rejected with the highest implicit reward Δ_lk (the hardest negative), ignoring padding."""
    rewards = logps.rejected_logratios.detach().masked_fill(~logps.rejected_mask, float("-inf"))
    return rewards.argmax(dim=1)


def reduce_over_rejected(
    pair_losses: torch.Tensor, rejected_mask: torch.Tensor, reduction: str, hardest: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine the [B, K] pair losses of each example into one loss per example [B].

    - `"mean"`: (1/K_i) Σ_k ℓ_k, the broadcast loss; each prompt weighs the same whatever its K_i.
    - `"sum"`: Σ_k ℓ_k; a prompt with more rejected weighs more.
    - `"min"`: ℓ_{k*} for the hardest negative k* (see `hardest_rejected_index`, required here).
    """
    pair_losses = pair_losses.masked_fill(~rejected_mask, 0.0)
    if reduction == "mean":
        return pair_losses.sum(dim=1) / rejected_mask.sum(dim=1).clamp(min=1)
    if reduction == "sum":
        return pair_losses.sum(dim=1)
    if reduction == "min":
        if hardest is None:
            raise ValueError("`reduction='min'` needs the index of the hardest rejected.")
        return pair_losses.gather(1, hardest.unsqueeze(1)).squeeze(1)
    raise ValueError(f"Unknown pairwise reduction {reduction!r}; expected one of {PAIRWISE_REDUCTIONS}.")


def softmax_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, rejected_mask: torch.Tensor, beta: float):
    """One-vs-K contrastive loss (S-DPO, arXiv 2406.09215; the top-1 term of the Plackett-Luce model):

        L = −log e^{β·s_w} / (e^{β·s_w} + Σ_k e^{β·s_lk})  =  logsumexp(β·[s_w, s_l1..s_lK]) − β·s_w

    with s the (f-divergence) scores of the log-ratios. With K = 1 it is the sigmoid loss −log σ(β(s_w − s_l)).
    `chosen_scores` [B, 1], `rejected_scores` and `rejected_mask` [B, K]; returns [B].
    """
    logits = torch.cat([chosen_scores, rejected_scores.masked_fill(~rejected_mask, float("-inf"))], dim=1) * beta
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _masked_fill_value(dtype: torch.dtype) -> float:
    # A finite stand-in for −∞: exp() of it is exactly 0, and no ∞ − ∞ can turn a gradient into NaN
    return torch.finfo(dtype).min / 4


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the full ranking under the Plackett-Luce model (DPO paper, arXiv 2305.18290, A.3):

        L = −Σ_{k=0}^{N−1} log( e^{r_k} / Σ_{j ≥ k} e^{r_j} )

    with `rewards` r [B, N] already in rank order (best first: the chosen, then the rejected) and `mask` [B, N] True
    for the responses present (padding at the end of a row is ignored). With N = 2 it is −log σ(r_0 − r_1), the
    sigmoid loss; its first term alone is the one-vs-K `softmax_loss`. Returns [B].
    """
    rewards = rewards.masked_fill(~mask, _masked_fill_value(rewards.dtype))
    suffix_lse = torch.logcumsumexp(rewards.flip(1), dim=1).flip(1)  # log Σ_{j ≥ k} e^{r_j}
    return -(rewards - suffix_lse).masked_fill(~mask, 0.0).sum(dim=1)


def score_targets(scores: torch.Tensor | None, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Target distribution softmax(s/α) [B, N] over the present responses; one-hot on the chosen without scores."""
    if scores is None:
        return F.one_hot(torch.zeros(mask.size(0), dtype=torch.long, device=mask.device), mask.size(1)).to(torch.float)
    logits = (scores / alpha).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=1)


def infonca_loss(rewards: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """InfoNCA (Chen et al. 2024, arXiv 2402.05369): cross-entropy from the score targets to the softmax of
    the implicit rewards, L = −Σ_i p_i · log softmax(r)_i, with p = softmax(s/α) (`score_targets`) and r = β·Δ [B, N].
    With one-hot targets on the chosen it is the one-vs-K `softmax_loss`. Returns [B].
    """
    log_probs = torch.log_softmax(rewards.masked_fill(~mask, _masked_fill_value(rewards.dtype)), dim=1)
    return -(targets * log_probs).masked_fill(~mask, 0.0).sum(dim=1)


def nca_loss(rewards: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369): each response is classified on its own,

        L = −Σ_i p_i · log σ(r_i) − (1/N) Σ_i log σ(−r_i)

    over the N = K + 1 responses present, with p = softmax(s/α) and r = β·Δ [B, N]. With N = 2 and one-hot targets it
    is TRL's `nca_pair`. Returns [B].
    """
    attract = -(targets * F.logsigmoid(rewards)).masked_fill(~mask, 0.0).sum(dim=1)
    repel = -F.logsigmoid(-rewards).masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1)
    return attract + repel


def listwise_loss(
    reduction: str,
    logps: PreferenceLogps,
    *,
    beta: float,
    scores: torch.Tensor | None = None,
    score_temperature: float = 1.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """Per-example [B] listwise loss over the chosen and its K rejected (`reduction` in `LISTWISE_REDUCTIONS`).

    `scores` [B, 1 + K] (chosen first) are the targets of `infonca`/`nca`, and give the order of the rejected for
    `plackett_luce` (best first; without scores, the rejected are taken as listed, in rank order).
    """
    chosen = f_divergence_scores(logps.chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected = f_divergence_scores(logps.rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    if reduction == "softmax":
        return softmax_loss(chosen, rejected, logps.rejected_mask, beta)
    rewards = beta * torch.cat([chosen, rejected], dim=1)  # [B, 1 + K]
    mask = torch.cat([torch.ones_like(logps.rejected_mask[:, :1]), logps.rejected_mask], dim=1)
    if reduction == "plackett_luce":
        if scores is not None:  # rank the rejected by score, best first (stable: ties keep the listed order)
            rejected_scores = scores[:, 1:].masked_fill(~logps.rejected_mask, float("-inf"))
            order = torch.argsort(rejected_scores, dim=1, descending=True, stable=True)
            rewards = torch.cat([rewards[:, :1], rewards[:, 1:].gather(1, order)], dim=1)
            mask = torch.cat([mask[:, :1], mask[:, 1:].gather(1, order)], dim=1)
        return plackett_luce_loss(rewards, mask)
    targets = score_targets(scores, mask, score_temperature).to(rewards.dtype)
    if reduction == "infonca":
        return infonca_loss(rewards, targets, mask)
    if reduction == "nca":
        return nca_loss(rewards, targets, mask)
    raise ValueError(f"Unknown listwise reduction {reduction!r}; expected one of {LISTWISE_REDUCTIONS}.")


def multi_rejected_loss(
    loss_type: str,
    reduction: str,
    logps: PreferenceLogps,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    pair_weights: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    score_temperature: float = 1.0,
) -> torch.Tensor:
    """Per-example loss [B] of one `loss_type` over one chosen and K rejected, reduced by `reduction`.

    `pair_weights` [B, K] (WPO, arXiv 2406.11827, Eq. 2) scales each pair's loss before the reduction. A listwise
    `reduction` replaces the `sigmoid` pair loss (see `listwise_loss`); `scores` [B, 1 + K] feed it.
    """
    if loss_type in BATCH_SORTED_LOSS_TYPES:
        losses = aot_losses(loss_type, logps, beta=beta, label_smoothing=label_smoothing)
        return (losses if pair_weights is None else losses * pair_weights).squeeze(1)
    if reduction in LISTWISE_REDUCTIONS:  # replaces the sigmoid loss (`LossSpec` checks that `loss_type` is it)
        return listwise_loss(
            reduction,
            logps,
            beta=beta,
            scores=scores,
            score_temperature=score_temperature,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
        )
    losses = pairwise_losses(
        loss_type,
        logps,
        beta=beta,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
    )
    if pair_weights is not None:
        losses = losses * pair_weights
    hardest = hardest_rejected_index(logps) if reduction == "min" else None
    return reduce_over_rejected(losses, logps.rejected_mask, reduction, hardest)


def length_desensitized_logps(
    per_token_logps: torch.Tensor, completion_mask: torch.Tensor, shared_lengths: torch.Tensor, alpha: float
) -> torch.Tensor:
    """LD-DPO sequence log-probs (arXiv 2409.06411): tokens past the length shared with the other response weigh α.

    `per_token_logps` and `completion_mask` are [N, T]; `shared_lengths` is [N, P]: for each sequence, the lengths
    it shares with each of the P responses it is compared with (P = K for a chosen, 1 for a rejected). Returns [N, P]:
    Σ_{t ≤ shared} log p_t + α Σ_{t > shared} log p_t.
    """
    position = (completion_mask.cumsum(dim=1) * completion_mask).unsqueeze(1)  # [N, 1, T], 0 outside the completion
    shared = (position > 0) & (position <= shared_lengths.unsqueeze(2))  # [N, P, T]
    tail = position > shared_lengths.unsqueeze(2)
    per_token = per_token_logps.unsqueeze(1)
    return (per_token * shared).sum(dim=2) + alpha * (per_token * tail).sum(dim=2)
