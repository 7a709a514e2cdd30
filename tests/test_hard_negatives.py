"""Online hard-negative selection in the trainer: the kept rejected, and the step on them, against independent runs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_grads_close, loss_and_grads, make_args, policy_and_ref, sequence_logps
from datasets import Dataset
from peft import LoraConfig

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.hard_negatives import KEPT_RANK_PREFIX


BETA = 0.1
ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22", "four"]},
    {"prompt": "sky? ", "chosen": "blue", "rejected": ["green"]},
    {"prompt": "abc", "chosen": "def", "rejected": ["xyz", "abcd"]},
    {"prompt": "hello ", "chosen": "hi there", "rejected": ["go", "no", "bye", "ok"]},
]
PACKING = {
    "padded": {},
    "prefix_sharing": {"prefix_sharing": True},
    "padding_free": {"padding_free": True},
    "prefix_sharing_padding_free": {"prefix_sharing": True, "padding_free": True},
    "precomputed_reference": {"precompute_ref_log_probs": True},
}


def trainer_for(tokenizer, tmp_path, rows, peft_config=None, **config):
    policy, ref_model = policy_and_ref(tokenizer, noise=0.2)
    config.setdefault("per_device_train_batch_size", len(rows))
    return DPOTrainer(
        model=policy,
        ref_model=None if peft_config else ref_model,
        args=make_args(tmp_path, beta=BETA, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def implicit_rewards(tokenizer, rows):
    """Δ = log π_θ/π_ref of each chosen and rejected, by plain forwards of fresh models (as `trainer_for` builds)."""
    policy, ref = policy_and_ref(tokenizer, noise=0.2)
    encode = tokenizer.encode
    rewards = []
    for row in rows:
        prompt = encode(row["prompt"], add_special_tokens=False)

        def delta(response, prompt=prompt):
            ids = encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
            return (sequence_logps(policy, prompt, ids) - sequence_logps(ref, prompt, ids)).item()

        rewards.append((delta(row["chosen"]), [delta(r) for r in row["rejected"]]))
    return rewards


def hardest_rows(tokenizer, rows, num_selected):
    """Each row with its `num_selected` rejected of largest implicit reward (= largest σ(β(Δ_l − Δ_w)), the largest
    gradient weight under `sigmoid` + `mean`), in their listed order."""
    kept_rows = []
    for row, (_, rejected) in zip(rows, implicit_rewards(tokenizer, rows), strict=True):
        kept = sorted(sorted(range(len(rejected)), key=lambda k: -rejected[k])[:num_selected])
        kept_rows.append({**row, "rejected": [row["rejected"][k] for k in kept]})
    return kept_rows


@pytest.mark.parametrize("packing", list(PACKING.values()), ids=list(PACKING))
@pytest.mark.parametrize("num_selected", [1, 2])
def test_hardest_equals_the_trainer_on_rows_listing_only_the_kept_rejected(tokenizer, tmp_path, packing, num_selected):
    selected = trainer_for(
        tokenizer, tmp_path / "sel", ROWS, rejected_selection="hardest", num_selected=num_selected, **packing
    )
    kept_rows = hardest_rows(tokenizer, ROWS, num_selected)
    assert kept_rows != ROWS and any(
        len(r["rejected"]) == num_selected < len(o["rejected"]) for r, o in zip(kept_rows, ROWS)
    )
    subset = trainer_for(tokenizer, tmp_path / "sub", kept_rows, **packing)
    loss, grads = loss_and_grads(selected)
    expected_loss, expected_grads = loss_and_grads(subset)
    assert expected_loss.item() != pytest.approx(0.6931471, abs=1e-4), "the policy must differ from the reference"
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads, atol=1e-6)


def test_hardest_with_peft_equals_the_trainer_on_the_kept_rows(tokenizer, tmp_path):
    """LoRA starts at the base model (B = 0): every implicit reward is 0, every weight 1/2, and the ties keep the
    first listed rejected; the step is that of the rows listing only those."""
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    selected = trainer_for(tokenizer, tmp_path / "sel", ROWS, peft, rejected_selection="hardest", num_selected=1)
    kept_rows = [{**row, "rejected": row["rejected"][:1]} for row in ROWS]
    subset = trainer_for(tokenizer, tmp_path / "sub", kept_rows, peft)
    loss, grads = loss_and_grads(selected)
    expected_loss, expected_grads = loss_and_grads(subset)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads, atol=1e-6)


@pytest.mark.parametrize("selection", ["hardest", "sampled"])
def test_num_selected_at_least_k_trains_exactly_as_all(tokenizer, tmp_path, selection):
    selected = trainer_for(tokenizer, tmp_path / "sel", ROWS, rejected_selection=selection, num_selected=4)
    everything = trainer_for(tokenizer, tmp_path / "all", ROWS)
    loss, grads = loss_and_grads(selected)
    expected_loss, expected_grads = loss_and_grads(everything)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and all(torch.equal(grads[n], expected_grads[n]) for n in grads)
    assert selected._metrics["train"] == everything._metrics["train"]


def test_metrics_describe_every_rejected_and_count_the_kept_ranks(tokenizer, tmp_path):
    selected = trainer_for(tokenizer, tmp_path / "sel", ROWS, rejected_selection="hardest", num_selected=1)
    everything = trainer_for(tokenizer, tmp_path / "all", ROWS)
    loss_and_grads(selected)
    loss_and_grads(everything)
    metrics, expected = selected._metrics["train"], everything._metrics["train"]
    for key in expected:  # rewards, log-probs, gradient weights: of all K, from the no-grad pass
        assert metrics[key][-1] == pytest.approx(expected[key][-1], rel=1e-5, abs=1e-6), key
    # Rank k kept: the fraction of the rows with a k-th rejected whose hardest it is
    kept_rows = hardest_rows(tokenizer, ROWS, 1)
    for k in range(4):
        having = [row for row in ROWS if len(row["rejected"]) > k]
        kept = sum(
            kr["rejected"] == [row["rejected"][k]] for row, kr in zip(ROWS, kept_rows) if len(row["rejected"]) > k
        )
        assert metrics[f"{KEPT_RANK_PREFIX}_{k}"][-1] == pytest.approx(kept / len(having)), k


def test_sampled_loss_is_the_importance_weighted_loss_of_the_drawn_rejected(tokenizer, tmp_path):
    """The seed's pair loss −log σ(β(Δ_w − Δ_lk)) of each drawn rejected, times m_i / (K_i π_ik), averaged over the
    m_i drawn and over the rows: recomputed from plain forwards, with the draw the trainer made."""
    num_selected = 2
    trainer = trainer_for(tokenizer, tmp_path, ROWS, rejected_selection="sampled", num_selected=num_selected)
    selector = trainer.rejected_selector
    drawn = []
    full_pass = selector.full_pass

    def spy(*args, **kwargs):
        drawn.append(full_pass(*args, **kwargs))
        return drawn[-1]

    selector.full_pass = spy
    loss, _ = loss_and_grads(trainer)
    selection = drawn[0].selection
    expected = []
    for i, (chosen, rejected) in enumerate(implicit_rewards(tokenizer, ROWS)):
        index, mask, importance = selection.index[i], selection.mask[i], selection.importance[i]
        kept = [(int(k), float(c)) for k, keep, c in zip(index, mask, importance, strict=True) if keep]
        assert len(kept) == min(num_selected, len(rejected))
        pair = [c * -F.logsigmoid(torch.tensor(BETA * (chosen - rejected[k]))).item() for k, c in kept]
        expected.append(sum(pair) / len(pair))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # Rows with K ≤ m keep all with weight 1; the others weigh each pair by m / (K π) ≠ 1
    assert selection.importance[1, 0].item() == pytest.approx(1.0)
    assert not torch.allclose(selection.importance[3], torch.ones(num_selected))


def test_training_with_selection_runs_and_records_every_rejected(tokenizer, tmp_path):
    trainer = trainer_for(
        tokenizer,
        tmp_path,
        ROWS,
        rejected_selection="hardest",
        num_selected=1,
        max_steps=2,
        per_device_train_batch_size=2,
        grad_weight_record=True,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    from trl_dpo_ext.grad_weight_record import read_record, record_path

    record = read_record(record_path(tmp_path))
    # Every row's weights of all its K rejected are recorded, not only the kept one
    assert sorted(len(line["grad_weight"]) for line in record) == sorted(len(r["rejected"]) for r in ROWS)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rejected_selection": "sampled", "num_selected": 1, "rejected_reduction": "softmax"}, "unbiased only"),
        ({"rejected_selection": "hardest", "num_selected": 0}, "`num_selected` must be at least 1"),
        ({"rejected_selection": "best"}, "`rejected_selection` must be one of"),
        ({"rejected_selection": "hardest", "ld_alpha": 0.5}, "with `ld_alpha` is not supported"),
    ],
)
def test_selection_settings_the_loss_does_not_define_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(str(tmp_path), report_to="none", bf16=False, **config)
