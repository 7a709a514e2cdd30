"""Prefix sharing: forward the prompt of an example once for its chosen and all its K rejected responses.

Each example becomes one packed row

    [prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected_1 | … | prompt[-1], rejected_K | pad …]
     └ prefix ┘  └ segment 1 ────────┘ └ segment 2 ──────────┘     └ segment K + 1 ──────┘

with an attention mask in which every token sees the shared prefix and the earlier tokens of its own segment only,
and position ids that restart at `P - 1` (P = prompt length) for every segment. Each segment opens with its own copy
of the last prompt token at position `P - 1`: that copy sees exactly what the last prompt token sees in the unshared
sequence (the prompt before it, and itself), so its hidden state is the same, and it predicts the first response
token. Every response token is then predicted by the next-token shift inside its segment, and TRL's fused LM head
(`trl.trainer.utils.add_fused_lm_head`) scores the packed row as it is, with no full-vocabulary logits and no
per-response gather of hidden states. The copies cost one token per response: at K = 3 and a 256-token prompt and
responses, 1,283 tokens per example instead of 2,048 (K + 1 sequences, the prompt repeated).

The packed per-token outputs are then laid out as those of the unshared batch (`unpack_index`): the B chosen
sequences then every rejected one, `[B + R, L_u - 1]`, so the rest of the trainer (sequence log-probs, LD-DPO, WPO,
metrics) runs unchanged.

Shapes: B examples, R = Σ K_i rejected in the batch, L_p the packed row length, L_u the unshared padded length.
Segment ids: -1 padding, 0 the shared prefix, 1 the chosen, 1 + k the k-th rejected (k ≥ 1).
"""

from __future__ import annotations

from typing import Any

import torch

from ._trl_compat import attn_implementation, pad


PAD_SEGMENT = -1
PREFIX_SEGMENT = 0
# Attention implementations that honour a custom 4D mask (as a tensor, or as a FlexAttention `BlockMask`)
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


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


def pack_preference_batch(
    examples: list[dict[str, Any]],
    rejected: list[list[list[int]]],
    pad_token_id: int,
    unshared_length: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack a batch of one chosen + K_i rejected examples, one row per example.

    Args:
        examples: rows with `"prompt_ids"` and `"chosen_ids"`.
        rejected: the K_i rejected token lists of each example.
        pad_token_id: token used for padding.
        unshared_length: L_u, the padded length of the unshared batch whose layout `unpack_index` targets.
        max_length, truncation_mode, pad_to_multiple_of: as in the unshared collator. `"keep_end"` truncation cuts
            each response's prompt differently, so it raises when it would cut anything.

    Returns:
        - `packed_input_ids`, `packed_position_ids` and `packed_segment_ids`, each [B, L_p];
        - `packed_completion_mask` [B, L_p]: 1 on the response tokens that are scored (their label positions);
        - `unpack_index` [B + R, L_u - 1]: for each scored token of the unshared per-token layout, the flat index
          into the packed per-token layout [B, L_p - 1] that predicts it (0 elsewhere; mask with the unshared
          `completion_mask[:, 1:]`).
    """
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"Unsupported truncation mode: {truncation_mode}, expected 'keep_start' or 'keep_end'")
    rows, segments, positions, scored, predictions = [], [], [], [], []
    for i, (example, rejected_ids) in enumerate(zip(examples, rejected, strict=True)):
        responses = [example["chosen_ids"], *rejected_ids]
        if truncation_mode == "keep_end" and max_length is not None:
            longest = len(example["prompt_ids"]) + max(len(r) for r in responses)
            if longest > max_length:
                raise ValueError(
                    f"Example {i} has a sequence of {longest} tokens, over `max_length={max_length}`: with "
                    "`truncation_mode='keep_end'` each response would keep a different part of the prompt, which "
                    "then cannot be shared. Use `truncation_mode='keep_start'`, a larger `max_length`, or "
                    "`prefix_sharing=False`."
                )
        input_ids, segment_ids, position_ids, pred_positions = pack_example(
            example["prompt_ids"], responses, max_length if truncation_mode == "keep_start" else None
        )
        mask = [0] * len(input_ids)
        for row_positions in pred_positions:
            for p in row_positions:
                mask[p + 1] = 1
        rows.append(input_ids)
        segments.append(segment_ids)
        positions.append(position_ids)
        scored.append(mask)
        predictions.append(pred_positions)

    def padded(values: list[list[int]], value: int) -> torch.Tensor:
        tensors = [torch.tensor(v, dtype=torch.long) for v in values]
        return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)

    input_ids = padded(rows, pad_token_id)
    packed_width = input_ids.size(1) - 1  # the packed per-token layout is [B, L_p - 1]

    # Unshared layout: the B chosen sequences, then every rejected sequence, example by example
    chosen_rows = [(i, 0) for i in range(len(examples))]
    rejected_rows = [(i, s) for i, rejected_ids in enumerate(rejected) for s in range(1, len(rejected_ids) + 1)]
    unpack_index = torch.zeros(len(chosen_rows) + len(rejected_rows), unshared_length - 1, dtype=torch.long)
    for row, (i, s) in enumerate(chosen_rows + rejected_rows):
        num_prompt = min(len(examples[i]["prompt_ids"]), max_length or len(examples[i]["prompt_ids"]))
        pred = predictions[i][s]
        # Unshared: response token j sits at P + j and is predicted at shifted position P + j - 1
        first = num_prompt - 1 if num_prompt else 0
        unpack_index[row, first : first + len(pred)] = torch.tensor(pred, dtype=torch.long) + i * packed_width
    return {
        "packed_input_ids": input_ids,
        "packed_position_ids": padded(positions, 0),
        "packed_segment_ids": padded(segments, PAD_SEGMENT),
        "packed_completion_mask": padded(scored, 0),
        "unpack_index": unpack_index,
    }


def dense_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, L_p, L_p] mask, True where query q may attend to key k: k ≤ q and k in the prefix or in q's
    segment. Padding queries see the prefix and the padding before them, never an empty row (which SDPA would turn
    into NaN, and NaN times a zero gradient is still NaN)."""
    length = segment_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    key, query = segment_ids[:, None, :], segment_ids[:, :, None]  # [B, 1, L], [B, L, 1]
    return (causal & ((key == PREFIX_SEGMENT) | (key == query)))[:, None]


def flex_block_mask(segment_ids: torch.Tensor):
    """The same mask as a FlexAttention `BlockMask`, whose kernel skips the blocks no query attends to."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        key = segment_ids[b, kv_idx]
        return (kv_idx <= q_idx) & ((key == PREFIX_SEGMENT) | (key == segment_ids[b, q_idx]))

    batch_size, length = segment_ids.shape
    return create_block_mask(mask_mod, batch_size, None, length, length, device=segment_ids.device)


def attention_mask_for(segment_ids: torch.Tensor, attn_implementation: str):
    """The 4D mask in the form `attn_implementation` takes: a bool tensor for SDPA, an additive float tensor for
    eager attention (which adds the mask to the scores), a `BlockMask` for FlexAttention."""
    if attn_implementation == "sdpa":
        return dense_attention_mask(segment_ids)
    if attn_implementation == "eager":
        allowed = dense_attention_mask(segment_ids)
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if attn_implementation == "flex_attention":
        return flex_block_mask(segment_ids)
    raise ValueError(
        f"Prefix sharing needs an attention that takes a custom 4D mask ({list(SUPPORTED_ATTN_IMPLEMENTATIONS)}), "
        f"got `attn_implementation={attn_implementation!r}`."
    )


def packed_model_inputs(inputs: dict[str, torch.Tensor], attn_implementation: str) -> tuple[dict, torch.Tensor]:
    """Keyword arguments of the packed forward and its labels (-100 where no response token is scored)."""
    labels = inputs["packed_input_ids"].masked_fill(inputs["packed_completion_mask"] == 0, -100)
    kwargs = {
        "input_ids": inputs["packed_input_ids"],
        "attention_mask": attention_mask_for(inputs["packed_segment_ids"], attn_implementation),
        "position_ids": inputs["packed_position_ids"],
    }
    return kwargs, labels


def unpack(values: torch.Tensor, unpack_index: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Lay packed per-token values [B, L_p - 1] out as the unshared batch's [B + R, L_u - 1], 0 off the responses.

    `completion_mask` is the unshared [B + R, L_u] mask; gradients flow back to the packed positions.
    """
    mask = completion_mask[:, 1:].bool()
    gathered = values.reshape(-1)[unpack_index]
    return gathered.masked_fill(~mask, 0)


PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def unpack_outputs(outputs, inputs: dict[str, torch.Tensor]):
    """`FusedCausalLMOutput` of the packed forward, with every per-token field laid out as the unshared batch's."""
    for name in PER_TOKEN_OUTPUTS:
        values = getattr(outputs, name, None)
        if values is not None:
            setattr(outputs, name, unpack(values, inputs["unpack_index"], inputs["completion_mask"]))
    return outputs


def check_prefix_sharing(model, name: str = "model", aux_loss_enabled: bool = False) -> None:
    """Raise if `model` (a `PreTrainedModel` or a PEFT model around one) cannot run the packed forward exactly, or
    if a Mixture-of-Experts router loss is on (it reads a 2D attention mask)."""
    from accelerate.utils import is_peft_model

    if aux_loss_enabled:
        raise NotImplementedError(
            "`prefix_sharing=True` does not support the router auxiliary loss of Mixture-of-Experts models yet "
            "(it reads a 2D attention mask). Set `router_aux_loss_coef=0.0` or `prefix_sharing=False`."
        )
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        raise ValueError(
            f"Prefix sharing cannot be used with the prompt-learning PEFT method of the {name} "
            f"({model.active_peft_config.peft_type}): its virtual tokens are not covered by the packed 4D attention "
            "mask. Use LoRA or another adapter method, or set `prefix_sharing=False`."
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = attn_implementation(config)
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Prefix sharing needs an attention implementation that takes a custom 4D attention mask, one of "
            f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}, but the {name} uses `attn_implementation={implementation!r}`. "
            "Load it with `attn_implementation='sdpa'` (or 'flex_attention' on GPU), or set `prefix_sharing=False`."
        )
    layer_types = getattr(config, "layer_types", None) or []
    windowed = [t for t in set(layer_types) if t != "full_attention"]
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        windowed = ["sliding_attention"]
    if windowed:
        raise ValueError(
            f"Prefix sharing replaces the attention mask of every layer, but the {name} has {sorted(windowed)} layers "
            "whose own mask (a sliding window, chunks or linear attention) would be lost. Set `prefix_sharing=False` "
            "for this architecture."
        )
