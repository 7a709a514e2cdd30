"""Prefix sharing: forward the prompt of an example once for its chosen and all its K rejected responses.

Each example becomes one packed block (`trl_dpo_ext.packing` lays the blocks in rows: one per row, or end to end
with `padding_free=True`)

    [prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected_1 | … | prompt[-1], rejected_K | pad …]
     └ prefix ┘  └ segment 1 ────────┘ └ segment 2 ──────────┘     └ segment K + 1 ──────┘

with an attention in which every token sees the shared prefix and the earlier tokens of its own segment only,
and position ids that restart at `P - 1` (P = prompt length) for every segment. Each segment opens with its own copy
of the last prompt token at position `P - 1`: that copy sees exactly what the last prompt token sees in the unshared
sequence (the prompt before it, and itself), so its hidden state is the same, and it predicts the first response
token. Every response token is then predicted by the next-token shift inside its segment, and TRL's fused LM head
(`trl.trainer.utils.add_fused_lm_head`) scores the packed row as it is, with no full-vocabulary logits and no
per-response gather of hidden states. The copies cost one token per response: at K = 3 and a 256-token prompt and
responses, 1,283 tokens per example instead of 2,048 (K + 1 sequences, the prompt repeated).

The packed per-token outputs are then laid out as those of the unshared batch (`trl_dpo_ext.packing`,
`unpack_index`), so the rest of the trainer (sequence log-probs, LD-DPO, WPO, metrics) runs unchanged; the attention
over the packed rows is `trl_dpo_ext.packed_attention`.

Segment ids: -1 padding, 0 the shared prefix, 1 the chosen, 1 + k the k-th rejected (k ≥ 1).
"""

from __future__ import annotations


PAD_SEGMENT = -1
PREFIX_SEGMENT = 0


def pack_example(
    prompt_ids: list[int], responses: list[list[int]], max_length: int | None = None
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """Pack one prompt and its responses (chosen first) into one row.

    `max_length` truncates each prompt + response as the unshared collator does with `truncation_mode="keep_start"`:
    the prompt first, then each response to what is left.

    Returns:
        `input_ids`, `segment_ids`, `position_ids` (each a list of length L_row), and for each response the packed
        positions that predict its tokens (`pred_positions[s][j]` predicts the j-th kept token of response s; a
        response of an empty prompt has no prediction for its first token, as in the unshared forward).
    """
    if max_length is not None:
        prompt_ids = prompt_ids[:max_length]
        responses = [r[: max_length - len(prompt_ids)] for r in responses]
    num_prompt = len(prompt_ids)
    prefix = prompt_ids[:-1]  # the last prompt token opens every segment
    opener = prompt_ids[-1:]
    start = len(prefix)  # position id of the opener, P - 1 (0 for an empty prompt)
    input_ids = list(prefix)
    segment_ids = [PREFIX_SEGMENT] * len(prefix)
    position_ids = list(range(len(prefix)))
    pred_positions = []
    for s, response in enumerate(responses, start=1):
        offset = len(input_ids)
        segment = opener + response
        input_ids += segment
        segment_ids += [s] * len(segment)
        position_ids += range(start, start + len(segment))
        # Token j of the response sits at offset + len(opener) + j and is predicted from the position before it
        first = 0 if num_prompt else 1
        pred_positions.append([offset + len(opener) + j - 1 for j in range(first, len(response))])
    return input_ids, segment_ids, position_ids, pred_positions
