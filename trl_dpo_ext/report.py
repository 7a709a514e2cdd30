"""Report of a gradient-weight record: the rows whose weight σ(r̂_l − r̂_w) stays high, likely mislabeled or
contradictory preference pairs.

Reads the `grad_weights.jsonl` that `DPOConfig(grad_weight_record=True)` writes (see `trl_dpo_ext.diagnostics`) and
writes, under `output_dir`:

- `grad_weights.png`: the distribution of the pair weights w over the training steps (median, 25–75% and 10–90%
  bands, mean), and the histogram of each row's mean weight over the last part of training;
- `grad_weights_ranking.csv`: every row of the dataset seen in training, ranked by its mean weight over the last
  `last_fraction` of the steps, highest first, with its prompt, chosen and rejected text when the dataset is given.

A row's weight at a step is the mean of w over its K rejected. A row the model keeps getting wrong late in training,
while the rest are learned, is one whose label contradicts what the rest of the data teaches.

Command (the `report` subcommand of the `trl-dpo-ext` CLI dispatches here):

    trl-dpo-ext report out/grad_weights.jsonl --dataset train.jsonl --output-dir out/report
    python -m trl_dpo_ext.report out --top-fraction 0.1 --last-fraction 0.5
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .grad_weight_record import RECORD_FILENAME, check_finite, read_record


FIGURE_FILENAME = "grad_weights.png"
TABLE_FILENAME = "grad_weights_ranking.csv"
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
# A row's mean weight over fewer observations than this is one draw, not a trend
MIN_OBSERVATIONS = 2


def _import_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "The gradient-weight report draws its figure with matplotlib, which is not installed. Install it with "
            "`pip install 'trl-dpo-ext[plot]'`."
        ) from error
    return Figure


def _resolve_record(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No gradient-weight record at {path}. Train with `DPOConfig(grad_weight_record=True)`; the record is "
            f"written to `<output_dir>/{RECORD_FILENAME}`."
        )
    return path


RECORD_KEYS = ("index", "step", "grad_weight")
EXPECTED_RECORD = (
    "expected the JSON lines that `DPOConfig(grad_weight_record=True)` writes, one object per row and step with keys "
    '"index", "step", "epoch", "grad_weight" and "grad_weight_eff"'
)


def load_record(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a gradient-weight record; a file that is not one (a figure, a CSV, other JSON) is an error that says
    what was expected and what was found."""
    path = _resolve_record(path)
    with open(path, "rb") as file:
        head = file.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        if len(head) < 4096 or b"\0" in head:  # not a text cut mid-character by the 4096 bytes
            raise ValueError(f"{path} is not a gradient-weight record: {EXPECTED_RECORD}; got binary data.") from None
    try:
        records = read_record(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a gradient-weight record: {EXPECTED_RECORD}; got {error}") from None
    for number, record in enumerate(records, start=1):
        missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(
                f"{path} is not a gradient-weight record: {EXPECTED_RECORD}; line {number} has no {missing}."
            )
    return records


def _load_dataset(dataset: Any) -> Any:
    """A `datasets.Dataset` or a list of dicts as given, or the `train` split of a path (see `load_preference_dataset`)."""
    if dataset is None or not isinstance(dataset, (str, os.PathLike)):
        return dataset
    from .convert import load_preference_dataset

    return load_preference_dataset(dataset, split="train")


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _nan_to_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def rank_rows(records: list[dict[str, Any]], last_fraction: float = 0.5) -> tuple[list[dict[str, Any]], int]:
    """Per dataset row, its mean weight over the last `last_fraction` of the recorded steps (and other summaries),
    ranked highest first; rows not seen in that window come last. Returns the ranking and the window's first step.

    The window is the steps `s > first − 1 + (1 − last_fraction)·(last − first + 1)` of the record's step range.
    """
    if not 0 < last_fraction <= 1:
        raise ValueError(f"`last_fraction` must be in (0, 1], got {last_fraction}.")
    first_step = min(r["step"] for r in records)
    last_step = max(r["step"] for r in records)
    window_start = math.floor(first_step - 1 + (1 - last_fraction) * (last_step - first_step + 1)) + 1

    per_row: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    check_finite(records)
    for r in records:
        w, e = _mean(r["grad_weight"]), _mean(r.get("grad_weight_eff") or [])
        row = per_row[r["index"]]
        row["all"].append(w)
        row["steps"].append(r["step"])
        if r["step"] >= window_start:
            row["window"].append(w)
            row["window_eff"].append(e)

    ranking = []
    for index, row in per_row.items():
        order = max(range(len(row["steps"])), key=row["steps"].__getitem__)
        ranking.append(
            {
                "index": index,
                "mean_grad_weight": _mean(row["window"]),
                "mean_grad_weight_eff": _mean(row["window_eff"]),
                "observations": len(row["window"]),
                "mean_grad_weight_all_steps": _mean(row["all"]),
                "last_grad_weight": row["all"][order],
                "last_step": row["steps"][order],
            }
        )
    # Highest window mean first; rows without an observation in the window (NaN) last
    ranking.sort(key=lambda r: (math.isnan(r["mean_grad_weight"]), -_nan_to_zero(r["mean_grad_weight"]), r["index"]))
    for rank, row in enumerate(ranking, start=1):
        row["rank"] = rank
    return ranking, window_start


def thin_ranking_warning(ranking: list[dict[str, Any]], window_start: int) -> str | None:
    """A warning when most ranked rows have fewer than `MIN_OBSERVATIONS` weights in the ranking window, each then
    ranked on one draw of a noisy quantity; None otherwise."""
    observed = [r["observations"] for r in ranking if r["observations"]]
    thin = sum(n < MIN_OBSERVATIONS for n in observed)
    if not observed or 2 * thin <= len(observed):
        return None
    return (
        f"{thin} of the {len(observed)} ranked rows rest on fewer than {MIN_OBSERVATIONS} observations (recorded steps "
        f"≥ {window_start} that saw them): their ranking is mostly noise. Train for more epochs over the data, or "
        "widen the window (`--last-fraction`)."
    )


def step_quantiles(records: list[dict[str, Any]], quantiles: Sequence[float]) -> tuple[list[int], torch.Tensor]:
    """The steps of the record and, for each, the `quantiles` and mean of its pair weights w: [S, len(quantiles) + 1]."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in records:
        by_step[r["step"]].extend(r["grad_weight"])
    steps = sorted(by_step)
    q = torch.tensor(list(quantiles), dtype=torch.float64)
    table = torch.stack(
        [
            torch.cat([torch.quantile(v, q), v.mean()[None]])
            for v in (torch.tensor(by_step[s], dtype=torch.float64) for s in steps)
        ]
    )
    return steps, table


def _draw(
    path: Path,
    records: list[dict[str, Any]],
    ranking: list[dict[str, Any]],
    window_start: int,
    top: int,
    highlight: set[int] | None = None,
) -> None:
    Figure = _import_matplotlib()
    steps, table = step_quantiles(records, (0.1, 0.25, 0.5, 0.75, 0.9))
    figure = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    over_steps, histogram = figure.subplots(1, 2)

    over_steps.fill_between(steps, table[:, 0], table[:, 4], alpha=0.2, color="C0", label="10–90%")
    over_steps.fill_between(steps, table[:, 1], table[:, 3], alpha=0.35, color="C0", label="25–75%")
    over_steps.plot(steps, table[:, 2], color="C0", label="median")
    over_steps.plot(steps, table[:, 5], color="C1", linestyle="--", label="mean")
    over_steps.axvline(window_start - 0.5, color="grey", linestyle=":", label="ranking window")
    over_steps.set(
        xlabel="step", ylabel=r"$w = \sigma(\hat r_l - \hat r_w)$", ylim=(0, 1), title="Pair weights over training"
    )
    over_steps.legend(loc="upper right", fontsize="small")

    means = [r["mean_grad_weight"] for r in ranking if not math.isnan(r["mean_grad_weight"])]
    if highlight:
        marked = [r["mean_grad_weight"] for r in ranking if r["index"] in highlight and r["observations"]]
        others = [r["mean_grad_weight"] for r in ranking if r["index"] not in highlight and r["observations"]]
        labels = [f"other rows ({len(others)})", f"highlighted rows ({len(marked)})"]
        histogram.hist([others, marked], bins=40, range=(0, 1), color=["C0", "C3"], stacked=True, label=labels)
    else:
        histogram.hist(means, bins=40, range=(0, 1), color="C0")
    if 0 < top <= len(means):
        histogram.axvline(means[top - 1], color="k", linestyle="--", label=f"top {top} rows")
        histogram.legend(loc="upper right", fontsize="small")
    histogram.set(
        xlabel=f"row mean of w over steps ≥ {window_start}", ylabel="rows", title="Per-row mean weight", yscale="log"
    )
    figure.savefig(path)


def write_report(
    record_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset: Any = None,
    top_fraction: float = 0.1,
    last_fraction: float = 0.5,
    highlight: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write the figure and the ranked table of a gradient-weight record (see the module docstring).

    Args:
        record_path: the `grad_weights.jsonl`, or the training `output_dir` that holds it.
        output_dir: folder of `grad_weights.png` and `grad_weights_ranking.csv` (created if needed).
        dataset: the training dataset as given to the trainer (a `datasets.Dataset`, a list of dicts, or the path of a
            JSON/JSONL/CSV/Parquet file or `save_to_disk` folder), to add each row's text to the table. Optional.
        top_fraction: share of the ranked rows flagged `top` in the table and marked on the histogram.
        last_fraction: share of the recorded steps, the last ones, over which a row's weight is averaged.
        highlight: dataset indices drawn apart in the histogram, e.g. rows known to be mislabeled. Optional.

    Returns:
        `{"figure", "table"}` (paths), `"num_rows"`, `"num_records"`, `"steps"` ([first, last]), `"window_start"`,
        `"top_indices"` (dataset indices of the top rows, highest first), `"ranking"` (the table's rows; `observations`
        is the number of weights a row's mean is over) and `"warning"` (when most rows rest on fewer than
        `MIN_OBSERVATIONS` of them, else None; also raised as a `UserWarning`).
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"`top_fraction` must be in (0, 1], got {top_fraction}.")
    _import_matplotlib()  # fail before any work if the figure cannot be drawn
    path = _resolve_record(record_path)
    records = load_record(path)
    if not records:
        raise ValueError(f"The record {path} is empty: no training step was recorded.")
    check_finite(records, path)
    ranking, window_start = rank_rows(records, last_fraction)
    dataset = _load_dataset(dataset)
    if dataset is not None:
        for row in ranking:
            if row["index"] >= len(dataset):
                raise ValueError(
                    f"Record row index {row['index']} is outside the dataset ({len(dataset)} rows): pass the dataset "
                    "the run trained on, as it was given to the trainer."
                )
            example = dataset[row["index"]]
            row.update({column: _text(example.get(column)) for column in TEXT_COLUMNS})

    observed = sum(not math.isnan(r["mean_grad_weight"]) for r in ranking)
    top = max(1, round(top_fraction * observed)) if observed else 0
    warning = thin_ranking_warning(ranking, window_start)
    if warning is not None:
        warnings.warn(warning, stacklevel=2)
    for row in ranking:
        row["top"] = row["rank"] <= top

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table_path, figure_path = output_dir / TABLE_FILENAME, output_dir / FIGURE_FILENAME
    columns = ["rank", "index", "top", "mean_grad_weight", "mean_grad_weight_eff", "observations"]
    columns += ["mean_grad_weight_all_steps", "last_grad_weight", "last_step"]
    columns += list(TEXT_COLUMNS) if dataset is not None else []
    with open(table_path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in ranking:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    _draw(figure_path, records, ranking, window_start, top, set(highlight) if highlight is not None else None)

    steps = [r["step"] for r in records]
    return {
        "figure": str(figure_path),
        "table": str(table_path),
        "num_rows": len(ranking),
        "num_records": len(records),
        "steps": [min(steps), max(steps)],
        "window_start": window_start,
        "top_indices": [r["index"] for r in ranking[:top]],
        "ranking": ranking,
        "warning": warning,
    }


def make_parser(prog: str = "trl-dpo-ext report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Figure and ranked table of a gradient-weight record (DPOConfig(grad_weight_record=True)): the "
        "rows whose weight σ(r̂_l − r̂_w) stays high late in training, likely mislabeled or contradictory.",
    )
    parser.add_argument("record", help=f"the {RECORD_FILENAME} file, or the training output_dir that holds it")
    parser.add_argument(
        "--output-dir", default=None, help="where to write the figure and the table (default: the record's folder)"
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="the training dataset (JSON/JSONL/CSV/Parquet file or save_to_disk folder), to add each row's text",
    )
    parser.add_argument("--top-fraction", type=float, default=0.1, help="share of rows flagged as top (default 0.1)")
    parser.add_argument(
        "--last-fraction",
        type=float,
        default=0.5,
        help="share of the steps, the last ones, over which each row's weight is averaged (default 0.5)",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (default: one line)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        output_dir = args.output_dir or _resolve_record(args.record).parent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # printed below, with the ranking it is about
            result = write_report(args.record, output_dir, args.dataset, args.top_fraction, args.last_fraction)
    except Exception as error:  # one line, not a traceback (`--debug` for it)
        if args.debug:
            raise
        parser.exit(1, f"{parser.prog}: error: {error} (--debug for the traceback)\n")
    print(f"Figure: {result['figure']}")
    print(f"Table:  {result['table']} ({result['num_rows']} rows, steps {result['steps'][0]}–{result['steps'][1]})")
    print(f"Top {len(result['top_indices'])} rows by mean weight over steps ≥ {result['window_start']}:")
    for row in result["ranking"][: min(10, len(result["top_indices"]))]:
        n = row["observations"]
        print(f"  row {row['index']}: {row['mean_grad_weight']:.3f} ({n} observation{'s' if n != 1 else ''})")
    if result["warning"] is not None:
        print(f"Warning: {result['warning']}")


if __name__ == "__main__":
    main()
