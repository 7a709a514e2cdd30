"""Held-out agreement with a judge (`trl_dpo_ext.evaluation`): the counts are what a direct count gives, ties are
handled as documented, and each response's log-probability equals an unpadded forward of that response alone."""

import itertools

import pytest
from conftest import policy_and_ref, sequence_logps

from trl_dpo_ext.evaluation import judge_agreement, judge_counts, response_logps, response_token_ids


def test_judge_counts_match_a_direct_count():
    values = [0.3, 0.1, 0.1, 0.9, 0.2]
    judge = [0.50, 0.505, 0.2, 0.8, 0.0]
    counts = judge_counts(values, judge, tie=0.01)
    expected = {"c": 0, "d": 0, "n": 0}
    for a, b in itertools.combinations(range(5), 2):
        if abs(judge[a] - judge[b]) < 0.01:  # (0, 1) is a judge tie: dropped
            continue
        expected["n"] += 1
        if values[a] == values[b]:
            continue
        expected["c" if (values[a] > values[b]) == (judge[a] > judge[b]) else "d"] += 1
    assert (counts.concordant, counts.discordant, counts.pairs) == (expected["c"], expected["d"], expected["n"])
    assert (counts.concordant, counts.discordant, counts.pairs) == (6, 2, 9)
    assert counts.top1  # response 3 is the judge's best and the highest value
    assert not judge_counts([1.0, 0.0], [0.0, 1.0], tie=0.01).top1


def test_agreement_drops_judge_ties_and_counts_ranker_ties_as_half():
    judge = [[0.9, 0.5, 0.505, 0.1]]  # 0.5 and 0.505 are a judge tie (< 0.01): 5 pairs remain
    # Pairs (a, b) with a judged better: (0,1) (0,2) (0,3) (1,3) (2,3); the ranker gets (0,1) (0,3) (2,3) right,
    # (0,2) wrong and ties (1,3): accuracy (3 + 0.5) / 5, tau (3 - 1) / 5
    values = [[2.0, 1.0, 3.0, 1.0]]
    assert judge_agreement(values, judge, tie=0.01) == pytest.approx((3.5 / 5, 2 / 5))
    assert judge_agreement(judge, judge, tie=0.01) == (1.0, 1.0)
    # Accuracy is pooled over pairs, τ averaged over prompts: a prompt of 1 pair (reversed) and one of 3 (right)
    assert judge_agreement([[0.0, 1.0], [3.0, 2.0, 1.0]], [[1.0, 0.0], [1.0, 0.5, 0.0]], tie=0.01) == (
        pytest.approx(3 / 4),
        pytest.approx((-1.0 + 1.0) / 2),
    )


def test_response_logps_equal_an_unpadded_forward_of_each_response(tokenizer):
    model, _ = policy_and_ref(tokenizer)
    prompt, responses = "sort 3 1 2:", [" 1 2 3", " 3", " 2 1 3 3 3 3"]  # ragged: the padded batch must not leak
    logps, lengths = response_logps(model, tokenizer, prompt, responses)
    prompt_ids = tokenizer(prompt)["input_ids"]
    for logp, n, response in zip(logps, lengths, responses, strict=True):
        full = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]  # text rows end with EOS, as TRL's
        assert full[: len(prompt_ids)] == prompt_ids and n == len(full) - len(prompt_ids)
        assert logp == pytest.approx(sequence_logps(model, prompt_ids, full[len(prompt_ids) :]).item(), abs=1e-5)
    assert response_token_ids(tokenizer, prompt, responses)[0] == prompt_ids
