"""Rows that used to train wrongly in silence, or crash deep inside: each fails at preparation naming its row and
column (before the SFT stage of `ref_init` too), or warns naming its first rows."""

import re

import pytest
from conftest import make_args, policy_and_ref
from datasets import Dataset, IterableDataset

from trl_dpo_ext import DPOTrainer, ref_init
from trl_dpo_ext.quickstart import tiny_causal_lm


SFT = {"ref_init": "sft_on_chosen", "ref_init_max_steps": 1}
GOOD_IDS = {"prompt_ids": [20, 21], "chosen_ids": [22, 1], "rejected_ids": [[23, 1], [24, 1]]}
GOOD_TEXT = {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22"]}


def messages(role, text):
    return [{"role": role, "content": text}]


CONVERSATIONAL = {
    "prompt": messages("user", "2+2?"),
    "chosen": messages("assistant", "4"),
    "rejected": [messages("assistant", "5")],
}


@pytest.fixture
def sft_calls(monkeypatch):
    """Every run of the SFT stage's `train()`: none may start when a row is bad."""
    calls = []
    monkeypatch.setattr(ref_init._SFTReferenceTrainer, "train", lambda self, *a, **k: calls.append(self))
    return calls


def build(tokenizer, tmp_path, rows, model=None, **config):
    policy, ref_model = policy_and_ref(tokenizer)
    return DPOTrainer(
        model=model if model is not None else policy,
        ref_model=None if config.get("ref_init") else ref_model,
        args=make_args(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def assert_fails_before_any_work(tokenizer, tmp_path, sft_calls, rows, message, model=None, **config):
    """The error names the row and the column, with and without the SFT stage (which runs first); nothing trains and
    nothing is written."""
    for stage, extra in (("dpo", {}), ("sft", SFT)):
        out = tmp_path / stage
        with pytest.raises(ValueError, match=re.escape(message)):
            build(tokenizer, out, rows, model=model, **config, **extra)
        assert not sft_calls, "the SFT stage started"
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"rejected_ids": [[23, 1], [24, 106, 1]]}, "Row 1, column 'rejected_ids': token id 106 at position 1"),
        ({"chosen_ids": [22, 5000]}, "Row 1, column 'chosen_ids': token id 5000 at position 1"),
        ({"prompt_ids": [-100, 21]}, "Row 1, column 'prompt_ids': token id -100 at position 0"),
        ({"rejected_ids": [[-1, 1]]}, "Row 1, column 'rejected_ids': token id -1 at position 0"),
    ],
)
def test_pretokenized_ids_outside_the_vocabulary_name_row_and_column(tokenizer, tmp_path, sft_calls, bad, message):
    rows = [GOOD_IDS, {**GOOD_IDS, **bad}]
    # The char tokenizer's 106 tokens are the rows of the tiny model's embedding
    assert_fails_before_any_work(tokenizer, tmp_path, sft_calls, rows, message + ", outside the model's vocabulary")


def test_vocabulary_of_a_model_given_as_a_path_is_its_config(tokenizer, tmp_path, sft_calls):
    small = tiny_causal_lm(50)
    small.save_pretrained(tmp_path / "small")
    assert small.get_input_embeddings().num_embeddings == 50
    rows = [{**GOOD_IDS, "chosen_ids": [22, 50]}]
    message = "Row 0, column 'chosen_ids': token id 50 at position 1, outside the model's vocabulary (ids 0 to 49"
    assert_fails_before_any_work(tokenizer, tmp_path, sft_calls, rows, message, model=str(tmp_path / "small"))


def test_text_whose_tokens_the_model_has_no_embedding_for_names_the_text_column(tokenizer, tmp_path):
    # Digits are tokens 6 to 15 and 'z' is token 41 of the tokenizer; the model's embedding has 30 rows
    rows = [{"prompt": "12", "chosen": "3", "rejected": "4"}, {"prompt": "12", "chosen": "3z", "rejected": "4"}]
    message = "Row 1, column 'chosen': the tokenizer gives token id 41 at position 1, outside the model's vocabulary"
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tokenizer, tmp_path, rows, model=tiny_causal_lm(30))


# ------------------------------------------------------------------------------------------------ empty parts


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD_IDS, "chosen_ids": []}, "Row 1, column 'chosen_ids': the chosen response has no tokens"),
        ({**GOOD_IDS, "rejected_ids": [[23, 1], []]}, "Row 1, column 'rejected_ids': rejected 1 has no tokens"),
        ({**GOOD_TEXT, "chosen": ""}, "Row 1, column 'chosen': empty response ''"),
        ({**CONVERSATIONAL, "chosen": messages("assistant", "")}, "Row 1, column 'chosen': empty response"),
    ],
)
def test_empty_responses_fail_naming_row_and_column(tokenizer, tmp_path, sft_calls, row, message):
    first = CONVERSATIONAL if isinstance(row.get("chosen"), list) else GOOD_IDS if "chosen_ids" in row else GOOD_TEXT
    assert_fails_before_any_work(tokenizer, tmp_path, sft_calls, [first, row], message)


def test_empty_prompt_trains_with_a_warning_naming_the_rows(tokenizer, tmp_path):
    rows = [GOOD_IDS, {**GOOD_IDS, "prompt_ids": []}, {**GOOD_IDS, "prompt_ids": []}]
    with pytest.warns(UserWarning, match=r"2 row\(s\) of the train dataset have an empty prompt \(rows 1, 2\)"):
        trainer = build(tokenizer, tmp_path, rows)
    assert [row["prompt_ids"] for row in trainer.train_dataset] == [[20, 21], [], []]  # kept, as TRL keeps them


# ------------------------------------------------------------------------------------------------- truncation


def test_pairs_identical_once_truncated_are_counted_with_their_rows(tokenizer, tmp_path):
    rows = [
        {"prompt": "ab", "chosen": "xy", "rejected": ["zz"]},
        {"prompt": "ab", "chosen": "cdefg", "rejected": ["cdexy", "q"]},  # "abcde" for both at max_length=5
        {"prompt": "ab", "chosen": "xyz", "rejected": ["xyw"]},  # "abxyz" against "abxyw": still different
    ]
    with pytest.warns(UserWarning) as record:
        trainer = build(tokenizer, tmp_path, rows, max_length=5)
    message = "1 rejected response(s) of the train dataset become identical to their chosen response once truncated"
    warning = next(str(w.message) for w in record if message in str(w.message))
    assert "`max_length=5` (row 1)" in warning
    # Independently: the collated sequences of the chosen and rejected 0 of row 1 are the same tokens and mask
    batch = trainer.data_collator([trainer.train_dataset[1]])
    assert batch["input_ids"][0].tolist() == batch["input_ids"][1].tolist()
    assert batch["completion_mask"][0].tolist() == batch["completion_mask"][1].tolist()
    assert batch["input_ids"][0].tolist() != batch["input_ids"][2].tolist()


def test_every_row_dropped_by_max_length_is_a_plain_error(tokenizer, tmp_path, sft_calls):
    rows = [
        {"prompt": "a long prompt", "chosen": "b", "rejected": ["c"]},
        {"prompt": "abcd", "chosen": "b", "rejected": ["c"]},
    ]
    message = (
        "Every row of the train dataset (2) has a prompt that alone fills `max_length=4` (the shortest has 4 tokens)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tokenizer, tmp_path / "dpo", rows, max_length=4)
    assert not (tmp_path / "dpo").exists()


def test_dropped_rows_and_identical_rejected_warnings_name_the_first_rows(tokenizer, tmp_path, caplog):
    rows = [{**GOOD_TEXT, "rejected": ["4", "5"]} if i in (2, 9) else GOOD_TEXT for i in range(10)]
    rows += [{**GOOD_TEXT, "prompt": "x" * 40}] * 7  # rows 10 to 16 fill max_length
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "2 rejected response(s) of the train dataset are identical to their chosen response (rows 2, 9)"
        ),
    ):
        with caplog.at_level("WARNING"):
            trainer = build(tokenizer, tmp_path, rows, max_length=32)
    assert (
        "Dropped 7 of 17 rows of the train dataset whose prompt alone fills `max_length=32` (rows 10, 11, 12, 13, 14, … (first 5))"
        in caplog.text
    )
    assert len(trainer.train_dataset) == 10


# ------------------------------------------------------------------------------------------- one kind of rows


def test_conversational_and_plain_rows_mixed_in_a_stream_fail_at_the_first_row_of_the_other_kind(tokenizer, tmp_path):
    # Arrow gives a `Dataset` one type per column, so only a stream can mix the two kinds
    rows = [CONVERSATIONAL, CONVERSATIONAL, GOOD_TEXT, CONVERSATIONAL]
    policy, ref_model = policy_and_ref(tokenizer)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=make_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
        train_dataset=IterableDataset.from_generator(lambda: iter(rows)),
        processing_class=tokenizer,
    )
    message = "Row 2, column 'chosen': plain text, but the dataset's first row is a list of messages."
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_pretokenized_stream_with_unknown_features_is_prepared_as_pretokenized(tokenizer, tmp_path):
    """`IterableDataset.from_generator` has no column names: the first row says the data is pre-tokenized."""
    rows = [{"prompt_ids": [20, 21], "chosen_ids": [22], "rejected_ids": [[23], [24, 25]]}] * 4
    stream = IterableDataset.from_generator(lambda: iter(rows))
    assert stream.column_names is None
    policy, ref_model = policy_and_ref(tokenizer)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=make_args(tmp_path, max_steps=1, per_device_train_batch_size=2),
        train_dataset=stream,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[0]["num_rejected"] == 2
