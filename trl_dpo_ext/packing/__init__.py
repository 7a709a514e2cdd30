"""Packed rows: prefix sharing (each prompt forwarded once for its K + 1 responses) and padding-free (a batch laid
end to end), one concern a module, read from the config once as a `PackingSpec`.

| module | concern |
|---|---|
| `spec.py` | `PackingSpec`: what to pack and the length limits, built once from the config; the packing rules |
| `truncation.py` | the one truncation of a prompt + response to the length limit (`truncation_mode`) |
| `layout.py` | blocks (a sequence, or an example's shared prompt and segments), best-fit rows, `unpack_index` |
| `masks.py` | the mask of packed rows: dense 4D, FlexAttention `BlockMask`, varlen flash boundaries |
| `attention.py` | segment-wise SDPA, registered with transformers as `SEGMENT_SDPA` |
| `models.py` | which models can run packed rows exactly; switching SDPA models to the segment-wise kernel |
| `inputs.py` | the packed forward's keyword arguments per attention implementation; unpacking its outputs |

What each attention implementation runs (see docs/prefix_sharing.md for the measurements behind it):

| `attn_implementation` | packed rows |
|---|---|
| `"sdpa"` | segment-wise SDPA (`attention.segment_sdpa_attention`): per attention piece, the queries of a segment over the keys of [its prompt prefix, itself]: only the attended blocks are computed. The trainer registers it as `"trl_dpo_ext_sdpa"`, which runs transformers' own SDPA for any other input. |
| `"eager"` | dense additive 4D mask (the fallback: every masked score is computed); `"sdpa"` itself (image rows, which the trainer does not switch) takes the dense bool mask |
| `"flex_attention"` | FlexAttention `BlockMask`; its kernel skips the blocks no query attends to (GPU: FlexAttention has no backward on CPU in torch 2.13) |
| `"eager"`, `"sdpa"`, `"flex_attention"`, padding-free without prefix sharing | no mask: transformers finds the sequences from the restarting `position_ids` and builds its own (the same numbers) |
| `"flash_attention_2"`/`"_3"` | varlen flash attention over `cu_seq_lens` (padding-free without prefix sharing only) |
"""

import importlib


# Name -> module that defines it, loaded on first access (as the package's own `__init__`), so that the row checks
# importing `truncation` do not import torch and transformers
_LAZY = {
    "SEGMENT_SDPA": ".attention",
    "register_segment_sdpa": ".attention",
    "segment_attention": ".attention",
    "segment_sdpa_attention": ".attention",
    "packed_model_inputs": ".inputs",
    "unpack": ".inputs",
    "unpack_outputs": ".inputs",
    "PAD_DOCUMENT": ".layout",
    "PAD_SEGMENT": ".layout",
    "PREFIX_SEGMENT": ".layout",
    "pack_example": ".layout",
    "pack_preference_batch": ".layout",
    "dense_attention_mask": ".masks",
    "flex_block_mask": ".masks",
    "varlen_kwargs": ".masks",
    "attn_implementation": ".models",
    "check_model_supports_packing": ".models",
    "check_packing_setup": ".models",
    "prepare_packed_models": ".models",
    "PackingSpec": ".spec",
    "sequence_limit": ".truncation",
    "truncate": ".truncation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
