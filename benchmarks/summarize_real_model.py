"""The tables of docs/experiments.md, made from the cells of `experiment_real_model.py`.

    python benchmarks/summarize_real_model.py [RESULTS_DIR]                 # markdown to stdout
    python benchmarks/summarize_real_model.py --check docs/experiments.md   # exit 1, with a diff, if the page differs
    python benchmarks/summarize_real_model.py --write docs/experiments.md   # replace the page's block

The block lies between the lines `<!-- summarize_real_model:begin -->` and `<!-- summarize_real_model:end -->`.
Per cell: pairwise accuracy pooled over judge-separated held-out pairs (a tie of the score counts ½), Kendall τ per
prompt averaged, top-1, and HH accuracy. Per (K, budget): mean ± sample standard deviation over seeds, and the paired
difference of each arm to `pairwise_random`: its mean over the common seeds, a 95% interval by a paired bootstrap over
seeds and prompts (each of 2,000 replicates draws the common seeds and the held-out prompts, or HH pairs, with
replacement, the same prompts for both arms and every seed of it; percentile interval), a two-sided bootstrap p-value
(twice the smaller share of replicates on either side of 0) and Holm's step-down correction over the arms of the
table. A second table compares the other ways of training on the whole list to the default `mean`; a last one each
K = 3 arm to the same arm at K = 7 (equal prompts: the same prompts, in the same order, for both). Standard library
only; the output is the same bytes on every run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path


ARMS = {
    7: (
        "pairwise_random",
        "pairwise_best",
        "pairwise_mu2sigma",
        "stock_pairs",
        "mean",
        "min",
        "softmax",
        "plackett_luce",
        "nca",
        "hardest_1",
        "hardest_2",
        "sampled_2",
    ),
    3: ("pairwise_random", "stock_pairs", "mean", "min", "softmax", "plackett_luce", "nca"),
}
BUDGETS = {"prompts": "equal prompts", "cpu": "equal CPU seconds"}
BASELINE = "pairwise_random"
# The default `rejected_reduction`, against which the other ways of training on a list are compared too
DEFAULT = "mean"
LIST_ARMS = ("stock_pairs", "min", "softmax", "plackett_luce", "nca", "hardest_1", "hardest_2", "sampled_2")
MIN_SEEDS = 5
REPLICATES = 2000
BEGIN, END = "<!-- summarize_real_model:begin -->", "<!-- summarize_real_model:end -->"
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "experiments_real_model"


# ------------------------------------------------------------------------------------------- metrics of one cell


def pair_accuracy(counts: dict, idx: list[int]) -> float:
    # Concordant pairs count 1 and ties ½: (pairs + concordant − discordant) / 2, summed over the prompts in integers
    pairs, concordant, discordant = (
        sum(map(counts[key].__getitem__, idx)) for key in ("pairs", "concordant", "discordant")
    )
    return (pairs + concordant - discordant) / 2 / pairs


def kendall_tau(counts: dict, idx: list[int]) -> float:
    taus = [
        (counts["concordant"][i] - counts["discordant"][i]) / counts["pairs"][i] for i in idx if counts["pairs"][i]
    ]
    return statistics.mean(taus)


def top1(counts: dict, idx: list[int]) -> float:
    return statistics.mean(float(counts["top1"][i]) for i in idx)


def hh_accuracy(values: list[float], idx: list[int]) -> float:
    # The values are 0, ½ or 1 (`load` checks): their float sum is exact, so one division is statistics.mean's value
    return sum(map(values.__getitem__, idx)) / len(idx)


# (column title, data set, scorer, metric)
COLUMNS = (
    ("pair acc. per token", "alpaca", "reward_per_token", pair_accuracy),
    ("τ per token", "alpaca", "reward_per_token", kendall_tau),
    ("top-1 per token", "alpaca", "reward_per_token", top1),
    ("pair acc. summed", "alpaca", "reward_sum", pair_accuracy),
    ("pair acc. policy log-lik. per token", "alpaca", "policy_ll_per_token", pair_accuracy),
    ("HH acc. summed", "hh", "reward_sum", hh_accuracy),
    ("HH acc. per token", "hh", "reward_per_token", hh_accuracy),
)
# The differences tested: the primary, length-controlled metric, and the independent HH set
TESTED = (COLUMNS[0], COLUMNS[5])


def metric(cell: dict, column, idx: list[int] | None = None) -> float:
    _, data, scorer, fn = column
    values = cell["metrics"][data][scorer]
    size = len(values) if data == "hh" else len(values["pairs"])
    return fn(values, list(range(size)) if idx is None else idx)


# --------------------------------------------------------------------------------------------------- statistics


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_bootstrap(arm: dict[int, dict], base: dict[int, dict], column, rng: random.Random) -> dict | None:
    """Mean paired difference (arm − baseline) over the common seeds, its 95% percentile interval and p-value."""
    seeds = sorted(set(arm) & set(base))
    if len(seeds) < 2:
        return None
    data, scorer = column[1], column[2]
    values = arm[seeds[0]]["metrics"][data][scorer]
    size = len(values) if data == "hh" else len(values["pairs"])
    everything = list(range(size))
    delta = statistics.mean(metric(arm[s], column, everything) - metric(base[s], column, everything) for s in seeds)
    replicates = []
    for _ in range(REPLICATES):
        drawn = [rng.choice(seeds) for _ in seeds]
        idx = [rng.randrange(size) for _ in range(size)]
        # A seed drawn twice has one difference: computed once (the bootstrap's cost is these metrics)
        difference = {s: metric(arm[s], column, idx) - metric(base[s], column, idx) for s in set(drawn)}
        replicates.append(statistics.mean(difference[s] for s in drawn))
    replicates.sort()
    low, high = replicates[int(0.025 * REPLICATES)], replicates[int(0.975 * REPLICATES) - 1]
    below = sum(r <= 0 for r in replicates) / REPLICATES
    above = sum(r >= 0 for r in replicates) / REPLICATES
    return {"seeds": len(seeds), "delta": delta, "low": low, "high": high, "p": min(1.0, 2 * min(below, above))}


# ------------------------------------------------------------------------------------------------------ reading


def check_hh_values(cell: dict, path: Path) -> None:
    """HH accuracies are per pair: 1 right, 0 wrong, ½ a tie (what `hh_accuracy`'s exact sum relies on)."""
    for scorer, values in cell["metrics"]["hh"].items():
        if not set(values) <= {0.0, 0.5, 1.0}:
            raise SystemExit(f"{path}: metrics.hh.{scorer} holds values other than 0, 0.5 and 1")


def load(results: Path) -> tuple[dict, dict]:
    """(baseline, cells by (K, budget) → arm → seed → cell); cells of another configuration are refused."""
    baseline = json.loads((results / "baseline.json").read_text())
    check_hh_values(baseline, results / "baseline.json")
    cells: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(results.glob("k*.json")):
        cell = json.loads(path.read_text())
        if cell["config_key"] != baseline["config_key"]:
            raise SystemExit(
                f"{path}: made with configuration {cell['config_key']}, baseline.json with {baseline['config_key']}; "
                "move one of them out of the folder."
            )
        # The bootstrap pairs prompts across cells: every cell must score the same judge-separated pairs
        pairs = cell["metrics"]["alpaca"]["reward_per_token"]["pairs"]
        if pairs != next(iter(baseline["metrics"]["alpaca"].values()))["pairs"]:
            raise SystemExit(f"{path}: its held-out pairs differ from baseline.json's")
        check_hh_values(cell, path)
        cells[(cell["k"], cell["budget"])][cell["arm"]][cell["seed"]] = cell
    return baseline, cells


# ------------------------------------------------------------------------------------------------------- tables


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def p_text(p: float) -> str:
    return "< 0.001" if p == 0 else f"{p:.3f}"


def status(cells: dict) -> list[str]:
    seeds = {seed for table in cells.values() for arm in table.values() for seed in arm}
    planned = max(MIN_SEEDS, len(seeds))
    lines = []
    for k in ARMS:
        for budget in BUDGETS:
            done = sum(len(cells.get((k, budget), {}).get(arm, {})) for arm in ARMS[k])
            lines.append(
                f"- K = {k}, {budget}: {done} of {len(ARMS[k]) * planned} cells ({len(ARMS[k])} arms × {planned} seeds)"
            )
    return lines


def trivial_table(baseline: dict) -> list[str]:
    alpaca, hh = baseline["metrics"]["alpaca"], baseline["metrics"]["hh"]
    any_scorer = next(iter(alpaca.values()))
    prompts, pairs = len(any_scorer["pairs"]), sum(any_scorer["pairs"])
    lines = [
        f"Trivial rankers (held-out AlpacaEval: {prompts} prompts, {pairs} judge-separated pairs; HH-RLHF harmless: "
        f"{len(next(iter(hh.values())))} pairs):",
        "",
        "| ranker | pair acc. | τ | top-1 | HH acc. |",
        "|---|---|---|---|---|",
    ]
    for name, counts in alpaca.items():
        everything = list(range(len(counts["pairs"])))
        hh_values = hh[name]
        lines.append(
            f"| {name} | {pair_accuracy(counts, everything):.3f} | {kendall_tau(counts, everything):.3f} | "
            f"{top1(counts, everything):.3f} | {hh_accuracy(hh_values, list(range(len(hh_values)))):.3f} |"
        )
    return lines


def arm_table(k: int, budget: str, table: dict) -> list[str]:
    titles = " | ".join(c[0] for c in COLUMNS)
    lines = [
        f"| arm | seeds | steps | prompts seen | train CPU-s | {titles} |",
        "|---" * (5 + len(COLUMNS)) + "|",
    ]
    for arm in ARMS[k]:
        runs = [table[arm][s] for s in sorted(table.get(arm, {}))]
        if not runs:
            continue
        cells = " | ".join(mean_std([metric(r, c) for r in runs]) for c in COLUMNS)
        lines.append(
            f"| {arm} | {len(runs)} | {statistics.mean(r['steps'] for r in runs):.1f} | "
            f"{statistics.mean(r['prompts_seen'] for r in runs):.0f} | "
            f"{statistics.mean(r['train_cpu_seconds'] for r in runs):.0f} | {cells} |"
        )
    return lines


def difference_table(k: int, table: dict, baseline: str = BASELINE) -> list[str]:
    base = table.get(baseline, {})
    arms = [arm for arm in ARMS[k] if arm != baseline and arm in table and (baseline == BASELINE or arm in LIST_ARMS)]
    lines = tested_table({arm: (table[arm], base) for arm in arms})
    return lines or [f"(No arm has 2 seeds paired with `{baseline}` yet.)"]


def cross_k_table(cells: dict) -> list[str]:
    """Each arm of K = 3 against the same arm at K = 7, equal prompts: the same seeds train on the same prompts in
    the same order from the same adapter initialisation, so the difference is the list (the three lowest-rated
    against all seven); for `pairwise_random` it is the choice of the one rejected (among the three or the seven)."""
    short, full = cells.get((3, "prompts"), {}), cells.get((7, "prompts"), {})
    lines = tested_table({arm: (short[arm], full[arm]) for arm in ARMS[3] if arm in short and arm in full})
    return lines or ["(No arm has 2 seeds at both K yet.)"]


def tested_table(pairs: dict[str, tuple[dict, dict]]) -> list[str]:
    """A row per name: the paired difference (first − second, cells by seed) of each TESTED metric, Holm over the
    rows of a metric; no lines where no row has 2 common seeds."""
    rng = random.Random(0)
    results = {
        column[0]: {name: paired_bootstrap(arm, base, column, rng) for name, (arm, base) in pairs.items()}
        for column in TESTED
    }
    adjusted = {}
    for title, by_name in results.items():
        tested = [name for name in pairs if by_name[name] is not None]
        adjusted[title] = dict(zip(tested, holm([by_name[name]["p"] for name in tested]), strict=True))
    if not any(adjusted.values()):
        return []
    head = " | ".join(f"Δ {t} [95% CI] | p | holds (Holm, 5%)" for t in results)
    lines = [f"| arm | seeds | {head} |", "|---" * (2 + 3 * len(results)) + "|"]
    for name in pairs:
        parts, seeds = [], "—"
        for title, by_name in results.items():
            r = by_name[name]
            if r is None:
                parts.append("— | — | —")
                continue
            seeds = str(r["seeds"])
            holds = "yes" if adjusted[title][name] < 0.05 else "no"
            parts.append(f"{r['delta']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | {p_text(r['p'])} | {holds}")
        lines.append(f"| {name} | {seeds} | {' | '.join(parts)} |")
    return lines


def provenance(cells: dict) -> list[str]:
    runs = [cell for table in cells.values() for arm in table.values() for cell in arm.values()]
    if not runs:
        return []
    commits = sorted({(r["provenance"]["commit"][:7], r["provenance"]["dirty"]) for r in runs})
    keys = ("torch", "transformers", "trl", "peft")
    versions = sorted({tuple(r["provenance"]["versions"][key] for key in keys) for r in runs})
    threads = sorted({r["provenance"]["threads"] for r in runs})
    first = min(
        runs, key=lambda r: (-r["k"], list(BUDGETS).index(r["budget"]), r["seed"], ARMS[r["k"]].index(r["arm"]))
    )
    return [
        "Provenance: commits "
        + ", ".join(f"`{c}`{' (uncommitted changes)' if dirty else ''}" for c, dirty in commits)
        + "; "
        + "; ".join(", ".join(f"{key} {v}" for key, v in zip(keys, vs, strict=True)) for vs in versions)
        + f"; {', '.join(map(str, threads))} thread(s) per process. Rerun a cell with the command in its JSON, e.g. "
        f"`{first['provenance']['command']}`.",
    ]


def summary(results: Path = RESULTS) -> str:
    baseline, cells = load(results)
    lines = ["Grid status:", "", *status(cells), "", *trivial_table(baseline)]
    for k in ARMS:
        for budget, title in BUDGETS.items():
            table = cells.get((k, budget))
            if not table:
                continue
            lines += ["", f"#### K = {k}, {title}", "", *arm_table(k, budget, table)]
            for baseline in (BASELINE, DEFAULT):
                lines += ["", f"Paired differences to `{baseline}` (K = {k}, {title}):", ""]
                lines += difference_table(k, table, baseline)
    if (3, "prompts") in cells:
        lines += ["", "#### K = 3 against K = 7, equal prompts", "", "Each K = 3 arm minus the same arm at K = 7:", ""]
        lines += cross_k_table(cells)
    lines += ["", *provenance(cells)]
    return "\n".join(lines) + "\n"


def replace_block(page: str, block: str, path: Path) -> str:
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise SystemExit(f"{path}: expected one line {BEGIN} and, after it, one line {END}")
    head, rest = page.split(BEGIN + "\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(RESULTS))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", metavar="PAGE", help="Exit 1 if the page's block differs from the results.")
    group.add_argument("--write", metavar="PAGE", help="Replace the page's block.")
    args = parser.parse_args(argv)
    block = summary(Path(args.results))
    if not (args.check or args.write):
        sys.stdout.write(block)
        return 0
    path = Path(args.check or args.write)
    page = path.read_text()
    new = replace_block(page, block, path)
    if args.write:
        path.write_text(new)
        return 0
    if new != page:
        sys.stdout.writelines(difflib.unified_diff(page.splitlines(True), new.splitlines(True), str(path), "results"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
