"""The per-example gradient-weight record: `<output_dir>/grad_weights.jsonl`, one JSON line per row and step.

Written by `GradWeightDiagnostics` (with `grad_weight_record=True`), cut back to the resumed step on resume
(`GradWeightRecordCallback`), and read by `trl-dpo-ext report` (`trl_dpo_ext.report`), which refuses a record with
non-finite weights (`check_finite`).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


RECORD_FILENAME = "grad_weights.jsonl"


def record_path(output_dir: str | os.PathLike) -> Path:
    """Where the per-example record of a run lives: `output_dir/grad_weights.jsonl`."""
    return Path(output_dir) / RECORD_FILENAME


def _rounded(row: torch.Tensor, present: torch.Tensor | None = None) -> list[float | None]:
    # Six decimals keep a line short; padding (not `present`; NaN without a mask) is dropped, and a real pair's NaN or
    # infinite weight is written as null, which JSON can hold
    if present is None:
        present = ~torch.isnan(row)
    return [
        round(v, 6) if math.isfinite(v) else None for v, p in zip(row.tolist(), present.tolist(), strict=True) if p
    ]


def format_record(
    index: torch.Tensor,
    step: int,
    epoch: int,
    weights: torch.Tensor,
    effective: torch.Tensor,
    present: torch.Tensor | None = None,
) -> str:
    """JSON lines, one per row: `{"index", "step", "epoch", "grad_weight": [w_k], "grad_weight_eff": [e_k]}`, with
    one value per real pair (`present`, bool [N, K]; NaN marks padding without it) and null for a non-finite one."""
    lines = []
    masks = present.cpu() if present is not None else [None] * len(weights)
    for i, w, e, m in zip(index.tolist(), weights.cpu(), effective.cpu(), masks, strict=True):
        line = {
            "index": i,
            "step": step,
            "epoch": epoch,
            "grad_weight": _rounded(w, m),
            "grad_weight_eff": _rounded(e, m),
        }
        lines.append(json.dumps(line, separators=(",", ":")) + "\n")
    return "".join(lines)


def append_record(path: str | os.PathLike, text: str) -> None:
    """Append JSON lines to the record; opened and closed on each call, so a crash loses at most the current step."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)


def read_record(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a record. A last line cut short by a crash is skipped; any other bad line raises."""
    rows = []
    with open(path, encoding="utf-8") as file:
        lines = file.readlines()
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}, line {number}: not a JSON object: {line[:80]!r}.") from None
    return rows


def truncate_record(path: str | os.PathLike, max_step: int) -> int:
    """Drop the rows of steps after `max_step` (those a resumed run trains again); returns how many were dropped.

    Rows are written before their optimizer step is taken and saved, so after resuming from the checkpoint of
    `global_step = max_step`, the rows of later steps would otherwise appear twice. Rewritten atomically.
    """
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_record(path)
    kept = [row for row in rows if row["step"] <= max_step]
    with open(path, encoding="utf-8") as file:
        num_lines = sum(1 for _ in file)
    if len(kept) == num_lines:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in kept)
    os.replace(tmp, path)
    return num_lines - len(kept)


class GradWeightRecordCallback(TrainerCallback):
    """Starts the record of a run: at `train()` start, drops the rows of steps the run is about to train (again).

    A fresh run (`global_step = 0`) starts an empty record; a run resumed from a checkpoint keeps the rows up to the
    checkpoint's step. Only the main process touches the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_record(self.path, state.global_step)
            self.path.touch()


def nonfinite_rows(records: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Dataset row -> the recorded steps at which one of its weights was NaN or infinite (null in the record), or
    missing altogether (records of versions that dropped them)."""
    steps: dict[int, list[int]] = defaultdict(list)
    for r in records:
        weights = r["grad_weight"]
        if not weights or any(w is None or not math.isfinite(w) for w in weights):
            steps[r["index"]].append(r["step"])
    return dict(steps)


def _step_ranges(steps: list[int]) -> str:
    steps, ranges = sorted(set(steps)), []
    for step in steps:
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def check_finite(records: list[dict[str, Any]], path: str | os.PathLike = "the record") -> None:
    """Fail, naming each row and its steps, when the record holds non-finite weights: the run diverged there, and a
    ranking over them means nothing."""
    bad = nonfinite_rows(records)
    if not bad:
        return
    shown = [
        f"row {index} at step{'s' if len(steps) > 1 else ''} {_step_ranges(steps)}"
        for index, steps in sorted(bad.items())
    ]
    more = f"; and {len(shown) - 10} more rows" if len(shown) > 10 else ""
    raise ValueError(
        f"{path} has non-finite gradient weights (NaN or infinite: the training diverged) for {len(bad)} rows: "
        f"{'; '.join(shown[:10])}{more}. Rerun with a lower `learning_rate`; `DPOConfig(on_nonfinite='stop')`, the "
        "default, stops at the first such step."
    )
