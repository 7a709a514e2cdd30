"""TRL features with K > 1 rejected: data formats, PEFT, precompute, checkpointing, evaluation, resume, bad input."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
import trl
from conftest import (
    assert_every_trainable_parameter_changed,
    loss_and_grads,
    make_args,
    policy_and_ref,
    sequence_logps,
    trainable_parameters,
)
from datasets import Dataset
from peft import LoraConfig

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm


ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22", "four"]},
    {"prompt": "sky? ", "chosen": "blue", "rejected": ["green"]},
    {"prompt": "abc", "chosen": "def", "rejected": ["xyz", "abcd"]},
    {"prompt": "hello ", "chosen": "hi there", "rejected": ["go", "no", "bye", "ok"]},
]


def trainer_for(tokenizer, tmp_path, rows=ROWS, ref=True, peft_config=None, **config):
    policy, ref_model = policy_and_ref(tokenizer)
    return DPOTrainer(
        model=policy,
        ref_model=ref_model if ref else None,
        args=make_args(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.mark.parametrize(
    "config",
    [{}, {"rejected_reduction": "softmax"}, {"prefix_sharing": True}, {"loss_type": ["sigmoid", "sft"]}],
    ids=["mean", "softmax", "prefix_sharing", "sigmoid_sft"],
)
def test_train_changes_every_trainable_parameter(tokenizer, tmp_path, config):
    """As TRL's own tests: after `train()` on K rejected per row, no trainable parameter is left where it was."""
    trainer = trainer_for(tokenizer, tmp_path, max_steps=3, **config)
    before = trainable_parameters(trainer.model)
    trainer.train()
    assert_every_trainable_parameter_changed(trainer.model, before)


def seed_broadcast_loss(policy, reference, dataset, beta=0.1):
    """The seed's loss, mean over examples of mean_k −log σ(β(Δ_w − Δ_lk)), from plain forwards."""
    losses = []
    with torch.no_grad():
        for row in dataset:
            prompt = row["prompt_ids"]
            delta_w = sequence_logps(policy, prompt, row["chosen_ids"]) - sequence_logps(
                reference, prompt, row["chosen_ids"]
            )
            delta_l = torch.stack(
                [sequence_logps(policy, prompt, r) - sequence_logps(reference, prompt, r) for r in row["rejected_ids"]]
            )
            losses.append(-F.logsigmoid(beta * (delta_w - delta_l)).mean())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- data formats


def test_standard_rows_tokenize_each_rejected_after_the_prompt_with_eos(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path)
    row = trainer.train_dataset[0]
    eos = tokenizer.eos_token_id
    assert row["prompt_ids"] == tokenizer("2+2=").input_ids
    assert row["chosen_ids"] == tokenizer("4").input_ids + [eos]
    assert row["rejected_ids"] == [tokenizer(r).input_ids + [eos] for r in ["5", "22", "four"]]


def test_pretokenized_rows_are_used_exactly_as_given(tokenizer, tmp_path):
    rows = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [[10], [11, 12, 13]]},
        {"prompt_ids": [20], "chosen_ids": [21, 22, 23], "rejected_ids": [[24, 25]]},
    ]
    trainer = trainer_for(tokenizer, tmp_path, rows=rows, per_device_train_batch_size=2)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    p = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, p],  # chosen of row 0: no EOS added
        [20, 21, 22, 23, p, p],  # chosen of row 1
        [5, 6, 7, 10, p, p],  # rejected 0 of row 0
        [5, 6, 7, 11, 12, 13],  # rejected 1 of row 0
        [20, 24, 25, p, p, p],  # the single rejected of row 1
    ]
    assert batch["rejected_mask"].tolist() == [[True, True], [True, False]]
    assert batch["completion_mask"][3].tolist() == [0, 0, 0, 1, 1, 1]
    # TRL's pairwise shape: `rejected_ids` a flat list[int] is one rejected
    flat = trainer_for(
        tokenizer, tmp_path / "flat", rows=[{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4]}]
    )
    assert flat.train_dataset[0]["rejected_ids"] == [[3, 4]]


def test_conversational_rows_use_the_chat_template_and_match_explicit_and_implicit_prompts(tokenizer, tmp_path):
    def msgs(role, text):
        return [{"role": role, "content": text}]

    explicit = [
        {
            "prompt": msgs("user", row["prompt"]),
            "chosen": msgs("assistant", row["chosen"]),
            "rejected": [msgs("assistant", r) for r in row["rejected"]],
        }
        for row in ROWS
    ]
    implicit = [
        {
            "chosen": row["prompt"] + row["chosen"],
            "rejected": [row["prompt"] + r for r in row["rejected"]],
        }
        for row in explicit
    ]
    a = trainer_for(tokenizer, tmp_path / "a", rows=explicit)
    b = trainer_for(tokenizer, tmp_path / "b", rows=implicit)
    first = a.train_dataset[0]
    prompt = tokenizer.apply_chat_template(explicit[0]["prompt"], add_generation_prompt=True, tokenize=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    assert first["prompt_ids"] == prompt
    assert tokenizer.decode(first["chosen_ids"]) == "4<|im_end|>\n"
    assert [tokenizer.decode(r) for r in first["rejected_ids"]] == [
        "5<|im_end|>\n",
        "22<|im_end|>\n",
        "four<|im_end|>\n",
    ]
    for i in range(len(ROWS)):
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert a.train_dataset[i][column] == b.train_dataset[i][column]
    loss, _ = loss_and_grads(a)
    policy, reference = policy_and_ref(tokenizer)
    torch.testing.assert_close(loss, seed_broadcast_loss(policy, reference, a.train_dataset), atol=1e-5, rtol=1e-5)


def test_implicit_standard_prompt_is_the_common_prefix_of_all_responses(tokenizer, tmp_path):
    rows = [{"chosen": "Q: hi A: hello", "rejected": ["Q: hi A: go away", "Q: hi A: help"]}]
    trainer = trainer_for(tokenizer, tmp_path, rows=rows)
    row = trainer.train_dataset[0]
    assert row["prompt"] == "Q: hi A:"
    assert row["chosen"] == " hello" and row["rejected"] == [" go away", " help"]


# ---------------------------------------------------------------- TRL features


def test_peft_reference_is_the_base_model_with_the_adapter_disabled(tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _, base = policy_and_ref(tokenizer)
    trainer = DPOTrainer(
        model=base,
        args=make_args(tmp_path, max_steps=3, per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=lora,
    )
    assert trainer.ref_model is None
    loss0, _ = loss_and_grads(trainer)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at zero: policy == reference
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(param, torch.zeros_like(param)), f"{name} was not trained"
        elif "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"{name} of the base model changed"
    loss, _ = loss_and_grads(trainer)
    # Independent computation: the reference is the base model, reached by disabling the adapter
    model, losses = trainer.model, []
    with torch.no_grad():
        for row in trainer.train_dataset:
            prompt, responses = row["prompt_ids"], [row["chosen_ids"], *row["rejected_ids"]]
            policy_logps = torch.stack([sequence_logps(model, prompt, r) for r in responses])
            with model.disable_adapter():
                ref_logps = torch.stack([sequence_logps(model, prompt, r) for r in responses])
            delta = policy_logps - ref_logps
            losses.append(-F.logsigmoid(0.1 * (delta[0] - delta[1:])).mean())
    assert loss.item() != pytest.approx(math.log(2), abs=1e-4)
    torch.testing.assert_close(loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def test_precomputed_reference_log_probs_are_one_chosen_and_k_rejected_per_row(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, precompute_ref_log_probs=True)
    _, reference = policy_and_ref(tokenizer)
    with torch.no_grad():
        for row in trainer.train_dataset:
            expected = sequence_logps(reference, row["prompt_ids"], row["chosen_ids"])
            assert row["ref_chosen_logps"] == pytest.approx(expected.item(), abs=1e-4)
            stored = row["ref_rejected_logps"][: len(row["rejected_ids"])]
            assert stored == pytest.approx(
                [sequence_logps(reference, row["prompt_ids"], r).item() for r in row["rejected_ids"]], abs=1e-4
            )
    loss, grads = loss_and_grads(trainer)
    live = trainer_for(tokenizer, tmp_path / "live")
    live_loss, live_grads = loss_and_grads(live)
    torch.testing.assert_close(loss, live_loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], live_grads[name], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer, tmp_path):
    plain = trainer_for(tokenizer, tmp_path / "plain")
    checkpointed = trainer_for(tokenizer, tmp_path / "gc", activation_checkpointing=True)
    loss, grads = loss_and_grads(checkpointed)
    expected_loss, expected_grads = loss_and_grads(plain)
    torch.testing.assert_close(loss, expected_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-6, rtol=1e-5)


def test_bf16_training_tracks_the_fp32_loss(tokenizer, tmp_path):
    fp32 = trainer_for(tokenizer, tmp_path / "fp32")
    bf16 = trainer_for(tokenizer, tmp_path / "bf16", bf16=True, use_cpu=True)
    expected, _ = loss_and_grads(fp32)
    with bf16.compute_loss_context_manager():
        loss, _ = loss_and_grads(bf16)
    assert loss.item() == pytest.approx(expected.item(), abs=2e-2)
    bf16.train()
    assert all(math.isfinite(h["loss"]) for h in bf16.state.log_history if "loss" in h)


def test_evaluation_reports_k_rejected_metrics(tokenizer, tmp_path):
    policy, ref_model = policy_and_ref(tokenizer)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=make_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=Dataset.from_list(ROWS),
        eval_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    policy, reference = policy_and_ref(tokenizer)
    expected = seed_broadcast_loss(policy, reference, trainer.eval_dataset)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["eval_num_rejected"] == pytest.approx(10 / 4)
    for key in ("eval_rewards/accuracies", "eval_rewards/accuracies_all", "eval_rewards/margins_min"):
        assert key in metrics


def test_k_rejected_metrics_have_their_documented_meaning(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path)
    loss_and_grads(trainer)
    policy, reference = policy_and_ref(tokenizer)
    chosen, rejected = [], []
    with torch.no_grad():
        for row in trainer.train_dataset:
            p = row["prompt_ids"]
            chosen.append(
                0.1 * (sequence_logps(policy, p, row["chosen_ids"]) - sequence_logps(reference, p, row["chosen_ids"]))
            )
            rejected.append(
                torch.stack(
                    [
                        0.1 * (sequence_logps(policy, p, r) - sequence_logps(reference, p, r))
                        for r in row["rejected_ids"]
                    ]
                )
            )
    margins = [c - r for c, r in zip(chosen, rejected)]
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    all_pairs = torch.cat(margins)
    assert metrics["rewards/rejected"] == pytest.approx(torch.cat(rejected).mean().item(), abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx((all_pairs > 0).float().mean().item())
    assert metrics["rewards/accuracies_all"] == pytest.approx(sum(bool((m > 0).all()) for m in margins) / 4)
    assert metrics["rewards/margins_min"] == pytest.approx(
        torch.stack([m.min() for m in margins]).mean().item(), abs=1e-5
    )
    assert metrics["num_rejected"] == 10 / 4


def test_resume_from_checkpoint_gives_the_same_final_weights(tokenizer, tmp_path):
    config = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    full = trainer_for(tokenizer, tmp_path / "full", **config)
    full.train()
    interrupted = trainer_for(tokenizer, tmp_path / "resumed", **config)
    interrupted.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), interrupted.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")
    start = tiny_causal_lm(len(tokenizer))
    assert not torch.equal(full.model.lm_head.weight, start.lm_head.weight)


# ---------------------------------------------------------------- guards


def test_prompts_that_fill_max_length_are_dropped_with_a_logged_count(tokenizer, tmp_path, caplog):
    rows = [*ROWS, {"prompt": "x" * 40, "chosen": "a", "rejected": ["b", "c"]}]
    with caplog.at_level("WARNING"):
        trainer = trainer_for(tokenizer, tmp_path, rows=rows, max_length=32)
    assert len(trainer.train_dataset) == len(ROWS)
    assert "Dropped 1 of 5 rows of the train dataset" in caplog.text


def test_rejected_identical_to_chosen_is_kept_and_warned_once(tokenizer, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": ["b", "c"]}, {"prompt": "d", "chosen": "e", "rejected": ["e"]}]
    with pytest.warns(UserWarning, match="2 rejected response"):
        trainer = trainer_for(tokenizer, tmp_path, rows=rows)
    assert trainer.train_dataset[0]["num_rejected"] == 2


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "a", "chosen": "b"}], r"no column \['rejected'\]"),
        ([{"prompt": "a", "rejected": ["b"]}], r"no column \['chosen'\]"),
        (
            [{"prompt": "a", "chosen": "b", "rejected": ["c"]}, {"prompt": "a", "chosen": "b", "rejected": []}],
            r"Row 1, column 'rejected': expected a str or a non-empty list\[str\], got empty list",
        ),
        (
            [{"prompt": "a", "chosen": "b", "rejected": ["c"]}, {"prompt": "a", "chosen": "b", "rejected": None}],
            r"Row 1, column 'rejected': missing value",
        ),
        ([{"prompt": "a", "chosen": 3, "rejected": ["c"]}], r"Row 0, column 'chosen': expected a str"),
        ([{"prompt": "a", "chosen": "b", "rejected": [[1, 2]]}], r"Row 0, column 'rejected': expected a str or"),
        (
            [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [[3]]}, {"prompt_ids": [1], "chosen_ids": [2]}],
            r"Row 1, column 'rejected_ids': missing value",
        ),
        (
            [{"prompt_ids": [1], "chosen_ids": ["x"], "rejected_ids": [3]}],
            r"Row 0, column 'chosen_ids': expected list\[int\]",
        ),
    ],
)
def test_bad_input_is_rejected_before_training_naming_row_and_column(tokenizer, tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        trainer_for(tokenizer, tmp_path, rows=rows)


def test_nan_in_precomputed_reference_log_probs_names_the_row(tokenizer, tmp_path):
    rows = [
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [[3], [4]], "ref_chosen_logps": -1.0,
         "ref_rejected_logps": [-2.0, -3.0]},
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [[3], [4]], "ref_chosen_logps": -1.0,
         "ref_rejected_logps": [-2.0, float("nan")]},
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"Row 1, column 'ref_rejected_logps': expected a finite float for rejected 1"
    ):
        trainer_for(tokenizer, tmp_path, rows=rows, precompute_ref_log_probs=True)


def test_nan_in_reference_log_probs_names_the_row_of_the_given_dataset_after_rows_are_dropped(tokenizer, tmp_path):
    """Row 0's prompt fills `max_length` and is dropped: the bad row is still named by its position as given."""
    rows = [
        {"prompt_ids": [1, 1, 1, 1], "chosen_ids": [2], "rejected_ids": [[3]], "ref_chosen_logps": -1.0,
         "ref_rejected_logps": [-2.0]},
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [[3], [4]], "ref_chosen_logps": -1.0,
         "ref_rejected_logps": [-2.0, -3.0]},
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [[3], [4]], "ref_chosen_logps": -1.0,
         "ref_rejected_logps": [-2.0, float("nan")]},
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"Row 2, column 'ref_rejected_logps': expected a finite float for rejected 1"
    ):
        trainer_for(tokenizer, tmp_path, rows=rows, precompute_ref_log_probs=True, max_length=4)


def test_given_reference_log_probs_are_used_without_a_reference_forward(tokenizer, tmp_path):
    rows = [
        {"prompt_ids": [20, 21], "chosen_ids": [22], "rejected_ids": [[23], [24, 25]], "ref_chosen_logps": -3.0,
         "ref_rejected_logps": [-2.0, -9.0]},
    ]  # fmt: skip
    trainer = trainer_for(tokenizer, tmp_path, rows=rows, ref=False, precompute_ref_log_probs=True)
    loss, _ = loss_and_grads(trainer)
    policy, _ = policy_and_ref(tokenizer)
    with torch.no_grad():
        dw = sequence_logps(policy, [20, 21], [22]) + 3.0
        dl = torch.stack(
            [sequence_logps(policy, [20, 21], [23]) + 2.0, sequence_logps(policy, [20, 21], [24, 25]) + 9.0]
        )
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * (dw - dl)).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"rejected_reduction": "softmax", "loss_type": "ipo"}, "listwise form of the sigmoid loss"),
        ({"rejected_reduction": "softmax", "use_weighting": True}, "use_weighting=True"),
        ({"rejected_reduction": "max"}, "must be one of"),
        ({"loss_type": "aot", "rejected_reduction": "min"}, "sorts one margin per example"),
    ],
)
def test_meaningless_combinations_fail_at_construction(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **config)


def test_aot_with_several_rejected_fails_at_construction(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"row 0 of the train dataset has 3 in column 'rejected'"):
        trainer_for(tokenizer, tmp_path, loss_type="aot")


def test_conversational_rows_are_recognised_by_the_chosen_whatever_the_rejected():
    """`trl.is_conversational` inspects an arbitrary column (set order follows the hash seed): a list of rejected
    messages, or an empty list, must not decide it."""
    from trl_dpo_ext.rows import is_conversational_row

    message = [{"role": "assistant", "content": "4"}]
    assert is_conversational_row(
        {"prompt": [{"role": "user", "content": "2+2"}], "chosen": message, "rejected": [message]}
    )
    assert is_conversational_row({"chosen": message, "rejected": []})
    assert not is_conversational_row({"prompt": "2+2=", "chosen": "4", "rejected": [["5"]]})


def test_pad_token_of_the_config_pads_the_batch_and_reaches_the_model_as_in_trl(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, pad_token="<unk>")
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    assert trainer.data_collator.pad_token_id == unk
    assert trainer.model.config.pad_token_id == unk and trainer.model.generation_config.pad_token_id == unk
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == unk).all()


def test_pad_token_outside_the_vocabulary_raises_trls_error(tmp_path):
    def build(trainer_class, config_class, output_dir):
        policy, ref = policy_and_ref(char_tokenizer())
        args = config_class(**cpu_training_args(str(output_dir), pad_token="<nope>"))
        rows = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        return trainer_class(
            model=policy, ref_model=ref, args=args, train_dataset=rows, processing_class=char_tokenizer()
        )

    with pytest.raises(ValueError) as stock:
        build(trl.DPOTrainer, trl.DPOConfig, tmp_path / "stock")
    with pytest.raises(ValueError, match=re.escape(str(stock.value))):
        build(DPOTrainer, DPOConfig, tmp_path / "ext")


def test_the_collators_columns_are_kept_once_whatever_the_number_of_dataloaders(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path)
    for _ in range(3):  # transformers sets the signature columns for every dataloader it builds
        trainer._set_signature_columns_if_needed()
    assert trainer._signature_columns.count("scores") == 1 and trainer._signature_columns.count("dataset_index") == 1
