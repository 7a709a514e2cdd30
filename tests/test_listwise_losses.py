"""Listwise losses over ranked or scored responses: Plackett-Luce, InfoNCA and NCA."""

import math
import warnings

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
from trl_dpo_ext.rows import check_scores


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


# ------------------------------------------------------------------------------ one rank order: rejected best first


def fit_free_rewards(rows: list[dict], use_scores: bool, steps: int = 400) -> list[list[int]]:
    """Fit free implicit rewards (one parameter per response) to `rows` by the Plackett-Luce loss; return, per row,
    the response indices (0 = chosen, k = rejected k-1) from the highest fitted reward to the lowest."""
    k_max = max(len(r["rejected"]) for r in rows)
    mask = torch.tensor([[k < len(r["rejected"]) for k in range(k_max)] for r in rows])
    chosen = torch.zeros(len(rows), 1, requires_grad=True)
    rejected = torch.zeros(len(rows), k_max, requires_grad=True)
    scores = None
    if use_scores:
        scores = torch.tensor([r["scores"] + [0.0] * (k_max + 1 - len(r["scores"])) for r in rows])
    optimizer = torch.optim.Adam([chosen, rejected], lr=0.05)
    for _ in range(steps):
        logps = PreferenceLogps(chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(rejected), mask)
        loss = listwise_loss("plackett_luce", logps, beta=1.0, scores=scores).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rewards = torch.cat([chosen, rejected], dim=1).detach().tolist()
    return [sorted(range(1 + len(r["rejected"])), key=lambda i: -v[i]) for r, v in zip(rows, rewards, strict=True)]


def test_plackett_luce_on_converted_rated_rows_learns_the_same_ranking_with_and_without_scores():
    from trl_dpo_ext.convert import rated_to_multi_rejected

    rng = torch.Generator().manual_seed(0)
    rated = []
    for i, n in enumerate([5, 4, 6, 3]):  # responses in a shuffled order, distinct scores
        scores = torch.rand(n, generator=rng).tolist()
        rated.append(
            {
                "instruction": f"q{i}",
                "completions": [{"output": f"r{i}-{j}", "score": s} for j, s in enumerate(scores)],
            }
        )
    for selection in ("lowest", "random"):
        rows = rated_to_multi_rejected(rated, num_rejected=3, selection=selection)
        with_scores, without_scores = fit_free_rewards(rows, True), fit_free_rewards(rows, False)
        assert with_scores == without_scores
        # ... and that ranking is the scores' own: chosen first, then the rejected from best to worst
        assert with_scores == [sorted(range(len(r["scores"])), key=lambda i: -r["scores"][i]) for r in rows]


@pytest.mark.parametrize(
    "scores, message",
    [
        ([0.9, float("inf")], r"got inf at position 1 \(rejected 0\)"),
        ([float("nan"), 0.2], r"got nan at position 0 \(the chosen\)"),
        ([0.9, None], r"got None at position 1 \(rejected 0\)"),
    ],
)
def test_scores_that_are_not_finite_numbers_name_the_row_the_column_and_the_value(
    tokenizer, tmp_path, scores, message
):
    rows = [{**ROWS[1], "scores": [0.9, 0.2]}, {**ROWS[1], "scores": scores}]
    policy, ref = policy_and_ref(tokenizer)
    with pytest.raises(ValueError, match=r"Row 1, column 'scores': expected a list of finite numbers .*" + message):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, rejected_reduction="infonca"),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "scores, message",
    [
        ([0.9, "0.2"], r"expected a list of finite numbers .* got '0.2' at position 1 \(rejected 0\)"),
        ([0.9, True], r".* got True at position 1 \(rejected 0\)"),
        (0.9, r"expected a list of finite numbers .* got float 0.9"),
    ],
)
def test_scores_of_another_type_name_the_row_the_column_and_the_value(scores, message):
    # Values an Arrow column cannot mix with floats: checked on the row as `tokenize_row` sees it
    with pytest.raises(ValueError, match=r"Row 4, column 'scores': " + message):
        check_scores({"scores": scores}, num_rejected=1, idx=4)


def make_trainer(tokenizer, tmp_path, rows, reduction):
    policy, ref = policy_and_ref(tokenizer)
    return DPOTrainer(
        model=policy,
        ref_model=ref,
        args=make_args(tmp_path, rejected_reduction=reduction),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def test_plackett_luce_raises_on_a_rejected_scored_above_its_chosen_naming_the_row(tokenizer, tmp_path):
    rows = [ROWS[0], {**ROWS[0], "scores": [0.5, 0.6, 0.3, 0.1]}]
    with pytest.raises(ValueError, match=r"Row 1, column 'scores': rejected 0 scores 0.6, above the chosen's 0.5"):
        make_trainer(tokenizer, tmp_path, rows, "plackett_luce")


@pytest.mark.parametrize("reduction", ["infonca", "nca", "mean"])
def test_chosen_scored_below_a_rejected_is_counted_in_one_warning_naming_the_rows(tokenizer, tmp_path, reduction):
    below = {**ROWS[0], "scores": [0.5, 0.6, 0.3, 0.1]}
    rows = [ROWS[0], below, ROWS[1], {**below, "scores": [0.0, 0.0, 0.0, 0.1]}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tokenizer, tmp_path, rows, reduction)
    messages = [str(w.message) for w in caught if "scored below" in str(w.message)]
    assert messages == [
        "2 row(s) of the train dataset have a chosen scored below one of their own rejected in column 'scores' "
        "(rows 1, 3). They are trained as given: the chosen is still preferred to every rejected."
    ]


def test_plackett_luce_without_scores_warns_once_that_the_listed_order_is_the_ranking(tokenizer, tmp_path):
    unscored = [{c: r[c] for c in ("prompt", "chosen", "rejected")} for r in ROWS]
    for rows, expected in [(unscored, 1), (ROWS, 0), ([{**r, "rejected": r["rejected"][:1]} for r in unscored], 0)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tokenizer, tmp_path, rows, "plackett_luce")
        messages = [str(w.message) for w in caught if "listed order as the ranking, best first" in str(w.message)]
        assert len(messages) == expected, messages
