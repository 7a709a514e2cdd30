"""TRL's fused LM head run on the scored positions only (`trl_dpo_ext/scored_positions.py`): the same numbers and
gradients as TRL's head on every position, for a fraction of the head's work."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from conftest import assert_grads_close, batch_of, packing_trainer
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from test_padding_free import PADDING_FREE_SHARED, rows
from trl.trainer.utils import add_fused_lm_head

from trl_dpo_ext.quickstart import tiny_causal_lm
from trl_dpo_ext.scored_positions import compact_labels, scored_forward, scored_positions, spread


OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def fused_model(vocab_size: int, peft: str | None = None):
    """A fresh tiny Llama with TRL's fused LM head (every output requested), optionally wrapped by PEFT."""
    model = tiny_causal_lm(vocab_size, seed=3)
    add_fused_lm_head(model, outputs=OUTPUTS)
    torch.manual_seed(0)  # the same adapter weights in every model built here
    if peft == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    elif peft == "prompt_tuning":
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    return model


def ragged_batch(vocab_size: int):
    """Three right-padded rows whose labels are −100 on the prompt and the padding; the last row scores nothing."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # prompt of 4 tokens
    labels[1, :2] = -100
    labels[2, :] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def outputs_and_grads(model, kwargs, labels, compact: bool):
    """Every per-token output and the gradients of a weighted sum of the log-probs and the entropy."""
    outputs = (
        scored_forward(model, labels, **kwargs) if compact else model(**kwargs, labels=labels, fused_lm_head=True)
    )
    weights = torch.linspace(0.5, 1.5, outputs.log_probs.numel()).view_as(outputs.log_probs)
    ((outputs.log_probs * weights).sum() + outputs.entropy.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("peft", [None, "lora", "prompt_tuning"])
def test_scored_forward_equals_the_full_head_values_and_gradients(tokenizer, peft):
    kwargs, labels = ragged_batch(len(tokenizer))
    expected, expected_grads = outputs_and_grads(fused_model(len(tokenizer), peft), kwargs, labels, compact=False)
    got, grads = outputs_and_grads(fused_model(len(tokenizer), peft), kwargs, labels, compact=True)
    assert got.log_probs.shape == expected.log_probs.shape
    assert expected.log_probs[0].abs().sum() > 0
    for name in (*OUTPUTS, "label_mask"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)


def test_the_compact_row_holds_the_scored_positions_in_batch_order():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    # positions 1 and 2 of row 0 predict 7 and 8; position 0 of row 1 predicts 5
    assert scored_positions(labels).tolist() == [1, 2, 4]
    assert compact_labels(labels).tolist() == [[-100, 7, 8, 5]]
    values = torch.tensor([[0.1, 0.2, 0.3]], requires_grad=True)
    laid_out = spread(values, labels)
    torch.testing.assert_close(laid_out, torch.tensor([[0.0, 0.1, 0.2], [0.3, 0.0, 0.0]]))
    laid_out.sum().backward()
    assert values.grad.tolist() == [[1.0, 1.0, 1.0]]


class CountingHead:
    """Stands in for TRL's `ChunkedLogProbFunction` in `trl.trainer.utils`, counting the positions it projects."""

    def __init__(self):
        self.rows: list[int] = []
        self.function = trl_utils._ChunkedLogProbFunction

    def apply(self, hidden, *args):
        self.rows.append(hidden.size(0))
        return self.function.apply(hidden, *args)


@pytest.mark.parametrize("packing", ["padded", "prefix_sharing_padding_free"])
def test_the_lm_head_projects_only_the_response_tokens(tokenizer, tmp_path, monkeypatch, packing):
    config = PADDING_FREE_SHARED if packing != "padded" else {}
    trainer = packing_trainer(tokenizer, tmp_path, packing, rows(), **config)
    batch = batch_of(trainer)
    head = CountingHead()
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", head)
    with torch.no_grad():
        trainer._per_token_logps(trainer.model, batch, reference=False)
    prefix = "packed_" if packing != "padded" else ""
    scored = int(batch[f"{prefix}completion_mask"][:, 1:].sum())
    positions = batch[f"{prefix}input_ids"].numel()
    # One response token per position, counted apart from the forward: the chosen and every rejected, whole
    responses = sum(len(r["chosen_ids"]) + sum(map(len, r["rejected_ids"])) for r in trainer.train_dataset)
    assert head.rows == [scored]
    assert scored == responses
    assert scored < positions  # TRL's head on this device projects every position


def test_labels_that_do_not_line_up_with_the_hidden_states_raise(tokenizer):
    kwargs, labels = ragged_batch(len(tokenizer))
    with pytest.raises(RuntimeError, match=r"hidden states \(3, 12\) do not line up with the labels \(3, 11\)"):
        scored_forward(fused_model(len(tokenizer)), labels[:, 1:], **kwargs)
