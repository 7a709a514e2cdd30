"""`trl_dpo_ext.packing`: the one truncation, the packed layout of the collator, the masks and the attention over
packed rows, the packed forward's inputs and the unpacking of its outputs, with expected tensors written by hand."""

import pytest
import torch
import torch.nn.functional as F

from trl_dpo_ext.collator import DataCollatorForMultiRejectedPreference
from trl_dpo_ext.packing import (
    PackingSpec,
    dense_attention_mask,
    packed_model_inputs,
    segment_attention,
    truncate,
    unpack,
)
from trl_dpo_ext.quickstart import tiny_causal_lm


# ------------------------------------------------------------ truncation and spec


@pytest.mark.parametrize(
    "max_length, mode, expected",
    [
        (None, "keep_start", ([1, 2, 3], [4, 5])),  # no limit
        (5, "keep_end", ([1, 2, 3], [4, 5])),  # fits
        (4, "keep_start", ([1, 2, 3], [4])),  # [1 2 3 4]
        (4, "keep_end", ([2, 3], [4, 5])),  # [2 3 4 5]
        (2, "keep_start", ([1, 2], [])),  # the prompt alone fills it
        (1, "keep_end", ([], [5])),  # the response alone fills it
    ],
)
def test_truncate_keeps_what_slicing_prompt_plus_response_keeps(max_length, mode, expected):
    assert truncate([1, 2, 3], [4, 5], max_length, mode) == expected


def test_truncate_with_an_unknown_mode_raises_when_it_would_cut():
    with pytest.raises(ValueError, match="Unsupported truncation mode: keep_middle"):
        truncate([1, 2, 3], [4, 5], 4, "keep_middle")


def test_packing_spec_cuts_to_the_token_budget_only_with_padding_free():
    assert PackingSpec(max_length=8, token_budget=6).length_limit == 8
    assert PackingSpec(padding_free=True, max_length=8, token_budget=6).length_limit == 6
    assert PackingSpec(padding_free=True, token_budget=6).length_limit == 6
    assert not PackingSpec().packed and PackingSpec(padding_free=True).packed


def test_collator_with_prefix_sharing_and_keep_end_truncation_raises_at_construction():
    with pytest.raises(ValueError, match=r"`prefix_sharing=True` shares the prompt .* `max_length=4`"):
        DataCollatorForMultiRejectedPreference(
            pad_token_id=0, prefix_sharing=True, max_length=4, truncation_mode="keep_end"
        )


# ------------------------------------------------------------ layout


def test_collator_lays_shared_blocks_end_to_end_and_indexes_every_prediction():
    collator = DataCollatorForMultiRejectedPreference(pad_token_id=0, prefix_sharing=True, padding_free=True)
    batch = collator(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [[6]]},
            {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [[9, 10]]},
        ]
    )
    # Block 0: prefix [1 2], segments [3 4 5] and [3 6]; block 1: no prefix, segments [7 8] and [7 9 10]
    torch.testing.assert_close(batch["packed_input_ids"], torch.tensor([[1, 2, 3, 4, 5, 3, 6, 7, 8, 7, 9, 10]]))
    torch.testing.assert_close(batch["packed_position_ids"], torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2]]))
    torch.testing.assert_close(batch["packed_segment_ids"], torch.tensor([[0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 2]]))
    torch.testing.assert_close(batch["packed_document_ids"], torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]))
    torch.testing.assert_close(batch["packed_completion_mask"], torch.tensor([[0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1]]))
    # (row, prefix start, prefix end, start, end): block 0's prefix, its two segments; block 1's two segments
    assert batch["packed_spans"] == [
        (0, 0, 0, 0, 2),
        (0, 0, 2, 2, 5),
        (0, 0, 2, 5, 7),
        (0, 7, 7, 7, 9),
        (0, 7, 7, 9, 12),
    ]
    # Unshared rows [B + R, L_u - 1] = [4, 4]; each scored column holds the packed position predicting it
    expected_index = torch.tensor(
        [
            [0, 0, 2, 3],  # chosen 0 [1 2 3 4 5]: 4 and 5 predicted by 3@2 and 4@3
            [7, 0, 0, 0],  # chosen 1 [7 8]: 8 predicted by 7@7
            [0, 0, 5, 0],  # rejected 0 of example 0 [1 2 3 6]: 6 predicted by 3@5
            [9, 10, 0, 0],  # rejected 0 of example 1 [7 9 10]: 9 and 10 predicted by 7@9 and 9@10
        ]
    )
    torch.testing.assert_close(batch["unpack_index"], expected_index)


def test_unpack_gathers_packed_values_into_the_unshared_layout_and_zeroes_the_rest():
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0]])  # one packed row, L - 1 = 4
    unpack_index = torch.tensor([[0, 1, 0], [3, 2, 0]])
    completion_mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1]])  # its [:, 1:] selects the scored columns
    expected = torch.tensor(
        [
            [10.0, 11.0, 0.0],  # columns 0 and 1 scored
            [13.0, 0.0, 10.0],  # columns 0 and 2 scored
        ]
    )
    torch.testing.assert_close(unpack(values, unpack_index, completion_mask), expected)


# ------------------------------------------------------------ masks


def test_dense_mask_of_a_shared_row_lets_each_response_see_the_prefix_and_itself():
    segment_ids = torch.tensor([[0, 0, 1, 1, 2, 2]])  # [1 2 | 3 4 | 3 5]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # 1
            [1, 1, 0, 0, 0, 0],  # 2
            [1, 1, 1, 0, 0, 0],  # 3 (segment 1)
            [1, 1, 1, 1, 0, 0],  # 4
            [1, 1, 0, 0, 1, 0],  # 3 (segment 2): the prefix and itself
            [1, 1, 0, 0, 1, 1],  # 5
        ],
        dtype=torch.bool,
    )
    torch.testing.assert_close(dense_attention_mask(segment_ids), expected[None, None])


def test_dense_mask_of_a_padding_free_row_keeps_blocks_apart():
    segment_ids = torch.tensor([[1, 1, 1, 1, 1, -1]])  # [1 2 | 3 4 5 | pad]
    document_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # 1
            [1, 1, 0, 0, 0, 0],  # 2
            [0, 0, 1, 0, 0, 0],  # 3: a new block
            [0, 0, 1, 1, 0, 0],  # 4
            [0, 0, 1, 1, 1, 0],  # 5
            [0, 0, 0, 0, 0, 1],  # padding sees itself, never an empty row
        ],
        dtype=torch.bool,
    )
    torch.testing.assert_close(dense_attention_mask(segment_ids, document_ids), expected[None, None])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padding_free_rows_get_transformers_packed_sequence_mask_with_the_numbers_of_ours(implementation):
    """Without prefix sharing the model gets no mask: transformers finds the sequences from the restarting
    `position_ids`, and its logits are those of our dense mask."""
    collator = DataCollatorForMultiRejectedPreference(pad_token_id=0, padding_free=True, token_budget=9)
    batch = collator(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [[6], [7, 8, 9]]},
            {"prompt_ids": [9], "chosen_ids": [10, 11], "rejected_ids": [[12]]},
        ]
    )
    assert batch["packed_input_ids"].size(0) > 1  # several rows, one with padding
    model = tiny_causal_lm(32, arch="llama", attn_implementation=implementation).eval()
    theirs, _ = packed_model_inputs(batch, implementation, prefix_sharing=False)
    ours, _ = packed_model_inputs(batch, implementation, prefix_sharing=True)  # our dense mask of the same rows
    assert theirs["attention_mask"] is None
    real = batch["packed_document_ids"] >= 0
    with torch.no_grad():
        expected = model(**ours, use_cache=False).logits[real]
        logits = model(**theirs, use_cache=False).logits[real]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ collator


def test_collator_packs_prompt_once_with_restarting_positions():
    collator = DataCollatorForMultiRejectedPreference(pad_token_id=0, prefix_sharing=True)
    batch = collator(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [[6], [7, 8]]},
            {"prompt_ids": [9], "chosen_ids": [10], "rejected_ids": [[11, 12]]},
        ]
    )
    # Example 0: prefix [1, 2], then each response opened by the last prompt token 3 at position 2
    # Example 1: empty prefix, each response opened by 9 at position 0
    assert batch["packed_input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 3, 6, 3, 7, 8],
        [9, 10, 9, 11, 12, 0, 0, 0, 0, 0],
    ]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 2, 3, 4], [0, 1, 0, 1, 2, 0, 0, 0, 0, 0]]
    assert batch["packed_segment_ids"].tolist() == [
        [0, 0, 1, 1, 1, 2, 2, 3, 3, 3],
        [1, 1, 2, 2, 2, -1, -1, -1, -1, -1],
    ]
    assert batch["packed_completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 0, 1, 1], [0, 1, 0, 1, 1, 0, 0, 0, 0, 0]]
    # The unshared keys are still there, and each scored token maps to the packed position predicting it
    assert batch["input_ids"].shape == (5, 5)
    packed_width = 9
    assert batch["unpack_index"][0, 2:4].tolist() == [2, 3]  # chosen of example 0: 4 from "3"@2, 5 from "4"@3
    assert batch["unpack_index"][3, 2:4].tolist() == [7, 8]  # rejected [7, 8] of example 0
    assert batch["unpack_index"][4, 0:2].tolist() == [packed_width + 2, packed_width + 3]  # rejected [11, 12]

    mask = dense_attention_mask(batch["packed_segment_ids"])[0, 0]
    assert mask[6].tolist() == [True, True, False, False, False, True, True, False, False, False]  # "6" sees 1 2 3 6
    assert mask[9].tolist() == [True, True, False, False, False, False, False, True, True, True]


def test_collator_lays_sequences_end_to_end_with_restarting_positions():
    collator = DataCollatorForMultiRejectedPreference(pad_token_id=0, padding_free=True)
    batch = collator(
        [
            {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [[4, 5]]},
            {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [[9]]},
        ]
    )
    # Unshared order: chosen 0 [1 2 3], chosen 1 [6 7 8], rejected of 0 [1 2 4 5], rejected of 1 [6 9]; no padding
    assert batch["packed_input_ids"].tolist() == [[1, 2, 3, 6, 7, 8, 1, 2, 4, 5, 6, 9]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch["packed_document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert batch["packed_completion_mask"].tolist() == [[0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1]]
    assert batch["packed_spans"] == [(0, 0, 0, 0, 3), (0, 3, 3, 3, 6), (0, 6, 6, 6, 10), (0, 10, 10, 10, 12)]
    # Unshared per-token column c of a sequence is predicted at its packed start + c
    assert batch["unpack_index"][2].tolist() == [6, 7, 8]  # rejected [1 2 4 5]: predictions of 2, 4, 5
    assert batch["unpack_index"][3, :1].tolist() == [10]  # rejected [6 9]: 9 predicted from 6 at 10

    mask = dense_attention_mask(batch["packed_segment_ids"], batch["packed_document_ids"])[0, 0]
    assert mask[4].tolist() == [False] * 3 + [True, True] + [False] * 7  # "7" sees 6 and itself only


def test_collator_shares_prompts_and_lays_examples_end_to_end():
    collator = DataCollatorForMultiRejectedPreference(pad_token_id=0, prefix_sharing=True, padding_free=True)
    batch = collator(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [[5, 6]]},
            {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [[9]]},
        ]
    )
    # Example 0: prefix [1 2], segments [3 4] and [3 5 6]; example 1: no prefix, segments [7 8] and [7 9]
    assert batch["packed_input_ids"].tolist() == [[1, 2, 3, 4, 3, 5, 6, 7, 8, 7, 9]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 0, 1]]
    assert batch["packed_segment_ids"].tolist() == [[0, 0, 1, 1, 2, 2, 2, 1, 1, 2, 2]]
    assert batch["packed_document_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert batch["packed_spans"] == [
        (0, 0, 0, 0, 2),
        (0, 0, 2, 2, 4),
        (0, 0, 2, 4, 7),
        (0, 7, 7, 7, 9),
        (0, 7, 7, 9, 11),
    ]
    mask = dense_attention_mask(batch["packed_segment_ids"], batch["packed_document_ids"])[0, 0]
    assert mask[10].tolist() == [False] * 9 + [True, True]  # "9" of example 1 sees its opener and itself
    assert mask[5].tolist() == [True, True, False, False, True, True] + [False] * 5  # "5" sees 1 2 and 3 5


def test_token_budget_splits_rows_and_keeps_every_example():
    examples = [
        {"prompt_ids": list(range(1, 1 + p)), "chosen_ids": [50] * c, "rejected_ids": [[60] * r for r in rejected]}
        for p, c, rejected in [(5, 3, [2, 7]), (2, 9, [1]), (8, 1, [4, 4, 4]), (1, 2, [3])]
    ]
    for prefix_sharing, budget in ((False, 11), (True, 14)):
        padded = DataCollatorForMultiRejectedPreference(pad_token_id=0, max_length=budget)(examples)
        collator = DataCollatorForMultiRejectedPreference(
            pad_token_id=0, prefix_sharing=prefix_sharing, padding_free=True, token_budget=budget
        )
        batch = collator(examples)
        lengths = (batch["packed_document_ids"] >= 0).sum(1)
        assert batch["packed_input_ids"].size(0) > 1 and (lengths <= budget).all()
        # Every scored token of every sequence is predicted somewhere, by a token of its own sequence
        gathered = batch["packed_input_ids"][:, 1:].reshape(-1)[batch["unpack_index"]]
        mask = padded["completion_mask"][:, 1:].bool()
        assert torch.equal(gathered[mask], padded["input_ids"][:, 1:][mask])
        assert int(batch["packed_completion_mask"].sum()) == int(mask.sum())


def test_shared_example_over_the_budget_is_split_with_its_prompt_repeated():
    collator = DataCollatorForMultiRejectedPreference(
        pad_token_id=0, prefix_sharing=True, padding_free=True, token_budget=8
    )
    batch = collator([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 4], "rejected_ids": [[5, 5], [6, 6, 6]]}])
    # [1 2 | 3 4 4 | 3 5 5] is 8 tokens; the third response goes to a second block repeating the prompt
    assert batch["packed_input_ids"].tolist() == [[1, 2, 3, 4, 4, 3, 5, 5], [1, 2, 3, 6, 6, 6, 0, 0]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0]]


def test_sequence_over_the_budget_is_truncated_as_max_length_truncates():
    examples = [
        {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [[10, 11, 12, 13]]},
        {"prompt_ids": [14], "chosen_ids": [15], "rejected_ids": [[16, 17]]},
    ]
    for mode in ("keep_start", "keep_end"):
        by_length = DataCollatorForMultiRejectedPreference(pad_token_id=0, max_length=6, truncation_mode=mode)
        by_budget = DataCollatorForMultiRejectedPreference(
            pad_token_id=0, padding_free=True, token_budget=6, truncation_mode=mode
        )
        expected, batch = by_length(examples), by_budget(examples)
        for key in ("input_ids", "completion_mask", "attention_mask"):
            assert torch.equal(batch[key], expected[key]), (mode, key)
        assert (batch["packed_document_ids"] >= 0).sum(1).max() <= 6
        gathered = batch["packed_input_ids"][:, 1:].reshape(-1)[batch["unpack_index"]]
        mask = expected["completion_mask"][:, 1:].bool()
        assert torch.equal(gathered[mask], expected["input_ids"][:, 1:][mask])


# ------------------------------------------------------------ attention


def random_spans(lengths: list[list[tuple[int, list[int]]]]):
    """Spans of rows of blocks (prefix length, segment lengths), and the matching segment / document ids."""
    spans, segment_rows, document_rows = [], [], []
    document = 0
    width = max(sum(p + sum(s) for p, s in row) for row in lengths) + 3  # room for padding
    for r, row in enumerate(lengths):
        segments, documents, offset = [], [], 0
        for prefix, segs in row:
            if prefix:
                spans.append((r, offset, offset, offset, offset + prefix))
            for s, n in enumerate(segs, start=1):
                start = offset + prefix + sum(segs[: s - 1])
                spans.append((r, offset, offset + prefix, start, start + n))
            segments += [0] * prefix + [s for s, n in enumerate(segs, start=1) for _ in range(n)]
            documents += [document] * (prefix + sum(segs))
            offset += prefix + sum(segs)
            document += 1
        segment_rows.append(segments + [-1] * (width - offset))
        document_rows.append(documents + [-1] * (width - offset))
    return spans, torch.tensor(segment_rows), torch.tensor(document_rows)


def test_segment_attention_equals_dense_mask_attention_and_its_gradients():
    # Row 0: a shared block (prefix 5, segments 3, 6, 1) then an unshared one (7); row 1: an empty prefix, then 2 + 4
    spans, segment_ids, document_ids = random_spans([[(5, [3, 6, 1]), (0, [7])], [(0, [2, 4]), (4, [5])]])
    generator = torch.Generator().manual_seed(0)
    num_rows, length = segment_ids.shape
    query = torch.randn(num_rows, 4, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    key = torch.randn(num_rows, 2, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    value = torch.randn(num_rows, 2, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(num_rows, 4, length, 8, generator=generator, dtype=torch.float64)
    real = (document_ids >= 0)[:, None, :, None]

    mask = dense_attention_mask(segment_ids, document_ids)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True) * real
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    out = segment_attention(query, key, value, spans)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    torch.testing.assert_close(out, expected)
    assert out[~real.expand_as(out)].abs().max() == 0  # padding positions get no attention output
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_varlen_flash_inputs_separate_every_sequence_and_the_row_padding():
    collator = DataCollatorForMultiRejectedPreference(pad_token_id=0, padding_free=True, token_budget=6)
    batch = collator(
        [
            {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [[4, 5]]},
            {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [[9]]},
        ]
    )
    # Best-fit decreasing: [1 2 4 5 | 6 9] and [1 2 3 | 6 7 8], rows of 6
    assert batch["packed_input_ids"].tolist() == [[1, 2, 4, 5, 6, 9], [1, 2, 3, 6, 7, 8]]
    kwargs, labels = packed_model_inputs(batch, "flash_attention_2")
    assert kwargs["attention_mask"] is None
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 4, 6, 9, 12]  # the N × L tokens read as one sequence
    assert kwargs["max_length_q"] == 4 and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert labels.tolist() == [[-100, -100, 4, 5, -100, 9], [-100, -100, 3, -100, 7, 8]]
