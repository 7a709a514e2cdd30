"""Shared fixtures: a character tokenizer and tiny models built fresh from a seeded config (nothing downloaded); the
pytest-xdist worker groups of the test command (`pytest -n 2 --dist loadgroup`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, not two workers of two threads each
    torch.set_num_threads(1)

# The modules whose tests start processes (torchrun, accelerate launch, the CLI, killed runs): under `pytest -n 2
# --dist loadgroup` they share one worker, so that two launches never run at once (nor meet on a port)
PROCESS_MODULES = {"test_cli", "test_diagnostics", "test_faults", "test_launch", "test_multiprocess", "test_ref_init"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist: a module's tests on one worker (its module fixtures built once), the process-starting
    modules all on one (above)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        item.add_marker(pytest.mark.xdist_group("processes" if module in PROCESS_MODULES else module))


# ../shared/data beside the checkout; `TRL_DPO_EXT_SHARED_DATA` points elsewhere (a git worktree has no ../shared)
SHARED_DATA = Path(
    os.environ.get("TRL_DPO_EXT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@pytest.fixture
def tokenizer():
    return char_tokenizer()


def policy_and_ref(tokenizer, arch: str = "llama", noise: float = 0.05, seed: int = 0):
    """A fresh reference model and a fresh policy: the same seeded weights, the policy then moved by seeded noise.

    Both are new objects built from the config, never copies of a model a trainer has patched.
    """
    ref = tiny_causal_lm(len(tokenizer), arch=arch, seed=seed)
    policy = tiny_causal_lm(len(tokenizer), arch=arch, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return policy, ref


def sequence_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log π(completion | prompt) by a plain forward and log-softmax: the textbook computation, independent of TRL."""
    input_ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=input_ids).logits[0, :-1]
    log_probs = logits.log_softmax(-1).gather(1, input_ids[0, 1:, None]).squeeze(1)
    return log_probs[len(prompt_ids) - 1 :].sum()


def make_args(tmp_path, **kwargs):
    from trl_dpo_ext import DPOConfig

    defaults = cpu_training_args(
        str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1
    )
    return DPOConfig(**{**defaults, **kwargs})


def packing_trainer(
    tokenizer,
    tmp_path,
    name: str,
    rows: list[dict],
    arch="llama",
    ref=True,
    model_kwargs=None,
    peft_config=None,
    **config,
):
    """A trainer on fresh seeded models over `rows` (one batch of 6 by default); `config` (the packing fields too) goes
    to `make_args`, `model_kwargs` builds the pair with other config values (e.g. the attention implementation)."""
    from datasets import Dataset

    from trl_dpo_ext import DPOTrainer

    policy, ref_model = policy_and_ref(tokenizer, arch=arch)
    if model_kwargs:
        ref_model = tiny_causal_lm(len(tokenizer), arch=arch, **model_kwargs)
        policy = tiny_causal_lm(len(tokenizer), arch=arch, **model_kwargs)
        policy.load_state_dict(policy_and_ref(tokenizer, arch=arch)[0].state_dict())
    config.setdefault("per_device_train_batch_size", 6)
    return DPOTrainer(
        model=policy,
        ref_model=ref_model if ref else None,
        args=make_args(tmp_path / name, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def assert_same_step(tokenizer, tmp_path, packing: dict, rows: list[dict], **kwargs):
    """Loss, gradients and every logged metric of one step: packed (`packing`) against the padded unshared forward.
    `kwargs` go to `packing_trainer` for both."""
    unpacked = packing_trainer(tokenizer, tmp_path, "unpacked", rows, **kwargs)
    packed = packing_trainer(tokenizer, tmp_path, "packed", rows, **packing, **kwargs)
    expected_loss, expected_grads = loss_and_grads(unpacked)
    loss, grads = loss_and_grads(packed)
    assert expected_loss.item() != pytest.approx(0.6931471, abs=1e-4), "the policy must differ from the reference"
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, expected_grads, atol=1e-5)
    for key, values in unpacked._metrics["train"].items():
        assert packed._metrics["train"][key][-1] == pytest.approx(values[-1], rel=1e-4, abs=1e-5), key
    return packed


def batch_of(trainer):
    """One collated batch of all the trainer's prepared training rows, on its device."""
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


def loss_and_grads(trainer, rows: list[int] | None = None):
    """Loss and parameter gradients of the trainer on one collated batch of its prepared training rows."""
    dataset = trainer.train_dataset
    rows = list(range(len(dataset))) if rows is None else rows
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in rows]))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads


def assert_every_trainable_parameter_changed(model, before: dict[str, torch.Tensor]) -> None:
    """TRL's own check after `train()`: every trainable parameter moved from its value in `before`."""
    for name, param in model.named_parameters():
        if param.requires_grad and name in before:
            assert not torch.equal(param.detach().cpu(), before[name]), f"Parameter {name} has not changed."


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(grads, expected, atol=1e-6, rtol=1e-5):
    """`atol` is in units of the tensor's largest entry (at least 1): float32 sums of O(1) terms differ by ~1e-7."""
    assert grads.keys() == expected.keys()
    for name in grads:
        scale = max(1.0, expected[name].abs().max().item())
        diff = (grads[name] - expected[name]).abs().max().item()
        torch.testing.assert_close(
            grads[name], expected[name], atol=atol * scale, rtol=rtol, msg=f"gradient of {name}: max diff {diff:.3g}"
        )
