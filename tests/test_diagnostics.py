"""Gradient-weight diagnostics: σ(r̂_l − r̂_w), the effective weight, their statistics, logging and the record."""

import json
import math
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_args, policy_and_ref, sequence_logps
from datasets import Dataset

import trl_dpo_ext.diagnostics as diagnostics_module
import trl_dpo_ext.trainer as trainer_module
from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.diagnostics import (
    EFFECTIVE_PREFIX,
    GRAD_WEIGHT_PREFIX,
    GradWeightHistogramCallback,
    effective_grad_weights,
    gather_pair_values,
    grad_weights,
    weight_statistics,
)
from trl_dpo_ext.grad_weight_record import read_record, record_path, truncate_record
from trl_dpo_ext.loss_spec import LossSpec
from trl_dpo_ext.losses import PreferenceLogps


ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22", "four"]},
    {"prompt": "sky? ", "chosen": "blue", "rejected": ["green"]},
    {"prompt": "abc", "chosen": "def", "rejected": ["xyz", "abcd"]},
    {"prompt": "hello ", "chosen": "hi there", "rejected": ["go", "no", "bye"]},
    {"prompt": "x*y ", "chosen": "xy", "rejected": ["yx", "x"]},
    {"prompt": "q", "chosen": "r", "rejected": ["s"]},
]


def spec(beta: float, loss_types: list[str], loss_weights: list[float] | None = None, reduction: str = "mean"):
    weights = loss_weights or [1.0] * len(loss_types)
    return LossSpec(loss_types=tuple(loss_types), loss_weights=tuple(weights), reduction=reduction, beta=beta)


STAT_NAMES = ("mean", "max", "p10", "p50", "p90", "frac_above_0.5", "frac_below_0.05")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_logps() -> PreferenceLogps:
    """Two examples: Δ_w = 1, Δ_l = [0, 1, 2] (K = 3); Δ_w = −0.5, Δ_l = [0.5] (K = 1, padded with junk)."""
    return PreferenceLogps(
        chosen=torch.tensor([[-3.0], [-6.5]]),
        rejected=torch.tensor([[-5.0, -2.0, -1.0], [-7.5, 123.0, -9.0]]),
        ref_chosen=torch.tensor([[-4.0], [-6.0]]),
        ref_rejected=torch.tensor([[-5.0, -3.0, -3.0], [-8.0, float("nan"), 4.0]]),
        rejected_mask=torch.tensor([[True, True, True], [True, False, False]]),
        chosen_lengths=torch.tensor([[2.0], [4.0]]),
        rejected_lengths=torch.tensor([[1.0, 2.0, 4.0], [5.0, 0.0, 0.0]]),
    )


DELTA_W = [1.0, -0.5]
DELTA_L = [[0.0, 1.0, 2.0], [0.5]]


# ------------------------------------------------------------------------------------------ pure functions


def test_grad_weight_is_the_sigmoid_of_the_implicit_reward_difference():
    # w = σ(β(Δ_l − Δ_w)), β = 0.5: σ(−0.5) = 0.37754, σ(0) = 0.5, σ(0.5) = 0.62246; σ(0.5·(0.5 + 0.5)) = 0.62246
    weights = grad_weights(hand_logps(), beta=0.5)
    expected = torch.tensor([[sigmoid(-0.5), 0.5, sigmoid(0.5)], [sigmoid(0.5), math.nan, math.nan]])
    torch.testing.assert_close(weights, expected, equal_nan=True)
    assert not weights.requires_grad


def expected_effective(reduction: str, beta: float) -> list[list[float]]:
    """(B/β)·∂L/∂Δ_lk worked by hand for the sigmoid loss −log σ(β(Δ_w − Δ_l)), whose derivative is β·w."""
    rows = []
    for dw, dls in zip(DELTA_W, DELTA_L, strict=True):
        w = [sigmoid(beta * (dl - dw)) for dl in dls]
        if reduction == "mean":
            rows.append([x / len(dls) for x in w])
        elif reduction == "sum":
            rows.append(w)
        elif reduction == "min":  # only the hardest rejected (largest Δ_l) carries a gradient
            hardest = max(range(len(dls)), key=dls.__getitem__)
            rows.append([x if k == hardest else 0.0 for k, x in enumerate(w)])
        elif reduction == "softmax":  # ∂/∂Δ_lk of logsumexp(β[Δ_w, Δ_l]) − βΔ_w = β·softmax_k
            z = [math.exp(beta * dw)] + [math.exp(beta * dl) for dl in dls]
            rows.append([x / sum(z) for x in z[1:]])
    return rows


def padded(rows: list[list[float]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [math.nan] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("reduction", ["mean", "sum", "min", "softmax"])
def test_effective_weight_of_the_sigmoid_loss_matches_its_hand_derivative(reduction):
    effective = effective_grad_weights(hand_logps(), spec(0.5, ["sigmoid"], [1.0], reduction))
    torch.testing.assert_close(effective, padded(expected_effective(reduction, 0.5)), equal_nan=True)


def test_effective_weight_of_sigmoid_mean_is_w_over_k():
    logps = hand_logps()
    k = logps.rejected_mask.sum(dim=1, keepdim=True)
    effective = effective_grad_weights(logps, spec(0.1, ["sigmoid"]))
    torch.testing.assert_close(effective, grad_weights(logps, 0.1) / k, equal_nan=True)


def test_effective_weight_of_ipo_matches_its_hand_derivative():
    # ℓ = (Δ_w/n_w − Δ_l/n_l − 1/(2β))², so ∂ℓ/∂Δ_l = −2(Δ_w/n_w − Δ_l/n_l − 1/(2β))/n_l; mean over the K rejected
    beta, logps = 0.5, hand_logps()
    n_w, n_l = [2.0, 4.0], [[1.0, 2.0, 4.0], [5.0]]
    expected = [
        [-2 * (dw / nw - dl / nl - 1 / (2 * beta)) / nl / len(dls) / beta for dl, nl in zip(dls, nls, strict=True)]
        for dw, dls, nw, nls in zip(DELTA_W, DELTA_L, n_w, n_l, strict=True)
    ]
    effective = effective_grad_weights(logps, spec(beta, ["ipo"], [1.0], "mean"))
    torch.testing.assert_close(effective, padded(expected), equal_nan=True)


def test_effective_weight_scales_with_loss_weights_and_ignores_sft():
    logps = hand_logps()
    effective = effective_grad_weights(logps, spec(0.5, ["sigmoid", "sft"], [0.8, 0.2], "mean"))
    torch.testing.assert_close(effective, 0.8 * padded(expected_effective("mean", 0.5)), equal_nan=True)
    only_sft = effective_grad_weights(logps, spec(0.5, ["sft"], [1.0], "mean"))
    torch.testing.assert_close(only_sft, padded([[0.0] * 3, [0.0]]), equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "min", "softmax"])
def test_padding_of_ragged_k_changes_nothing(reduction):
    logps = hand_logps()
    batch_w = grad_weights(logps, 0.5)
    batch_e = effective_grad_weights(logps, spec(0.5, ["sigmoid"], [1.0], reduction))
    for i, k in enumerate([3, 1]):  # each example alone, with no padding at all
        alone = PreferenceLogps(*(t[i : i + 1, :k] if t.size(1) == 3 else t[i : i + 1] for t in logps))
        torch.testing.assert_close(batch_w[i, :k], grad_weights(alone, 0.5)[0])
        torch.testing.assert_close(
            batch_e[i, :k], effective_grad_weights(alone, spec(0.5, ["sigmoid"], [1.0], reduction))[0]
        )
    # An extra column of padding leaves the weights and every statistic as they were
    wider = logps._replace(
        rejected=torch.cat([logps.rejected, torch.full((2, 1), 9.0)], dim=1),
        ref_rejected=torch.cat([logps.ref_rejected, torch.full((2, 1), -1.0)], dim=1),
        rejected_mask=torch.cat([logps.rejected_mask, torch.zeros(2, 1, dtype=torch.bool)], dim=1),
        rejected_lengths=torch.cat([logps.rejected_lengths, torch.ones(2, 1)], dim=1),
    )
    wide_w = grad_weights(wider, 0.5)
    wide_e = effective_grad_weights(wider, spec(0.5, ["sigmoid"], [1.0], reduction))
    torch.testing.assert_close(wide_w[:, :3], batch_w, equal_nan=True)
    torch.testing.assert_close(wide_e[:, :3], batch_e, equal_nan=True)
    assert torch.isnan(wide_w[:, 3]).all() and torch.isnan(wide_e[:, 3]).all()
    assert weight_statistics(wide_w) == pytest.approx(weight_statistics(batch_w))


def test_weight_statistics_of_hand_picked_weights():
    # Pairs 0.1, 0.6, 0.02 | 0.7 (rank 0: 0.1, 0.7; rank 1: 0.6; rank 2: 0.02); sorted 0.02, 0.1, 0.6, 0.7
    weights = torch.tensor([[0.1, 0.6, 0.02], [0.7, math.nan, math.nan]])
    stats = weight_statistics(weights, "w")
    assert stats == pytest.approx(
        {
            "w/mean": 1.42 / 4,
            "w/max": 0.7,
            "w/p10": 0.02 + 0.3 * 0.08,  # linear interpolation at position 0.1·3 = 0.3
            "w/p50": 0.35,
            "w/p90": 0.6 + 0.7 * 0.1,  # position 2.7
            "w/frac_above_0.5": 0.5,
            "w/frac_below_0.05": 0.25,
            "w/rank_0": 0.4,
            "w/rank_1": 0.6,
            "w/rank_2": 0.02,
        }
    )
    assert "w/rank_0" not in weight_statistics(weights[:, :1], "w")  # no per-rank mean with K = 1
    assert weight_statistics(torch.full((2, 2), math.nan)) == {}


class SingleProcess:
    """The two collectives of `gather_pair_values` on one process: nothing to pad or gather."""

    num_processes = 1

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def gather(self, tensor):
        return tensor


def test_gather_pair_values_keeps_rows_and_index_on_one_process():
    values = torch.stack([padded([[0.1, 0.2], [0.3]]), padded([[1.0, 2.0], [3.0]])], dim=2)
    pairs, index = gather_pair_values(SingleProcess(), values, torch.tensor([7, 3]))
    torch.testing.assert_close(pairs, values, equal_nan=True)
    assert index.tolist() == [7, 3]


def _gather_worker(rank: int, port: int, queue) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    os.environ.update({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # Rank 0: two examples with K ≤ 2; rank 1: one example with K = 3
    if rank == 0:
        values, index = padded([[0.1, 0.2], [0.3]]), torch.tensor([4, 0])
    else:
        values, index = padded([[0.7, 0.8, 0.9]]), torch.tensor([2])
    pairs, gathered_index = gather_pair_values(accelerator, torch.stack([values, -values], dim=2), index)
    if rank == 0:
        # Plain lists: tensors in shared memory would not outlive this process
        queue.put((pairs.tolist(), gathered_index.tolist(), weight_statistics(pairs[..., 0])))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_gather_pair_values_takes_the_union_of_ragged_processes():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_gather_worker, args=(port, queue), nprocs=2, start_method="spawn")
    pairs, index, stats = queue.get()
    pairs = torch.tensor(pairs)
    expected = padded([[0.1, 0.2], [0.3], [0.7, 0.8, 0.9]])
    torch.testing.assert_close(pairs[..., 0], expected, equal_nan=True)
    torch.testing.assert_close(pairs[..., 1], -expected, equal_nan=True)
    assert index == [4, 0, 2]
    # Quantiles over the union of both processes' pairs: 0.1, 0.2, 0.3, 0.7, 0.8, 0.9
    assert stats["grad_weight/p50"] == pytest.approx(0.5)
    assert stats["grad_weight/rank_2"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------- trainer


def trainer_for(tokenizer, output_dir, rows=ROWS, eval_dataset=None, **config):
    policy, ref = policy_and_ref(tokenizer)
    return DPOTrainer(
        model=policy,
        ref_model=ref,
        args=make_args(output_dir, **config),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def test_trainer_logs_every_grad_weight_key_in_training_and_evaluation(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, max_steps=2, eval_dataset=Dataset.from_list(ROWS[:3]))
    trainer.train()
    logs = trainer.state.log_history[0]
    for prefix in (GRAD_WEIGHT_PREFIX, EFFECTIVE_PREFIX):
        for name in STAT_NAMES:
            assert f"{prefix}/{name}" in logs, f"{prefix}/{name} not logged"
    ranks = sorted(key for key in logs if key.startswith(f"{GRAD_WEIGHT_PREFIX}/rank_"))
    assert ranks == [f"{GRAD_WEIGHT_PREFIX}/rank_{k}" for k in range(3)]
    assert 0 < logs["grad_weight/p10"] <= logs["grad_weight/p50"] <= logs["grad_weight/p90"] <= logs["grad_weight/max"]
    assert not (tmp_path / "grad_weights.jsonl").exists()  # the record is off by default
    metrics = trainer.evaluate()
    assert {f"eval_{GRAD_WEIGHT_PREFIX}/{name}" for name in STAT_NAMES} <= metrics.keys()


def test_recorded_weights_are_the_seeds_sigmoid_from_plain_forwards(tokenizer, tmp_path):
    # One step over all rows: each line's w must be σ(β(Δ_l − Δ_w)) of the row its index names, by plain forwards
    trainer = trainer_for(tokenizer, tmp_path, max_steps=1, per_device_train_batch_size=6, grad_weight_record=True)
    trainer.train()
    lines = read_record(record_path(tmp_path))
    assert sorted(line["index"] for line in lines) == list(range(6))
    policy, ref = policy_and_ref(tokenizer)
    dataset, beta = trainer.train_dataset, trainer.beta
    step_means = []
    for line in lines:
        row = dataset[line["index"]]
        assert row["chosen_ids"] == tokenizer(ROWS[line["index"]]["chosen"] + tokenizer.eos_token)["input_ids"]

        def delta(ids, row=row):
            return sequence_logps(policy, row["prompt_ids"], ids) - sequence_logps(ref, row["prompt_ids"], ids)

        with torch.no_grad():
            expected = [
                torch.sigmoid(beta * (delta(r) - delta(row["chosen_ids"]))).item() for r in row["rejected_ids"]
            ]
        assert line["grad_weight"] == pytest.approx(expected, abs=1e-5)
        assert line["grad_weight_eff"] == pytest.approx([w / len(expected) for w in expected], abs=1e-5)
        assert (line["step"], line["epoch"]) == (1, 0)
        step_means.extend(expected)
    assert trainer.state.log_history[0]["grad_weight/mean"] == pytest.approx(sum(step_means) / len(step_means))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"rejected_reduction": "softmax"},
        {"rejected_reduction": "plackett_luce"},
        {"rejected_reduction": "min"},
        {"rejected_reduction": "sum", "loss_type": ["sigmoid", "sft"], "loss_weights": [0.7, 0.3]},
        {"loss_type": "ipo"},
        {"loss_type": "robust", "label_smoothing": 0.2},
        {"use_weighting": True},
    ],
    ids=["sigmoid_mean", "softmax", "plackett_luce", "min", "sum_sft", "ipo", "robust", "wpo"],
)
def test_effective_weight_is_the_gradient_of_the_trainers_own_loss(tokenizer, tmp_path, monkeypatch, config):
    """(B/β)·∂L/∂log π_θ(y_lk) by backpropagating the loss the trainer returns, against what the diagnostics logged."""
    trainer = trainer_for(tokenizer, tmp_path, **config)
    captured = {}
    sequence_logps_fn, effective_fn = trainer_module.sequence_logps, diagnostics_module.effective_grad_weights

    def keep_policy_rejected(*args, **kwargs):
        chosen, rejected = sequence_logps_fn(*args, **kwargs)
        if rejected.requires_grad:  # the policy's; the reference's runs under no_grad
            rejected.retain_grad()
            captured["rejected"] = rejected
        return chosen, rejected

    def keep_effective(*args, **kwargs):
        captured["effective"] = effective_fn(*args, **kwargs)
        return captured["effective"]

    monkeypatch.setattr(trainer_module, "sequence_logps", keep_policy_rejected)
    monkeypatch.setattr(diagnostics_module, "effective_grad_weights", keep_effective)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))]))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    mask = batch["rejected_mask"]
    expected = (captured["rejected"].grad * len(ROWS) / trainer.beta).masked_fill(~mask, math.nan)
    torch.testing.assert_close(captured["effective"], expected, equal_nan=True, atol=1e-6, rtol=1e-5)
    assert captured["effective"][mask].abs().sum() > 0


def test_record_has_one_line_per_row_per_step(tokenizer, tmp_path):
    # 6 rows, micro-batches of 2, 2 accumulation steps: steps of 4 then 2 rows per epoch; 4 steps = 2 epochs. The
    # evaluations in between write nothing.
    trainer = trainer_for(
        tokenizer,
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        grad_weight_record=True,
        eval_dataset=Dataset.from_list(ROWS),
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer.train()
    lines = read_record(record_path(tmp_path))
    assert [(line["step"], line["epoch"]) for line in lines] == [(1, 0)] * 4 + [(2, 0)] * 2 + [(3, 1)] * 4 + [
        (4, 1)
    ] * 2
    for epoch in (0, 1):
        assert sorted(line["index"] for line in lines if line["epoch"] == epoch) == list(range(6))
    for line in lines:
        k = len(ROWS[line["index"]]["rejected"])
        assert len(line["grad_weight"]) == len(line["grad_weight_eff"]) == k
        assert line["grad_weight_eff"] == pytest.approx([w / k for w in line["grad_weight"]], abs=2e-6)
    assert len({(line["index"], line["step"]) for line in lines}) == len(lines)


def test_record_survives_resume_without_duplicated_or_lost_rows(tokenizer, tmp_path):
    # 8 rows in steps of 4: 2 steps per epoch. The resumed run restarts mid-epoch 1, after the checkpoint of step 3.
    rows = ROWS + ROWS[:2]
    config = dict(
        max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=3, grad_weight_record=True
    )
    full = trainer_for(tokenizer, tmp_path / "full", rows=rows, **config)
    full.train()
    reference = read_record(record_path(tmp_path / "full"))
    assert sorted(line["step"] for line in reference) == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4

    # A run that died after writing step 4's rows (before the checkpoint of step 4) resumes from step 3
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoint-3").parent.mkdir()
    os.symlink(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    record_path(resumed_dir).write_text("".join(json.dumps(line) + "\n" for line in reference))
    resumed = trainer_for(tokenizer, resumed_dir, rows=rows, **config)
    resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    lines = read_record(record_path(resumed_dir))

    def key(line):
        return line["step"], line["epoch"], line["index"]

    assert sorted(map(key, lines)) == sorted(map(key, reference))
    by_key = {key(line): line for line in reference}
    for line in lines:
        assert line["grad_weight"] == pytest.approx(by_key[key(line)]["grad_weight"], abs=1e-5)

    # A fresh run in the same folder starts a new record
    fresh = trainer_for(tokenizer, resumed_dir, rows=rows, **{**config, "max_steps": 1, "save_strategy": "no"})
    fresh.train()
    assert [line["step"] for line in read_record(record_path(resumed_dir))] == [1] * 4


def test_truncate_record_drops_later_steps_and_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "grad_weights.jsonl"
    lines = [
        {"index": i, "step": s, "epoch": 0, "grad_weight": [0.5], "grad_weight_eff": [0.5]}
        for s in (1, 2, 3)
        for i in (0, 1)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"index": 0, "st')
    assert truncate_record(path, 2) == 3
    assert read_record(path) == lines[:4]
    assert truncate_record(path, 2) == 0
    path.write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        read_record(path)


def test_record_without_dataset_index_in_the_batch_names_the_key(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path, grad_weight_record=True)
    collator = trainer.data_collator

    def without_index(examples):
        batch = collator(examples)
        del batch["dataset_index"]
        return batch

    trainer.data_collator = without_index
    with pytest.raises(ValueError, match="needs each row's dataset index in the batch \\(key 'dataset_index'\\)"):
        trainer.train()


def test_dataset_index_is_kept_as_a_column_but_not_sent_to_the_model(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path)
    assert trainer.train_dataset["dataset_index"] == list(range(len(ROWS)))
    seen = []
    handle = trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True
    )
    trainer.train()
    handle.remove()
    assert seen and all("dataset_index" not in kwargs for kwargs in seen)


class FakeWriter:
    def __init__(self):
        self.histograms = []

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, sorted(values.tolist()), step))

    def flush(self):
        pass


def test_histogram_goes_to_the_tensorboard_writer_at_each_log():
    from transformers.integrations import TensorBoardCallback

    tensorboard = TensorBoardCallback.__new__(TensorBoardCallback)  # the package itself is not installed here
    tensorboard.tb_writer = FakeWriter()
    handler = type("Handler", (), {"callbacks": [tensorboard]})()
    callback = GradWeightHistogramCallback(["tensorboard"], handler)
    callback.add(padded([[0.25, 0.5], [0.75]]), padded([[0.125, 0.25], [0.75]]))
    callback.add(padded([[1.0]]), padded([[1.0]]))
    state = type("State", (), {"global_step": 7, "is_world_process_zero": True})()
    callback.on_log(None, state, None, logs={})
    assert tensorboard.tb_writer.histograms == [
        ("train/grad_weight", [0.25, 0.5, 0.75, 1.0], 7),
        ("train/grad_weight_eff", [0.125, 0.25, 0.75, 1.0], 7),
    ]
    callback.on_log(None, state, None, logs={})  # nothing new since the last log: nothing sent
    assert len(tensorboard.tb_writer.histograms) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host syncs")
def test_weight_statistics_reads_back_once_from_cuda():
    weights = torch.tensor([[0.2, 0.7, float("nan")], [0.01, 0.6, 0.9]], device="cuda")
    expected = weight_statistics(weights.cpu())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = weight_statistics(weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert stats == pytest.approx(expected)
