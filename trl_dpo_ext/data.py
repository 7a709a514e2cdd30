"""Preference rows with one chosen and K rejected: validation, tokenisation and collation.

A row holds a `chosen` response and a `rejected` that is either one response (TRL's pairwise format) or a list of
K ≥ 1 responses; K may differ from row to row. Text rows are standard (`str`) or conversational (lists of messages),
with an explicit `prompt` or a prompt implicit in the shared start of the responses, exactly as `trl.DPOTrainer`
takes them. Pre-tokenized rows (`prompt_ids`, `chosen_ids`, `rejected_ids`) are used as given.

Every check raises before training starts, naming the row and the column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import _tokenize, common_prefix_length, extract_prompt
from trl.trainer.utils import pad

from .prefix_sharing import pack_preference_batch


TEXT_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Position of each row in the dataset given to the trainer, carried to the batch for the per-example diagnostics
INDEX_COLUMN = "dataset_index"


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def is_conversational_row(example: dict[str, Any]) -> bool:
    """Whether a text row holds messages. `trl.is_conversational` looks at an arbitrary one of the columns, which for a
    list of rejected is a list of lists (or empty); the chosen, or the prompt, is always one response."""
    return _is_messages(example.get("chosen")) or _is_messages(example.get("prompt"))


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        inner = sorted({_type_name(v) for v in value[:4]})
        return f"list[{' | '.join(inner)}]" if inner else "empty list"
    return type(value).__name__


def _error(row: int, column: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"Row {row}, column '{column}': expected {expected}, got {_type_name(value)}.")


def rejected_as_list(value: Any, conversational: bool, row: int, column: str = "rejected") -> list:
    """The rejected response(s) of a text row as a non-empty list, whether given as one response or as a list."""
    if conversational:
        if _is_messages(value):
            return [value]
        if isinstance(value, list) and value and all(_is_messages(v) for v in value):
            return value
        raise _error(row, column, "a list of messages or a non-empty list of lists of messages", value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise _error(row, column, "a str or a non-empty list[str]", value)


def _check_ids(value: Any, row: int, column: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _error(row, column, "list[int]", value)
    return value


def rejected_ids_as_list(value: Any, row: int) -> list[list[int]]:
    """`rejected_ids` of a pre-tokenized row as a non-empty list of token lists (one list[int] means K = 1)."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return [_check_ids(v, row, "rejected_ids") for v in value]
    if isinstance(value, list) and value:
        return [_check_ids(value, row, "rejected_ids")]
    raise _error(row, "rejected_ids", "a non-empty list[int] or list[list[int]]", value)


def extract_prompt_multi(example: dict[str, Any], idx: int = 0) -> dict[str, Any]:
    """`trl.extract_prompt` for a list of rejected: the prompt is the shortest of the chosen's common prefixes with
    each rejected. With one rejected it is exactly `trl.extract_prompt`."""
    for column in TEXT_COLUMNS:
        if example.get(column) is None:
            raise ValueError(f"Row {idx}, column '{column}': missing value (None).")
    conversational = _is_messages(example["chosen"])
    if not conversational and not isinstance(example["chosen"], str):
        raise _error(idx, "chosen", "a str or a list of messages", example["chosen"])
    rejected = example["rejected"]
    candidates = rejected_as_list(rejected, conversational, idx)
    many = candidates is rejected  # given as a list of responses, rather than as one response
    prompt_len = min(len(extract_prompt({"chosen": example["chosen"], "rejected": r})["prompt"]) for r in candidates)
    stripped = [r[prompt_len:] for r in candidates]
    return {
        "prompt": example["chosen"][:prompt_len],
        "chosen": example["chosen"][prompt_len:],
        "rejected": stripped if many else stripped[0],
    }


def tokenize_row(example: dict[str, Any], idx: int, processing_class, eos_token: str | None) -> dict[str, Any]:
    """Validate one text row and tokenize it as TRL does, with each rejected tokenized after the same prompt.

    The completion starts where the tokenized prompt and the tokenized prompt+response diverge, taken over all the
    responses of the row (see `trl.data_utils.common_prefix_length`); with one rejected this is TRL's own rule.
    """
    for column in ("prompt", *TEXT_COLUMNS):
        if example.get(column) is None:
            raise ValueError(f"Row {idx}, column '{column}': missing value (None).")
    conversational = is_conversational_row(example)
    chosen = example["chosen"]
    if conversational and not _is_messages(chosen):
        raise _error(idx, "chosen", "a list of messages", chosen)
    if not conversational and not isinstance(chosen, str):
        raise _error(idx, "chosen", "a str (or a list of messages)", chosen)
    rejected = rejected_as_list(example["rejected"], conversational, idx)

    if conversational:
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        prompt_ids = _tokenize(processing_class, example["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = [
            _tokenize(processing_class, example["prompt"] + r, **kwargs)["input_ids"] for r in [chosen, *rejected]
        ]
    else:
        if eos_token is not None:  # as TRL: standard text ends with EOS, added once
            chosen = chosen if chosen.endswith(eos_token) else chosen + eos_token
            rejected = [r if r.endswith(eos_token) else r + eos_token for r in rejected]
        prompt_ids = _tokenize(processing_class, example["prompt"])["input_ids"]
        full_ids = [_tokenize(processing_class, example["prompt"] + r)["input_ids"] for r in [chosen, *rejected]]

    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    chosen_ids = full_ids[0][prompt_len:]
    rejected_ids = [ids[prompt_len:] for ids in full_ids[1:]]
    return {
        "prompt_ids": prompt_ids[:prompt_len],
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "num_rejected": len(rejected_ids),
        "num_identical_rejected": sum(ids == chosen_ids for ids in rejected_ids),
        **check_scores(example, len(rejected_ids), idx),
        INDEX_COLUMN: dataset_index(example, idx),
    }


def check_scores(example: dict[str, Any], num_rejected: int, idx: int) -> dict[str, list[float]]:
    """The optional `scores` of a row: one finite float per response, the chosen's first, then each rejected's."""
    if "scores" not in example:
        return {}
    scores = example["scores"]
    ok = isinstance(scores, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores)
    if not ok:
        raise _error(idx, "scores", "a list of finite floats (the chosen's score, then each rejected's)", scores)
    if len(scores) != 1 + num_rejected:
        raise ValueError(
            f"Row {idx}, column 'scores': expected {1 + num_rejected} scores (the chosen's, then each of the "
            f"{num_rejected} rejected), got {len(scores)}."
        )
    return {"scores": [float(v) for v in scores]}


def dataset_index(example: dict[str, Any], idx: int) -> int:
    """The row's position in the dataset given to the trainer: `idx`, or the index an earlier preparation stored."""
    value = example.get(INDEX_COLUMN, idx)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _error(idx, INDEX_COLUMN, "a non-negative int (the row's position in the dataset)", value)
    return value


def check_tokenized_row(example: dict[str, Any], idx: int) -> dict[str, Any]:
    """Validate one pre-tokenized row; its ids are kept exactly as given (no EOS added, nothing re-tokenized)."""
    for column in TOKENIZED_COLUMNS:
        if example.get(column) is None:
            raise ValueError(f"Row {idx}, column '{column}': missing value (None).")
    prompt_ids = _check_ids(example["prompt_ids"], idx, "prompt_ids")
    chosen_ids = _check_ids(example["chosen_ids"], idx, "chosen_ids")
    rejected_ids = rejected_ids_as_list(example["rejected_ids"], idx)
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "num_rejected": len(rejected_ids),
        "num_identical_rejected": sum(ids == chosen_ids for ids in rejected_ids),
        **check_scores(example, len(rejected_ids), idx),
        INDEX_COLUMN: dataset_index(example, idx),
    }


def missing_columns(column_names: list[str] | None) -> tuple[bool, list[str]]:
    """Whether the dataset is pre-tokenized, and which required columns it lacks."""
    if column_names is None:  # an IterableDataset whose features are unknown: rows are checked one by one
        return False, []
    tokenized = "chosen_ids" in column_names or "rejected_ids" in column_names
    required = TOKENIZED_COLUMNS if tokenized else TEXT_COLUMNS
    return tokenized, [c for c in required if c not in column_names]


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


@dataclass
class DataCollatorForMultiRejectedPreference(DataCollatorMixin):
    """
    Collate rows of one chosen and K_i rejected into one padded batch of B + Σ K_i sequences.

    Each example holds `"prompt_ids"`, `"chosen_ids"` and `"rejected_ids"` (a list of K_i token lists). Rows of the
    output are the B chosen sequences (prompt + chosen), then every rejected sequence (prompt + rejected_k), example
    by example. With K_i = 1 for all rows, `input_ids`, `attention_mask` and `completion_mask` are exactly those of
    `trl.trainer.dpo_trainer.DataCollatorForPreference`. Besides them it returns:

    - `"rejected_mask"`: bool [B, K_max], True where example i has a k-th rejected;
    - `"ref_chosen_logps"` [B] and `"ref_rejected_logps"` [B, K_max] (0 where absent), when the examples carry them;
    - `"scores"` [B, 1 + K_max] (the chosen's first; 0 where absent), when the examples carry them;
    - `"dataset_index"` [B] (long), each row's position in the training dataset, when the examples carry it (it is
      not a model input).

    Args:
        pad_token_id (`int`): token used for padding.
        max_length (`int`, *optional*): each sequence is truncated to this length before padding.
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`): `"keep_start"` or `"keep_end"`.
        pad_to_multiple_of (`int`, *optional*): pad the length to a multiple of this value.
        prefix_sharing (`bool`, *optional*, defaults to `False`): also pack each example as one row [prompt |
            chosen | rejected_1 | …]: the batch then holds `packed_input_ids`, `packed_position_ids`,
            `packed_segment_ids`, `packed_completion_mask` [B, L_p] and `unpack_index` besides the unshared keys
            (see `trl_dpo_ext.prefix_sharing.pack_preference_batch`).

    Examples:
    ```python
    >>> collator = DataCollatorForMultiRejectedPreference(pad_token_id=0)
    >>> collator([
    ...     {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [[4, 5], [6]]},
    ...     {"prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [[10]]},
    ... ])
    {'input_ids': tensor([[ 1,  2,  3,  0],    # chosen of example 0
                          [ 7,  8,  9,  0],    # chosen of example 1
                          [ 1,  2,  4,  5],    # rejected 0 of example 0
                          [ 1,  2,  6,  0],    # rejected 1 of example 0
                          [ 7, 10,  0,  0]]),  # rejected 0 of example 1
     'attention_mask': ..., 'completion_mask': ...,
     'rejected_mask': tensor([[ True,  True],
                              [ True, False]])}
    ```
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    prefix_sharing: bool = False

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rejected = [rejected_ids_as_list(example["rejected_ids"], i) for i, example in enumerate(examples)]
        sequences, completion_masks = [], []
        for example in examples:
            sequences.append(example["prompt_ids"] + example["chosen_ids"])
            completion_masks.append([0] * len(example["prompt_ids"]) + [1] * len(example["chosen_ids"]))
        for example, rejected_ids in zip(examples, rejected, strict=True):
            for ids in rejected_ids:
                sequences.append(example["prompt_ids"] + ids)
                completion_masks.append([0] * len(example["prompt_ids"]) + [1] * len(ids))

        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                sl = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                sl = slice(-self.max_length, None)
            else:
                raise ValueError(
                    f"Unsupported truncation mode: {self.truncation_mode}, expected 'keep_start' or 'keep_end'"
                )
            sequences = [ids[sl] for ids in sequences]
            completion_masks = [m[sl] for m in completion_masks]

        def padded(rows: list[list[int]], value: int) -> torch.Tensor:
            tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
            return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)

        num_rejected = [len(r) for r in rejected]
        max_rejected = max(num_rejected)
        output = {
            "input_ids": padded(sequences, self.pad_token_id),
            "attention_mask": padded([[1] * len(ids) for ids in sequences], 0),
            "completion_mask": padded(completion_masks, 0),
            "rejected_mask": torch.arange(max_rejected)[None, :] < torch.tensor(num_rejected)[:, None],
        }
        if "scores" in examples[0]:
            scores = torch.zeros(len(examples), 1 + max_rejected)
            for i, example in enumerate(examples):
                scores[i, : len(example["scores"])] = torch.tensor(example["scores"])
            output["scores"] = scores
        if INDEX_COLUMN in examples[0]:
            output[INDEX_COLUMN] = torch.tensor([example[INDEX_COLUMN] for example in examples], dtype=torch.long)
        if self.prefix_sharing:  # one packed row per example, forwarded instead of the unshared `input_ids`
            packed = pack_preference_batch(
                examples,
                rejected,
                self.pad_token_id,
                output["completion_mask"].size(1),
                self.max_length,
                self.truncation_mode,
                self.pad_to_multiple_of,
            )
            output.update(packed)
        if "ref_chosen_logps" in examples[0]:
            output["ref_chosen_logps"] = torch.tensor([float(example["ref_chosen_logps"]) for example in examples])
        if "ref_rejected_logps" in examples[0]:
            ref_rejected = torch.zeros(len(examples), max_rejected)
            for i, (example, k) in enumerate(zip(examples, num_rejected, strict=True)):
                values = example["ref_rejected_logps"]
                ref_rejected[i, :k] = torch.tensor(values[:k] if isinstance(values, list) else [values])
            output["ref_rejected_logps"] = ref_rejected
        return output
