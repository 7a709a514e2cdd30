"""Non-finite steps (`trl_dpo_ext.guards`): a diverged run stops the step it happens, naming the step and the rows,
before a checkpoint of NaN weights is written; `on_nonfinite="warn"` only warns; a saturated model is warned about."""

import logging
import re

import pytest
import torch
from conftest import make_args, policy_and_ref
from datasets import Dataset
from safetensors.torch import load_file

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.guards import NonFiniteGuard, NonFiniteTrainingError
from trl_dpo_ext.losses import PreferenceLogps


ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22", "four"]},
    {"prompt": "sky? ", "chosen": "blue", "rejected": ["green"]},
    {"prompt": "abc", "chosen": "def", "rejected": ["xyz", "abcd"]},
    {"prompt": "hello ", "chosen": "hi there", "rejected": ["go", "no", "bye", "ok"]},
]


def diverging_trainer(tokenizer, tmp_path, learning_rate=1e30, **config):
    """One batch of the 4 rows per step, a checkpoint every step; with lr=1e30 the loss is NaN from step 2."""
    policy, ref = policy_and_ref(tokenizer)
    settings = {"max_steps": 3, "save_strategy": "steps", "save_steps": 1, **config}
    args = make_args(tmp_path, learning_rate=learning_rate, **settings)
    return DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )


def checkpoint_tensors(tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path / "model.safetensors") for path in sorted(tmp_path.glob("checkpoint-*"))}


def test_nan_loss_stops_training_naming_the_step_and_rows_before_its_checkpoint(tokenizer, tmp_path):
    trainer = diverging_trainer(tokenizer, tmp_path)
    with pytest.raises(NonFiniteTrainingError, match=r"^Step 2: non-finite values") as error:
        trainer.train()
    message = str(error.value)
    assert "the loss of the micro-batch of dataset rows 0, 1, 2, 3" in message
    assert "the implicit reward β·Δ of dataset rows 0, 1, 2, 3" in message
    # Only the checkpoint of step 1 was written, and every one of its tensors is finite
    saved = checkpoint_tensors(tmp_path)
    assert list(saved) == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in saved["checkpoint-1"].values())
    # The NaN step was neither logged (as a loss of 0) nor counted
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1]


def test_on_nonfinite_warn_trains_on_and_warns_each_nan_step(tokenizer, tmp_path, caplog):
    trainer = diverging_trainer(tokenizer, tmp_path, on_nonfinite="warn")
    with caplog.at_level(logging.WARNING, logger="trl_dpo_ext.guards"):
        trainer.train()
    steps = [int(m) for m in re.findall(r"Step (\d+): non-finite values", caplog.text)]
    assert steps == [2, 3]
    assert "on_nonfinite='warn'" in caplog.text
    # The run went on: the checkpoints of the NaN steps are written, as asked
    saved = checkpoint_tensors(tmp_path)
    assert list(saved) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not all(torch.isfinite(t).all() for t in saved["checkpoint-3"].values())


def test_zero_gradient_with_a_nonzero_loss_is_warned_once(tokenizer, tmp_path, caplog):
    """lr=1e6 saturates the tiny model after one step: finite weights, a loss near log 2, and a gradient of exactly 0."""
    trainer = diverging_trainer(tokenizer, tmp_path, learning_rate=1e6, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="trl_dpo_ext.guards"):
        trainer.train()
    grad_norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    first_zero = next(step for step, norm in enumerate(grad_norms, start=1) if norm == 0.0)
    assert losses[first_zero - 1] > 0.1
    warnings = re.findall(r"Step (\d+): the gradient is exactly zero while the loss is not", caplog.text)
    assert warnings == [str(first_zero)]


def test_a_nan_of_a_present_pair_is_reported_and_padding_is_not(tokenizer, tmp_path):
    """Row 0 has 2 rejected, the second of them NaN; row 1 has one rejected and a NaN in its padding slot."""
    trainer = diverging_trainer(tokenizer, tmp_path, learning_rate=1e-3)
    guard = NonFiniteGuard("stop", trainer.accelerator)
    nan = float("nan")
    logps = PreferenceLogps(
        chosen=torch.tensor([[-1.0], [-2.0]]),
        rejected=torch.tensor([[-3.0, nan], [-4.0, nan]]),
        ref_chosen=torch.tensor([[-1.5], [-2.5]]),
        ref_rejected=torch.tensor([[-3.5, -1.0], [-4.5, nan]]),
        rejected_mask=torch.tensor([[True, True], [True, False]]),
    )
    guard.observe_batch({"dataset_index": torch.tensor([7, 9])}, torch.tensor(0.5), logps, beta=0.1)
    assert (guard.reward_rows, guard.loss_rows) == ([7], [])
    guard.observe_batch({}, torch.tensor(nan), logps, beta=0.1)  # no index column: positions in the micro-batch
    assert guard.loss_rows == [0, 1] and guard.named_by_position


def test_on_nonfinite_rejects_unknown_values(tmp_path):
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be one of \['stop', 'warn'\], got 'ignore'"):
        DPOConfig(str(tmp_path), on_nonfinite="ignore", report_to="none")
