"""TRL's fused LM head on the scored positions only, on every device.

TRL's `add_fused_lm_head` projects only the positions whose next-token label is not −100 where Triton runs (CUDA,
XPU); elsewhere, the CPU included, it projects every position of the batch and masks afterwards, so that the tile
shapes stay fixed for compiled backends. A preference batch scores only its responses: the prompt (repeated K + 1
times without prefix sharing) and the padding are not scored, and on a CPU the head is a large part of the step (44%
of stock TRL's on SmolLM2-135M at K = 7, its vocabulary-wide log-softmax included: docs/benchmarks.md).

`scored_forward` runs the same patched forward, backbone and kernel, but hands the kernel only the scored positions:
a forward hook on the backbone keeps the hidden states of the scored positions (one row [1, n + 1, H], plus a dummy
last position that TRL's shift drops), the labels are those n targets, and each per-token output of the head is laid
out again as the batch's [B, L − 1], zero off the scored positions. The per-position results are the same numbers:
each position's log-softmax is its own.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model


# Per-token fields of TRL's `FusedCausalLMOutput`
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices, into the [B · L] hidden states, of the positions whose next-token label is scored."""
    shifted = labels[:, 1:] != -100
    rows, cols = shifted.nonzero(as_tuple=True)
    return rows * labels.size(1) + cols


def compact_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels of the compact row [1, n + 1]: −100, then the n scored targets in the batch's order."""
    targets = labels[:, 1:][labels[:, 1:] != -100]
    return torch.cat([targets.new_full((1,), -100), targets])[None]


def spread(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token values [1, n] of the compact row laid out as the batch's [B, L − 1], zero elsewhere (differentiable)."""
    mask = labels[:, 1:] != -100
    return values.new_zeros(mask.shape).masked_scatter(mask, values.reshape(-1))


def causal_lm(model):
    """The causal LM that `add_fused_lm_head` patched, under DDP/DeepSpeed/compile and PEFT wrappers."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft_model(model) else model


def compactable(model) -> bool:
    """Prompt-learning PEFT prepends virtual tokens to the hidden states and −100 to the labels, which the compact
    row cannot follow; every other model is compacted."""
    model = extract_model_from_parallel(model)
    return not (is_peft_model(model) and model.active_peft_config.is_prompt_learning)


@contextlib.contextmanager
def _keep_positions(backbone: torch.nn.Module, labels: torch.Tensor):
    positions = scored_positions(labels)

    def keep(module, args, output):
        hidden = output.last_hidden_state
        if hidden.shape[:2] != labels.shape:
            raise RuntimeError(
                f"The backbone's hidden states {tuple(hidden.shape[:2])} do not line up with the labels "
                f"{tuple(labels.shape)}; the LM head cannot be restricted to the scored positions."
            )
        kept = hidden.reshape(-1, hidden.size(-1)).index_select(0, positions)
        # TRL drops the last position of the row (`[:, :-1]`): a dummy one, with no gradient
        output.last_hidden_state = torch.cat([kept, kept.new_zeros(1, kept.size(-1))])[None]
        return output

    handle = backbone.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def scored_forward(model, labels: torch.Tensor, **kwargs):
    """`model(**kwargs, labels=labels, fused_lm_head=True)` with the LM head run on the scored positions only; the
    per-token outputs are the batch's [B, L − 1], as TRL's."""
    if not compactable(model):
        return model(**kwargs, labels=labels, fused_lm_head=True)
    with _keep_positions(causal_lm(model).base_model, labels):
        outputs = model(**kwargs, labels=compact_labels(labels), fused_lm_head=True)
    for name in PER_TOKEN_FIELDS:
        values = getattr(outputs, name, None)
        if values is not None:
            setattr(outputs, name, spread(values, labels))
    return outputs
