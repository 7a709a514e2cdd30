"""`DPOConfig`: a plain `trl.DPOConfig` is upgraded to ours once, keeping every TRL field."""

import dataclasses
import warnings

import pytest
import trl

from trl_dpo_ext import DPOConfig
from trl_dpo_ext.packing import PackingSpec


def test_a_plain_trl_config_is_upgraded_keeping_every_trl_field_and_the_new_fields_defaults(tmp_path):
    plain = trl.DPOConfig(
        str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        beta=0.3,
        max_length=77,
        loss_type=["sigmoid", "sft"],
        loss_weights=[0.8, 0.2],
        padding_free=True,
        hub_token="secret",
    )
    ours = DPOConfig.from_trl_config(plain)
    assert isinstance(ours, DPOConfig)
    differing = [f.name for f in dataclasses.fields(trl.DPOConfig) if getattr(ours, f.name) != getattr(plain, f.name)]
    assert differing == []  # `hub_token` too, which `to_dict` hides
    assert (ours.prefix_sharing, ours.token_budget, ours.rejected_reduction) == (False, None, "mean")
    assert PackingSpec.from_config(ours) == PackingSpec(padding_free=True, max_length=77)


def test_one_of_our_configs_is_not_copied(tmp_path):
    ours = DPOConfig(str(tmp_path), bf16=False, report_to="none", prefix_sharing=True)
    assert DPOConfig.from_trl_config(ours) is ours


def test_upgrading_keeps_the_pad_token_and_does_not_repeat_trls_deprecation(tmp_path):
    with pytest.warns(FutureWarning, match="`pad_token` is deprecated"):
        plain = trl.DPOConfig(str(tmp_path), bf16=False, use_cpu=True, report_to="none", pad_token="<pad>")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = DPOConfig.from_trl_config(plain)
    assert ours.pad_token == "<pad>"  # `to_dict` hides it
    assert [str(w.message) for w in caught if "pad_token" in str(w.message)] == []
