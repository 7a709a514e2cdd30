"""`DPOConfig`: a plain `trl.DPOConfig` is upgraded to ours once, keeping every TRL field; defaults that keep a plain
CPU run free of warnings about settings nobody set."""

import dataclasses
import warnings

import pytest
import torch
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


def config(tmp_path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = DPOConfig(str(tmp_path), report_to="none", bf16=False, **kwargs)
    return args, [str(w.message) for w in caught]


def test_trls_gradient_checkpointing_default_passes_on_without_a_deprecation_warning(tmp_path):
    args, messages = config(tmp_path)
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
    assert not [m for m in messages if "checkpointing" in m], messages
    # The deprecated name, set by hand, still warns (transformers' message), and is honoured
    args, messages = config(tmp_path, gradient_checkpointing=False)
    assert args.activation_checkpointing is False
    assert any("`gradient_checkpointing` is deprecated" in m for m in messages), messages


@pytest.mark.skipif(torch.accelerator.is_available(), reason="pinned memory is kept where an accelerator is found")
def test_pinned_memory_is_off_without_an_accelerator(tmp_path):
    assert config(tmp_path)[0].dataloader_pin_memory is False
