"""Attention over packed rows (`trl_dpo_ext.packing`): a token sees the earlier tokens of its own block that are in
the shared prefix or in its own segment, and nothing else.

What each attention implementation runs (see docs/prefix_sharing.md for the measurements behind it):

| `attn_implementation` | packed rows |
|---|---|
| `"sdpa"` | segment-wise SDPA (`segment_sdpa_attention`): per attention piece, the queries of a segment over the keys of [its prompt prefix, itself], with PyTorch's SDPA: only the attended blocks are computed. The trainer registers it as `"trl_dpo_ext_sdpa"`, which runs transformers' own SDPA for any other input. |
| `"eager"` | dense additive 4D mask (the fallback: every masked score is computed); `"sdpa"` itself (image rows, which the trainer does not switch) takes the dense bool mask |
| `"flex_attention"` | FlexAttention `BlockMask`; its kernel skips the blocks no query attends to (GPU: FlexAttention has no backward on CPU in torch 2.13) |
| `"flash_attention_2"`/`"_3"` | varlen flash attention over `cu_seq_lens` (padding-free without prefix sharing only) |

The model reads the layout from its keyword arguments: transformers passes a model's extra keyword arguments down
to its attention function, which is how `flash_attention_2` gets `cu_seq_lens_q`; `packed_spans` travels the same
way to `segment_sdpa_attention`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._trl_compat import attn_implementation as config_attn_implementation
from ._trl_compat import sdpa_attention_forward, sdpa_mask
from .packing import PREFIX_SEGMENT


# The name under which the trainer registers segment-wise SDPA with transformers' `AttentionInterface`
SEGMENT_SDPA = "trl_dpo_ext_sdpa"
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")  # take a custom 4D mask
VARLEN_PREFIX = "flash_attention"  # flash_attention_2, _3: sequences from `cu_seq_lens`, no custom mask
# Per-token fields of TRL's `FusedCausalLMOutput`, laid out as the unshared batch's by `unpack_outputs`
PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


# ------------------------------------------------------------------ masks


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


# --------------------------------------------------- segment-wise SDPA


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


# ------------------------------------------------------------- models


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attn_implementation(model) -> str | None:
    """The attention implementation of a model's text part (the one that runs the packed rows)."""
    return config_attn_implementation(text_config(model))


def check_model_supports_packing(
    model, name: str = "model", prefix_sharing: bool = True, padding_free: bool = False, aux_loss_enabled: bool = False
) -> None:
    """Raise if `model` (a `PreTrainedModel` or a PEFT model around one) cannot run the packed forward exactly, or
    if a Mixture-of-Experts router loss is on (it reads a 2D attention mask)."""
    from accelerate.utils import is_peft_model

    feature = " and ".join(
        f for f, on in (("`prefix_sharing=True`", prefix_sharing), ("`padding_free=True`", padding_free)) if on
    )
    off = " and ".join(
        f for f, on in (("`prefix_sharing=False`", prefix_sharing), ("`padding_free=False`", padding_free)) if on
    )
    if aux_loss_enabled:
        raise NotImplementedError(
            f"{feature} does not support the router auxiliary loss of Mixture-of-Experts models yet (it reads a 2D "
            f"attention mask). Set `router_aux_loss_coef=0.0` or {off}."
        )
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        raise ValueError(
            f"{feature} cannot be used with the prompt-learning PEFT method of the {name} "
            f"({model.active_peft_config.peft_type}): its virtual tokens are not covered by the packed attention. "
            f"Use LoRA or another adapter method, or set {off}."
        )
    implementation = attn_implementation(model)
    varlen = implementation is not None and implementation.startswith(VARLEN_PREFIX)
    if varlen and prefix_sharing:
        raise ValueError(
            f"Prefix sharing needs an attention that takes a custom mask, one of {list(MASK_IMPLEMENTATIONS)}, but the "
            f"{name} uses `attn_implementation={implementation!r}`, which only separates whole sequences. Load it "
            "with `attn_implementation='sdpa'` (or 'flex_attention' on GPU), or set `prefix_sharing=False` (varlen "
            "flash attention then serves `padding_free=True`)."
        )
    if not varlen and implementation not in (*MASK_IMPLEMENTATIONS, SEGMENT_SDPA):
        supported = [*MASK_IMPLEMENTATIONS] + (
            ["flash_attention_2", "flash_attention_3"] if not prefix_sharing else []
        )
        raise ValueError(
            f"{feature} needs an attention implementation that keeps the packed sequences apart, one of {supported}, "
            f"but the {name} uses `attn_implementation={implementation!r}`. Load it with `attn_implementation='sdpa'` "
            f"(or 'flex_attention' on GPU), or set {off}."
        )
    if implementation == "flex_attention" and not torch.cuda.is_available():
        raise ValueError(
            f"The {name} uses `attn_implementation='flex_attention'`, which has no backward pass on CPU (torch "
            f"{torch.__version__}), so {feature} cannot train with it here. Load it with "
            "`attn_implementation='sdpa'`: on CPU the packed rows then run segment-wise SDPA."
        )
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None) or []
    windowed = [t for t in set(layer_types) if t != "full_attention"]
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        windowed = ["sliding_attention"]
    if windowed:
        raise ValueError(
            f"{feature} replaces the attention mask of every layer, but the {name} has {sorted(windowed)} layers "
            f"whose own mask (a sliding window, chunks or linear attention) would be lost. Set {off} for this "
            "architecture."
        )


def use_segment_sdpa(model) -> None:
    """Switch an SDPA `model` to `SEGMENT_SDPA`: the same kernel on every ordinary forward, segment-wise on packed
    rows. Other implementations are left as they are. Not saved: `attn_implementation` is not part of a config."""
    from accelerate.utils import is_peft_model

    if attn_implementation(model) != "sdpa":
        return
    register_segment_sdpa()
    base = model.get_base_model() if is_peft_model(model) else model
    base.set_attn_implementation(SEGMENT_SDPA)


def check_packing_setup(args, data_collator, image_rows: bool) -> None:
    """Raise, before any work, for a run that could not pack: a given collator that does not pack what
    `prefix_sharing` or `padding_free` asks for, or `padding_free` with image rows."""
    if getattr(args, "prefix_sharing", False) and data_collator is not None:
        if not getattr(data_collator, "prefix_sharing", False):
            raise ValueError(
                f"`prefix_sharing=True` needs a collator that packs each example's prompt once, but the given "
                f"{type(data_collator).__name__} does not (no `prefix_sharing=True`). Leave `data_collator=None` for "
                "the default one, pass `DataCollatorForMultiRejectedPreference(..., prefix_sharing=True)`, or set "
                "`prefix_sharing=False`."
            )
    if not args.padding_free:
        return
    if data_collator is not None and not getattr(data_collator, "padding_free", False):
        raise ValueError(
            f"`padding_free=True` needs a collator that lays the batch in packed rows, but the given "
            f"{type(data_collator).__name__} does not (no `padding_free=True`). Leave `data_collator=None` for "
            "the default one, pass `DataCollatorForMultiRejectedPreference(..., padding_free=True)`, or set "
            "`padding_free=False`."
        )
    if image_rows:
        raise NotImplementedError(
            "`padding_free=True` is not supported for image rows yet (their image inputs are per sequence or per "
            "example). Set `padding_free=False`; `prefix_sharing=True` works with images."
        )


def prepare_packed_models(
    models: dict[str, Any], prefix_sharing: bool, padding_free: bool, aux_loss_enabled: bool, image_rows: bool
) -> None:
    """Check every model (None skipped) for the packed forward, the policy's router loss too, and switch SDPA text
    models to the segment-wise kernel. Image rows keep the dense mask: a vision-language model's vision tower shares
    the attention setting, and the segment-wise kernel failed the LLaVA packed-forward test."""
    models = {name: model for name, model in models.items() if model is not None}
    for name, model in models.items():
        check_model_supports_packing(model, name, prefix_sharing, padding_free, aux_loss_enabled and name == "model")
    if not image_rows:
        for model in models.values():
            use_segment_sdpa(model)


# ------------------------------------------------------------ forward


def packed_model_inputs(inputs: dict[str, Any], implementation: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Keyword arguments of the packed forward and its labels (-100 where no response token is scored)."""
    input_ids = inputs["packed_input_ids"]
    labels = input_ids.masked_fill(inputs["packed_completion_mask"] == 0, -100)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "position_ids": inputs["packed_position_ids"]}
    segment_ids, document_ids = inputs["packed_segment_ids"], inputs["packed_document_ids"]
    if implementation == SEGMENT_SDPA:
        # An empty 4D mask: transformers then builds none (a 4D mask is used as given), and any kernel that read it
        # instead of `packed_spans` would fail on its shape rather than attend everywhere
        kwargs["attention_mask"] = input_ids.new_zeros(input_ids.size(0), 1, 0, 0, dtype=torch.bool)
        kwargs["packed_spans"] = inputs["packed_spans"]
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
    for name in PER_TOKEN_OUTPUTS:
        values = getattr(outputs, name, None)
        if values is not None:
            setattr(outputs, name, unpack(values, inputs["unpack_index"], inputs["completion_mask"]))
    return outputs
