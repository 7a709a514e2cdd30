"""The one truncation: a prompt + response cut to the length limit as TRL's `DataCollatorForPreference` cuts it.

Done once per sequence, before any packing (the collator, image rows' per-token outputs, the dataset's checks), so a
packed row holds exactly the tokens of the unshared sequence.
"""

from __future__ import annotations

from typing import TypeVar


T = TypeVar("T")
TRUNCATION_MODES = ("keep_start", "keep_end")


def sequence_limit(max_length: int | None, token_budget: int | None = None) -> int | None:
    """The length every sequence is cut to: `max_length`, and the `token_budget` of padding-free rows (the smaller),
    so that each sequence fits a packed row alone."""
    limits = [limit for limit in (max_length, token_budget) if limit is not None]
    return min(limits) if limits else None


def truncate(
    prompt: list[T], response: list[T], max_length: int | None, truncation_mode: str = "keep_start"
) -> tuple[list[T], list[T]]:
    """The parts of `prompt` and `response` that `(prompt + response)[:max_length]` (`"keep_start"`) or
    `(prompt + response)[-max_length:]` (`"keep_end"`) keeps. Any per-token lists work (token ids, token types)."""
    if max_length is None:
        return list(prompt), list(response)
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"Unsupported truncation mode: {truncation_mode}, expected 'keep_start' or 'keep_end'")
    if len(prompt) + len(response) <= max_length:
        return list(prompt), list(response)
    if truncation_mode == "keep_start":
        kept_prompt = prompt[:max_length]
        return list(kept_prompt), list(response[: max_length - len(kept_prompt)])
    kept_response = response[len(response) - min(len(response), max_length) :]
    return list(prompt[len(prompt) - (max_length - len(kept_response)) :]), list(kept_response)
