"""`DPOConfig` defaults that keep a plain CPU run free of warnings about settings nobody set."""

import warnings

import pytest
import torch

from trl_dpo_ext import DPOConfig


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
