"""Masks of packed rows (`layout`): a token sees the earlier tokens of its own block that are in the shared prefix or
in its own segment, and nothing else; as a dense 4D mask, a FlexAttention `BlockMask`, or varlen flash boundaries."""

from __future__ import annotations

from typing import Any

import torch

from .layout import PREFIX_SEGMENT


def dense_attention_mask(segment_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [N, 1, L, L] mask, True where query q may attend to key k: k ≤ q, k in q's block, and k in the prefix or
    in q's segment. Padding queries see the padding before them, never an empty row (which SDPA would turn into NaN,
    and NaN times a zero gradient is still NaN). Without `document_ids`, each row is one block."""
    length = segment_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    key, query = segment_ids[:, None, :], segment_ids[:, :, None]  # [N, 1, L], [N, L, 1]
    allowed = causal & ((key == PREFIX_SEGMENT) | (key == query))
    if document_ids is not None:
        allowed &= document_ids[:, None, :] == document_ids[:, :, None]
    else:  # one block per row: padding (segment -1) keys are then only seen by padding queries
        allowed &= (key >= PREFIX_SEGMENT) | (query < PREFIX_SEGMENT)
    return allowed[:, None]


def flex_block_mask(segment_ids: torch.Tensor, document_ids: torch.Tensor):
    """The same mask as a FlexAttention `BlockMask`, whose kernel skips the blocks no query attends to."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        key = segment_ids[b, kv_idx]
        same_block = document_ids[b, kv_idx] == document_ids[b, q_idx]
        return (kv_idx <= q_idx) & same_block & ((key == PREFIX_SEGMENT) | (key == segment_ids[b, q_idx]))

    num_rows, length = segment_ids.shape
    return create_block_mask(mask_mod, num_rows, None, length, length, device=segment_ids.device)


def varlen_kwargs(spans: list[tuple[int, int, int, int, int]], shape: tuple[int, int], device) -> dict[str, Any]:
    """`cu_seq_lens_q/k` and `max_length_q/k` of the N × L packed tokens read as one sequence, for varlen flash
    attention: one sequence per block, and the padding at the end of each row as one more."""
    num_rows, length = shape
    starts = sorted(row * length + start for row, _, _, start, _ in spans)
    ends = {row * length + end for row, _, _, _, end in spans} | {row * length for row in range(1, num_rows + 1)}
    boundaries = sorted(set(starts) | ends | {0})
    longest = max(b - a for a, b in zip(boundaries, boundaries[1:]))
    cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32).to(device, non_blocking=True)
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }
