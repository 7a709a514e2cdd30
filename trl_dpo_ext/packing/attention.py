"""Segment-wise SDPA: the attention of packed rows computed piece by piece, only the attended blocks.

Registered with transformers' `AttentionInterface` as `SEGMENT_SDPA`; it runs transformers' own SDPA on every ordinary
forward and the segment-wise path when the forward carries `packed_spans` (transformers passes a model's extra
keyword arguments down to its attention function, as it passes `cu_seq_lens_q` to flash attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._trl_compat import sdpa_attention_forward, sdpa_mask


# The name under which the trainer registers segment-wise SDPA with transformers' `AttentionInterface`
SEGMENT_SDPA = "trl_dpo_ext_sdpa"


def _prefix_causal_mask(num_prefix: int, num_query: int, device) -> torch.Tensor:
    """Bool [S, P + S]: every query sees the whole prefix, and the segment causally."""
    causal = torch.ones(num_query, num_query, dtype=torch.bool, device=device).tril()
    return torch.cat([causal.new_ones(num_query, num_prefix), causal], dim=1)


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: list[tuple[int, int, int, int, int]],
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention of packed rows computed piece by piece: only the attended blocks, with PyTorch's SDPA kernels.

    Args:
        query: [N, H, L, D]; key, value: [N, H_kv, L, D] (grouped-query heads are matched by SDPA's `enable_gqa`).
        spans: `(row, prefix_start, prefix_end, start, end)` per piece, in row order: the queries [start, end) see
            the keys [prefix_start, prefix_end) (a whole earlier piece, or nothing) and, causally, [start, end).

    Returns:
        [N, H, L, D]; 0 on the positions no piece covers (padding).
    """
    num_rows, num_heads, length, head_dim = query.shape
    gqa = num_heads != key.size(1)
    by_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(num_rows)]
    for row, prefix_start, prefix_end, start, end in spans:
        by_row[row].append((prefix_start, prefix_end, start, end))
    rows = []
    masks: dict[tuple[int, int], torch.Tensor] = {}
    # One split per row and tensor (its backward is one concatenation), not a slice per piece (whose backward
    # allocates and adds a full-size gradient for each)
    for row, q_row, k_row, v_row in zip(by_row, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        bounds = sorted({0, length} | {b for _, _, start, end in row for b in (start, end)})
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        index = {a: i for i, a in enumerate(bounds[:-1])}
        chunks = [t.unsqueeze(0).split(sizes, dim=2) for t in (q_row, k_row, v_row)]  # each [1, H, n, D]
        outputs = [None] * len(sizes)
        for prefix_start, prefix_end, start, end in row:
            i = index[start]
            q, k, v = (c[i] for c in chunks)
            if prefix_end > prefix_start:
                j = index[prefix_start]
                k, v = torch.cat([chunks[1][j], k], dim=2), torch.cat([chunks[2][j], v], dim=2)
                shape = (prefix_end - prefix_start, end - start)
                if shape not in masks:
                    masks[shape] = _prefix_causal_mask(*shape, query.device)
                outputs[i] = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=masks[shape], dropout_p=dropout, scale=scaling, enable_gqa=gqa
                )
            else:
                outputs[i] = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
                )
        for i, size in enumerate(sizes):
            if outputs[i] is None:  # padding
                outputs[i] = query.new_zeros(1, num_heads, size, head_dim)
        rows.append(torch.cat(outputs, dim=2))
    return torch.cat(rows, dim=0)


def segment_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_spans: list | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: segment-wise SDPA on packed rows (a `packed_spans` keyword), transformers'
    own SDPA on anything else."""
    if packed_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = segment_attention(query, key, value, packed_spans, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_segment_sdpa() -> None:
    """Register `SEGMENT_SDPA` with transformers (idempotent): the attention function, and SDPA's mask builder for
    its ordinary (unpacked) forwards."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
    AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
