"""Making one-chosen, K-rejected rows: from rated multi-response rows, and from pairwise rows sharing a prompt."""

import gzip
import json
import re

import pytest
from conftest import SHARED_DATA, make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.convert import group_pairwise, load_preference_dataset, normalize_rows, rated_to_multi_rejected
from trl_dpo_ext.quickstart import char_tokenizer


def rated(instruction, *scored):
    return {"instruction": instruction, "completions": [{"output": o, "score": s} for o, s in scored]}


ROWS = [
    rated("2+2?", ("4", 0.9), ("5", 0.2), ("22", 0.1), ("four", 0.85), ("3", 0.3)),
    rated("sky?", ("blue", 0.7), ("green", 0.7), ("red", 0.1)),  # tie for the best
    rated("flat", ("a", 0.5), ("b", 0.5)),  # no preference at all
]


def test_rated_rows_keep_the_best_as_chosen_and_the_k_lowest_as_rejected_listed_best_first():
    out = rated_to_multi_rejected(ROWS, num_rejected=2)
    assert out[0] == {"prompt": "2+2?", "chosen": "4", "rejected": ["5", "22"], "scores": [0.9, 0.2, 0.1]}
    # Tie for the best: the first is the chosen, the other tied response is neither chosen nor rejected
    assert out[1] == {"prompt": "sky?", "chosen": "blue", "rejected": ["red"], "scores": [0.7, 0.1]}
    assert len(out) == 2, "a row whose responses all tie has no rejected and is dropped"


SOURCE_SCORES = {"4": 0.9, "5": 0.2, "22": 0.1, "four": 0.85, "3": 0.3}


@pytest.mark.parametrize("selection", ["lowest", "highest", "random"])
@pytest.mark.parametrize("num_rejected", [2, 3, None])
def test_rated_rows_list_the_rejected_best_first_with_aligned_scores_for_every_selection(selection, num_rejected):
    (row,) = rated_to_multi_rejected(ROWS[:1], num_rejected=num_rejected, selection=selection, seed=1)
    assert row["scores"] == [SOURCE_SCORES[row["chosen"]]] + [SOURCE_SCORES[r] for r in row["rejected"]]
    assert row["scores"][1:] == sorted(row["scores"][1:], reverse=True), "rejected not in rank order, best first"
    kept = {"lowest": ["5", "22"], "highest": ["four", "3"]}.get(selection) if num_rejected == 2 else None
    if kept is not None:  # `selection` chooses which are kept, not how they are listed
        assert row["rejected"] == kept


def test_rated_rows_dropped_rows_are_counted_per_reason_with_their_indices(caplog):
    rows = [
        ROWS[0],
        rated("one", ("only", 0.5)),
        ROWS[2],  # all scores equal
        rated("close", ("a", 0.5), ("b", 0.45)),
        ROWS[1],  # tie for the best
        rated("flat2", ("c", 0.1), ("d", 0.1)),
    ]
    with caplog.at_level("WARNING", logger="trl_dpo_ext.convert"):
        out = rated_to_multi_rejected(rows, min_score_gap=0.1, ties="skip")
    assert [r["prompt"] for r in out] == ["2+2?"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "dropped 5 of 6 rows" in message
    assert "1 with a single response (rows 1)" in message
    assert "2 with all scores equal (rows 2, 5)" in message
    assert "1 with a tie for the best score (ties='skip') (rows 4)" in message
    assert "1 with fewer than min_rejected=1 rejected at least min_score_gap=0.1 below" in message
    assert "(rows 3)" in message


def test_rated_rows_drop_nothing_and_warn_nothing_when_every_row_converts(caplog):
    with caplog.at_level("WARNING", logger="trl_dpo_ext.convert"):
        rated_to_multi_rejected(ROWS[:2])
    assert not caplog.records


def test_rated_rows_select_hardest_negatives_with_highest():
    out = rated_to_multi_rejected(ROWS[:1], num_rejected=2, selection="highest")
    assert out[0]["rejected"] == ["four", "3"]
    assert out[0]["scores"] == [0.9, 0.85, 0.3]


def test_rated_rows_random_selection_is_seeded_and_keeps_scores_aligned():
    first = rated_to_multi_rejected(ROWS[:1], num_rejected=2, selection="random", seed=3)
    assert first == rated_to_multi_rejected(ROWS[:1], num_rejected=2, selection="random", seed=3)
    scores = {o: s for o, s in [("4", 0.9), ("5", 0.2), ("22", 0.1), ("four", 0.85), ("3", 0.3)]}
    assert first[0]["scores"] == [0.9] + [scores[r] for r in first[0]["rejected"]]
    assert first[0]["scores"][1:] == sorted(first[0]["scores"][1:], reverse=True)


def test_min_score_gap_leaves_out_close_responses():
    out = rated_to_multi_rejected(ROWS[:1], min_score_gap=0.1)
    assert out[0]["rejected"] == ["3", "5", "22"]  # "four" (0.85) is within 0.1 of the chosen (0.9)


def test_ties_skip_drops_rows_with_a_tied_best():
    out = rated_to_multi_rejected(ROWS, ties="skip")
    assert [r["prompt"] for r in out] == ["2+2?"]


def test_min_rejected_drops_rows_with_fewer_eligible_rejected():
    out = rated_to_multi_rejected(ROWS, num_rejected=3, min_rejected=3)
    assert [(r["prompt"], len(r["rejected"])) for r in out] == [("2+2?", 3)]


def test_rated_rows_conversational_and_parallel_score_lists_and_dataset_in_dataset_out():
    data = Dataset.from_list([{"id": 7, "prompt": "hi", "responses": ["hello", "go"], "ratings": [5.0, 1.0]}])
    out = rated_to_multi_rejected(
        data,
        prompt_column="prompt",
        completions_column="responses",
        scores_column="ratings",
        keep_columns=["id"],
        conversational=True,
    )
    assert isinstance(out, Dataset)
    assert out[0] == {
        "id": 7,
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [[{"role": "assistant", "content": "go"}]],
        "scores": [5.0, 1.0],
    }


@pytest.mark.parametrize(
    "row, message",
    [
        ({"completions": []}, r"Row 1, column 'instruction': missing"),
        ({"instruction": "x", "completions": "abc"}, r"Row 1, column 'completions': expected a non-empty list"),
        (
            {"instruction": "x", "completions": [{"output": "a", "score": 1}, {"output": "b"}]},
            r"Row 1, column 'completions', item 1: expected a dict with keys 'output' and 'score', got \['output'\]",
        ),
        (
            {"instruction": "x", "completions": [{"output": "a", "score": float("nan")}]},
            r"Row 1, column 'completions', item 0: expected a finite numeric score, got nan",
        ),
        (
            {
                "instruction": "x",
                "completions": [{"output": "a", "score": 1.0}, {"output": "b", "score": float("inf")}],
            },
            r"Row 1, column 'completions', item 1: expected a finite numeric score, got inf",
        ),
        (
            {"instruction": "x", "completions": ["a", "b"], "scores": [1.0, float("-inf")]},
            r"Row 1, column 'scores', item 1: expected a finite numeric score, got -inf",
        ),
        (
            {"instruction": "x", "completions": [{"output": "", "score": 1.0}]},
            r"Row 1, column 'completions', item 0: expected a non-empty str response, got str \(empty\)",
        ),
        ({"instruction": "x", "completions": ["a", "b"]}, r"Row 1, column 'scores': missing"),
        (
            {"instruction": "x", "completions": ["a", "b"], "scores": [1.0]},
            r"Row 1, column 'scores': expected a list of 2 scores .* got 1",
        ),
    ],
)
def test_rated_rows_errors_name_the_row_and_column(row, message):
    with pytest.raises(ValueError, match=message):
        rated_to_multi_rejected([ROWS[0], row])


def test_rated_rows_bad_options_raise():
    with pytest.raises(ValueError, match="`ties` must be one of"):
        rated_to_multi_rejected(ROWS, ties="average")
    with pytest.raises(ValueError, match="`min_rejected` must be between 1 and `num_rejected`"):
        rated_to_multi_rejected(ROWS, num_rejected=2, min_rejected=3)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the real preference data) is absent")
def test_alpacaeval_rated_rows_to_one_chosen_and_three_rejected():
    with gzip.open(SHARED_DATA / "alpacaeval-rated.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(40), f, strict=False)]
    out = rated_to_multi_rejected(rows, num_rejected=3, min_rejected=3, min_score_gap=0.01, keep_columns=["id"])
    assert len(out) >= 30
    by_id = {row["id"]: row for row in rows}
    for row in out:
        source = {c["output"]: c["score"] for c in by_id[row["id"]]["completions"]}
        assert len(row["rejected"]) == 3 and len(row["scores"]) == 4
        assert row["scores"][0] == max(source.values()) == source[row["chosen"]]
        assert row["scores"][1:] == [source[r] for r in row["rejected"]]
        assert all(s <= row["scores"][0] - 0.01 for s in row["scores"][1:])
        # The three lowest of the eligible responses, listed best first
        assert row["scores"][1:] == sorted(source.values())[:3][::-1]


def test_group_pairwise_groups_rows_sharing_prompt_and_chosen():
    rows = [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
        {"prompt": "p2", "chosen": "c2", "rejected": "r3"},
        {"prompt": "p1", "chosen": "c1", "rejected": "r2"},
        {"prompt": "p1", "chosen": "c1", "rejected": "r1"},  # duplicate pair
        {"prompt": "p1", "chosen": "other", "rejected": "r1"},  # another chosen: another row
        {"prompt": "p2", "chosen": "c2", "rejected": ["r4", "r5"]},  # already a list
    ]
    assert group_pairwise(rows) == [
        {"prompt": "p1", "chosen": "c1", "rejected": ["r1", "r2"]},
        {"prompt": "p2", "chosen": "c2", "rejected": ["r3", "r4", "r5"]},
        {"prompt": "p1", "chosen": "other", "rejected": ["r1"]},
    ]
    assert group_pairwise(rows, max_rejected=2)[1]["rejected"] == ["r3", "r4"]


def test_group_pairwise_implicit_prompt_and_conversational():
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
    ]
    assert group_pairwise(Dataset.from_list(rows)).to_list() == [
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": [" go away", " no"]}
    ]
    user, good, bad = [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}], "b"
    conversational = [
        {"prompt": user, "chosen": good, "rejected": [{"role": "assistant", "content": bad}]},
        {"prompt": user, "chosen": good, "rejected": [{"role": "assistant", "content": bad + "!"}]},
    ]
    out = group_pairwise(conversational)
    assert len(out) == 1 and [r[0]["content"] for r in out[0]["rejected"]] == ["b", "b!"]


def test_group_pairwise_errors_name_the_row_and_column():
    with pytest.raises(ValueError, match=r"Row 1, column 'rejected': missing"):
        group_pairwise([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"Row 0, column 'chosen': expected a str or a list of messages, got int"):
        group_pairwise([{"prompt": "p", "chosen": 3, "rejected": "r"}])
    with pytest.raises(
        ValueError, match=r"Row 0, column 'rejected': expected a str or a non-empty list\[str\], got empty list"
    ):
        group_pairwise([{"prompt": "p", "chosen": "c", "rejected": []}])


def test_load_preference_dataset_reads_a_jsonl_file_and_a_folder_of_splits(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": ["r1", "r2"]}]
    (tmp_path / "folder").mkdir()
    for name in ("folder/train.jsonl", "folder/test.jsonl", "single.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_preference_dataset(str(tmp_path / "single.jsonl"))["train"].to_list() == rows
    folder = load_preference_dataset(str(tmp_path / "folder"))
    assert set(folder) == {"train", "test"} and folder["test"].to_list() == rows


# ---------------------------------------------------------------------------------------------- row lists

MIXED_ROWS = [
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "scores": [1, 0]},
    {"prompt": "3+3=", "chosen": " 6", "rejected": [" 5", " 33"], "scores": [0.9, 0.2, 0.1]},
]


def test_normalize_rows_makes_rows_whose_k_varies_fit_one_dataset():
    rows = normalize_rows(MIXED_ROWS)
    assert [row["rejected"] for row in rows] == [[" 5"], [" 5", " 33"]]
    assert Dataset.from_list(rows)["scores"] == [[1.0, 0.0], [0.9, 0.2, 0.1]]
    assert MIXED_ROWS[0]["rejected"] == " 5"  # the input is left as it was


def test_normalize_rows_names_a_score_given_as_a_string():
    rows = [MIXED_ROWS[0], {**MIXED_ROWS[1], "scores": "0.9, 0.2, 0.1"}]
    with pytest.raises(ValueError, match=re.escape("Row 1, column 'scores': expected a list of finite numbers")):
        normalize_rows(rows)


def test_the_trainer_takes_a_list_of_rows_whose_k_varies(tmp_path):
    tokenizer = char_tokenizer()
    policy, ref_model = policy_and_ref(tokenizer)
    args = make_args(tmp_path)
    trainer = DPOTrainer(policy, ref_model, args, train_dataset=MIXED_ROWS, processing_class=tokenizer)
    assert trainer.train_dataset["num_rejected"] == [1, 2]
    assert trainer.train_dataset["scores"] == [[1.0, 0.0], [0.9, 0.2, 0.1]]
