"""`padding_free=True`: the batch laid end to end in packed rows gives the log-probs, loss, gradients and metrics of
the padded forward, with and without prefix sharing (the layout and attention themselves: test_packing.py)."""

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
from trl_dpo_ext.collator import DataCollatorForMultiRejectedPreference
from trl_dpo_ext.forward import sequence_logps as forward_sequence_logps
from trl_dpo_ext.losses import REJECTED_REDUCTIONS
from trl_dpo_ext.packing import SEGMENT_SDPA
from trl_dpo_ext.quickstart import tiny_causal_lm


# Ragged prompts, responses and K
PROMPTS = ["2+2=", "what colour is the sky? ", "abc", "hello ", "x*y ", "q"]
CHOSEN = ["4", "blue, mostly", "def", "hi there, friend", "xy", "r"]
REJECTED = [
    ["5", "22", "four"],
    ["green", "red", "b"],
    ["xyz", "abcd", "d"],
    ["go", "no", "bye bye now"],
    ["yx", "x", "z"],
    ["s", "qq", "rr"],
]
RAGGED = (1, 2, 3, 1, 2, 3)


def rows(scores: bool = False) -> list[dict]:
    out = []
    for p, c, r, k in zip(PROMPTS, CHOSEN, REJECTED, RAGGED, strict=True):
        row = {"prompt": p, "chosen": c, "rejected": r[:k]}
        if scores:
            row["scores"] = [1.0] + [-0.5 * j for j in range(k)]
        out.append(row)
    return out


PADDING_FREE = {"padding_free": True}
PADDING_FREE_SHARED = {"padding_free": True, "prefix_sharing": True}
BUDGETED = {"padding_free": True, "token_budget": 48}
BUDGETED_SHARED = {"padding_free": True, "prefix_sharing": True, "token_budget": 40}
PACKINGS = {"padding_free": PADDING_FREE, "padding_free_shared": PADDING_FREE_SHARED}


# ------------------------------------------------------------ attention


@pytest.mark.parametrize("name", list(PACKINGS))
def test_segment_sdpa_model_equals_dense_mask_model(tokenizer, tmp_path, name):
    """The whole packed forward, with the segment-wise kernel and with transformers' SDPA on the dense 4D mask."""
    packed = packing_trainer(tokenizer, tmp_path, name, rows(), **PACKINGS[name])
    assert packed.model.config._attn_implementation == SEGMENT_SDPA
    batch = batch_of(packed)
    with torch.no_grad():
        fast = packed._per_token_logps(packed.model, batch, False)[0]
        packed.model.set_attn_implementation("sdpa")  # the fallback: dense mask
        dense = packed._per_token_logps(packed.model, batch, False)[0]
    assert fast.abs().sum() > 0
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ trainer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", [*PACKINGS, "budgeted", "budgeted_shared"])
def test_packed_sequence_logps_match_a_plain_forward(tokenizer, tmp_path, arch, name):
    packing = {**PACKINGS, "budgeted": BUDGETED, "budgeted_shared": BUDGETED_SHARED}[name]
    packed = packing_trainer(tokenizer, tmp_path, name, rows(), arch=arch, **packing)
    policy = policy_and_ref(tokenizer, arch=arch)[0]
    batch = batch_of(packed)
    if "token_budget" in packing:  # several rows, each within the budget
        assert batch["packed_input_ids"].size(0) > 1
        assert ((batch["packed_document_ids"] >= 0).sum(1) <= packing["token_budget"]).all()
    else:
        assert batch["packed_input_ids"].size(0) == 1  # the whole batch in one row, no padding
        assert (batch["packed_document_ids"] >= 0).all()
    with torch.no_grad():
        chosen, rejected = forward_sequence_logps(packed._per_token_logps(packed.model, batch, False)[0], batch)
    for i in range(len(packed.train_dataset)):
        row = packed.train_dataset[i]
        expected = sequence_logps(policy, row["prompt_ids"], row["chosen_ids"])
        torch.testing.assert_close(chosen[i, 0], expected, atol=1e-5, rtol=1e-5)
        for k, ids in enumerate(row["rejected_ids"]):
            torch.testing.assert_close(
                rejected[i, k], sequence_logps(policy, row["prompt_ids"], ids), atol=1e-5, rtol=1e-5
            )


REDUCTION_CONFIGS = {name: {"rejected_reduction": name} for name in REJECTED_REDUCTIONS}
OTHER_CONFIGS = {
    "ld_alpha": {"ld_alpha": 0.5},
    "wpo_weighting": {"use_weighting": True},
    "sigmoid_sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},
    "ipo": {"loss_type": ["ipo"]},
    "truncated": {"max_length": 9},
    "gradient_checkpointing": {"activation_checkpointing": True},
}


@pytest.mark.parametrize("name", list(REDUCTION_CONFIGS) + list(OTHER_CONFIGS))
@pytest.mark.parametrize("packing", list(PACKINGS))
def test_padding_free_step_matches_padded_llama(tokenizer, tmp_path, packing, name):
    config = {**REDUCTION_CONFIGS, **OTHER_CONFIGS}[name]
    assert_same_step(tokenizer, tmp_path, PACKINGS[packing], rows(scores=name in ("infonca", "nca")), **config)


@pytest.mark.parametrize("packing", [BUDGETED, BUDGETED_SHARED], ids=["budgeted", "budgeted_shared"])
def test_padding_free_step_matches_padded_qwen2(tokenizer, tmp_path, packing):
    assert_same_step(tokenizer, tmp_path, packing, rows(), arch="qwen2", rejected_reduction="sum")


def test_budget_truncation_matches_padded_max_length(tokenizer, tmp_path):
    """A sequence over the budget is cut as `max_length` cuts it: same step as the padded forward with that
    `max_length`."""
    packed = packing_trainer(tokenizer, tmp_path, "packed", rows(), padding_free=True, token_budget=12)
    padded = packing_trainer(tokenizer, tmp_path, "padded", rows(), max_length=12)
    assert max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in packed.train_dataset) > 12
    torch.testing.assert_close(loss_and_grads(packed)[0], loss_and_grads(padded)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packing", list(PACKINGS))
def test_padding_free_step_matches_padded_with_lora(tokenizer, tmp_path, packing):
    """LoRA with random B, so that the policy differs from the reference (the adapter disabled)."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    packed = assert_same_step(tokenizer, tmp_path, PACKINGS[packing], rows(), ref=False, peft_config=lora)
    assert packed.model.get_base_model().config._attn_implementation == SEGMENT_SDPA


@pytest.mark.parametrize("packing", list(PACKINGS))
def test_padding_free_precompute_stores_the_padded_reference_logps(tokenizer, tmp_path, packing):
    padded = packing_trainer(tokenizer, tmp_path, "padded", rows(), precompute_ref_log_probs=True)
    packed = packing_trainer(tokenizer, tmp_path, "packed", rows(), precompute_ref_log_probs=True, **PACKINGS[packing])
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected = torch.tensor(padded.train_dataset[column]).nan_to_num(0.0)
        got = torch.tensor(packed.train_dataset[column]).nan_to_num(0.0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_and_grads(packed)[0], loss_and_grads(padded)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packing", list(PACKINGS))
def test_padding_free_training_with_gradient_accumulation_matches_padded(tokenizer, tmp_path, packing):
    """Two optimizer steps of two micro-batches each: the trained weights and the logged metrics of both runs (SGD,
    whose update is linear in the gradient; Adam's sign-like update of near-zero gradients would amplify rounding)."""
    config = dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-1, optim="sgd"
    )
    padded = packing_trainer(tokenizer, tmp_path, "padded", rows() + rows()[:2], **config)
    packed = packing_trainer(tokenizer, tmp_path, "packed", rows() + rows()[:2], **PACKINGS[packing], **config)
    before = {n: p.detach().clone() for n, p in padded.model.named_parameters()}
    padded.train()
    packed.train()
    padded_params = dict(padded.model.named_parameters())
    for name, param in packed.model.named_parameters():
        assert not torch.equal(padded_params[name], before[name]), f"Parameter {name} has not changed."
        torch.testing.assert_close(param, padded_params[name], atol=1e-5, rtol=1e-4)
    logged = [e for e in packed.state.log_history if "loss" in e]
    expected = [e for e in padded.state.log_history if "loss" in e]
    assert [e["loss"] for e in logged] == pytest.approx([e["loss"] for e in expected], rel=1e-4, abs=1e-6)


def test_padding_free_is_honoured_without_trl_fallback_warning(tokenizer, tmp_path, caplog):
    packed = packing_trainer(tokenizer, tmp_path, "packed", rows(), padding_free=True)
    assert packed.padding_free and packed.args.padding_free
    assert "temporarily unavailable" not in caplog.text
    assert "packed_input_ids" in batch_of(packed)


# ------------------------------------------------------------ guards


def test_flash_attention_with_padding_free_and_prefix_sharing_raises(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    policy.config._attn_implementation = "flash_attention_2"  # the guard reads the config; nothing is run
    with pytest.raises(ValueError, match=r"uses `attn_implementation='flash_attention_2'`, which only separates"):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, prefix_sharing=True, padding_free=True),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


def test_padding_free_with_an_attention_that_cannot_separate_sequences_raises(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    policy.config._attn_implementation = "paged|eager"
    with pytest.raises(
        ValueError, match=r"`padding_free=True` needs an attention implementation .* 'flash_attention_2'"
    ):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, padding_free=True),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlexAttention trains on CUDA")
def test_flex_attention_on_cpu_raises_naming_sdpa(tokenizer, tmp_path):
    policy = tiny_causal_lm(len(tokenizer), attn_implementation="flex_attention")
    with pytest.raises(ValueError, match=r"no backward pass on CPU .* `attn_implementation='sdpa'`"):
        DPOTrainer(
            model=policy,
            args=make_args(tmp_path, padding_free=True, precompute_ref_log_probs=True),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


def test_prefix_sharing_with_a_collator_that_does_not_pack_raises(tokenizer, tmp_path):
    """Otherwise the run would silently train unshared."""
    policy, ref = policy_and_ref(tokenizer)
    with pytest.raises(ValueError, match=r"`prefix_sharing=True` needs a collator that packs each example's prompt"):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, prefix_sharing=True),
            data_collator=DataCollatorForMultiRejectedPreference(pad_token_id=tokenizer.pad_token_id),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


def test_padding_free_with_a_collator_that_does_not_pack_raises(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    with pytest.raises(ValueError, match=r"`padding_free=True` needs a collator that lays the batch in packed rows"):
        DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path, padding_free=True),
            data_collator=DataCollatorForMultiRejectedPreference(pad_token_id=tokenizer.pad_token_id),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )


def test_token_budget_checks(tmp_path):
    with pytest.raises(ValueError, match=r"`token_budget` must be None or a positive number of tokens, got 0"):
        DPOConfig(str(tmp_path), padding_free=True, token_budget=0, bf16=False)
    with pytest.warns(UserWarning, match=r"`token_budget=64` is set but `padding_free=False`"):
        DPOConfig(str(tmp_path), token_budget=64, bf16=False)
    with pytest.raises(ValueError, match=r"`prefix_sharing=True` shares the prompt .* `token_budget=64`"):
        DPOConfig(
            str(tmp_path),
            prefix_sharing=True,
            padding_free=True,
            token_budget=64,
            truncation_mode="keep_end",
            bf16=False,
        )


# ------------------------------------------------------------ GPU


def _gpu_logps(tokenizer, tmp_path, implementation: str, dtype=torch.float32, **packing):
    """Sequence log-probs of one batch on CUDA: padded with SDPA, and packed with `implementation`."""
    results = []
    for name, config in (("padded", {}), ("packed", packing)):
        model_kwargs = {"attn_implementation": implementation if config else "sdpa", "dtype": dtype}
        policy = tiny_causal_lm(len(tokenizer), **model_kwargs).cuda()
        ref = tiny_causal_lm(len(tokenizer), seed=1, **model_kwargs).cuda()
        t = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=make_args(tmp_path / name, per_device_train_batch_size=6, **config),
            train_dataset=Dataset.from_list(rows()),
            processing_class=tokenizer,
        )
        batch = batch_of(t)
        with torch.no_grad():
            results.append(forward_sequence_logps(t._per_token_logps(t.model, batch, False)[0], batch))
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks train on a CUDA device")
@pytest.mark.parametrize("packing", [PADDING_FREE, PADDING_FREE_SHARED, BUDGETED_SHARED])
def test_flex_attention_padding_free_logps_match_padded_sdpa(tokenizer, tmp_path, packing):
    padded, packed = _gpu_logps(tokenizer, tmp_path, "flex_attention", **packing)
    for got, expected in zip(packed, padded, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="segment-wise SDPA on a CUDA device")
def test_segment_sdpa_on_cuda_matches_padded_sdpa(tokenizer, tmp_path):
    padded, packed = _gpu_logps(tokenizer, tmp_path, "sdpa", **PADDING_FREE_SHARED)
    for got, expected in zip(packed, padded, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs a CUDA device")
def test_flash_attention_padding_free_logps_match_padded_sdpa(tokenizer, tmp_path):
    pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    padded, packed = _gpu_logps(tokenizer, tmp_path, "flash_attention_2", dtype=torch.bfloat16, **BUDGETED)
    for got, expected in zip(packed, padded, strict=True):  # bf16: the kernels round differently
        torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
