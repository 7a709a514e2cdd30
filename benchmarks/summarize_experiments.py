"""Summarise the JSON of `experiment_losses.py --part sort` as a markdown table: mean ± spread over the seeds.

python benchmarks/summarize_experiments.py docs/experiments_sort.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    result = json.load(open(path))
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for run in result["runs"]:
        groups[(run["arm"], run["k"])].append(run)
    print(f"{result['steps']} steps × {result['sequences_per_step']} policy sequences per step, {len(groups)} arms\n")
    print("| arm | K (mean K kept) | greedy reward | held-out pref. accuracy | seeds |")
    print("|---|---|---|---|---|")
    for (arm, k), runs in groups.items():
        cells = []
        for key in ("greedy_reward", "accuracy"):
            values = [r[key] for r in runs]
            spread = (max(values) - min(values)) / 2
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        mean_k = statistics.mean(r.get("mean_k", 0) for r in runs)
        print(f"| {arm} | {k} ({mean_k:.2f}) | {cells[0]} | {cells[1]} | {len(runs)} |")


if __name__ == "__main__":
    main(sys.argv[1])
