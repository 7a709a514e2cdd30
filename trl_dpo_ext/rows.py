"""Row checks of preference data: every check of a row or of a prepared dataset, in one message style.

Errors name the row and the column, `f"Row {i}, column '{col}': ..."`, and raise before training starts; rows that
train but teach nothing are counted in one warning each, naming the first of them (`first_rows`). The column names and
the rules on their values live here; `data.py` tokenizes and prepares the rows, calling these checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow.compute as pc
from datasets import Dataset

from .messages import chat_roles, check_messages, check_response
from .packing.truncation import truncate


TEXT_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Position of each row in the dataset given to the trainer, carried to the batch for the per-example diagnostics
INDEX_COLUMN = "dataset_index"


def is_messages(value: Any) -> bool:
    """Whether a value is one conversational response or prompt: a non-empty list of messages (dicts). Their keys are
    checked by `parse_text_row`, which names the message at fault."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def is_conversational_row(example: dict[str, Any]) -> bool:
    """Whether a text row holds messages. `trl.is_conversational` looks at an arbitrary one of the columns, which for a
    list of rejected is a list of lists (or empty); the chosen, or the prompt, is always one response."""
    return is_messages(example.get("chosen")) or is_messages(example.get("prompt"))


def require_values(example: dict[str, Any], columns: tuple[str, ...], idx: int) -> None:
    """Every one of `columns` holds a value (a missing column of a row, or None, is an error naming both)."""
    for column in columns:
        if example.get(column) is None:
            raise ValueError(f"Row {idx}, column '{column}': missing value (None).")


@contextmanager
def in_dataset(name: str) -> Iterator[None]:
    """A row error raised inside names the dataset it comes from (`train`, `eval`, ...)."""
    try:
        yield
    except ValueError as error:
        if not str(error).startswith("Row ") or str(error).endswith(" dataset)"):
            raise
        raise ValueError(f"{error} (in the {name} dataset)") from None


def type_name(value: Any) -> str:
    if isinstance(value, list):
        inner = sorted({type_name(v) for v in value[:4]})
        return f"list[{' | '.join(inner)}]" if inner else "empty list"
    return type(value).__name__


def row_error(row: int, column: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"Row {row}, column '{column}': expected {expected}, got {type_name(value)}.")


def first_rows(indices: Sequence[int], limit: int = 5) -> str:
    """The first row indices of a warning that counts rows: "rows 3, 8" or "rows 3, 8, 9, 12, 40, … (first 5)"."""
    shown = ", ".join(str(i) for i in indices[:limit])
    more = f", … (first {limit})" if len(indices) > limit else ""
    return f"row{'s' if len(indices) > 1 else ''} {shown}{more}"


@dataclass(frozen=True)
class RowLimits:
    """What a row is checked against besides its own values: the model's vocabulary, the truncation that the
    collator will apply (`max_length`, `truncation_mode`), and whether the loss ranks the chosen first
    (`plackett_luce`), which makes a rejected scored above its chosen an error."""

    vocab_size: int | None = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    chosen_first: bool = False


def model_vocab_size(model: Any, args: Any) -> int | None:
    """The number of rows of the model's input embedding, which every token id must be below. For a path or Hub id,
    the `vocab_size` of its config (the embedding is built from it), read without loading the weights."""
    if isinstance(model, str):
        from transformers import AutoConfig

        revision = (args.model_init_kwargs or {}).get("revision")
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
        return getattr(config.get_text_config(), "vocab_size", None)
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if isinstance(getattr(embedding, "num_embeddings", None), int):  # kept under ZeRO-3, whose weight is partitioned
        return embedding.num_embeddings
    config = getattr(model, "config", None)
    return getattr(config.get_text_config(), "vocab_size", None) if config is not None else None


def check_row_kind(example: dict[str, Any], idx: int, conversational: bool | None) -> bool:
    """Whether a text row holds messages; an error when it is not of the dataset's kind (that of its first row), as
    the two kinds are tokenized differently (the chat template, or the text with EOS added)."""
    kind = is_conversational_row(example)
    if conversational is not None and kind != conversational:
        this, first = ("a list of messages", "plain text") if kind else ("plain text", "a list of messages")
        raise ValueError(
            f"Row {idx}, column 'chosen': {this}, but the dataset's first row is {first}. Conversational and "
            "plain-text rows cannot be mixed in one dataset; convert them to one kind."
        )
    return kind


def check_completion_ids(ids: list[int], idx: int, column: str, name: str) -> None:
    """A completion with no token has log-prob 0 whatever the model: its pairs carry no gradient."""
    if not ids:
        raise ValueError(
            f"Row {idx}, column '{column}': {name} has no tokens. A response with no tokens has log-prob 0 and teaches "
            "nothing; fix the row or drop it."
        )


def check_token_range(ids: list[int], idx: int, column: str, vocab_size: int | None, tokenized: bool) -> None:
    """Every token id is in [0, vocab_size): the rows of the model's input embedding. Negative ids are always wrong.
    `tokenized`: the ids were given (else the tokenizer made them from the text of `column`)."""
    if not ids:
        return
    low, high = min(ids), max(ids)
    if low >= 0 and (vocab_size is None or high < vocab_size):
        return
    bad = low if low < 0 else high
    vocab = (
        f"ids 0 to {vocab_size - 1}: the model's input embedding has {vocab_size} rows" if vocab_size else "ids ≥ 0"
    )
    if tokenized:
        source, hint = "", " (-100 marks ignored labels; it is not a token)" if bad == -100 else ""
    else:
        source = "the tokenizer gives "
        hint = "; the tokenizer does not match the model (resize its embeddings: `model.resize_token_embeddings`)"
    raise ValueError(
        f"Row {idx}, column '{column}': {source}token id {bad} at position {ids.index(bad)}, outside the model's "
        f"vocabulary ({vocab}){hint}."
    )


def num_identical_after_truncation(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[list[int]], limits: RowLimits
) -> int:
    """How many rejected differ from the chosen but become the same sequence (tokens and completion mask) once
    truncated to `max_length`: such a pair has a zero margin, whatever the model."""
    if limits.max_length is None or (limits.truncation_mode == "keep_start" and len(prompt_ids) >= limits.max_length):
        return 0  # nothing truncated, or the row is dropped

    def truncated(ids: list[int]) -> tuple[list[int], list[int]]:
        return truncate(prompt_ids, ids, limits.max_length, limits.truncation_mode)

    chosen = truncated(chosen_ids)
    return sum(ids != chosen_ids and truncated(ids) == chosen for ids in rejected_ids)


def checked_ids(
    example: dict[str, Any],
    idx: int,
    ids: tuple[list[int], list[int], list[list[int]]],
    limits: RowLimits | None,
    tokenized: bool,
) -> dict[str, Any]:
    """The prepared row of a text or pre-tokenized row: the checks every prepared row passes, and its counts."""
    prompt_ids, chosen_ids, rejected_ids = ids
    limits = limits or RowLimits()
    columns = TOKENIZED_COLUMNS if tokenized else ("prompt", *TEXT_COLUMNS)
    check_completion_ids(chosen_ids, idx, columns[1], "the chosen response")
    for k, rejected in enumerate(rejected_ids):
        check_completion_ids(rejected, idx, columns[2], f"rejected {k}")
    for column, sequences in zip(columns, ([prompt_ids], [chosen_ids], rejected_ids), strict=True):
        for sequence in sequences:
            check_token_range(sequence, idx, column, limits.vocab_size, tokenized)
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "num_rejected": len(rejected_ids),
        "num_identical_rejected": sum(r == chosen_ids for r in rejected_ids),
        "num_identical_after_truncation": num_identical_after_truncation(prompt_ids, chosen_ids, rejected_ids, limits),
        **check_scores(example, len(rejected_ids), idx, limits.chosen_first),
        INDEX_COLUMN: dataset_index(example, idx),
    }


def rejected_as_list(value: Any, conversational: bool, row: int, column: str = "rejected") -> list:
    """The rejected response(s) of a text row as a non-empty list, whether given as one response or as a list."""
    if conversational:
        if is_messages(value):
            return [value]
        if isinstance(value, list) and value and all(is_messages(v) for v in value):
            return value
        raise row_error(row, column, "a list of messages or a non-empty list of lists of messages", value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise row_error(row, column, "a str or a non-empty list[str]", value)


class TextRow(NamedTuple):
    """One checked text row: its prompt (given, or the shared start of its responses), its chosen, its K rejected as a
    list, whether `rejected` was given as a list (rather than one response), and whether the row holds messages."""

    prompt: Any
    chosen: Any
    rejected: list
    listed: bool
    conversational: bool


def parse_text_row(
    example: dict[str, Any], idx: int, conversational: bool | None = None, roles: frozenset[str] | None = None
) -> TextRow:
    """Check one text row and split it into a `TextRow`: every text check, for the DPO data, the SFT rows of
    `ref_init`, image rows and the converter alike.

    `conversational` is the dataset's kind, which the row must have (None: not checked); `roles` the message roles
    allowed (`chat_roles`). A row without a `prompt` key has it extracted as `trl.extract_prompt` does, over every
    rejected: the shortest of the chosen's shared starts with each. Errors name the row, the column, and the rejected
    and the message at fault.
    """
    from trl import extract_prompt

    require_values(example, TEXT_COLUMNS, idx)
    conversational = check_row_kind(example, idx, conversational)
    roles = chat_roles() if roles is None else roles
    chosen = example["chosen"]
    if not (is_messages(chosen) if conversational else isinstance(chosen, str)):
        raise row_error(
            idx, "chosen", "a list of messages" if conversational else "a str or a list of messages", chosen
        )
    rejected = rejected_as_list(example["rejected"], conversational, idx)
    listed = rejected is example["rejected"]  # given as a list of responses, rather than as one response
    if "prompt" in example:
        require_values(example, ("prompt",), idx)
        prompt = example["prompt"]
    else:  # implicit: the shared start of the responses
        length = min(len(extract_prompt({"chosen": chosen, "rejected": r})["prompt"]) for r in rejected)
        prompt, chosen, rejected = chosen[:length], chosen[length:], [r[length:] for r in rejected]
    if conversational and not isinstance(prompt, list):
        raise row_error(idx, "prompt", "a list of messages", prompt)
    if conversational:
        check_messages(prompt, idx, "prompt", roles)
    elif not isinstance(prompt, str):
        raise row_error(idx, "prompt", "a str (or a list of messages)", prompt)
    check_response(chosen, idx, "chosen", roles)
    for k, response in enumerate(rejected):
        check_response(response, idx, "rejected", roles, f"rejected {k}, " if listed else "")
    return TextRow(prompt, chosen, rejected, listed, conversational)


def check_ids(value: Any, row: int, column: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise row_error(row, column, "list[int]", value)
    return value


def rejected_ids_as_list(value: Any, row: int) -> list[list[int]]:
    """`rejected_ids` of a pre-tokenized row as a non-empty list of token lists (one list[int] means K = 1)."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return [check_ids(v, row, "rejected_ids") for v in value]
    if isinstance(value, list) and value:
        return [check_ids(value, row, "rejected_ids")]
    raise row_error(row, "rejected_ids", "a non-empty list[int] or list[list[int]]", value)


def _response_name(position: int) -> str:
    return "the chosen" if position == 0 else f"rejected {position - 1}"


def check_scores(
    example: dict[str, Any], num_rejected: int, idx: int, chosen_first: bool = False
) -> dict[str, list[float]]:
    """The optional `scores` of a row: one finite number per response, the chosen's first, then each rejected's.

    With `chosen_first` (the ranking of `plackett_luce` puts the chosen first), a rejected scored above its chosen
    is an error; otherwise such rows are counted in one warning (`scores_order_warnings`).
    """
    if "scores" not in example:
        return {}
    scores = example["scores"]
    expected = "a list of finite numbers (the chosen's score, then each rejected's)"
    if not isinstance(scores, list):
        raise ValueError(f"Row {idx}, column 'scores': expected {expected}, got {type_name(scores)} {scores!r:.80}.")
    for j, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"Row {idx}, column 'scores': expected {expected}, got {value!r} at position {j} "
                f"({_response_name(j)})."
            )
    if len(scores) != 1 + num_rejected:
        raise ValueError(
            f"Row {idx}, column 'scores': expected {1 + num_rejected} scores (the chosen's, then each of the "
            f"{num_rejected} rejected), got {len(scores)}."
        )
    if chosen_first:
        above = [k for k, value in enumerate(scores[1:]) if value > scores[0]]
        if above:
            raise ValueError(
                f"Row {idx}, column 'scores': rejected {above[0]} scores {scores[1 + above[0]]!r}, above the chosen's "
                f"{scores[0]!r}, but `rejected_reduction='plackett_luce'` ranks the chosen first. Fix or drop the row "
                "(or swap it so that the best-scored response is the chosen)."
            )
    return {"scores": [float(v) for v in scores]}


def dataset_index(example: dict[str, Any], idx: int) -> int:
    """The row's position in the dataset given to the trainer: `idx`, or the index an earlier preparation stored."""
    value = example.get(INDEX_COLUMN, idx)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise row_error(idx, INDEX_COLUMN, "a non-negative int (the row's position in the dataset)", value)
    return value


def missing_columns(column_names: list[str]) -> tuple[bool, list[str]]:
    """Whether the dataset is pre-tokenized, and which required columns it lacks."""
    tokenized = "chosen_ids" in column_names or "rejected_ids" in column_names
    required = TOKENIZED_COLUMNS if tokenized else TEXT_COLUMNS
    return tokenized, [c for c in required if c not in column_names]


def _rows_where(dataset: Dataset, mask: Any) -> list[int]:
    """The dataset indices (positions in the dataset given to the trainer) of the rows where `mask` is true."""
    return [i for i, flag in zip(dataset[INDEX_COLUMN], mask.to_pylist(), strict=True) if flag]


def rows_filling_max_length(dataset: Dataset, max_length: int) -> tuple[list[int], int]:
    """The rows of a prepared `Dataset` whose prompt alone fills `max_length` (dropped under `keep_start`, as TRL
    does), and the length of the shortest prompt."""
    lengths = pc.list_value_length(dataset.with_format("arrow")["prompt_ids"])
    return _rows_where(dataset, pc.greater_equal(lengths, max_length)), pc.min(lengths).as_py() or 0


def identical_rejected_message(count: int, rows: Sequence[int], dataset_name: str) -> str:
    """The warning for rejected responses identical to their row's chosen (kept: they only carry no gradient)."""
    return (
        f"{count} rejected response(s) of the {dataset_name} dataset are identical to their chosen response "
        f"({first_rows(rows)}). They are kept, but such a pair carries no gradient."
    )


def row_warnings(dataset: Dataset, dataset_name: str, max_length: int | None) -> list[str]:
    """What trains but carries no gradient, or less than it seems, in a prepared `Dataset`: one line per kind, with
    the count and the first rows."""
    table = dataset.with_format("arrow")
    messages = []
    identical = _rows_where(dataset, pc.greater(table["num_identical_rejected"], 0))
    if identical:
        count = pc.sum(table["num_identical_rejected"]).as_py()
        messages.append(identical_rejected_message(count, identical, dataset_name))
    truncated = _rows_where(dataset, pc.greater(table["num_identical_after_truncation"], 0))
    if truncated:
        count = pc.sum(table["num_identical_after_truncation"]).as_py()
        messages.append(
            f"{count} rejected response(s) of the {dataset_name} dataset become identical to their chosen response "
            f"once truncated to `max_length={max_length}` ({first_rows(truncated)}): such a pair has a zero margin and "
            "carries no gradient. Raise `max_length`."
        )
    empty = _rows_where(dataset, pc.equal(pc.list_value_length(table["prompt_ids"]), 0))
    if empty:
        messages.append(
            f"{len(empty)} row(s) of the {dataset_name} dataset have an empty prompt ({first_rows(empty)}): the first "
            "token of each response is then not scored, as nothing precedes it. TRL allows it; check the prompts."
        )
    return messages
