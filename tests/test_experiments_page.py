"""docs/experiments.md is what its results say: the summary's metrics, paired bootstrap and Holm correction count
what they claim, and the page's tables are the summary of the committed cells."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary():
    return load("summarize_real_model")


def counts(concordant, discordant, pairs, top1):
    return {"concordant": concordant, "discordant": discordant, "pairs": pairs, "top1": top1}


def write_cell(
    folder: Path, arm: str, seed: int, prompts: list[tuple[int, int, int]], hh: list[float], k: int = 7, **extra
):
    """A cell whose every scorer has the given per-prompt (concordant, discordant, pairs) and HH outcomes."""
    alpaca = counts(*map(list, zip(*prompts, strict=True)), [c > d for c, d, _ in prompts])
    scorers = ("reward_sum", "reward_per_token", "policy_ll_per_token")
    cell = {
        "k": k,
        "budget": "prompts",
        "seed": seed,
        "arm": arm,
        "config_key": "abc",
        "steps": 12,
        "prompts_seen": 48,
        "train_cpu_seconds": 100.0,
        "metrics": {"alpaca": {s: alpaca for s in scorers}, "hh": {s: hh for s in scorers}},
        "provenance": {
            "commit": "0123456789",
            "dirty": False,
            "versions": {"torch": "2", "transformers": "5", "trl": "1", "peft": "0"},
            "threads": 1,
            "command": f"python benchmarks/experiment_real_model.py cell --seed {seed} --arm {arm}",
        },
    }
    cell.update(extra)
    (folder / f"k{k}-prompts-seed{seed}-{arm}.json").write_text(json.dumps(cell))


def write_baseline(folder: Path, key: str = "abc"):
    trivial = counts([4, 5, 2, 6], [4, 3, 6, 2], [10, 9, 8, 10], [False, True, False, True])
    names = ("token_count", "reference_sum", "reference_per_token", "random")
    metrics = {"alpaca": {n: trivial for n in names}, "hh": {n: [1.0, 0.0, 0.5] for n in names}}
    (folder / "baseline.json").write_text(json.dumps({"config_key": key, "metrics": metrics}))


def grid(folder: Path, better_by: int = 0, seeds=range(5)):
    write_baseline(folder)
    base = [(4, 4, 10), (5, 3, 9), (2, 6, 8), (6, 2, 10)]
    for seed in seeds:
        shifted = [(c + seed % 2, d, n) for c, d, n in base]  # the seeds differ, the arms pair up
        write_cell(folder, "pairwise_random", seed, shifted, [1.0, 0.0, 0.0, 1.0])
        write_cell(folder, "mean", seed, shifted, [1.0, 0.0, 0.0, 1.0])
        write_cell(folder, "nca", seed, [(c + better_by, d - better_by, n) for c, d, n in shifted], [1.0] * 4)


def test_metrics_of_one_cell_count_ties_as_half(summary):
    c = counts([3, 1, 0], [1, 2, 0], [5, 4, 0], [True, False, True])
    assert summary.pair_accuracy(c, [0, 1, 2]) == pytest.approx((3 + 0.5 + 1 + 0.5) / 9)
    assert summary.pair_accuracy(c, [0, 0]) == pytest.approx(3.5 / 5)  # a bootstrap draw may repeat a prompt
    assert summary.kendall_tau(c, [0, 1, 2]) == pytest.approx(((3 - 1) / 5 + (1 - 2) / 4) / 2)  # no pairs: left out
    assert summary.top1(c, [0, 1, 2]) == pytest.approx(2 / 3)
    assert summary.hh_accuracy([1.0, 0.5, 0.0, 1.0], [0, 1, 3]) == pytest.approx(2.5 / 3)


def test_holm_matches_a_hand_worked_example(summary):
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, then max(0.06, 0.04·1) = 0.06
    assert summary.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_an_hh_outcome_other_than_0_half_or_1_is_refused_naming_the_file(summary, tmp_path):
    """The bootstrap's HH accuracy is an exact float sum of 0, ½ and 1: any other value is an error, not a drift."""
    grid(tmp_path, seeds=range(2))
    write_cell(tmp_path, "mean", 1, [(4, 4, 10), (5, 3, 9), (2, 6, 8), (6, 2, 10)], [1.0, 0.0, 0.3, 1.0])
    with pytest.raises(SystemExit, match=r"k7-prompts-seed1-mean\.json: metrics\.hh\.reward_sum holds values other"):
        summary.load(tmp_path)


def test_an_arm_equal_to_the_baseline_differs_by_exactly_zero_and_does_not_hold(summary, tmp_path):
    grid(tmp_path)
    _, cells = summary.load(tmp_path)
    table = cells[(7, "prompts")]
    result = summary.paired_bootstrap(table["mean"], table["pairwise_random"], summary.TESTED[0], random.Random(0))
    assert (result["delta"], result["low"], result["high"], result["p"]) == (0, 0, 0, 1.0)
    row = next(line for line in summary.difference_table(7, table) if line.startswith("| mean |"))
    assert row.count("| no") == 2


def test_an_arm_better_on_every_prompt_and_seed_holds(summary, tmp_path):
    grid(tmp_path, better_by=2)
    (tmp_path / "k7-prompts-seed4-pairwise_random.json").unlink()  # seed 4 is no longer paired
    _, cells = summary.load(tmp_path)
    table = cells[(7, "prompts")]
    result = summary.paired_bootstrap(table["nca"], table["pairwise_random"], summary.TESTED[0], random.Random(0))
    assert result["seeds"] == 4
    # every prompt gains 2 correct pairs (2 concordant more, 2 discordant fewer) of 10 + 9 + 8 + 10, on every seed
    expected = 4 * 2 / 37
    assert result["delta"] == pytest.approx(expected)
    assert 0 < result["low"] <= result["delta"] <= result["high"] and result["p"] == 0
    row = next(line for line in summary.difference_table(7, table) if line.startswith("| nca |"))
    assert "| < 0.001 | yes |" in row and row.startswith("| nca | 4 |")


def test_k3_is_compared_with_the_same_arm_at_k7_seed_by_seed(summary, tmp_path):
    grid(tmp_path)
    base = [(4, 4, 10), (5, 3, 9), (2, 6, 8), (6, 2, 10)]
    for seed in range(5):
        shifted = [(c + seed % 2, d, n) for c, d, n in base]  # as the K = 7 cells of `grid`
        write_cell(tmp_path, "pairwise_random", seed, shifted, [1.0, 0.0, 0.0, 1.0], k=3)
        write_cell(tmp_path, "mean", seed, [(c + 2, d - 2, n) for c, d, n in shifted], [1.0, 0.0, 0.0, 1.0], k=3)
    write_cell(tmp_path, "nca", 0, base, [1.0] * 4, k=3)  # one seed: no paired difference
    _, cells = summary.load(tmp_path)
    rows = {line.split(" | ")[0][2:]: line for line in summary.cross_k_table(cells)[2:]}
    assert list(rows) == ["pairwise_random", "mean", "nca"]
    assert rows["pairwise_random"].startswith("| pairwise_random | 5 | +0.000 [+0.000, +0.000] | 1.000 | no |")
    assert rows["mean"].startswith(f"| mean | 5 | {4 * 2 / 37:+.3f} [") and "| < 0.001 | yes |" in rows["mean"]
    assert rows["nca"] == "| nca | — | — | — | — | — | — | — |"
    assert "#### K = 3 against K = 7, equal prompts" in summary.summary(tmp_path)


def test_the_summary_is_the_same_bytes_twice_and_check_catches_one_digit(summary, tmp_path):
    (tmp_path / "results").mkdir()
    grid(tmp_path / "results", better_by=1)
    first, second = summary.summary(tmp_path / "results"), summary.summary(tmp_path / "results")
    assert first == second and "| nca | 5 |" in first
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{summary.BEGIN}\nold\n{summary.END}\n\nAfter.\n")
    assert summary.main([str(tmp_path / "results"), "--check", str(page)]) == 1
    assert summary.main([str(tmp_path / "results"), "--write", str(page)]) == 0
    assert summary.main([str(tmp_path / "results"), "--check", str(page)]) == 0
    assert page.read_text().endswith(f"{summary.END}\n\nAfter.\n") and first in page.read_text()
    text = page.read_text()
    digit = next(i for i, ch in enumerate(text) if ch.isdigit() and i > text.index("pair acc. per token"))
    page.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])
    assert summary.main([str(tmp_path / "results"), "--check", str(page)]) == 1
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="expected one line"):
        summary.main([str(tmp_path / "results"), "--check", str(page)])


def test_a_cell_of_another_configuration_is_refused_by_name(summary, tmp_path):
    grid(tmp_path)
    write_cell(tmp_path, "min", 0, [(1, 1, 2)], [1.0], config_key="other")
    with pytest.raises(SystemExit, match="k7-prompts-seed0-min.json: made with configuration other"):
        summary.load(tmp_path)
    write_cell(tmp_path, "min", 0, [(1, 1, 2)] * 4, [1.0])
    with pytest.raises(SystemExit, match="k7-prompts-seed0-min.json: its held-out pairs differ"):
        summary.load(tmp_path)


def test_the_summary_knows_the_harness_arms(summary):
    assert summary.ARMS == load("experiment_real_model").ARMS


def test_docs_experiments_page_matches_the_committed_results(summary):
    results = ROOT / "docs" / "experiments_real_model"
    if not (results / "baseline.json").exists():
        pytest.skip("no real-model results committed yet")
    assert summary.main([str(results), "--check", str(ROOT / "docs" / "experiments.md")]) == 0, (
        "docs/experiments.md differs from its results: python benchmarks/summarize_real_model.py --write "
        "docs/experiments.md"
    )
