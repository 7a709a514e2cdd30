"""The TRL/transformers surface the package relies on (`_trl_compat.py`) exists in the installed versions."""

import warnings

import pytest
from conftest import make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer, _trl_compat


def test_every_overridden_trl_method_still_exists():
    assert _trl_compat.missing_surface() == []


def test_every_private_attribute_read_is_set_by_trl(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    rows = [{"prompt": "a", "chosen": "b", "rejected": ["c", "d"]}]
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=make_args(tmp_path), train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    for name in (*_trl_compat.PRIVATE_TRAINER_ATTRIBUTES, *_trl_compat.DPO_INIT_ATTRIBUTES):
        assert hasattr(trainer, name), name
    assert _trl_compat.attn_implementation(trainer.model) == "sdpa"
    assert _trl_compat.tokenizer_of(trainer) is tokenizer


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3.dev0"])
def test_a_tested_trl_version_gives_no_warning(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _trl_compat.check_trl_version(version)


@pytest.mark.parametrize("version", ["1.17.0", "2.0.0.dev0", "1.15.3"])
def test_an_untested_trl_version_warns_naming_the_tested_ones(version):
    with pytest.warns(UserWarning, match=rf"was tested with TRL 1\.16\.x; TRL {version} is installed"):
        assert not _trl_compat.check_trl_version(version)


def test_the_multimodal_rope_index_of_qwen2_5_vl_is_found_and_a_text_model_has_none(tokenizer):
    from toy_vision import tiny_vlm, tiny_vlm_processor

    assert _trl_compat.multimodal_rope_index(tiny_vlm(tiny_vlm_processor("qwen2_5_vl"), "qwen2_5_vl")) is not None
    assert _trl_compat.multimodal_rope_index(policy_and_ref(tokenizer)[0]) is None
