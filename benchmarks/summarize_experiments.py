"""Markdown tables of the JSON of `experiment_losses.py`, one per budget: mean ± half-range over the seeds.

    python benchmarks/summarize_experiments.py docs/experiments_sort.json
    python benchmarks/summarize_experiments.py docs/experiments_alpacaeval.json

The last column compares each arm's range over the seeds [min, max] of the first metric with that of the arm of the
best mean: `best`, `overlaps` (the seeds cannot tell them apart) or `below` (every seed of it is under every seed of
the best arm); `—` with one seed. The paired column is the mean over the seeds of (arm − best arm) on the first
metric, each seed's arms sharing one SFT reference, and on how many seeds the arm is lower. `stock_pairs` rows are the (chosen, rejected_k) pairs expanded from the K-lists.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


METRICS = {
    "sort": (("greedy_reward", "greedy reward"), ("accuracy", "held-out pref. accuracy")),
    "alpacaeval": (("kendall_tau", "Kendall τ vs judge"), ("top1", "top-1")),
}


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def table(result: dict, budget: str) -> str:
    metrics = METRICS[result["part"]]
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in result["runs"]:
        if run["budget"] in (budget, "none"):
            groups[run["arm"]].append(run)
    first = metrics[0][0]
    ranges = {arm: [r[first] for r in runs] for arm, runs in groups.items() if arm != "sft"}
    best = max(ranges, key=lambda arm: statistics.mean(ranges[arm])) if ranges else None
    by_seed = {arm: {r["seed"]: r[first] for r in runs} for arm, runs in groups.items()}
    header = "| arm | K per row | steps | prompts/step | train s | " + " | ".join(m[1] for m in metrics)
    lines = [header + " | seeds | vs best | Δ vs best, paired |", "|---" * (len(metrics) + 8) + "|"]
    for arm, runs in groups.items():
        if arm == "sft":
            steps = k = prompts = seconds = "—"
        else:
            k = f"{statistics.mean(r['mean_k'] for r in runs):.2f}"
            steps = f"{statistics.mean(r['steps'] for r in runs):.0f}"
            prompts = str(runs[0]["prompts_per_step"])
            seconds = f"{statistics.mean(r['train_seconds'] for r in runs):.1f}"
            shared = sum(bool(r.get("prefix_sharing")) for r in runs)
            if shared:
                prompts += f" (shared in {shared}/{len(runs)})"
        verdict = "—"
        if arm in ranges and len(runs) > 1:
            verdict = "best" if arm == best else "overlaps" if max(ranges[arm]) >= min(ranges[best]) else "below"
        paired = "—"
        if arm in ranges and arm != best and len(runs) > 1:
            seeds = sorted(set(by_seed[arm]) & set(by_seed[best]))
            deltas = [by_seed[arm][s] - by_seed[best][s] for s in seeds]
            paired = f"{statistics.mean(deltas):+.3f} (lower in {sum(d < 0 for d in deltas)}/{len(deltas)})"
        metric_cells = " | ".join(cell([r[m] for r in runs]) for m, _ in metrics)
        row = (
            f"| {arm} | {k} | {steps} | {prompts} | {seconds} | {metric_cells} | {len(runs)} | {verdict} | {paired} |"
        )
        lines.append(row)
    return "\n".join(lines)


def main(path: str) -> None:
    result = json.load(open(path))
    config = result["config"]
    print(f"Configuration: {json.dumps(config)}\n")
    for seed, calibration in sorted(result.get("calibration", {}).items()):
        per_step = ", ".join(
            f"{arm} {c['seconds_per_step']:.3f}" for arm, c in calibration.items() if isinstance(c, dict)
        )
        speedup = calibration.get("prefix_sharing_speedup", 1.0)
        print(f"Seed {seed}, seconds per step: {per_step}; prefix sharing ×{speedup:.2f} on the K-list batch\n")
    for budget, title in (("sequences", "Equal forwarded sequences"), ("wall", "Equal wall-clock")):
        if not any(run["budget"] == budget for run in result["runs"]):
            continue
        print(f"{title} ({budget}):\n")
        print(table(result, budget) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
