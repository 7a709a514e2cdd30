"""`PackingSpec`: what the packed forward packs, and the length limits, built once from the config."""

from __future__ import annotations

from dataclasses import dataclass

from .truncation import sequence_limit


@dataclass(frozen=True)
class PackingSpec:
    """The packing fields of a `trl_dpo_ext.DPOConfig`, read from it in `from_config` and nowhere else.

    Args:
        prefix_sharing: each example packed as one block, its prompt once (`layout.pack_example`).
        padding_free: the blocks of a batch laid end to end, in rows of at most `token_budget` tokens.
        token_budget: with `padding_free`, the most tokens in a packed row; it also cuts every sequence.
        max_length, truncation_mode: the unshared collator's truncation of each prompt + response.
    """

    prefix_sharing: bool = False
    padding_free: bool = False
    token_budget: int | None = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    @classmethod
    def from_config(cls, args) -> PackingSpec:
        return cls(
            prefix_sharing=args.prefix_sharing,
            padding_free=args.padding_free,
            token_budget=args.token_budget,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
        )

    def __post_init__(self) -> None:
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"`token_budget` must be None or a positive number of tokens, got {self.token_budget}.")
        budget = self.token_budget if self.padding_free else None
        if self.prefix_sharing and (self.max_length, budget) != (None, None) and self.truncation_mode == "keep_end":
            cut_by = f"`max_length={self.max_length}`" + (f", `token_budget={budget}`" if budget else "")
            raise ValueError(
                f"`prefix_sharing=True` shares the prompt of every response, but `truncation_mode='keep_end'` (with "
                f"{cut_by}) cuts a different part of the prompt for each response. Use "
                "`truncation_mode='keep_start'`, no `max_length` nor `token_budget`, or `prefix_sharing=False`."
            )

    @property
    def packed(self) -> bool:
        """Whether the forward runs on packed rows."""
        return self.prefix_sharing or self.padding_free

    @property
    def length_limit(self) -> int | None:
        """What every sequence is cut to: `max_length`, and with `padding_free` the `token_budget` (the smaller)."""
        return sequence_limit(self.max_length, self.token_budget if self.padding_free else None)
