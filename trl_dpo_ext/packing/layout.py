"""Lay the sequences of a collated batch in packed rows: prefix sharing and padding-free.

The unit laid in a row is a *block*:

- without prefix sharing, one sequence `prompt + response` (one segment, no shared prefix);
- with prefix sharing, one example `[prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected_1 | …]` (see
  `pack_example`), or, when it exceeds the token budget, several blocks that each repeat the prompt and carry some
  of its responses.

`padding_free=False` puts one block per row and pads the rows to the longest (prefix sharing alone);
`padding_free=True` lays the blocks end to end, in one row, or in as few rows of at most `token_budget` tokens as
best-fit decreasing finds. Inside a block, positions restart at 0 (and at `P - 1` in each shared segment), and a
token attends to the earlier tokens of its own block that are in the shared prefix or in its own segment: never to
another block. The attention side is `masks`, `attention` and `inputs`.

The packed per-token outputs [N, L - 1] are then gathered (`unpack_index`) into the layout of the unshared padded
batch [B + R, L_u - 1], so everything after the forward runs unchanged.

A shared block repeats the last prompt token at the head of every segment, at position `P - 1`: that copy sees
exactly what the last prompt token sees in the unshared sequence (the prompt before it, and itself), so its hidden
state is the same, and it predicts the first response token; TRL's fused LM head then scores the packed row as it is
(docs/prefix_sharing.md). The copies cost one token per response.

Shapes: B examples, R = Σ K_i rejected, N packed rows of length L, L_u the unshared padded length.
Segment ids: -1 padding, 0 the shared prefix, s ≥ 1 the s-th segment of its block.
Document ids: -1 padding, d ≥ 0 the block's index in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._trl_compat import pad
from .spec import PackingSpec


PAD_SEGMENT = -1
PREFIX_SEGMENT = 0
PAD_DOCUMENT = -1


def pack_example(
    prompt_ids: list[int], responses: list[list[int]]
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """Pack one prompt and its responses (chosen first, each already truncated with the prompt) into one row.

    Returns:
        `input_ids`, `segment_ids`, `position_ids` (each a list of length L_row), and for each response the packed
        positions that predict its tokens (`pred_positions[s][j]` predicts the j-th kept token of response s; a
        response of an empty prompt has no prediction for its first token, as in the unshared forward).
    """
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


@dataclass
class Block:
    """A run of tokens laid in a row as a whole; every list is block-relative."""

    input_ids: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    label_mask: list[int]  # 1 on the tokens that are scored (predicted from the token before)
    # Attention pieces: queries [start, end) see the keys [prefix_start, prefix_end) and, causally, [start, end)
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (unshared row, first unshared per-token column, positions predicting that row's columns from there on)
    predictions: list[tuple[int, int, list[int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def sequence_block(row: int, input_ids: list[int], completion_mask: list[int]) -> Block:
    """One unshared sequence (already truncated) as a block; `row` is its row in the unshared batch."""
    length = len(input_ids)
    return Block(
        input_ids=list(input_ids),
        position_ids=list(range(length)),
        segment_ids=[1] * length,
        label_mask=[0, *completion_mask[1:]],  # the first token is predicted by nothing in its block
        spans=[(0, 0, 0, length)],
        predictions=[(row, 0, list(range(length - 1)))],
    )


def shared_blocks(
    prompt_ids: list[int], responses: list[list[int]], rows: list[int], token_budget: int | None = None
) -> list[Block]:
    """One example (prompt, then its responses, chosen first, whose unshared rows are `rows`) as shared blocks.

    One block, unless it would exceed `token_budget`: then the responses are split, in order, into as few groups as
    fit, each block repeating the prompt (each prompt + response fits alone: `truncation.truncate` cut it to the
    `token_budget` too).
    """
    num_prompt, lengths = len(prompt_ids), [len(r) for r in responses]
    prefix = max(num_prompt - 1, 0)
    opener = 1 if num_prompt else 0
    groups: list[list[int]] = [[]]
    used = prefix
    for s, n in enumerate(lengths):
        if token_budget is not None and groups[-1] and used + opener + n > token_budget:
            groups.append([])
            used = prefix
        groups[-1].append(s)
        used += opener + n

    # Unshared: response token j sits at P + j and is predicted at column P + j - 1 (from 0 for an empty prompt)
    first_column = num_prompt - 1 if num_prompt else 0
    blocks = []
    for group in groups:
        input_ids, segment_ids, position_ids, pred_positions = pack_example(prompt_ids, [responses[s] for s in group])
        label_mask = [0] * len(input_ids)
        for positions in pred_positions:
            for p in positions:
                label_mask[p + 1] = 1
        spans = [(0, 0, 0, prefix)] if prefix else []
        offset = prefix
        for s in group:
            end = offset + opener + lengths[s]
            spans.append((0, prefix, offset, end))
            offset = end
        predictions = [(rows[s], first_column, p) for s, p in zip(group, pred_positions, strict=True)]
        blocks.append(Block(input_ids, position_ids, segment_ids, label_mask, spans, predictions))
    return blocks


def best_fit_rows(lengths: list[int], token_budget: int | None) -> list[list[int]]:
    """Indices of the blocks in each row: all in one row without a budget, else best-fit decreasing (as TRL's
    `packing_strategy="bfd"`). Every block fits in a row alone; none is dropped."""
    if token_budget is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fitting = [r for r in range(len(rows)) if space[r] >= lengths[i]]
        if fitting:
            best = min(fitting, key=lambda r: space[r])
            rows[best].append(i)
            space[best] -= lengths[i]
        else:
            rows.append([i])
            space.append(token_budget - lengths[i])
    return [sorted(row) for row in rows]


def pack_blocks(
    blocks: list[Block],
    rows: list[list[int]],
    pad_token_id: int,
    unshared_shape: tuple[int, int],
    pad_to_multiple_of: int | None = None,
) -> dict:
    """Lay the blocks in the given rows.

    Returns:
        - `packed_input_ids`, `packed_position_ids`, `packed_segment_ids`, `packed_document_ids` and
          `packed_completion_mask` (1 on the scored tokens), each [N, L];
        - `packed_spans`: a list of `(row, prefix_start, prefix_end, start, end)`, one per attention piece, kept on
          the host (plain ints: the CPU kernels loop over them, and they cost no device sync);
        - `unpack_index` [B + R, L_u - 1]: for each column of the unshared per-token layout, the flat index into
          the packed per-token layout [N, L - 1] that predicts it (0 where nothing does; mask it with the unshared
          `completion_mask[:, 1:]`).
    """
    tokens, positions, segments, documents, scored = [], [], [], [], []
    spans: list[tuple[int, int, int, int, int]] = []
    located: list[tuple[int, int, Block]] = []  # (row, offset, block)
    for r, row in enumerate(rows):
        ids, pos, seg, doc, lab = [], [], [], [], []
        for b in row:
            block = blocks[b]
            offset = len(ids)
            ids += block.input_ids
            pos += block.position_ids
            seg += block.segment_ids
            doc += [b] * len(block)
            lab += block.label_mask
            spans += [(r, offset + ps, offset + pe, offset + s, offset + e) for ps, pe, s, e in block.spans]
            located.append((r, offset, block))
        tokens.append(ids)
        positions.append(pos)
        segments.append(seg)
        documents.append(doc)
        scored.append(lab)

    def padded(values: list[list[int]], value: int) -> torch.Tensor:
        tensors = [torch.tensor(v, dtype=torch.long) for v in values]
        return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)

    input_ids = padded(tokens, pad_token_id)
    width = input_ids.size(1) - 1  # the packed per-token layout is [N, L - 1]
    unpack_index = torch.zeros(unshared_shape[0], unshared_shape[1] - 1, dtype=torch.long)
    for r, offset, block in located:
        for unshared_row, first, predicted_at in block.predictions:
            index = torch.tensor(predicted_at, dtype=torch.long) + (r * width + offset)
            unpack_index[unshared_row, first : first + len(predicted_at)] = index
    return {
        "packed_input_ids": input_ids,
        "packed_position_ids": padded(positions, 0),
        "packed_segment_ids": padded(segments, PAD_SEGMENT),
        "packed_document_ids": padded(documents, PAD_DOCUMENT),
        "packed_completion_mask": padded(scored, 0),
        "packed_spans": spans,
        "unpack_index": unpack_index,
    }


def pack_preference_batch(
    truncated: list[list[tuple[list[int], list[int]]]],
    sequences: list[list[int]],
    completion_masks: list[list[int]],
    pad_token_id: int,
    unshared_length: int,
    packing: PackingSpec,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """The packed keys of a collated batch (see `pack_blocks`).

    Args:
        truncated: for each example, the (prompt, response) pair of each of its responses, chosen first, as
            `truncation.truncate` kept them; `packing.prefix_sharing` needs the same prompt in every pair, which
            `PackingSpec` ensures (it refuses `truncation_mode="keep_end"` with a length limit).
        sequences, completion_masks: the unshared sequences (the B chosen, then every rejected, example by example)
            and their completion masks, made of the same pairs.
        unshared_length: L_u, the padded length of the unshared batch whose layout `unpack_index` targets.
        packing: a block is an example (its prompt once) with `prefix_sharing`, else a sequence; blocks are laid
            end to end (in rows of at most `token_budget` tokens) with `padding_free`, else one per row.
    """
    token_budget = packing.token_budget if packing.padding_free else None
    if packing.prefix_sharing:
        first_rejected_row = len(truncated)
        blocks = []
        for i, pairs in enumerate(truncated):
            num_rejected = len(pairs) - 1
            rows = [i, *range(first_rejected_row, first_rejected_row + num_rejected)]
            first_rejected_row += num_rejected
            blocks += shared_blocks(pairs[0][0], [response for _, response in pairs], rows, token_budget)
    else:
        blocks = [
            sequence_block(r, ids, m) for r, (ids, m) in enumerate(zip(sequences, completion_masks, strict=True))
        ]

    if packing.padding_free:
        rows = best_fit_rows([len(block) for block in blocks], token_budget)
    else:
        rows = [[b] for b in range(len(blocks))]
    unshared_shape = (len(sequences), unshared_length)
    return pack_blocks(blocks, rows, pad_token_id, unshared_shape, pad_to_multiple_of)
