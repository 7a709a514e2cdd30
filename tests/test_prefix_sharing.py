"""Prefix sharing: the packed forward gives the log-probs, loss, gradients and metrics of the unshared forward."""

import pytest
import torch
from conftest import (
    assert_same_step,
    batch_of,
    loss_and_grads,
    make_args,
    packing_trainer,
    policy_and_ref,
    sequence_logps,
)
from datasets import Dataset
from peft import LoraConfig

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.forward import sequence_logps as forward_sequence_logps
from trl_dpo_ext.losses import REJECTED_REDUCTIONS
from trl_dpo_ext.quickstart import tiny_causal_lm


PROMPTS = ["2+2=", "sky? ", "abc", "hello ", "x*y ", "q"]
CHOSEN = ["4", "blue", "def", "hi there", "xy", "r"]
REJECTED = [["5", "22", "four"], ["green", "red", "b"], ["xyz", "abcd", "d"], ["go", "no", "bye"], ["yx", "x", "z"]]
REJECTED.append(["s", "qq", "rr"])
RAGGED = (1, 2, 3, 1, 2, 3)


def rows(num_rejected=RAGGED, scores: bool = False):
    out = []
    for p, c, r, k in zip(PROMPTS, CHOSEN, REJECTED, num_rejected, strict=True):
        row = {"prompt": p, "chosen": c, "rejected": r[:k]}
        if scores:
            row["scores"] = [1.0] + [-0.5 * j for j in range(k)]
        out.append(row)
    return out


SHARED = {"prefix_sharing": True}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_sequence_logps_match_a_plain_forward(tokenizer, tmp_path, arch):
    shared = packing_trainer(tokenizer, tmp_path, "shared", rows(), arch=arch, **SHARED)
    policy = policy_and_ref(tokenizer, arch=arch)[0]
    batch = batch_of(shared)
    assert batch["packed_input_ids"].size(0) == len(RAGGED)  # one packed row per example
    with torch.no_grad():
        chosen, rejected = forward_sequence_logps(shared._per_token_logps(shared.model, batch, False)[0], batch)
    for i in range(len(shared.train_dataset)):
        row = shared.train_dataset[i]
        expected = sequence_logps(policy, row["prompt_ids"], row["chosen_ids"])
        torch.testing.assert_close(chosen[i, 0], expected, atol=1e-5, rtol=0)
        for k, ids in enumerate(row["rejected_ids"]):
            torch.testing.assert_close(
                rejected[i, k], sequence_logps(policy, row["prompt_ids"], ids), atol=1e-5, rtol=0
            )


REDUCTION_CONFIGS = {name: {"rejected_reduction": name} for name in REJECTED_REDUCTIONS}
OTHER_CONFIGS = {
    "ld_alpha": {"ld_alpha": 0.5},
    "wpo_weighting": {"use_weighting": True},
    "sigmoid_sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},
    "truncated": {"max_length": 7},
    "gradient_checkpointing": {"activation_checkpointing": True},
}


@pytest.mark.parametrize("name", list(REDUCTION_CONFIGS) + list(OTHER_CONFIGS))
def test_shared_step_matches_unshared_llama(tokenizer, tmp_path, name):
    config = {**REDUCTION_CONFIGS, **OTHER_CONFIGS}[name]
    data = rows(scores=name in ("infonca", "nca"))
    assert_same_step(tokenizer, tmp_path, SHARED, data, **config)


def test_shared_step_matches_unshared_qwen2(tokenizer, tmp_path):
    assert_same_step(tokenizer, tmp_path, SHARED, rows(), arch="qwen2", rejected_reduction="sum")


def test_shared_step_matches_unshared_with_eager_attention(tokenizer, tmp_path):
    shared = assert_same_step(tokenizer, tmp_path, SHARED, rows(), model_kwargs={"attn_implementation": "eager"})
    assert shared.model.config._attn_implementation == "eager"


def test_shared_step_matches_unshared_with_lora(tokenizer, tmp_path):
    """LoRA with random B, so that the policy differs from the reference (the adapter disabled)."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    shared = assert_same_step(tokenizer, tmp_path, SHARED, rows(), ref=False, peft_config=lora)
    assert any("lora_" in name for name, p in shared.model.named_parameters() if p.requires_grad)


def test_shared_precompute_stores_the_unshared_reference_logps(tokenizer, tmp_path):
    unshared = packing_trainer(tokenizer, tmp_path, "unshared", rows(), precompute_ref_log_probs=True)
    shared = packing_trainer(tokenizer, tmp_path, "shared", rows(), precompute_ref_log_probs=True, **SHARED)
    assert shared.ref_model is not None  # the precompute pass runs the reference on packed rows
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected = torch.tensor(unshared.train_dataset[column]).nan_to_num(0.0)
        torch.testing.assert_close(
            torch.tensor(shared.train_dataset[column]).nan_to_num(0.0), expected, atol=1e-5, rtol=0
        )
    torch.testing.assert_close(loss_and_grads(shared)[0], loss_and_grads(unshared)[0], atol=1e-5, rtol=1e-5)


def test_shared_forward_computes_each_prompt_once(tokenizer, tmp_path):
    shared = packing_trainer(tokenizer, tmp_path, "shared", rows(), max_steps=1, **SHARED)
    tokens = {"policy": 0, "reference": 0}

    def counter(name):
        def hook(module, args, kwargs, output):
            tokens[name] += kwargs["input_ids"].numel()
            assert kwargs["attention_mask"].dim() == 4

        return hook

    shared.model.model.register_forward_hook(counter("policy"), with_kwargs=True)
    shared.ref_model.model.register_forward_hook(counter("reference"), with_kwargs=True)
    shared.train()
    data = shared.train_dataset
    # Packed row: P - 1 prompt tokens, then each response opened by a copy of the last prompt token
    row_lengths = [
        len(r["prompt_ids"]) - 1 + sum(1 + len(ids) for ids in [r["chosen_ids"], *r["rejected_ids"]]) for r in data
    ]
    packed = len(data) * max(row_lengths)
    assert tokens == {"policy": packed, "reference": packed}
    unshared = sum(len(r["prompt_ids"]) + len(ids) for r in data for ids in [r["chosen_ids"], *r["rejected_ids"]])
    assert sum(row_lengths) < unshared


def test_shared_bf16_logps_match_unshared_bf16(tokenizer, tmp_path):
    """bf16 weights: the packed and the unshared forward round differently, so compare at bf16 precision."""
    results = []
    for shared in (False, True):
        t = packing_trainer(
            tokenizer,
            tmp_path,
            f"shared_{shared}",
            rows(),
            model_kwargs={"dtype": torch.bfloat16},
            prefix_sharing=shared,
        )
        batch = batch_of(t)
        with torch.no_grad():
            results.append(forward_sequence_logps(t._per_token_logps(t.model, batch, False)[0], batch))
    assert results[1][0].dtype == torch.float32  # TRL's fused head returns float32 log-probs
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_prefix_sharing_with_keep_end_truncation_raises(tmp_path):
    with pytest.raises(ValueError, match=r"`prefix_sharing=True` shares the prompt .* `truncation_mode='keep_end'`"):
        DPOConfig(str(tmp_path), prefix_sharing=True, max_length=32, truncation_mode="keep_end", bf16=False)


def test_prefix_sharing_with_an_attention_that_ignores_4d_masks_raises(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    policy.config._attn_implementation = "flash_attention_2"  # the guard reads the config; nothing is run
    with pytest.raises(ValueError, match=r"the model uses `attn_implementation='flash_attention_2'`"):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, prefix_sharing=True),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


def test_prefix_sharing_with_sliding_window_layers_raises(tokenizer, tmp_path):
    policy = tiny_causal_lm(
        len(tokenizer), arch="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0
    )
    with pytest.raises(ValueError, match=r"has \['sliding_attention'\] layers"):
        DPOTrainer(
            model=policy,
            args=make_args(tmp_path, prefix_sharing=True, precompute_ref_log_probs=True),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks need a CUDA device")
def test_flex_attention_shared_logps_match_unshared_sdpa(tokenizer, tmp_path):
    results = []
    for shared, implementation in ((False, "sdpa"), (True, "flex_attention")):
        t = packing_trainer(
            tokenizer,
            tmp_path,
            f"shared_{shared}",
            rows(),
            model_kwargs={"attn_implementation": implementation},
            prefix_sharing=shared,
        )
        batch = batch_of(t)
        with torch.no_grad():
            results.append(forward_sequence_logps(t._per_token_logps(t.model, batch, False)[0], batch))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
