"""Checks over the `scores` and reference log-prob columns of a prepared dataset (a row's own `scores` are checked
by `rows.check_scores`): the ranking convention's warnings, and precomputed reference log-probs given with the data.
Errors and warnings in the one message style of `rows.py`.
"""

from __future__ import annotations

import math
from typing import Any

from datasets import Dataset

from .rows import INDEX_COLUMN, first_rows


def rows_with_chosen_below(scores: list[list[float]]) -> list[int]:
    """Indices of the rows whose chosen is scored below at least one of its own rejected."""
    return [i for i, row in enumerate(scores) if any(value > row[0] for value in row[1:])]


def listed_order_warning(dataset_name: str) -> str:
    return (
        f"The {dataset_name} dataset has no 'scores' column: `rejected_reduction='plackett_luce'` takes each row's "
        "'rejected' list in its listed order as the ranking, best first. Add the scores (as "
        "`trl_dpo_ext.convert.rated_to_multi_rejected` does) to rank them by score."
    )


def scores_order_warnings(dataset: Dataset, dataset_name: str, reduction: str) -> list[str]:
    """The convention: a row's `rejected` are in rank order, best first, and its chosen is above them all.

    With a `scores` column, rows whose chosen is scored below one of its own rejected are counted in one warning
    (deliberate, perhaps, for `infonca`/`nca` targets; `plackett_luce` has already raised on the first). Without one,
    `plackett_luce` takes the listed order as the ranking, which one warning says.
    """
    if "scores" in dataset.column_names:
        rows = rows_with_chosen_below(dataset["scores"])
        if rows:
            return [
                f"{len(rows)} row(s) of the {dataset_name} dataset have a chosen scored below one of their own "
                f"rejected in column 'scores' ({first_rows(rows)}). They are trained as given: the chosen is still "
                "preferred to every rejected."
            ]
    elif reduction == "plackett_luce" and max(dataset["num_rejected"], default=1) > 1:
        return [listed_order_warning(dataset_name)]
    return []


def check_ref_logps(ref_chosen: Any, ref_rejected: Any, num_rejected: int, idx: int) -> None:
    """Precomputed reference log-probs of one row: one finite float for the chosen, one per rejected."""
    if not isinstance(ref_chosen, (int, float)) or not math.isfinite(ref_chosen):
        raise ValueError(f"Row {idx}, column 'ref_chosen_logps': expected a finite float, got {ref_chosen!r}.")
    values = ref_rejected if isinstance(ref_rejected, list) else [ref_rejected]
    if len(values) < num_rejected:
        raise ValueError(
            f"Row {idx}, column 'ref_rejected_logps': expected {num_rejected} values (one per rejected), got "
            f"{len(values)}."
        )
    for k, value in enumerate(values[:num_rejected]):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"Row {idx}, column 'ref_rejected_logps': expected a finite float for rejected {k}, got {value!r}."
            )


def check_ref_logps_columns(dataset: Dataset, name: str) -> None:
    """The precomputed reference log-probs of every row of a prepared dataset (`check_ref_logps`)."""
    columns = zip(dataset["ref_chosen_logps"], dataset["ref_rejected_logps"], dataset["rejected_ids"], strict=True)
    # Rows are named by their position in the dataset given to the trainer, before any was dropped
    indices = dataset[INDEX_COLUMN] if INDEX_COLUMN in dataset.column_names else range(len(dataset))
    for idx, (ref_chosen, ref_rejected, rejected_ids) in zip(indices, columns, strict=True):
        try:
            check_ref_logps(ref_chosen, ref_rejected, len(rejected_ids), idx)
        except ValueError as error:
            raise ValueError(f"{error} (in the {name} dataset)") from None
