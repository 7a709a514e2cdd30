"""Hard-negative selection: which rejected are kept, and the sampled estimate's expectation (enumerated exactly)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trl_dpo_ext.diagnostics import effective_grad_weights, grad_weights
from trl_dpo_ext.loss_spec import LossSpec
from trl_dpo_ext.losses import PreferenceLogps
from trl_dpo_ext.selection import (
    check_selection,
    gather_kept,
    inclusion_probabilities,
    select_hardest,
    select_sampled,
    systematic_sample,
)


def hand_logps(rejected_mask: torch.Tensor, seed: int = 0, dtype=torch.float64) -> PreferenceLogps:
    generator = torch.Generator().manual_seed(seed)
    batch, width = rejected_mask.shape
    return PreferenceLogps(
        chosen=torch.randn(batch, 1, generator=generator, dtype=dtype) - 5,
        rejected=torch.randn(batch, width, generator=generator, dtype=dtype) * 3 - 5,
        ref_chosen=torch.full((batch, 1), -5.0, dtype=dtype),
        ref_rejected=torch.full((batch, width), -5.0, dtype=dtype),
        rejected_mask=rejected_mask,
    )


def test_hardest_keeps_the_rejected_with_the_largest_weights_in_listed_order():
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, False, False, False]])
    effective = torch.tensor([[0.1, 0.7, 0.05, 0.4], [0.2, 0.9, 5.0, 5.0], [0.3, 9.0, 9.0, 9.0]])
    selection = select_hardest(effective, effective, mask, num_selected=2)
    # Row 0: the two largest are k = 1 (0.7) and k = 3 (0.4), listed in their order; row 1 has K = 2 = m: both;
    # row 2 has K = 1: its only rejected (the padding's large values are never taken)
    assert selection.index.tolist() == [[1, 3], [0, 1], [0, 0]]
    assert selection.mask.tolist() == [[True, True], [True, True], [True, False]]
    assert selection.importance is None


def test_hardest_breaks_ties_on_the_seed_weight_then_the_rank():
    mask = torch.ones(1, 4, dtype=torch.bool)
    effective = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # "min": only the hardest carries a gradient
    weights = torch.tensor([[0.2, 0.6, 0.6, 0.9]])
    assert select_hardest(effective, weights, mask, 2).index.tolist() == [[1, 3]]
    assert select_hardest(effective, weights, mask, 3).index.tolist() == [[1, 2, 3]]


def test_hardest_follows_the_effective_weights_of_the_loss_spec():
    mask = torch.ones(3, 5, dtype=torch.bool)
    logps = hand_logps(mask)
    spec = LossSpec(reduction="mean", beta=0.5)
    effective = effective_grad_weights(logps, spec)
    selection = select_hardest(effective, grad_weights(logps, spec.beta), mask, 2)
    for row in range(3):
        expected = sorted(effective[row].argsort(descending=True)[:2].tolist())
        assert selection.index[row].tolist() == expected


@pytest.mark.parametrize("num_selected", [1, 2, 3])
def test_inclusion_probabilities_are_proportional_capped_and_sum_to_m(num_selected):
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, True, True, False, False]])
    scores = torch.tensor([[10.0, 1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0, 0, 0], [0.0, 0.0, 0.0, 7.0, 7.0]])
    pi = inclusion_probabilities(scores, mask, num_selected)
    expected_sums = mask.sum(1).clamp(max=num_selected).double()
    torch.testing.assert_close(pi.sum(1), expected_sums)
    assert (pi <= 1).all() and (pi[mask] > 0).all() and (pi[~mask] == 0).all()
    # Row 0: the dominant item is certain once m ≥ 1 ... (10 / 14 · m ≥ 1 for m ≥ 2); the others share the rest
    if num_selected >= 2:
        assert pi[0, 0] == 1.0
        torch.testing.assert_close(pi[0, 1:], torch.full((4,), (num_selected - 1) / 4, dtype=torch.float64))
    else:
        torch.testing.assert_close(pi[0], torch.tensor([10, 1, 1, 1, 1], dtype=torch.float64) / 14)
    # Row 2: all scores 0 (every pair learned): uniform
    torch.testing.assert_close(pi[2, :3], torch.full((3,), min(num_selected, 3) / 3, dtype=torch.float64))


def _outcomes(pi: torch.Tensor, mask: torch.Tensor):
    """Every outcome of `systematic_sample` on one row with its exact probability: each order (1/K!) times each
    interval of the offset u on which the drawn set is constant."""
    width = pi.size(1)
    for permutation in itertools.permutations(range(width)):
        cumulative = pi[0, list(permutation)].cumsum(0)
        breaks = sorted({0.0, 1.0} | {float(c - math.floor(c)) for c in cumulative})
        for low, high in zip(breaks[:-1], breaks[1:], strict=True):
            if high - low < 1e-12:
                continue
            drawn = systematic_sample(
                pi, mask, permutation=torch.tensor([permutation]), offset=torch.tensor([(low + high) / 2])
            )
            yield (high - low) / math.factorial(width), drawn, permutation, (low + high) / 2


@pytest.mark.parametrize(("width", "num_selected"), [(4, 1), (4, 2), (5, 3)])
def test_systematic_sample_draws_m_distinct_items_each_with_its_inclusion_probability(width, num_selected):
    mask = torch.ones(1, width, dtype=torch.bool)
    pi = inclusion_probabilities(torch.tensor([[5.0, 1.0, 0.5, 2.0, 0.01][:width]]), mask, num_selected)
    marginal = torch.zeros(width, dtype=torch.float64)
    total = 0.0
    for probability, drawn, _, _ in _outcomes(pi, mask):
        assert int(drawn.sum()) == num_selected
        marginal += probability * drawn[0].double()
        total += probability
    assert total == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(marginal, pi[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_sampled_expected_gradient_equals_the_full_reduction_gradient(reduction, loss_type):
    """E over every draw of ∇(loss on the kept pairs, importance-weighted) = ∇(loss on all K), autograd, float64."""
    width, num_selected = 4, 2
    mask = torch.ones(1, width, dtype=torch.bool)
    spec = LossSpec(loss_types=(loss_type,), reduction=reduction, beta=0.3)
    base = hand_logps(mask, seed=3)._replace(
        chosen_lengths=torch.tensor([[4.0]], dtype=torch.float64),
        rejected_lengths=torch.tensor([[3.0, 5.0, 2.0, 6.0]], dtype=torch.float64),
    )

    def gradient(loss_of):
        chosen = base.chosen.clone().requires_grad_(True)
        rejected = base.rejected.clone().requires_grad_(True)
        loss = loss_of(base._replace(chosen=chosen, rejected=rejected))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (chosen, rejected))])

    full = gradient(spec.preference_loss)
    effective = effective_grad_weights(base, spec).double()
    expected = torch.zeros_like(full)
    for probability, _, permutation, offset in _outcomes(inclusion_probabilities(effective, mask, num_selected), mask):
        selection = select_sampled(
            effective,
            mask,
            num_selected,
            reduction,
            permutation=torch.tensor([permutation]),
            offset=torch.tensor([offset]),
        )

        def kept_loss(logps, selection=selection):
            kept = logps._replace(
                rejected=gather_kept(logps.rejected, selection),
                ref_rejected=gather_kept(logps.ref_rejected, selection),
                rejected_lengths=gather_kept(logps.rejected_lengths, selection, 1.0),
                rejected_mask=selection.mask,
            )
            return spec.preference_loss(kept, pair_weights=selection.importance)

        expected += probability * gradient(kept_loss)
    torch.testing.assert_close(expected, full, atol=1e-12, rtol=1e-10)


def test_sampled_keeps_every_rejected_of_a_short_row_with_weight_one():
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    selection = select_sampled(torch.rand(2, 4), mask, 2, "mean", generator=torch.Generator().manual_seed(0))
    assert selection.index[0].tolist() == [0, 1] and selection.mask[0].tolist() == [True, True]
    torch.testing.assert_close(selection.importance[0], torch.ones(2))
    assert int(selection.mask[1].sum()) == 2 and selection.index[1, 0] < selection.index[1, 1]


def test_sampled_is_reproducible_with_a_seeded_generator():
    mask = torch.ones(8, 7, dtype=torch.bool)
    effective = torch.rand(8, 7, generator=torch.Generator().manual_seed(1))
    first = select_sampled(effective, mask, 2, "mean", generator=torch.Generator().manual_seed(5))
    second = select_sampled(effective, mask, 2, "mean", generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.index, second.index)


@pytest.mark.parametrize("reduction", ["min", "softmax", "plackett_luce", "infonca", "nca"])
def test_sampled_selection_refuses_a_nonlinear_reduction(reduction):
    with pytest.raises(ValueError, match=f"unbiased only for a reduction linear.*rejected_reduction='{reduction}'"):
        check_selection("sampled", 2, reduction, ("sigmoid",))


def test_selection_checks_name_the_field():
    with pytest.raises(ValueError, match="`rejected_selection` must be one of"):
        check_selection("random", 1, "mean", ("sigmoid",))
    with pytest.raises(ValueError, match="`num_selected` must be at least 1"):
        check_selection("hardest", 0, "mean", ("sigmoid",))
    with pytest.raises(ValueError, match="sort the batch"):
        check_selection("hardest", 1, "mean", ("aot",))
    check_selection("hardest", 1, "softmax", ("sigmoid",))  # defined: the listwise loss on the kept list
