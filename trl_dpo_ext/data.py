"""Preference rows with one chosen and K rejected: tokenisation and dataset preparation (the row checks are in
`rows.py`, the collator in `collator.py`).

A row holds a `chosen` response and a `rejected` that is either one response (TRL's pairwise format) or a list of
K ≥ 1 responses; K may differ from row to row. Text rows are standard (`str`) or conversational (lists of messages),
with an explicit `prompt` or a prompt implicit in the shared start of the responses, exactly as `trl.DPOTrainer`
takes them. Pre-tokenized rows (`prompt_ids`, `chosen_ids`, `rejected_ids`) are used as given.

Every row is checked (`rows.py`) before training starts, and an error names the row and the column.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor

from ._trl_compat import common_prefix_length, get_config_model_id, global_then_local_main_first, tokenize
from .messages import chat_roles
from .packing.spec import PackingSpec
from .rows import (
    TOKENIZED_COLUMNS,
    RowLimits,
    check_ids,
    check_scores,
    checked_ids,
    first_rows,
    in_dataset,
    is_conversational_row,
    missing_columns,
    parse_text_row,
    rejected_ids_as_list,
    require_values,
    row_warnings,
    rows_filling_max_length,
)
from .score_checks import listed_order_warning, scores_order_warnings


logger = get_logger(__name__)


def extract_prompt_multi(
    example: dict[str, Any], idx: int = 0, conversational: bool | None = None, roles: frozenset[str] | None = None
) -> dict[str, Any]:
    """`trl.extract_prompt` for a list of rejected: the prompt is the shortest of the chosen's common prefixes with
    each rejected. With one rejected it is exactly `trl.extract_prompt`. `conversational`: the dataset's kind, which
    the row must have (None: not checked). The row is checked (`rows.parse_text_row`, with `roles`)."""
    row = parse_text_row({k: v for k, v in example.items() if k != "prompt"}, idx, conversational, roles)
    return {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected if row.listed else row.rejected[0]}


def tokenize_row(
    example: dict[str, Any],
    idx: int,
    processing_class,
    eos_token: str | None,
    conversational: bool | None = None,
    limits: RowLimits | None = None,
    roles: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Validate one text row and tokenize it as TRL does, with each rejected tokenized after the same prompt.

    The completion starts where the tokenized prompt and the tokenized prompt+response diverge, taken over all the
    responses of the row (see `trl.data_utils.common_prefix_length`); with one rejected this is TRL's own rule.
    `conversational` is the dataset's kind, which the row must have (None: not checked); `limits` what its token ids
    and truncation are checked against; `roles` the message roles of the chat template (`messages.chat_roles`).
    """
    require_values(example, ("prompt",), idx)
    prompt, chosen, rejected, _, conversational = parse_text_row(example, idx, conversational, roles)
    if conversational:
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        prompt_ids = tokenize(processing_class, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = [tokenize(processing_class, prompt + r, **kwargs)["input_ids"] for r in [chosen, *rejected]]
    else:
        if eos_token is not None:  # as TRL: standard text ends with EOS, added once
            chosen = chosen if chosen.endswith(eos_token) else chosen + eos_token
            rejected = [r if r.endswith(eos_token) else r + eos_token for r in rejected]
        prompt_ids = tokenize(processing_class, prompt)["input_ids"]
        full_ids = [tokenize(processing_class, prompt + r)["input_ids"] for r in [chosen, *rejected]]

    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    ids = (prompt_ids[:prompt_len], full_ids[0][prompt_len:], [ids[prompt_len:] for ids in full_ids[1:]])
    return checked_ids(example, idx, ids, limits, tokenized=False)


def check_tokenized_row(example: dict[str, Any], idx: int, limits: RowLimits | None = None) -> dict[str, Any]:
    """Validate one pre-tokenized row; its ids are kept exactly as given (no EOS added, nothing re-tokenized).
    `limits` holds the model's vocabulary size, which every id must be below, and the truncation."""
    require_values(example, TOKENIZED_COLUMNS, idx)
    prompt_ids = check_ids(example["prompt_ids"], idx, "prompt_ids")
    chosen_ids = check_ids(example["chosen_ids"], idx, "chosen_ids")
    rejected_ids = rejected_ids_as_list(example["rejected_ids"], idx)
    return checked_ids(example, idx, (prompt_ids, chosen_ids, rejected_ids), limits, tokenized=True)


# ---------------------------------------------------------------------------------------------- preparation


def rated_rows_hint(column_names: list[str]) -> str:
    """Rows of rated responses (UltraFeedback style) are not preference rows yet: say how to convert them."""
    if "completions" not in column_names:
        return ""
    return (
        " Its 'completions' column looks like rated responses: make one chosen and K rejected per row first, with "
        "`trl-dpo-ext convert rated IN OUT --num_rejected K` or `trl_dpo_ext.convert.rated_to_multi_rejected`."
    )


def model_id(model) -> str:
    """The name a model (a path, a Hub id or an instance) goes by, as TRL names it."""
    return model if isinstance(model, str) else get_config_model_id(model.config)


def load_processing_class(model, args):
    """The tokenizer or processor of `model`, loaded as `trl.DPOTrainer` loads it when none is given."""
    return AutoProcessor.from_pretrained(
        model_id(model),
        revision=(args.model_init_kwargs or {}).get("revision"),
        trust_remote_code=args.trust_remote_code,
    )


def prepare_preference_dataset(
    dataset,
    processing_class,
    eos_token: str | None,
    args,
    dataset_name: str,
    loss_spec,
    vocab_size: int | None = None,
    packing: PackingSpec | None = None,
):
    """Validate and tokenize a preference dataset (the trainer's `_prepare_dataset`): every row checked, naming the
    row and the column (token ids against `vocab_size`, the rows of the model's input embedding, when given); text
    rows tokenized with each rejected after the same prompt; the rules on the number of rejected checked against
    `loss_spec`; rows that teach nothing counted in warnings naming the first; rows whose prompt fills `max_length`
    (with `packing.padding_free`, the `token_budget` too) dropped, as TRL drops them (all of them: an error)."""
    max_length = packing.length_limit if packing is not None else args.max_length
    if max_length == args.max_length:
        limit_name = f"`max_length={max_length}`"
    else:
        limit_name = f"`token_budget={max_length}` (which cuts sequences as `max_length` does, with `padding_free`)"
    # A stream whose features are unknown (`IterableDataset.from_generator`, after `.map`) is judged by its first row
    column_names = dataset.column_names or list(next(iter(dataset)))
    tokenized, missing = missing_columns(column_names)
    if missing:
        raise ValueError(
            f"The {dataset_name} dataset has no column {missing} (columns: {column_names}). A preference "
            "dataset needs 'chosen' and 'rejected' (text, with an optional 'prompt'), or 'prompt_ids', "
            "'chosen_ids' and 'rejected_ids' (pre-tokenized)." + rated_rows_hint(column_names)
        )
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}

    def desc(text: str) -> dict:  # `IterableDataset.map` takes no `desc`
        return {"desc": f"{text} {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}

    # The ranking of `plackett_luce` puts the chosen first: a rejected scored above it is an error in that row
    chosen_first = loss_spec.reduction == "plackett_luce"
    limits = RowLimits(vocab_size, max_length, args.truncation_mode, chosen_first)
    with global_then_local_main_first(), in_dataset(dataset_name):
        if tokenized:
            dataset = dataset.map(
                check_tokenized_row, with_indices=True, fn_kwargs={"limits": limits}, **map_kwargs, **desc("Checking")
            )
        else:
            # The first row decides the dataset's kind (chat template, or text with EOS); every row must share it
            first = next(iter(dataset))
            conversational = is_conversational_row(first)
            if "prompt" not in first:
                dataset = dataset.map(
                    extract_prompt_multi,
                    with_indices=True,
                    fn_kwargs={"conversational": conversational, "roles": chat_roles(processing_class)},
                    **map_kwargs,
                    **desc("Extracting prompt from"),
                )
            fn_kwargs = {"processing_class": processing_class, "eos_token": None if conversational else eos_token}
            roles = chat_roles(processing_class)
            dataset = dataset.map(
                tokenize_row,
                with_indices=True,
                fn_kwargs={**fn_kwargs, "conversational": conversational, "limits": limits, "roles": roles},
                **map_kwargs,
                **desc("Tokenizing"),
            )

        if isinstance(dataset, Dataset):
            loss_spec.check_num_rejected(list(dataset["num_rejected"]), dataset_name, args.precompute_ref_log_probs)
            for message in row_warnings(dataset, dataset_name, max_length):
                warnings.warn(message, stacklevel=4)
            for message in scores_order_warnings(dataset, dataset_name, loss_spec.reduction):
                warnings.warn(message, stacklevel=4)
        elif chosen_first and dataset.column_names is not None and "scores" not in dataset.column_names:
            warnings.warn(listed_order_warning(dataset_name), stacklevel=4)

        # As TRL: a prompt that fills `max_length` leaves no completion token under `keep_start` truncation
        if max_length is not None and args.truncation_mode == "keep_start":
            dropped, num_rows = [], None
            if isinstance(dataset, Dataset):
                num_rows = len(dataset)
                dropped, shortest = rows_filling_max_length(dataset, max_length)
                if num_rows and len(dropped) == num_rows:
                    raise ValueError(
                        f"Every row of the {dataset_name} dataset ({num_rows}) has a prompt that alone fills "
                        f"{limit_name} (the shortest has {shortest} tokens), so no completion token is left to train "
                        "on. Raise it, or shorten the prompts."
                    )
            dataset = dataset.filter(
                lambda example: len(example["prompt_ids"]) < max_length,
                **map_kwargs,
                **desc("Dropping fully truncated examples from"),
            )
            if dropped:
                logger.warning(
                    f"Dropped {len(dropped)} of {num_rows} rows of the {dataset_name} dataset whose prompt alone "
                    f"fills {limit_name} ({first_rows(dropped)})."
                )
    return dataset


# ------------------------------------------------------------------------------------------- SFT rows (ref_init)

# Columns of a text row that SFTTrainer reads besides the prompt and completion
SFT_EXTRA_COLUMNS = ("tools", "chat_template_kwargs")


def _check_text_row(example: dict[str, Any], idx: int, conversational: bool | None = None) -> dict[str, Any]:
    """Validate a text row as the DPO trainer will (so a bad row fails before the SFT stage, not after it), and keep
    the prompt and the chosen as SFTTrainer's prompt-completion pair. `conversational`: the dataset's kind."""
    require_values(example, ("prompt",), idx)
    prompt, chosen, rejected, _, _ = parse_text_row(example, idx, conversational)
    check_scores(example, len(rejected), idx)
    row = {"prompt": prompt, "completion": chosen}
    for column in SFT_EXTRA_COLUMNS:
        if column in example:
            row[column] = example[column]
    return row


def _tokenized_sft_row(example: dict[str, Any], idx: int, limits: RowLimits | None = None) -> dict[str, Any]:
    """A pre-tokenized row as SFTTrainer's own tokenized format: nothing is re-tokenized, and the loss mask is the
    chosen tokens (`completion_mask`, used because the SFT stage sets `completion_only_loss=True`)."""
    row = check_tokenized_row(example, idx, limits)
    prompt_ids, chosen_ids = row["prompt_ids"], row["chosen_ids"]
    return {"input_ids": prompt_ids + chosen_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(chosen_ids)}


def preference_to_sft_dataset(
    dataset: Dataset | IterableDataset, dataset_num_proc: int | None = None, vocab_size: int | None = None
) -> Dataset | IterableDataset:
    """The SFT rows of a preference dataset: one (prompt, chosen) row per example, whatever its number of rejected.

    Text rows (standard or conversational, explicit or implicit prompt) become `{"prompt", "completion"}` rows that
    `trl.SFTTrainer` tokenizes as it tokenizes any prompt-completion data; pre-tokenized rows (`prompt_ids`,
    `chosen_ids`, `rejected_ids`) become `{"input_ids", "completion_mask"}` rows, used as given. Every row is
    validated as the DPO trainer validates it, rejected included (pre-tokenized ids against `vocab_size`, the rows
    of the model's input embedding, when given).
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"The training dataset must be a `datasets.Dataset` or `IterableDataset`, got {type(dataset)}."
        )
    first = next(iter(dataset))
    if "image" in first or "images" in first:
        raise NotImplementedError(
            "`ref_init` does not support image rows yet. Train the SFT reference on (prompt, images, chosen) with "
            "`trl.SFTTrainer`, pass it as `model`, and leave `ref_init=None`."
        )
    column_names = dataset.column_names or list(first)
    tokenized, missing = missing_columns(column_names)
    if missing:
        raise ValueError(
            f"The preference dataset has no column {missing} (columns: {column_names}). It needs 'chosen' and "
            "'rejected' (text, with an optional 'prompt'), or 'prompt_ids', 'chosen_ids' and 'rejected_ids'."
        )
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither
        map_kwargs = {"num_proc": dataset_num_proc, "desc": "Building the SFT-on-chosen rows of the dataset"}
    with global_then_local_main_first():
        if tokenized:
            limits = {"limits": RowLimits(vocab_size)}
            return dataset.map(
                _tokenized_sft_row, with_indices=True, fn_kwargs=limits, remove_columns=column_names, **map_kwargs
            )
        kind = {"conversational": is_conversational_row(first)}
        if "prompt" not in column_names:
            dataset = dataset.map(extract_prompt_multi, with_indices=True, fn_kwargs=kind, **map_kwargs)
            column_names = dataset.column_names or list(next(iter(dataset)))
        return dataset.map(
            _check_text_row, with_indices=True, fn_kwargs=kind, remove_columns=column_names, **map_kwargs
        )
