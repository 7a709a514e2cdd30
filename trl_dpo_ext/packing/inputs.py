"""The packed forward's inputs (one form per attention implementation), and its outputs laid out as the unshared
batch's again."""

from __future__ import annotations

from typing import Any

import torch

from ..scored_positions import PER_TOKEN_FIELDS
from .attention import SEGMENT_SDPA
from .masks import dense_attention_mask, flex_block_mask, varlen_kwargs
from .models import MASK_IMPLEMENTATIONS, VARLEN_PREFIX


def packed_model_inputs(
    inputs: dict[str, Any], implementation: str, prefix_sharing: bool = True
) -> tuple[dict[str, Any], torch.Tensor]:
    """Keyword arguments of the packed forward and its labels (-100 where no response token is scored).

    Without `prefix_sharing` every block is a whole sequence whose positions restart at 0, which transformers finds
    by itself: the mask implementations get no mask, and transformers builds it from `position_ids`."""
    input_ids = inputs["packed_input_ids"]
    labels = input_ids.masked_fill(inputs["packed_completion_mask"] == 0, -100)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "position_ids": inputs["packed_position_ids"]}
    segment_ids, document_ids = inputs["packed_segment_ids"], inputs["packed_document_ids"]
    if implementation == SEGMENT_SDPA:
        # Ours even without prefix sharing: transformers' SDPA would mask a dense [L, L] block-diagonal over the row
        # An empty 4D mask: transformers then builds none (a 4D mask is used as given), and any kernel that read it
        # instead of `packed_spans` would fail on its shape rather than attend everywhere
        kwargs["attention_mask"] = input_ids.new_zeros(input_ids.size(0), 1, 0, 0, dtype=torch.bool)
        kwargs["packed_spans"] = inputs["packed_spans"]
    elif not prefix_sharing and implementation in MASK_IMPLEMENTATIONS:
        # `create_causal_mask` (no mask, no cache) finds the sequences with `find_packed_sequence_indices`
        kwargs["attention_mask"] = None
    elif implementation == "sdpa":
        kwargs["attention_mask"] = dense_attention_mask(segment_ids, document_ids)
    elif implementation == "eager":
        allowed = dense_attention_mask(segment_ids, document_ids)
        kwargs["attention_mask"] = torch.zeros(allowed.shape, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
    elif implementation == "flex_attention":
        kwargs["attention_mask"] = flex_block_mask(segment_ids, document_ids)
    elif implementation.startswith(VARLEN_PREFIX):
        kwargs["attention_mask"] = None
        kwargs.update(varlen_kwargs(inputs["packed_spans"], tuple(input_ids.shape), input_ids.device))
    else:
        raise ValueError(
            f"Packed rows need one of {[*MASK_IMPLEMENTATIONS, SEGMENT_SDPA, 'flash_attention_2']}, got "
            f"`attn_implementation={implementation!r}`."
        )
    return kwargs, labels


def unpack(values: torch.Tensor, unpack_index: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Lay packed per-token values [N, L - 1] out as the unshared batch's [B + R, L_u - 1], 0 off the responses.

    `completion_mask` is the unshared [B + R, L_u] mask; gradients flow back to the packed positions.
    """
    mask = completion_mask[:, 1:].bool()
    gathered = values.reshape(-1)[unpack_index]
    return gathered.masked_fill(~mask, 0)


def unpack_outputs(outputs, inputs: dict[str, Any]):
    """`FusedCausalLMOutput` of the packed forward, with every per-token field laid out as the unshared batch's."""
    for name in PER_TOKEN_FIELDS:
        values = getattr(outputs, name, None)
        if values is not None:
            setattr(outputs, name, unpack(values, inputs["unpack_index"], inputs["completion_mask"]))
    return outputs
