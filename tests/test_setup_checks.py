"""What used to fail deep inside TRL or after the first step fails when the trainer is built, saying what to do."""

import os
import re

import pytest
from conftest import make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.quickstart import char_tokenizer, tiny_causal_lm


ROWS = [{"prompt": "2+2=", "chosen": " 4", "rejected": [" 5", " 22"]}] * 2


def build(output_dir, model=None, ref_model=None, tokenizer=None, **config):
    tokenizer = tokenizer or char_tokenizer()
    if model is None:
        model, ref_model = policy_and_ref(tokenizer)
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=make_args(output_dir, **config),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )


def test_an_output_dir_that_cannot_be_made_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=re.escape(f"cannot be made: {tmp_path / 'file'} is a file, not a folder")):
        build(tmp_path / "file" / "out")


def test_a_read_only_output_dir_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() == 0:
        # Root writes in a 0o555 folder; what stops it is a read-only file system, which `os.access` reports the same
        real_access = os.access
        read_only = str(tmp_path / "ro")

        def access(path, mode, *args, **kwargs):
            if os.path.abspath(path) == read_only and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    with pytest.raises(ValueError, match="is not writable: the run could save neither its checkpoints"):
        build(tmp_path / "ro")


def test_a_model_built_from_a_config_without_ref_model_says_to_pass_one(tmp_path):
    model = tiny_causal_lm(len(char_tokenizer()))
    assert model.name_or_path == ""
    with pytest.raises(ValueError, match=re.escape("has no name or path (built from a config?) and no `ref_model`")):
        build(tmp_path, model=model)
    # With a reference given, or none needed (precomputed once from the initial policy), it builds
    assert build(tmp_path, model=model, precompute_ref_log_probs=True).ref_model is None


def test_a_tokenizer_without_pad_nor_eos_token_says_what_to_set(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match=re.escape("has neither a pad token nor an EOS token")):
        build(tmp_path, tokenizer=tokenizer)
    tokenizer.pad_token = "<pad>"
    assert build(tmp_path, tokenizer=tokenizer).data_collator.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")
