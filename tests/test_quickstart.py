"""The quickstart and its task: the ground-truth reward, the best-of-n rows, and a reduced end-to-end run."""

import pytest

from trl_dpo_ext import cli
from trl_dpo_ext.quickstart import QuickstartConfig, SortDigitsTask, implicit_reward_accuracy, run


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("1358", 1.0),
        ("135", 3 / 4),  # stopped one digit early
        ("1538", 2 / 4),  # two neighbours swapped
        ("8315", 1 / 4),  # the prompt copied: only its "3" is in place
        ("13589", 4 / 5),  # one digit too many
        (" 1358 ", 1.0),  # surrounding spaces are ignored
    ],
)
def test_reward_is_the_share_of_right_positions_over_the_longer_string(completion, expected):
    assert SortDigitsTask.reward("8315=", completion) == pytest.approx(expected)


def test_preference_rows_are_best_of_n_with_strictly_worse_rejected():
    task = SortDigitsTask()
    prompts = task.prompts(200, seed=0)
    held_out = task.prompts(50, seed=1, exclude=prompts)
    assert len(set(prompts)) == 200 and not set(held_out) & set(prompts)
    rows = task.preference_rows(prompts, seed=0, keep_scores=True)
    assert rows == task.preference_rows(prompts, seed=0, keep_scores=True), "seeded"
    assert 150 < len(rows) <= 200
    for row in rows:
        assert row["scores"][0] == task.reward(row["prompt"], row["chosen"])
        assert row["scores"][1:] == [task.reward(row["prompt"], r) for r in row["rejected"]]
        assert 1 <= len(row["rejected"]) <= 3 and max(row["scores"][1:]) < row["scores"][0]
    # The annotator's systematic error: the chosen answer stops one digit early more often than it is right
    early = sum(r["chosen"] == task.answer(r["prompt"])[:-1] for r in rows)
    right = sum(r["chosen"] == task.answer(r["prompt"]) for r in rows)
    assert early > right > 0


def test_task_rejects_impossible_settings():
    with pytest.raises(ValueError, match="sum to at most 1, got p_correct=0.5, p_stop_early=0.5, p_swap=0.2"):
        SortDigitsTask(p_correct=0.5, p_stop_early=0.5, p_swap=0.2)
    with pytest.raises(ValueError, match="min_digits=5, max_digits=4"):
        SortDigitsTask(min_digits=5, max_digits=4)


def test_implicit_reward_accuracy_counts_ties_half():
    import torch

    rows = [{"rejected": ["a", "b"]}, {"rejected": ["c"]}]
    ref = torch.zeros(5)
    # row 0: chosen 1.0 vs rejected 0.0 (win) and 1.0 (tie); row 1: chosen 0.0 vs rejected 2.0 (loss)
    policy = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0])
    assert implicit_reward_accuracy(policy, ref, rows) == pytest.approx((1 + 0.5 + 0) / 3)


def test_reduced_quickstart_prints_the_before_after_table(capsys):
    """A small fraction of the real run (which `trl-dpo-ext quickstart` makes): same stages, same table."""
    argv = ["--num_train_prompts", "300", "--num_eval_prompts", "40", "--sft_epochs", "3", "--dpo_epochs", "1"]
    assert cli.main(["quickstart", *argv]) == 0
    out = capsys.readouterr().out
    assert "after SFT   after DPO" in out
    label = "Preference accuracy of the implicit reward"
    after_sft, after_dpo = [
        float(v) for v in next(line for line in out.splitlines() if line.startswith(label)).split()[-2:]
    ]
    # The printed table is the run's: DPO ranks most held-out pairs right (as `run` below, with the same settings)
    assert after_dpo > 0.7 and after_dpo > after_sft


def test_reduced_quickstart_returns_its_numbers_and_dpo_learns_the_held_out_preferences():
    results = run(QuickstartConfig(num_train_prompts=300, num_eval_prompts=40, sft_epochs=3, dpo_epochs=1))
    # Even this short run ranks most held-out (chosen, rejected) pairs right
    assert results["dpo"]["implicit_reward_accuracy"] > 0.7
    assert 250 < results["data"]["train_rows"] <= 300 and 1 < results["data"]["mean_rejected"] < 3
