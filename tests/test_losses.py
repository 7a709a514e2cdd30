"""The loss math on hand-worked values, against the papers' formulas and autograd."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_dpo_ext.losses import (
    PreferenceLogps,
    f_divergence_scores,
    length_desensitized_logps,
    multi_rejected_loss,
    softmax_loss,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def example_logps(chosen_lr=1.0, rejected_lr=(0.0, 2.0), pad=0):
    """One example whose log-ratios are Δ_w = `chosen_lr`, Δ_l = `rejected_lr` (reference log-probs are 0)."""
    rejected = torch.tensor([list(rejected_lr) + [123.0] * pad])  # padding holds garbage on purpose
    mask = torch.tensor([[True] * len(rejected_lr) + [False] * pad])
    return PreferenceLogps(
        chosen=torch.tensor([[chosen_lr]]),
        rejected=rejected,
        ref_chosen=torch.zeros(1, 1),
        ref_rejected=torch.zeros_like(rejected),
        rejected_mask=mask,
    )


# Δ_w = 1, Δ_l = (0, 2), β = 1:
#   pair losses −log σ(1 − 0) = softplus(−1) = 0.313262, −log σ(1 − 2) = softplus(1) = 1.313262
#   mean 0.813262, sum 1.626523, min (hardest: Δ_l = 2) 1.313262
#   softmax: log(e^1 + e^0 + e^2) − 1 = log(11.107338) − 1 = 1.407606
@pytest.mark.parametrize(
    "reduction, expected",
    [
        ("mean", (softplus(-1) + softplus(1)) / 2),
        ("sum", softplus(-1) + softplus(1)),
        ("min", softplus(1)),
        ("softmax", math.log(math.e + 1 + math.e**2) - 1),
    ],
)
def test_reductions_match_hand_worked_values(reduction, expected):
    loss = multi_rejected_loss("sigmoid", reduction, example_logps(), beta=1.0)
    torch.testing.assert_close(loss, torch.tensor([expected]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "min", "softmax"])
def test_single_rejected_every_reduction_is_the_sigmoid_loss(reduction):
    logps = example_logps(chosen_lr=0.3, rejected_lr=(-0.7,))
    loss = multi_rejected_loss("sigmoid", reduction, logps, beta=0.5)
    torch.testing.assert_close(loss, -F.logsigmoid(torch.tensor([0.5 * (0.3 + 0.7)])))


@pytest.mark.parametrize(
    "loss_type, reduction",
    [
        (loss_type, reduction)
        for loss_type in ("sigmoid", "hinge", "ipo", "nca_pair", "apo_down")
        for reduction in ("mean", "sum", "min", "softmax")
        if reduction != "softmax" or loss_type == "sigmoid"  # softmax is the listwise sigmoid loss only
    ],
)
def test_padding_of_ragged_k_changes_nothing(loss_type, reduction):
    values, grads = [], []
    for pad in (0, 3):
        logps = example_logps(pad=pad)
        chosen = logps.chosen.clone().requires_grad_()
        rejected = logps.rejected.clone().requires_grad_()
        lengths = torch.full_like(rejected, 5.0)
        logps = logps._replace(chosen=chosen, rejected=rejected, chosen_lengths=torch.full((1, 1), 4.0))
        logps = logps._replace(rejected_lengths=lengths)
        loss = multi_rejected_loss(loss_type, reduction, logps, beta=0.1)
        loss.sum().backward()
        values.append(loss.detach())
        grads.append((chosen.grad.clone(), rejected.grad[:, :2].clone()))
        assert torch.all(rejected.grad[:, 2:] == 0), "padding received a gradient"
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_mean_reduction_gradient_is_the_seeds_weight_over_k():
    """DPO paper (arXiv 2305.18290), §4: ∇L = −β σ(r̂_l − r̂_w)(∇log π(y_w) − ∇log π(y_l)); with the mean over K each pair gets 1/K of it."""
    beta = 0.1
    chosen = torch.tensor([[2.0]], requires_grad=True)
    rejected = torch.tensor([[1.0, 3.0, -4.0]], requires_grad=True)
    logps = PreferenceLogps(chosen, rejected, torch.zeros(1, 1), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    multi_rejected_loss("sigmoid", "mean", logps, beta=beta).sum().backward()
    weights = torch.sigmoid(beta * (rejected.detach() - chosen.detach()))  # σ(r̂_l − r̂_w)
    torch.testing.assert_close(rejected.grad, beta * weights / 3)
    torch.testing.assert_close(chosen.grad, -(beta * weights / 3).sum(dim=1, keepdim=True))


def test_min_reduction_sends_gradient_to_the_hardest_rejected_only():
    chosen = torch.tensor([[0.0]], requires_grad=True)
    rejected = torch.tensor([[0.5, 2.0, 1.0]], requires_grad=True)
    logps = PreferenceLogps(chosen, rejected, torch.zeros(1, 1), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    multi_rejected_loss("sigmoid", "min", logps, beta=1.0).sum().backward()
    assert rejected.grad[0, 1] > 0
    assert rejected.grad[0, 0] == 0 and rejected.grad[0, 2] == 0


def test_softmax_loss_matches_the_plackett_luce_top1_probability():
    # −log P(chosen ranked first) with P = e^{β s_w} / Σ_j e^{β s_j}, written out directly
    scores = torch.tensor([0.4, -0.2, 1.1, 0.0])
    beta = 2.0
    expected = -math.log(math.exp(beta * 0.4) / sum(math.exp(beta * s) for s in scores.tolist()))
    loss = softmax_loss(scores[:1][None], scores[1:][None], torch.ones(1, 3, dtype=torch.bool), beta)
    torch.testing.assert_close(loss, torch.tensor([expected]))


def test_f_divergence_scores_are_the_f_dpo_derivatives():
    # t = π/π_ref = e^{0.5}: forward KL 1 − 1/t, JS log(2t/(1+t)), α = 0.5 divergence (t^{−0.5} − 1)/(−0.5)
    t = math.exp(0.5)
    lr = torch.tensor([0.5])
    torch.testing.assert_close(f_divergence_scores(lr, "forward_kl"), torch.tensor([1 - 1 / t]))
    torch.testing.assert_close(f_divergence_scores(lr, "js_divergence"), torch.tensor([math.log(2 * t / (1 + t))]))
    torch.testing.assert_close(f_divergence_scores(lr, "alpha_divergence", 0.5), torch.tensor([(t**-0.5 - 1) / -0.5]))
    torch.testing.assert_close(f_divergence_scores(lr, "reverse_kl"), lr)


def test_length_desensitized_logps_weigh_the_tail_by_alpha():
    # Completion tokens at positions 1..4 with log-probs −1, −2, −3, −4; shared lengths 2 and 4; α = 0.5:
    #   shared 2: (−1 − 2) + 0.5·(−3 − 4) = −6.5;  shared 4: −10
    per_token = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    out = length_desensitized_logps(per_token, mask, torch.tensor([[2, 4]]), alpha=0.5)
    torch.testing.assert_close(out, torch.tensor([[-6.5, -10.0]]))
