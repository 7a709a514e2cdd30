"""The real-model evidence harness (benchmarks/experiment_real_model.py): each arm gets the rows its claim needs, the
metrics count what they say, the CPU budget stops a run where it says."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
from transformers import TrainerControl


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location(
        "experiment_real_model", ROOT / "benchmarks/experiment_real_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def k_rows(n=6, k=7, seed=0):
    """Rows as `prepare` makes them: rejected best first, scores aligned, reference columns aligned."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scores = sorted((rng.random() for _ in range(k + 1)), reverse=True)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"q{i}"}],
                "chosen": [{"role": "assistant", "content": f"a{i}-0"}],
                "rejected": [[{"role": "assistant", "content": f"a{i}-{j}"}] for j in range(1, k + 1)],
                "scores": scores,
                "ref_chosen_logps": -float(i),
                "ref_rejected_logps": [-float(i) - j / 10 for j in range(1, k + 1)],
            }
        )
    return rows


def test_pairwise_arms_pick_the_rejected_they_name(harness):
    rows = k_rows()
    best = harness.arm_rows("pairwise_best", rows, 0)
    assert [r["rejected"][0] for r in best] == [r["rejected"][0] for r in rows]
    mu2sigma = harness.arm_rows("pairwise_mu2sigma", rows, 0)
    for row, source in zip(mu2sigma, rows, strict=True):
        target = statistics.mean(source["scores"]) - 2 * statistics.pstdev(source["scores"])
        distances = [abs(s - target) for s in source["scores"][1:]]
        j = source["rejected"].index(row["rejected"][0])
        assert distances[j] == min(distances)
        assert row["ref_rejected_logps"] == [source["ref_rejected_logps"][j]]
        assert row["scores"] == [source["scores"][0], source["scores"][1 + j]]
    drawn = [harness.arm_rows("pairwise_random", rows, seed) for seed in range(20)]
    assert len({tuple(r["rejected"][0][0]["content"] for r in d) for d in drawn}) > 1  # the seed draws
    assert harness.arm_rows("pairwise_random", rows, 3) == harness.arm_rows("pairwise_random", rows, 3)
    for arm in ("pairwise_random", "pairwise_best", "pairwise_mu2sigma", "mean", "hardest_1"):
        harness.check_arm(arm, harness.arm_rows(arm, rows, 0), rows)


def test_stock_pairs_expand_every_rejected_with_its_reference(harness):
    rows = k_rows(n=3)
    pairs = harness.arm_rows("stock_pairs", rows, 0)
    assert len(pairs) == 3 * 7
    assert [(p["rejected"], p["ref_rejected_logps"]) for p in pairs] == [
        (rejected, ref) for r in rows for rejected, ref in zip(r["rejected"], r["ref_rejected_logps"], strict=True)
    ]
    assert all(
        p["ref_chosen_logps"] == r["ref_chosen_logps"] for p, r in zip(pairs, [r for r in rows for _ in range(7)])
    )


def test_k3_keeps_the_three_lowest_rated(harness):
    rows = k_rows(n=2)
    three = harness.rows_k(rows, 3)
    for row, source in zip(three, rows, strict=True):
        assert row["rejected"] == source["rejected"][-3:]
        assert row["scores"] == [source["scores"][0], *source["scores"][-3:]]
        assert row["ref_rejected_logps"] == source["ref_rejected_logps"][-3:]
    for arm in harness.ARMS[3]:  # every K = 3 arm's rows pass the harness's own check
        harness.check_arm(arm, harness.arm_rows(arm, three, 0), three)


def test_check_arm_refuses_a_reference_that_moved_or_a_dropped_rejected(harness):
    rows = k_rows(n=2)
    moved = harness.arm_rows("pairwise_best", rows, 0)
    moved[1]["ref_rejected_logps"] = [rows[1]["ref_rejected_logps"][2]]
    with pytest.raises(AssertionError, match="row 1: reference moved"):
        harness.check_arm("pairwise_best", moved, rows)
    shorter = [{**r, "rejected": r["rejected"][:-1], "ref_rejected_logps": r["ref_rejected_logps"][:-1]} for r in rows]
    with pytest.raises(AssertionError):
        harness.check_arm("mean", shorter, rows)


def test_hh_dialogue_becomes_chat_messages(harness):
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour."
    assert harness.hh_messages(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour."},
    ]


def test_cpu_budget_stops_at_the_step_nearest_the_budget(harness, monkeypatch):
    clock = iter([0.0, 3.0, 3.0, 6.0, 6.0, 9.0, 9.0, 12.0])  # process_time at each step's begin and end
    monkeypatch.setattr(harness.time, "process_time", lambda: next(clock))
    budget, control = harness.CPUBudget(7.6), TrainerControl()
    steps = 0
    while not control.should_training_stop:
        budget.on_step_begin(None, None, control)
        budget.on_step_end(None, None, control)
        steps += 1
    # 3 s steps against 7.6 s: stops after 3 steps (9 s, 1.4 over) rather than 2 (6 s, 1.6 short)
    assert steps == 3 and budget.seconds == [3.0, 3.0, 3.0]
    unbounded, control = harness.CPUBudget(None), TrainerControl()
    clock = iter([0.0, 100.0])
    unbounded.on_step_begin(None, None, control)
    unbounded.on_step_end(None, None, control)
    assert not control.should_training_stop
