"""Online hard-negative selection: which m of an example's K rejected the training forward keeps.

Most pairs of a K list carry little gradient once the implicit reward ranks them right: the DPO gradient of pair
(i, k) is scaled by its gradient weight (`trl_dpo_ext.diagnostics`). A no-grad forward of the chosen and all K gives
those weights; the forward and backward that train then run on the chosen and m ≤ K rejected only.

- ``"hardest"``: the m rejected with the largest effective weight |e_ik| (ties: the larger seed weight w_ik, then
  the earlier rank). The loss is the configured one on the kept rejected, as if the row listed only them.
- ``"sampled"``: m rejected drawn without replacement with inclusion probabilities π_ik proportional to |e_ik|
  (capped at 1, Σ_k π_ik = m), by systematic sampling in a random order (Madow 1949), each kept pair's loss
  multiplied by the Horvitz-Thompson weight c_ik: with ``"mean"``, c_ik = m_i / (K_i·π_ik), so that
  E[(1/m_i) Σ_{k kept} c_ik ℓ_ik] = (1/K_i) Σ_k ℓ_ik; with ``"sum"``, c_ik = 1/π_ik. The expected loss, and so the
  expected gradient, is the full reduction's. That holds for a reduction linear in the pair losses only (``"mean"``
  and ``"sum"``); ``"min"`` and the listwise reductions are refused for ``"sampled"`` (see `check_selection`).

A row with K_i ≤ m keeps all its rejected, with weight 1. The kept rejected stay in their listed order (best first),
so a ranking loss sees the same order. Shapes: B examples, K the largest number of rejected, M = min(m, K).
Nothing here imports TRL or touches a model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


REJECTED_SELECTIONS = ("all", "hardest", "sampled")
# Reductions that are linear in the pair losses: the importance-weighted sample is unbiased only for these
SAMPLED_REDUCTIONS = ("mean", "sum")
# A pair's sampling score relative to its row's largest: a floor that keeps every π_ik > 0 (so the estimate stays
# unbiased) without letting a learned pair be drawn often
_MIN_RELATIVE_SCORE = 1e-6


class Selection(NamedTuple):
    """The rejected each example keeps.

    Attributes:
        index (`torch.LongTensor`): [B, M] positions (0..K-1) of the kept rejected, ascending; 0 where not kept.
        mask (`torch.BoolTensor`): [B, M], True where the entry is a kept rejected.
        importance (`torch.Tensor` or `None`): [B, M] weight of each kept pair's loss (``"sampled"``), else None.
    """

    index: torch.Tensor
    mask: torch.Tensor
    importance: torch.Tensor | None = None


def check_selection(
    selection: str, num_selected: int, reduction: str, loss_types: tuple[str, ...], ld_alpha: float | None = None
) -> None:
    """Raise `ValueError` for a selection the loss does not define (called when the config is built)."""
    if selection not in REJECTED_SELECTIONS:
        raise ValueError(f"`rejected_selection` must be one of {REJECTED_SELECTIONS}, got {selection!r}.")
    if selection == "all":
        return
    if num_selected < 1:
        raise ValueError(
            f"`num_selected` must be at least 1 with `rejected_selection={selection!r}`, got {num_selected}."
        )
    if selection == "sampled" and reduction not in SAMPLED_REDUCTIONS:
        raise ValueError(
            f"`rejected_selection='sampled'` is unbiased only for a reduction linear in the pair losses "
            f"({SAMPLED_REDUCTIONS}), got `rejected_reduction={reduction!r}`. Use `rejected_selection='hardest'`, or "
            f"a reduction in {SAMPLED_REDUCTIONS}."
        )
    batch_sorted = [t for t in loss_types if t in ("aot", "aot_unpaired")]
    if batch_sorted:
        raise ValueError(f"`rejected_selection={selection!r}` needs per-pair losses; {batch_sorted} sort the batch.")
    if ld_alpha is not None:
        raise ValueError(
            f"`rejected_selection={selection!r}` with `ld_alpha` is not supported: LD-DPO's chosen log-prob depends on "
            "the rejected it is paired with. Set `rejected_selection='all'` or `ld_alpha=None`."
        )


def _sorted_kept(order: torch.Tensor, keep: torch.Tensor) -> Selection:
    """The first `keep[i]` entries of each row of `order`, ascending, as a `Selection`."""
    width = max(int(keep.max()), 1) if keep.numel() else 1
    chosen = order[:, :width]
    mask = torch.arange(width, device=order.device) < keep[:, None]
    # Ascending positions, padding last: sort with the padding pushed past every real position
    big = order.size(1)
    index, _ = torch.where(mask, chosen, big).sort(dim=1)
    return Selection(index=index.masked_fill(index == big, 0), mask=mask)


def select_hardest(
    effective: torch.Tensor, weights: torch.Tensor, rejected_mask: torch.Tensor, num_selected: int
) -> Selection:
    """The `num_selected` rejected of each row with the largest |effective| weight (ties: larger seed weight `weights`,
    then earlier rank), in their listed order. `effective`, `weights`: [B, K] (any value where not `rejected_mask`)."""
    num_rejected = rejected_mask.sum(dim=1)
    keep = num_rejected.clamp(max=num_selected)
    ninf = float("-inf")
    # Two stable sorts give the lexicographic order (|e| desc, w desc, k asc); padding sorts last
    by_weight = weights.float().masked_fill(~rejected_mask, ninf).argsort(dim=1, descending=True, stable=True)
    primary = effective.float().abs().masked_fill(~rejected_mask, ninf).gather(1, by_weight)
    order = by_weight.gather(1, primary.argsort(dim=1, descending=True, stable=True))
    return _sorted_kept(order, keep)


def inclusion_probabilities(scores: torch.Tensor, rejected_mask: torch.Tensor, num_selected: int) -> torch.Tensor:
    """π [B, K], proportional to `scores` (floored at 1e-6 of the row's largest), capped at 1, Σ_k π_ik = min(m, K_i);
    0 where not `rejected_mask`. Float64."""
    scores = scores.detach().double().abs().masked_fill(~rejected_mask, 0.0)
    row_max = scores.amax(dim=1, keepdim=True)
    relative = torch.where(row_max > 0, scores / row_max.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    scores = relative.clamp(min=_MIN_RELATIVE_SCORE).masked_fill(~rejected_mask, 0.0)
    target = rejected_mask.sum(dim=1).clamp(max=num_selected).double()
    pi = torch.zeros_like(scores)
    free = rejected_mask.clone()
    # Items whose proportional share reaches 1 are taken for certain; the rest share what is left (at most m rounds)
    for _ in range(num_selected + 1):
        total = (scores * free).sum(dim=1, keepdim=True)
        share = target[:, None] * scores / total.clamp(min=torch.finfo(torch.float64).tiny)
        certain = free & (share >= 1)
        if not certain.any():
            break
        pi = pi.masked_fill(certain, 1.0)
        free = free & ~certain
        target = target - certain.sum(dim=1)
    return torch.where(free, share.clamp(max=1.0), pi)


def systematic_sample(
    pi: torch.Tensor,
    rejected_mask: torch.Tensor,
    generator: torch.Generator | None = None,
    permutation: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw, per row, the items whose interval of the cumulated π (in a random order) holds one of u, u+1, ...:
    exactly round(Σ_k π_ik) distinct items, item k with probability π_ik. Returns the bool [B, K] of drawn items.

    `permutation` [B, K] (the order, padding anywhere) and `offset` [B] (u in [0, 1)) replace the random draws,
    which tests use to enumerate every outcome.
    """
    batch, width = pi.shape
    device = pi.device
    if permutation is None:
        keys = torch.rand(batch, width, generator=generator, device=device).masked_fill(~rejected_mask, 2.0)
        permutation = keys.argsort(dim=1)
    if offset is None:
        offset = torch.rand(batch, generator=generator, device=device)
    permuted = pi.double().gather(1, permutation)
    upper = permuted.cumsum(dim=1)
    # Pin the total to the integer it is meant to be, so that rounding cannot add or drop a draw
    total = upper[:, -1:].round()
    upper = torch.where(upper > total, total, upper)
    upper = torch.cat([upper[:, :-1], total], dim=1)
    lower = torch.cat([upper.new_zeros(batch, 1), upper[:, :-1]], dim=1)
    u = offset.double()[:, None]
    hits = torch.ceil(upper - u) - torch.ceil(lower - u)  # how many of u, u+1, ... fall in [lower, upper)
    drawn_permuted = (hits > 0) & (permuted > 0)
    drawn = torch.zeros_like(drawn_permuted)
    return drawn.scatter(1, permutation, drawn_permuted)


def select_sampled(
    effective: torch.Tensor,
    rejected_mask: torch.Tensor,
    num_selected: int,
    reduction: str,
    generator: torch.Generator | None = None,
    **draws,
) -> Selection:
    """`num_selected` rejected per row drawn with π ∝ |effective| (`inclusion_probabilities`, `systematic_sample`),
    with the Horvitz-Thompson weights that make the expected loss the full `reduction`'s ("mean" or "sum")."""
    if reduction not in SAMPLED_REDUCTIONS:
        raise ValueError(f"Sampled selection is unbiased only for {SAMPLED_REDUCTIONS}, got {reduction!r}.")
    pi = inclusion_probabilities(effective, rejected_mask, num_selected)
    drawn = systematic_sample(pi, rejected_mask, generator, **draws)
    keep = drawn.sum(dim=1)
    positions = torch.arange(pi.size(1), device=pi.device).expand_as(pi)
    order = torch.where(drawn, positions, pi.size(1)).sort(dim=1).values
    selection = _sorted_kept(order, keep)
    kept_pi = pi.gather(1, selection.index)
    num_rejected = rejected_mask.sum(dim=1, keepdim=True).double()
    if reduction == "mean":  # (1/m_i) Σ_kept c ℓ with c = m_i / (K_i π): the mean's Horvitz-Thompson estimate
        importance = keep[:, None].double() / (num_rejected * kept_pi)
    else:
        importance = 1.0 / kept_pi
    importance = importance.masked_fill(~selection.mask, 0.0).to(effective.dtype)
    return selection._replace(importance=importance)


def gather_kept(values: torch.Tensor, selection: Selection, fill: float | bool = 0.0) -> torch.Tensor:
    """The [B, M] entries of a [B, K] tensor at the kept positions, `fill` where not kept."""
    return values.gather(1, selection.index).masked_fill(~selection.mask, fill)
