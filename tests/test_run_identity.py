"""A run resumed from a checkpoint after its loss or its data changed: an error naming the field, before any step,
unless `resume_allow_changes=True`."""

import json
import re

import pytest
from conftest import make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.quickstart import char_tokenizer
from trl_dpo_ext.run_identity import RUN_IDENTITY_FILE


ROWS_K2 = [{"prompt": f"{i}+{i}=", "chosen": f" {2 * i}", "rejected": [f" {i}", f" {i}{i}"]} for i in range(4)]
ROWS_K3 = [{**row, "rejected": [*row["rejected"], " 0"]} for row in ROWS_K2]


def trainer(tmp_path, rows, **config):
    tokenizer = char_tokenizer()
    policy, ref_model = policy_and_ref(tokenizer)
    args = make_args(tmp_path, save_strategy="steps", save_steps=1, **{"max_steps": 2, **config})
    return DPOTrainer(
        model=policy, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


@pytest.fixture
def checkpoint(tmp_path):
    """`checkpoint-1` of a run with K = 2 and beta = 0.1."""
    trainer(tmp_path, ROWS_K2, max_steps=1).train()
    saved = json.loads((tmp_path / "checkpoint-1" / RUN_IDENTITY_FILE).read_text())
    assert saved["loss_spec"]["beta"] == 0.1 and saved["num_rejected"] == [2]
    return tmp_path / "checkpoint-1"


@pytest.mark.parametrize(
    ("rows", "config", "difference"),
    [
        (ROWS_K2, {"beta": 0.2}, "loss_spec.beta: saved 0.1, now 0.2"),
        (ROWS_K2, {"rejected_reduction": "softmax"}, "loss_spec.reduction: saved mean, now softmax"),
        (ROWS_K3, {}, "num_rejected: saved [2], now [3]"),
        (ROWS_K2[::-1], {}, "train_dataset.sha256: saved "),
        (ROWS_K2, {"rejected_selection": "hardest", "num_selected": 1}, "selection: saved None, now {"),
    ],
)
def test_resuming_after_a_change_fails_naming_the_field_before_any_step(
    tmp_path, checkpoint, rows, config, difference
):
    resumed = trainer(tmp_path, rows, **config)
    with pytest.raises(ValueError, match=re.escape(difference)):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 0
    assert not (tmp_path / "checkpoint-2").exists()


def test_resume_allow_changes_resumes_after_a_change(tmp_path, checkpoint):
    resumed = trainer(tmp_path, ROWS_K3, beta=0.2, resume_allow_changes=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    saved = json.loads((tmp_path / "checkpoint-2" / RUN_IDENTITY_FILE).read_text())
    assert saved["loss_spec"]["beta"] == 0.2 and saved["num_rejected"] == [3]


def test_resuming_the_same_run_goes_on(tmp_path, checkpoint):
    resumed = trainer(tmp_path, ROWS_K2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
