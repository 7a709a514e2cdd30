"""Listwise losses over ranked or scored responses: Plackett-Luce, InfoNCA and NCA."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import loss_and_grads, make_args, policy_and_ref, sequence_logps
from datasets import Dataset

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.losses import (
    PreferenceLogps,
    infonca_loss,
    listwise_loss,
    nca_loss,
    plackett_luce_loss,
    score_targets,
    softmax_loss,
)


def logps_from_rewards(rewards: list[list[float]], beta: float = 1.0, pad: int = 0) -> PreferenceLogps:
    """PreferenceLogps whose implicit rewards β·Δ are `rewards` (chosen first), with `pad` garbage columns."""
    r = torch.tensor(rewards) / beta
    rejected = torch.cat([r[:, 1:], torch.full((r.size(0), pad), 55.0)], dim=1)
    mask = torch.cat([torch.ones_like(r[:, 1:], dtype=torch.bool), torch.zeros(r.size(0), pad, dtype=torch.bool)], 1)
    return PreferenceLogps(r[:, :1], rejected, torch.zeros_like(r[:, :1]), torch.zeros_like(rejected), mask)


def test_plackett_luce_matches_a_hand_worked_three_response_ranking():
    # r = (2, 1, 0) for chosen > rejected_1 > rejected_2:
    #   L = −[log e²/(e² + e + 1) + log e/(e + 1) + log 1] = −[2 − log(e² + e + 1) + 1 − log(e + 1)]
    e = math.e
    expected = -(2 - math.log(e**2 + e + 1) + 1 - math.log(e + 1))
    rewards = torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(
        plackett_luce_loss(rewards, torch.ones(1, 3, dtype=torch.bool)), torch.tensor([expected])
    )


def test_plackett_luce_with_one_rejected_is_the_sigmoid_loss():
    rewards = torch.tensor([[0.3, -1.2], [2.0, 2.5]])
    expected = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    torch.testing.assert_close(plackett_luce_loss(rewards, torch.ones(2, 2, dtype=torch.bool)), expected)


def test_plackett_luce_ranks_the_rejected_by_their_scores():
    listed = logps_from_rewards([[2.0, 0.0, 1.0]])
    scores = torch.tensor([[1.0, 0.1, 0.9]])  # rejected_2 ranks above rejected_1
    ranked = listwise_loss("plackett_luce", listed, beta=1.0, scores=scores)
    in_order = listwise_loss("plackett_luce", logps_from_rewards([[2.0, 1.0, 0.0]]), beta=1.0)
    torch.testing.assert_close(ranked, in_order)


def test_infonca_with_one_hot_targets_on_the_chosen_is_the_softmax_reduction():
    logps = logps_from_rewards([[0.5, 1.5, -0.3, 0.2]])
    scores = torch.tensor([[1e4, 0.0, 0.0, 0.0]])  # softmax(s/α) is exactly one-hot in float32
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = softmax_loss(logps.chosen, logps.rejected, mask, beta=1.0)
    torch.testing.assert_close(listwise_loss("infonca", logps, beta=1.0, scores=scores), expected)
    torch.testing.assert_close(listwise_loss("infonca", logps, beta=1.0), expected)  # no scores: one-hot


def test_nca_with_one_rejected_and_one_hot_targets_is_trls_nca_pair():
    rewards = torch.tensor([[0.7, -0.4]])
    targets = score_targets(None, torch.ones(1, 2, dtype=torch.bool), 1.0)
    r_w, r_l = rewards[:, 0], rewards[:, 1]
    expected = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    torch.testing.assert_close(nca_loss(rewards, targets, torch.ones(1, 2, dtype=torch.bool)), expected)


def test_listwise_gradients_equal_their_closed_forms():
    """∂L/∂r: InfoNCA softmax(r) − p; NCA −p σ(−r) + σ(r)/N; Plackett-Luce −1 + Σ_{k ≤ j} softmax_{suffix k}(r)_j."""
    rewards = torch.tensor([[0.4, -0.2, 1.1, 0.0]], requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    targets = score_targets(torch.tensor([[3.0, 1.0, 2.0, 0.5]]), mask, alpha=0.7)
    r = rewards.detach()

    infonca_loss(rewards, targets, mask).sum().backward()
    torch.testing.assert_close(rewards.grad, torch.softmax(r, 1) - targets)
    rewards.grad = None

    nca_loss(rewards, targets, mask).sum().backward()
    torch.testing.assert_close(rewards.grad, -targets * torch.sigmoid(-r) + torch.sigmoid(r) / 4)
    rewards.grad = None

    plackett_luce_loss(rewards, mask).sum().backward()
    expected = -torch.ones(1, 4)
    for k in range(4):
        expected[:, k:] += torch.softmax(r[:, k:], dim=1)
    torch.testing.assert_close(rewards.grad, expected)


@pytest.mark.parametrize("reduction", ["plackett_luce", "infonca", "nca", "softmax"])
def test_padding_of_ragged_k_changes_nothing_in_listwise_losses(reduction):
    scores = torch.tensor([[0.9, 0.2, 0.5]])
    results = []
    for pad in (0, 2):
        logps = logps_from_rewards([[0.5, 1.5, -0.3]], pad=pad)
        rejected = logps.rejected.clone().requires_grad_()
        padded_scores = torch.cat([scores, torch.full((1, pad), 7.0)], dim=1)
        loss = listwise_loss(reduction, logps._replace(rejected=rejected), beta=1.0, scores=padded_scores)
        loss.sum().backward()
        assert torch.all(rejected.grad[:, 2:] == 0)
        results.append((loss.detach(), rejected.grad[:, :2]))
    torch.testing.assert_close(results[0], results[1])


ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22", "four"], "scores": [1.0, 0.6, 0.3, 0.1]},
    {"prompt": "sky? ", "chosen": "blue", "rejected": ["green"], "scores": [0.9, 0.2]},
    {"prompt": "abc", "chosen": "def", "rejected": ["xyz", "abcd"], "scores": [0.8, 0.1, 0.5]},
]


def test_trainer_infonca_loss_matches_an_independent_computation_from_the_scores(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    args = make_args(tmp_path, rejected_reduction="infonca", score_temperature=0.5, beta=0.5)
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    loss, _ = loss_and_grads(trainer)
    policy, reference = policy_and_ref(tokenizer)
    losses = []
    with torch.no_grad():
        for row, raw in zip(trainer.train_dataset, ROWS, strict=True):
            responses = [row["chosen_ids"], *row["rejected_ids"]]
            rewards = torch.stack(
                [
                    0.5
                    * (sequence_logps(policy, row["prompt_ids"], r) - sequence_logps(reference, row["prompt_ids"], r))
                    for r in responses
                ]
            )
            targets = torch.softmax(torch.tensor(raw["scores"]) / 0.5, dim=0)
            losses.append(-(targets * torch.log_softmax(rewards, dim=0)).sum())
    torch.testing.assert_close(loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def test_plackett_luce_trainer_with_one_rejected_matches_the_sigmoid_trainer(tokenizer, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"][:1]} for r in ROWS]
    results = []
    for reduction in ("mean", "plackett_luce"):
        policy, ref = policy_and_ref(tokenizer)
        trainer = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path / reduction, rejected_reduction=reduction),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        results.append(loss_and_grads(trainer))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5)


def test_scores_of_the_wrong_length_name_the_row(tokenizer, tmp_path):
    rows = [dict(ROWS[0]), {**ROWS[1], "scores": [0.9, 0.2, 0.1]}]
    policy, ref = policy_and_ref(tokenizer)
    with pytest.raises(ValueError, match=r"Row 1, column 'scores': expected 2 scores .* got 3"):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, rejected_reduction="nca"),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
