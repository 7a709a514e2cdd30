"""Make one-chosen, K-rejected rows from the preference data that exists.

- `rated_to_multi_rejected`: rows with several rated responses (UltraFeedback, AlpacaEval, Best-of-n samples; e.g.
  `{"instruction": ..., "completions": [{"output": ..., "score": ...}, ...]}`) to one chosen, the best-rated
  response, and up to K rejected, with a choice of K, of which K, of what to do with ties and of a minimum score gap.
  The rejected are listed in rank order, best first (the convention of every row, and the ranking `plackett_luce`
  takes), whatever `selection` keeps; the scores are kept in a `scores` column aligned with them, the chosen's first.
- `group_pairwise`: pairwise rows (TRL's `{"prompt", "chosen", "rejected"}`) that share their prompt and chosen to
  one row whose `rejected` is the list of their rejected.
- `normalize_rows`: a list of row dicts whose `rejected` is one response in some rows and a list in others (or whose
  `scores` mix ints and floats) made uniform for `Dataset.from_list`; the trainer takes such a list too.
- `load_preference_dataset`: a Hub id, or a local folder or file of JSON lines, as a `datasets.DatasetDict`.

Each takes a `list[dict]` or a `datasets.Dataset` and returns the same kind. Every check names the row and the column.

```python
>>> from trl_dpo_ext.convert import rated_to_multi_rejected
>>> rows = [{"instruction": "2+2?", "completions": [
...     {"output": "4", "score": 0.9}, {"output": "5", "score": 0.2}, {"output": "22", "score": 0.1}]}]
>>> rated_to_multi_rejected(rows, num_rejected=2)
[{'prompt': '2+2?', 'chosen': '4', 'rejected': ['5', '22'], 'scores': [0.9, 0.2, 0.1]}]
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .rows import (
    check_scores,
    is_conversational_row,
    parse_text_row,
    rejected_as_list,
    rejected_ids_as_list,
    type_name,
)


logger = logging.getLogger(__name__)

Rows = list[dict[str, Any]] | Dataset

TIE_POLICIES = ("first", "skip")
REJECTED_SELECTIONS = ("lowest", "highest", "random")


def _rows(data: Rows) -> list[dict[str, Any]]:
    return data.to_list() if isinstance(data, Dataset) else list(data)


def _same_kind(rows: list[dict[str, Any]], data: Rows) -> Rows:
    return Dataset.from_list(rows) if isinstance(data, Dataset) else rows


def _as_message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


# ------------------------------------------------------------------------------------------- rated rows


def _rated_responses(
    row: dict[str, Any], idx: int, completions_column: str, response_key: str, score_key: str, scores_column: str
) -> list[tuple[Any, float]]:
    """The (response, score) pairs of one rated row, from a list of dicts or from two parallel lists."""
    if completions_column not in row:
        raise ValueError(f"Row {idx}, column '{completions_column}': missing (columns: {sorted(row)}).")
    completions = row[completions_column]
    if not isinstance(completions, list) or not completions:
        raise ValueError(
            f"Row {idx}, column '{completions_column}': expected a non-empty list of responses, got "
            f"{type_name(completions)}{' (empty)' if completions == [] else ''}."
        )
    if isinstance(completions[0], dict):
        pairs = []
        for j, item in enumerate(completions):
            if not isinstance(item, dict) or response_key not in item or score_key not in item:
                raise ValueError(
                    f"Row {idx}, column '{completions_column}', item {j}: expected a dict with keys '{response_key}' "
                    f"and '{score_key}', got {sorted(item) if isinstance(item, dict) else type_name(item)}."
                )
            pairs.append((item[response_key], item[score_key]))
    else:
        if scores_column not in row:
            raise ValueError(
                f"Row {idx}, column '{scores_column}': missing; the responses of column '{completions_column}' are "
                f"not dicts with a '{score_key}', so their scores are read from column '{scores_column}'."
            )
        scores = row[scores_column]
        if not isinstance(scores, list) or len(scores) != len(completions):
            raise ValueError(
                f"Row {idx}, column '{scores_column}': expected a list of {len(completions)} scores (one per "
                f"response of column '{completions_column}'), got "
                f"{len(scores) if isinstance(scores, list) else type_name(scores)}."
            )
        pairs = list(zip(completions, scores, strict=True))
    for j, (response, score) in enumerate(pairs):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            column = completions_column if isinstance(completions[0], dict) else scores_column
            raise ValueError(
                f"Row {idx}, column '{column}', item {j}: expected a finite numeric score, got {score!r}."
            )
        if not isinstance(response, str) or not response:
            raise ValueError(
                f"Row {idx}, column '{completions_column}', item {j}: expected a non-empty str response, got "
                f"{type_name(response)}{' (empty)' if response == '' else ''}."
            )
    return [(response, float(score)) for response, score in pairs]


def rated_to_multi_rejected(
    data: Rows,
    num_rejected: int | None = None,
    *,
    min_rejected: int = 1,
    min_score_gap: float = 0.0,
    ties: Literal["first", "skip"] = "first",
    selection: Literal["lowest", "highest", "random"] = "lowest",
    prompt_column: str = "instruction",
    completions_column: str = "completions",
    response_key: str = "output",
    score_key: str = "score",
    scores_column: str = "scores",
    keep_columns: Sequence[str] = (),
    conversational: bool = False,
    seed: int = 0,
) -> Rows:
    """Rows of several rated responses to `{"prompt", "chosen", "rejected": [...], "scores": [...]}`.

    Args:
        data: rows with a prompt column and a list of rated responses: either dicts
            (`[{"output": str, "score": float}, ...]`, UltraFeedback/AlpacaEval style) or plain strings with their
            scores in a parallel list column `scores_column`.
        num_rejected: the most rejected to keep per row (K); all eligible ones when None.
        min_rejected: rows with fewer eligible rejected are dropped (set it to `num_rejected` for exactly K).
        min_score_gap: a response is eligible as rejected only if its score is at most the chosen's score minus this
            gap; responses closer to the chosen are left out, as ambiguous preferences.
        ties: when several responses share the best score: `"first"` takes the first of them as the chosen (the
            others are dropped, never rejected); `"skip"` drops the row.
        selection: which K of the eligible rejected are kept: `"lowest"` scores (the clearest preferences),
            `"highest"` (the hardest negatives) or `"random"` (seeded by `seed`). Whichever are kept, they are listed
            best first (ties keep their input order).
        prompt_column, completions_column, response_key, score_key, scores_column: where the fields are.
        keep_columns: other columns copied to the output rows as they are (e.g. `["id"]`).
        conversational: write prompt and responses as chat messages (a user turn, an assistant turn) instead of text.
        seed: seed of the `"random"` selection.

    Returns:
        The same kind as `data`. A row is dropped when it has fewer than `min_rejected` eligible rejected, or under
        `ties="skip"`; one warning counts the dropped rows per reason, with the first few row indices. `rejected` is
        in rank order, best first, and `scores` holds the chosen's score first, then each kept rejected's.

    Raises:
        ValueError: naming the row and the column, for a missing or malformed field, or a score that is not a finite
            number (NaN, ±inf).
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"`ties` must be one of {list(TIE_POLICIES)}, got {ties!r}.")
    if selection not in REJECTED_SELECTIONS:
        raise ValueError(f"`selection` must be one of {list(REJECTED_SELECTIONS)}, got {selection!r}.")
    if num_rejected is not None and num_rejected < 1:
        raise ValueError(f"`num_rejected` must be at least 1 (or None for all), got {num_rejected}.")
    if min_rejected < 1 or (num_rejected is not None and min_rejected > num_rejected):
        raise ValueError(
            f"`min_rejected` must be between 1 and `num_rejected`, got min_rejected={min_rejected}, "
            f"num_rejected={num_rejected}."
        )
    if min_score_gap < 0:
        raise ValueError(f"`min_score_gap` must be >= 0, got {min_score_gap}.")

    rng = random.Random(seed)
    out = []
    dropped: dict[str, list[int]] = {}
    for idx, row in enumerate(_rows(data)):
        if prompt_column not in row:
            raise ValueError(f"Row {idx}, column '{prompt_column}': missing (columns: {sorted(row)}).")
        prompt = row[prompt_column]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(
                f"Row {idx}, column '{prompt_column}': expected a non-empty str, got {type_name(prompt)}."
            )
        rated = _rated_responses(row, idx, completions_column, response_key, score_key, scores_column)
        best = max(score for _, score in rated)
        best_indices = [j for j, (_, score) in enumerate(rated) if score == best]
        if len(rated) == 1:
            dropped.setdefault("a single response", []).append(idx)
            continue
        if len(best_indices) == len(rated):
            dropped.setdefault("all scores equal", []).append(idx)
            continue
        if len(best_indices) > 1 and ties == "skip":
            dropped.setdefault("a tie for the best score (ties='skip')", []).append(idx)
            continue
        chosen = rated[best_indices[0]][0]
        # Strictly below the best by the gap; an exact copy of the chosen response is never its own rejected
        eligible = [(r, s) for r, s in rated if s <= best - min_score_gap and s < best and r != chosen]
        if selection == "lowest":
            eligible.sort(key=lambda rs: rs[1])
        elif selection == "highest":
            eligible.sort(key=lambda rs: -rs[1])
        else:
            rng.shuffle(eligible)
        # Rank order, best first, whichever were kept (stable: ties keep the order they were selected in)
        eligible = sorted(eligible[:num_rejected], key=lambda rs: -rs[1])
        if len(eligible) < min_rejected:
            reason = f"fewer than min_rejected={min_rejected} rejected at least min_score_gap={min_score_gap} below"
            dropped.setdefault(reason + " the chosen (other than a copy of it)", []).append(idx)
            continue
        new = {column: row[column] for column in keep_columns}
        if conversational:
            new.update(
                prompt=_as_message("user", prompt),
                chosen=_as_message("assistant", chosen),
                rejected=[_as_message("assistant", r) for r, _ in eligible],
            )
        else:
            new.update(prompt=prompt, chosen=chosen, rejected=[r for r, _ in eligible])
        new["scores"] = [best] + [s for _, s in eligible]
        out.append(new)
    if dropped:
        logger.warning(_dropped_message(dropped, len(out) + sum(map(len, dropped.values()))))
    return _same_kind(out, data)


def _dropped_message(dropped: dict[str, list[int]], num_rows: int, shown: int = 5) -> str:
    """One line per reason: how many rows were dropped for it, and the first few of their indices."""
    total = sum(map(len, dropped.values()))
    lines = [f"rated_to_multi_rejected dropped {total} of {num_rows} rows:"]
    for reason, rows in dropped.items():
        more = ", ..." if len(rows) > shown else ""
        lines.append(f"  {len(rows)} with {reason} (rows {', '.join(map(str, rows[:shown]))}{more})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pairwise


def _key(value: Any) -> str:
    """A hashable form of a text or of a list of messages."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def group_pairwise(data: Rows, max_rejected: int | None = None) -> Rows:
    """Pairwise rows that share their prompt and chosen, grouped into one row with the list of their rejected.

    Rows are `{"prompt", "chosen", "rejected"}` (text or conversational); without a `prompt` column, the prompt is
    first taken from the shared start of `chosen` and `rejected`, as `trl.extract_prompt` does. A row whose
    `rejected` is already a list adds all of it. Groups keep the order of their first row; within a group the
    rejected keep their order and duplicates are dropped. `max_rejected` keeps the first ones.
    Other columns are not carried over (they may differ between the rows of a group).
    """
    if max_rejected is not None and max_rejected < 1:
        raise ValueError(f"`max_rejected` must be at least 1 (or None for all), got {max_rejected}.")
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for idx, row in enumerate(_rows(data)):
        if row.get("prompt") is None:  # no prompt (or None, as `Dataset.from_list` fills a missing key): implicit
            row = {key: value for key, value in row.items() if key != "prompt"}
        prompt, chosen, rejected_list, _, _ = parse_text_row(row, idx)
        group = groups.setdefault(
            (_key(prompt), _key(chosen)), {"prompt": prompt, "chosen": chosen, "rejected": [], "_seen": set()}
        )
        for item in rejected_list:
            if _key(item) not in group["_seen"]:
                group["_seen"].add(_key(item))
                group["rejected"].append(item)
    out = [
        {"prompt": g["prompt"], "chosen": g["chosen"], "rejected": g["rejected"][:max_rejected]}
        for g in groups.values()
    ]
    return _same_kind(out, data)


# ---------------------------------------------------------------------------------------------- row lists


def normalize_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as `Dataset.from_list` can hold them, whatever each one gives: `rejected` (or `rejected_ids`) always a
    list of responses, so that K may vary by row (one response in a row and a list in another make pyarrow fail with
    "cannot mix list and non-list"), and `scores` checked (1 + K finite numbers) and made floats. Errors name the row
    and the column; other columns are kept as they are."""
    out = []
    for idx, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"Row {idx}: expected a dict of columns, got {type_name(row)}.")
        row = dict(row)
        num_rejected = None
        if row.get("rejected_ids") is not None:
            row["rejected_ids"] = rejected_ids_as_list(row["rejected_ids"], idx)
            num_rejected = len(row["rejected_ids"])
        elif row.get("rejected") is not None:
            row["rejected"] = rejected_as_list(row["rejected"], is_conversational_row(row), idx)
            num_rejected = len(row["rejected"])
        if num_rejected is not None:
            row.update(check_scores(row, num_rejected, idx))
        out.append(row)
    return out


def rows_as_dataset(data: Any) -> Any:
    """A list of row dicts as a `Dataset` (through `normalize_rows`); anything else unchanged."""
    return Dataset.from_list(normalize_rows(data)) if isinstance(data, list) else data


# ------------------------------------------------------------------------------------------------ loading


# A local file's builder, by its suffix (after a compression suffix)
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_preference_dataset(
    name_or_path: str | os.PathLike,
    config_name: str | None = None,
    streaming: bool = False,
    split: str | None = None,
) -> DatasetDict | Dataset:
    """The one dataset loader of `trl-dpo-ext dpo`, `sft-ref` and `report`.

    A Hub dataset id, or a local path: a JSON-lines, JSON, CSV or Parquet file (`.jsonl`, `.json`, optionally `.gz`,
    `.csv`, `.parquet`), which becomes the `train` split; a folder saved by `save_to_disk`, loaded as it was saved;
    any other folder, read as `datasets.load_dataset` reads it, its file names (`train.jsonl`, `test.jsonl`, ...)
    naming the splits. Returns the `DatasetDict`, or its `split` when one is named.
    """
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        stem, suffix = os.path.splitext(name_or_path[:-3] if name_or_path.endswith(".gz") else name_or_path)
        builder = FILE_BUILDERS.get(suffix)
        if builder is None:
            raise ValueError(
                f"Unknown dataset file type {suffix!r} of {name_or_path}: expected one of {sorted(FILE_BUILDERS)} "
                "(optionally .gz)."
            )
        dataset = load_dataset(builder, data_files={"train": name_or_path}, streaming=streaming)
    elif os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")):
        dataset = load_from_disk(name_or_path)
    elif os.path.isfile(os.path.join(name_or_path, "state.json")):  # one `Dataset` saved by `save_to_disk`
        dataset = DatasetDict(train=load_from_disk(name_or_path))
    else:
        dataset = load_dataset(name_or_path, name=config_name, streaming=streaming)
    if split is None:
        return dataset
    if split not in dataset:
        raise ValueError(
            f"The dataset {name_or_path!r} has no split {split!r} (splits: {list(dataset)}); name one of them."
        )
    return dataset[split]
