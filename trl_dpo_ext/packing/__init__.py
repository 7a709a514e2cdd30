"""Packed rows: prefix sharing (each prompt forwarded once for its K + 1 responses) and padding-free (a batch laid
end to end), one concern a module, read from the config once as a `PackingSpec`.

| module | concern |
|---|---|
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
| `"flash_attention_2"`/`"_3"` | varlen flash attention over `cu_seq_lens` (padding-free without prefix sharing only) |
"""

from .attention import SEGMENT_SDPA, register_segment_sdpa, segment_attention, segment_sdpa_attention
from .inputs import packed_model_inputs, unpack, unpack_outputs
from .layout import PAD_DOCUMENT, PAD_SEGMENT, PREFIX_SEGMENT, pack_example, pack_preference_batch
from .masks import dense_attention_mask, flex_block_mask, varlen_kwargs
from .models import attn_implementation, check_model_supports_packing, check_packing_setup, prepare_packed_models


__all__ = [
    "PAD_DOCUMENT",
    "PAD_SEGMENT",
    "PREFIX_SEGMENT",
    "SEGMENT_SDPA",
    "attn_implementation",
    "check_model_supports_packing",
    "check_packing_setup",
    "dense_attention_mask",
    "flex_block_mask",
    "pack_example",
    "pack_preference_batch",
    "packed_model_inputs",
    "prepare_packed_models",
    "register_segment_sdpa",
    "segment_attention",
    "segment_sdpa_attention",
    "unpack",
    "unpack_outputs",
    "varlen_kwargs",
]
