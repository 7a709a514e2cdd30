"""`rows.parse_text_row`, the one parser of text rows, and what it rejects before training: messages the chat template
would render wrongly in silence, empty rejected, and bad rows of the eval dataset named as such."""

import re

import pytest
from conftest import make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.convert import group_pairwise
from trl_dpo_ext.data import preference_to_sft_dataset
from trl_dpo_ext.messages import chat_roles
from trl_dpo_ext.quickstart import char_tokenizer
from trl_dpo_ext.rows import TextRow, parse_text_row


def messages(role, text):
    return [{"role": role, "content": text}]


GOOD = {
    "prompt": messages("user", "2+2?"),
    "chosen": messages("assistant", "4"),
    "rejected": [messages("assistant", "5"), messages("assistant", "22")],
}


def build(tmp_path, rows, eval_rows=None, tokenizer=None):
    tokenizer = tokenizer or char_tokenizer()
    policy, ref_model = policy_and_ref(tokenizer)
    return DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=make_args(tmp_path, **({"eval_strategy": "steps", "eval_steps": 1} if eval_rows else {})),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------------------------------------------- parsing


def test_parse_text_row_extracts_an_implicit_prompt_over_every_rejected():
    row = parse_text_row({"chosen": "2+2= 4", "rejected": ["2+2= 5", "2+2= 22"]}, 0)
    assert row == TextRow("2+2=", " 4", [" 5", " 22"], True, False)
    one = parse_text_row({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}, 0)
    assert (one.rejected, one.listed) == ([" 5"], False)


def test_the_converter_and_the_sft_rows_share_the_text_row_checks():
    bad = {"prompt": "2+2=", "chosen": " 4", "rejected": ["", " 5"]}
    message = "Row 1, column 'rejected': rejected 0, empty response ''"
    with pytest.raises(ValueError, match=re.escape(message)):
        group_pairwise([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}, bad])
    with pytest.raises(ValueError, match=re.escape(message)):
        preference_to_sft_dataset(Dataset.from_list([{**bad, "rejected": [" 3", " 5"]}, bad]))


# ---------------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"chosen": messages("banana", "4")},
            "Row 1, column 'chosen': message 0: role 'banana' is not one the chat template knows (assistant, system, "
            "tool, user)",
        ),
        (
            {"prompt": [{"content": "2+2?"}]},
            "Row 1, column 'prompt': message 0: no 'role' (missing or None)",
        ),
        (
            {"rejected": [messages("assistant", "5"), messages("assistant", None)]},
            "Row 1, column 'rejected': rejected 1, message 0: content None (NoneType); expected a str",
        ),
        (
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": None}]},
            "Row 1, column 'prompt': message 1: content None (NoneType); expected a str",
        ),
        (
            {"rejected": [messages("assistant", "5"), messages("user", "22")]},
            "Row 1, column 'rejected': rejected 1, message 0 has role 'user', but a response starts with an assistant "
            "turn",
        ),
        (
            {"rejected": [messages("assistant", "")]},
            "Row 1, column 'rejected': rejected 0, empty response",
        ),
    ],
)
def test_bad_messages_fail_before_training_naming_row_column_and_message(tmp_path, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tmp_path, [GOOD, {**GOOD, **bad}])
    assert not (tmp_path / "checkpoint-1").exists()


def test_a_banana_role_in_an_implicit_prompt_is_named_too():
    row = {"chosen": [*messages("banana", "2+2?"), *messages("assistant", "4")]}
    row["rejected"] = [*messages("banana", "2+2?"), *messages("assistant", "5")]
    with pytest.raises(ValueError, match=re.escape("Row 0, column 'prompt': message 0: role 'banana'")):
        parse_text_row(row, 0)


def test_a_role_the_chat_template_tests_for_by_name_is_allowed():
    tokenizer = char_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'ipython' %}<|im_start|>tool\n{% else %}<|im_start|>"
        "{{ m['role'] }}\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    roles = chat_roles(tokenizer)
    assert roles == {"system", "user", "assistant", "tool", "ipython"}
    row = {**GOOD, "prompt": [*GOOD["prompt"], *messages("ipython", "4")]}
    assert parse_text_row(row, 0, roles=roles).prompt == row["prompt"]
    with pytest.raises(ValueError, match="role 'ipython' is not one the chat template knows"):
        parse_text_row(row, 0)


# ------------------------------------------------------------------------------------------------- plain text


def test_an_empty_plain_rejected_fails_before_training(tmp_path):
    rows = [{"prompt": "2+2=", "chosen": " 4", "rejected": [" 5", " 22"]}]
    rows.append({"prompt": "2+2=", "chosen": " 4", "rejected": [" 5", ""]})
    with pytest.raises(ValueError, match=re.escape("Row 1, column 'rejected': rejected 1, empty response ''")):
        build(tmp_path, rows)


def test_a_plain_prompt_that_is_not_text_names_the_prompt_column():
    with pytest.raises(ValueError, match=re.escape("Row 0, column 'prompt': expected a str (or a list of messages)")):
        parse_text_row({"prompt": 3, "chosen": " 4", "rejected": " 5"}, 0)


# ------------------------------------------------------------------------------------------------ which dataset


def test_a_bad_row_of_the_eval_dataset_says_it_is_the_eval_dataset(tmp_path):
    good = {"prompt": "2+2=", "chosen": " 4", "rejected": [" 5"]}
    message = (
        "Row 1, column 'rejected': expected a str or a non-empty list[str], got empty list. (in the eval dataset)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tmp_path, [good, good], eval_rows=[good, {**good, "rejected": []}])
