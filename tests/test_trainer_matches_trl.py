"""The K-rejected trainer against independent computations: stock `trl.DPOTrainer`, and the seed's own formula."""

import pytest
import torch
import torch.nn.functional as F
import trl
from conftest import assert_grads_close, loss_and_grads, make_args, policy_and_ref, sequence_logps
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.forward import sequence_logps as forward_sequence_logps


PROMPTS = ["2+2=", "sky? ", "abc", "hello ", "x*y ", "q"]
CHOSEN = ["4", "blue", "def", "hi there", "xy", "r"]
REJECTED = [["5", "22", "four"], ["green", "red", "b"], ["xyz", "abcd", "d"], ["go", "no", "bye"], ["yx", "x", "z"]]
REJECTED.append(["s", "qq", "rr"])


def multi_rows(num_rejected=(3, 3, 3, 3, 3, 3)):
    return [
        {"prompt": p, "chosen": c, "rejected": r[:k]}
        for p, c, r, k in zip(PROMPTS, CHOSEN, REJECTED, num_rejected, strict=True)
    ]


def expand_to_pairs(rows):
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rej} for r in rows for rej in r["rejected"]]


def trl_trainer(tokenizer, rows, tmp_path, **config):
    policy, ref = policy_and_ref(tokenizer)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        bf16=False,
        activation_checkpointing=False,
        **config,
    )
    return trl.DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def ext_trainer(tokenizer, rows, tmp_path, ref=True, **config):
    policy, ref_model = policy_and_ref(tokenizer)
    args = make_args(tmp_path / "ext", **config)
    return DPOTrainer(
        model=policy,
        ref_model=ref_model if ref else None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


PAIRWISE_CONFIGS = {
    "sigmoid": {},
    "ipo": {"loss_type": "ipo"},
    "js_divergence": {"f_divergence_type": "js_divergence"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "loss_type": "hinge"},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "nca_pair": {"loss_type": "nca_pair"},
    "bco_pair": {"loss_type": "bco_pair"},
    "sppo_hard": {"loss_type": "sppo_hard"},
    "apo_zero": {"loss_type": "apo_zero"},
    "apo_down": {"loss_type": "apo_down"},
    "discopop": {"loss_type": "discopop"},
    "sigmoid_norm": {"loss_type": "sigmoid_norm"},
    "aot": {"loss_type": "aot", "label_smoothing": 0.1},
    "aot_unpaired": {"loss_type": "aot_unpaired"},
    "mpo_sigmoid_sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},
    "ld_alpha": {"ld_alpha": 0.5},
    "wpo_weighting": {"use_weighting": True},
}


@pytest.mark.parametrize("name", list(PAIRWISE_CONFIGS))
def test_single_rejected_matches_stock_trl_loss_and_gradients(tokenizer, tmp_path, name):
    config = PAIRWISE_CONFIGS[name]
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"][0]} for r in multi_rows()]
    stock = trl_trainer(tokenizer, rows, tmp_path, **config)
    ours = ext_trainer(tokenizer, rows, tmp_path, **config)
    expected_loss, expected_grads = loss_and_grads(stock)
    loss, grads = loss_and_grads(ours)
    assert expected_loss.item() != pytest.approx(0.6931471, abs=1e-4), "the policy must differ from the reference"
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)
    # TRL's metrics keep their names and values
    for key, values in stock._metrics["train"].items():
        theirs, mine = values[-1], ours._metrics["train"][key][-1]
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_constant_k_mean_matches_stock_trl_on_pairs_expanded_from_k(tokenizer, tmp_path, loss_type):
    rows = multi_rows()
    stock = trl_trainer(tokenizer, expand_to_pairs(rows), tmp_path, loss_type=loss_type)
    ours = ext_trainer(tokenizer, rows, tmp_path, loss_type=loss_type)
    expected_loss, expected_grads = loss_and_grads(stock)
    loss, grads = loss_and_grads(ours)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)
    assert ours._metrics["train"]["rewards/accuracies"][-1] == pytest.approx(
        stock._metrics["train"]["rewards/accuracies"][-1]
    )
    assert ours._metrics["train"]["num_rejected"][-1] == 3


def test_ragged_k_mean_is_the_average_of_per_prompt_stock_trl_losses(tokenizer, tmp_path):
    """With K_i varying, "mean" gives each prompt the weight 1/B: the mean over prompts of TRL's loss on its pairs."""
    rows = multi_rows(num_rejected=(1, 2, 3, 1, 2, 3))
    ours = ext_trainer(tokenizer, rows, tmp_path)
    loss, grads = loss_and_grads(ours)
    expected_loss, expected_grads = 0.0, None
    for i, row in enumerate(rows):
        stock = trl_trainer(tokenizer, expand_to_pairs([row]), tmp_path / str(i))
        row_loss, row_grads = loss_and_grads(stock)
        expected_loss += row_loss / len(rows)
        if expected_grads is None:
            expected_grads = {n: g / len(rows) for n, g in row_grads.items()}
        else:
            expected_grads = {n: expected_grads[n] + g / len(rows) for n, g in row_grads.items()}
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)


def test_seed_toy_example_matches_the_seeds_broadcast_loss(tokenizer, tmp_path):
    """The seed's own example: prompt [1..6], chosen [7, 8, 9, 10], rejected [[1, 2, 3, 0], [4, 5, 6, 0]], β = 0.1."""
    config = LlamaConfig(vocab_size=1000, num_hidden_layers=1, hidden_size=128)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    seed_policy, seed_reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    with torch.no_grad():  # move the policy away from the reference, identically in both copies
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        seed_policy.load_state_dict(policy.state_dict())
        seed_reference.load_state_dict(reference.state_dict())

    prompt_ids, good, bad_list = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [[1, 2, 3, 0], [4, 5, 6, 0]]
    dataset = Dataset.from_list([{"prompt_ids": prompt_ids, "chosen_ids": good, "rejected_ids": bad_list}])
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=make_args(tmp_path, beta=0.1, per_device_train_batch_size=1),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    loss, _ = loss_and_grads(trainer)

    # The seed's code, verbatim in substance
    input_ids = torch.LongTensor([prompt_ids + good, *[prompt_ids + bad for bad in bad_list]])
    labels = torch.LongTensor([[-100] * 6 + good, *[[-100] * 6 + bad for bad in bad_list]])[:, 1:]
    loss_mask = labels != -100
    labels[labels == -100] = 0

    def all_logps(model):
        logits = model(input_ids)["logits"][:, :-1, :]
        per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
        return (per_token_logps * loss_mask).sum(-1)

    with torch.no_grad():
        policy_logps, reference_logps = all_logps(seed_policy), all_logps(seed_reference)
    logits = (policy_logps[:1] - reference_logps[:1]) - (policy_logps[1:] - reference_logps[1:])
    seed_loss = -F.logsigmoid(0.1 * logits).mean()
    assert seed_loss.item() != pytest.approx(0.6931471, abs=1e-5)
    torch.testing.assert_close(loss, seed_loss, atol=1e-6, rtol=1e-6)


def test_each_sequence_is_forwarded_once_per_step_by_policy_and_reference(tokenizer, tmp_path):
    rows = multi_rows(num_rejected=(1, 2, 3, 1, 2, 3))
    trainer = ext_trainer(tokenizer, rows, tmp_path, per_device_train_batch_size=len(rows), max_steps=2)
    counts = {"policy": 0, "reference": 0}

    def counter(name):
        def hook(module, args, kwargs, output):
            counts[name] += kwargs["input_ids"].size(0)

        return hook

    trainer.model.model.register_forward_hook(counter("policy"), with_kwargs=True)
    trainer.ref_model.model.register_forward_hook(counter("reference"), with_kwargs=True)
    trainer.train()
    sequences_per_step = sum(1 + len(r["rejected"]) for r in rows)  # K + 1 per example, not 2K
    assert counts == {"policy": 2 * sequences_per_step, "reference": 2 * sequences_per_step}


def test_policy_log_probs_match_a_plain_forward(tokenizer, tmp_path):
    """The trainer's sequence log-probs are those of an independent forward + log-softmax of each (prompt, response)."""
    rows = multi_rows(num_rejected=(1, 2, 3, 1, 2, 3))
    trainer = ext_trainer(tokenizer, rows, tmp_path)
    _, policy = policy_and_ref(tokenizer)[0], policy_and_ref(tokenizer)[0]
    dataset = trainer.train_dataset
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with torch.no_grad():
        per_token, _ = trainer._per_token_logps(trainer.model, batch, reference=False)
        chosen, rejected = forward_sequence_logps(per_token, batch)
        for i in range(len(dataset)):
            row = dataset[i]
            expected = sequence_logps(policy, row["prompt_ids"], row["chosen_ids"])
            torch.testing.assert_close(chosen[i, 0], expected, atol=1e-5, rtol=1e-5)
            for k, ids in enumerate(row["rejected_ids"]):
                expected = sequence_logps(policy, row["prompt_ids"], ids)
                torch.testing.assert_close(rejected[i, k], expected, atol=1e-5, rtol=1e-5)
