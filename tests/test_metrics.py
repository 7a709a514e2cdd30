"""The metric arithmetic, without a Trainer: hand-computed values, and exact sums across processes."""

from types import SimpleNamespace

import pytest
import torch

from trl_dpo_ext.losses import PreferenceLogps
from trl_dpo_ext.metrics import NUM_TOKENS, metric_sums, ratios, stack_sums


BETA = 0.5
# Two examples: example 0 has 2 rejected, example 1 has 1. Sequence log-probs and reference log-probs:
CHOSEN, REF_CHOSEN = [-2.0, -4.0], [-3.0, -3.0]  # Δ_w = +1, −1
REJECTED, REF_REJECTED = [[-5.0, -1.0], [-2.0]], [[-4.0, -3.0], [-4.0]]  # Δ_l = (−1, +2), (+2)


def batch_and_outputs(examples=(0, 1)):
    """The collated tensors of the chosen examples: chosen rows first, then each rejected, with 4 token positions."""
    rejected_rows = [(i, k) for i in examples for k in range(len(REJECTED[i]))]
    num_rows = len(examples) + len(rejected_rows)
    completion = torch.zeros(num_rows, 4, dtype=torch.long)
    completion[:, 2:] = 1  # every sequence: 2 prompt tokens, 2 completion tokens
    row_values = [float(r + 1) for r in range(num_rows)]  # a value per row, to tell the rows apart
    per_token = torch.tensor(row_values)[:, None].expand(num_rows, 3).clone()
    outputs = SimpleNamespace(
        entropy=per_token, mean_logits=-per_token, is_top1=torch.ones(num_rows, 3, dtype=torch.bool)
    )
    width = max(len(REJECTED[i]) for i in examples)
    mask = torch.tensor([[k < len(REJECTED[i]) for k in range(width)] for i in examples])

    def padded(values):
        return torch.tensor([values[i] + [0.0] * (width - len(values[i])) for i in examples])

    logps = PreferenceLogps(
        chosen=torch.tensor([[CHOSEN[i]] for i in examples]),
        rejected=padded(REJECTED),
        ref_chosen=torch.tensor([[REF_CHOSEN[i]] for i in examples]),
        ref_rejected=padded(REF_REJECTED),
        rejected_mask=mask,
    )
    inputs = {"completion_mask": completion, "attention_mask": torch.ones(num_rows, 4, dtype=torch.long)}
    return inputs, outputs, logps


def test_metrics_of_a_ragged_batch_match_hand_computation():
    inputs, outputs, logps = batch_and_outputs()
    sums = metric_sums(inputs, outputs, logps, BETA, train=True)
    values = ratios(list(sums), stack_sums(sums, torch.device("cpu")))
    # Margins β(Δ_w − Δ_l): example 0: 0.5·(1+1) = 1, 0.5·(1−2) = −0.5; example 1: 0.5·(−1−2) = −1.5
    assert values["rewards/margins"] == pytest.approx((1 - 0.5 - 1.5) / 3)
    assert values["rewards/margins_min"] == pytest.approx((-0.5 - 1.5) / 2)
    assert values["rewards/accuracies"] == pytest.approx(1 / 3)
    assert values["rewards/accuracies_all"] == pytest.approx(0.0)
    assert values["rewards/chosen"] == pytest.approx((0.5 - 0.5) / 2)
    assert values["rewards/rejected"] == pytest.approx(0.5 * (-1 + 2 + 2) / 3)
    assert values["logps/chosen"] == pytest.approx((-2 - 4) / 2)
    assert values["logps/rejected"] == pytest.approx((-5 - 1 - 2) / 3)
    assert values["num_rejected"] == pytest.approx(1.5)
    # Rows 1, 2 are the chosen, 3, 4, 5 the rejected; each has 2 completion positions after the shift
    assert values["logits/chosen"] == pytest.approx(-(1 + 2) / 2)
    assert values["logits/rejected"] == pytest.approx(-(3 + 4 + 5) / 3)
    assert values["entropy"] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert values["mean_token_accuracy"] == pytest.approx(1.0)
    assert values[NUM_TOKENS] == 5 * 4


def test_summed_sums_of_two_processes_give_the_metrics_of_the_whole_batch():
    """What the trainer's single gather relies on: with K = 2 on one process and K = 1 on the other, adding the
    (numerator, denominator) sums gives exactly the metrics of the batch as one, where a mean of means would not."""
    whole_inputs, whole_outputs, whole_logps = batch_and_outputs()
    whole = metric_sums(whole_inputs, whole_outputs, whole_logps, BETA, train=True)
    parts = [metric_sums(*batch_and_outputs((i,)), BETA, train=True) for i in (0, 1)]
    totals = sum(stack_sums(p, torch.device("cpu")) for p in parts)
    expected = ratios(list(whole), stack_sums(whole, torch.device("cpu")))
    got = ratios(list(parts[0]), totals)
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/rejected", "num_rejected"):
        assert got[key] == pytest.approx(expected[key]), key
    mean_of_means = sum(ratios(list(p), stack_sums(p, torch.device("cpu")))["rewards/margins"] for p in parts) / 2
    assert mean_of_means != pytest.approx(expected["rewards/margins"])


def test_a_metric_with_nothing_counted_is_zero_and_evaluation_counts_no_tokens():
    inputs, outputs, logps = batch_and_outputs()
    sums = metric_sums(inputs, outputs, logps, BETA, train=False)
    assert NUM_TOKENS not in sums
    totals = torch.zeros(len(sums), 2, dtype=torch.float64)
    assert set(ratios(list(sums), totals).values()) == {0.0}
