"""`DataCollatorForMultiRejectedPreference`: one padded batch of B chosen and Σ K_i rejected sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import ProcessorMixin

from ._trl_compat import DataCollatorMixin, pad
from .packing import pack_preference_batch
from .packing.spec import PackingSpec
from .packing.truncation import truncate
from .rows import INDEX_COLUMN, rejected_ids_as_list


def set_pad_token(args, processing_class):
    """TRL's rule for the pad token of the collator it builds: `args.pad_token`, else the tokenizer's, else EOS, which
    must be in the vocabulary; set on the tokenizer, which is returned (the trainer mirrors it onto the model)."""
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    pad_token = getattr(args, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None:  # else TRL's message below names a `pad_token` ('None') the user never set
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token, so nothing pads the "
            "batches. Set one of its tokens as the pad token (`tokenizer.pad_token = ...`), or add one "
            "(`tokenizer.add_special_tokens({'pad_token': '<pad>'})`, then `model.resize_token_embeddings(len(tokenizer))`)."
        )
    if pad_token not in tokenizer.get_vocab():
        raise ValueError(
            f"The specified `pad_token` ('{pad_token}') is not found in the vocabulary of the given "
            f"`processing_class` ({processing_class.__class__.__name__}). Ensure that the `pad_token` exists "
            "in the vocabulary before using it as a padding token."
        )
    tokenizer.pad_token = pad_token
    return tokenizer


def mirror_pad_token(model, pad_token_id: int) -> None:
    """The model's configs take the collator's pad token id, as TRL sets them when it builds its collator."""
    model.config.get_text_config().pad_token_id = pad_token_id
    model.generation_config.pad_token_id = pad_token_id


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
        prefix_sharing (`bool`, *optional*, defaults to `False`): also pack each example as one block [prompt |
            chosen | rejected_1 | …], one block per row unless `padding_free`.
        padding_free (`bool`, *optional*, defaults to `False`): also lay the blocks (the sequences, or with
            `prefix_sharing` the examples) end to end, in one row or in rows of at most `token_budget` tokens.
        token_budget (`int`, *optional*): with `padding_free`, the most tokens in a packed row; it also truncates
            every sequence as `max_length` does (the smaller of the two applies), so no block is ever dropped.

    With `prefix_sharing` or `padding_free`, the batch also holds `packed_input_ids`, `packed_position_ids`,
    `packed_segment_ids`, `packed_document_ids`, `packed_completion_mask` [N, L], `packed_spans` (host ints) and
    `unpack_index`, besides the unshared keys (see `trl_dpo_ext.packing.pack_preference_batch`).

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
    padding_free: bool = False
    token_budget: int | None = None

    def __post_init__(self):
        # The packing rules of a config hold for a collator built by hand too
        self.packing = PackingSpec(
            self.prefix_sharing, self.padding_free, self.token_budget, self.max_length, self.truncation_mode
        )

    @classmethod
    def from_config(cls, args, processing_class, packing: PackingSpec) -> DataCollatorForMultiRejectedPreference:
        """The collator a `DPOConfig` and its `PackingSpec` ask for, padding with the pad token TRL would
        (`set_pad_token`)."""
        tokenizer = set_pad_token(args, processing_class)
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            max_length=packing.max_length,
            truncation_mode=packing.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
            prefix_sharing=packing.prefix_sharing,
            padding_free=packing.padding_free,
            token_budget=packing.token_budget,
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rejected = [rejected_ids_as_list(example["rejected_ids"], i) for i, example in enumerate(examples)]
        # Each prompt + response truncated once, here (with `padding_free`, to the `token_budget` too, so every
        # sequence fits a packed row alone): the unshared rows and the packed blocks hold the same tokens
        limit, mode = self.packing.length_limit, self.truncation_mode
        truncated = [
            [truncate(example["prompt_ids"], ids, limit, mode) for ids in (example["chosen_ids"], *rejected_ids)]
            for example, rejected_ids in zip(examples, rejected, strict=True)
        ]
        # The unshared order: every chosen, then every rejected, example by example
        pairs = [pairs[0] for pairs in truncated] + [pair for pairs in truncated for pair in pairs[1:]]
        sequences = [prompt + response for prompt, response in pairs]
        completion_masks = [[0] * len(prompt) + [1] * len(response) for prompt, response in pairs]

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
        if self.prefix_sharing or self.padding_free:  # packed rows, forwarded instead of the unshared `input_ids`
            packed = pack_preference_batch(
                truncated,
                sequences,
                completion_masks,
                self.pad_token_id,
                output["completion_mask"].size(1),
                self.packing,
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
