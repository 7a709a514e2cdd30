"""Per-token and sequence log-probs of a collated K-rejected batch, padded or packed.

The batch of `DataCollatorForMultiRejectedPreference` holds B chosen sequences, then the R = Σ K_i rejected ones,
example by example. The forward runs TRL's fused LM head (`fused_lm_head=True`: per-token log-probs of the labels,
without materialising the logits) on the scored positions only (`scored_positions.py`); with prefix sharing it runs
on the packed rows and its outputs are laid out again as those of the unshared batch [B + R, L − 1], so everything
after it is the same for both layouts.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate.utils import is_peft_model

from ._trl_compat import disable_gradient_checkpointing, use_adapter
from .losses import PreferenceLogps, length_desensitized_logps
from .packing import packed_model_inputs, unpack_outputs
from .packing.spec import PackingSpec
from .scored_positions import scored_forward


# Keys of the collated batch that the model's forward takes
MODEL_INPUT_KEYS = ("input_ids", "attention_mask")


def scatter_rejected(values: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """Place the [R] values of the flattened rejected sequences into [B, K], row by row; 0 where there is none."""
    return values.new_zeros(rejected_mask.shape).masked_scatter(rejected_mask, values)


def model_inputs(inputs: dict) -> dict:
    """The keys of the batch the model's forward takes."""
    return {key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs}


def fused_forward(
    model,
    inputs: dict,
    attn_implementation: str | None,
    output_router_logits: bool = False,
    extra_inputs: dict | None = None,
    packing: PackingSpec | None = None,
):
    """The fused-LM-head forward of the batch: per-token log-probs (and entropy, mean logits, top-1) of the
    completion labels; the prompt and padding are labelled −100. `extra_inputs` (the image inputs of image rows,
    `trl_dpo_ext.vision.image_model_inputs`) go to the model as they are, in either layout. With a `packing` that
    packs, the packed rows are forwarded instead of the unshared ones."""
    model_kwargs = {**model_inputs(inputs), "use_cache": False}
    if output_router_logits:
        model_kwargs["output_router_logits"] = True
    if packing is None or not packing.packed:
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return scored_forward(model, labels, **model_kwargs, **(extra_inputs or {}))
    packed_kwargs, packed_labels = packed_model_inputs(inputs, attn_implementation, packing.prefix_sharing)
    outputs = scored_forward(model, packed_labels, **{**model_kwargs, **packed_kwargs, **(extra_inputs or {})})
    return unpack_outputs(outputs, inputs)


def per_token_logps(
    model,
    inputs: dict,
    attn_implementation: str | None,
    output_router_logits: bool = False,
    extra_inputs: dict | None = None,
    packing: PackingSpec | None = None,
) -> tuple[torch.Tensor, object]:
    """Per-token log-probs [B + R, L − 1] of the batch's labels, and the model's outputs."""
    outputs = fused_forward(model, inputs, attn_implementation, output_router_logits, extra_inputs, packing)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
    seq_len = inputs["completion_mask"].size(1) - 1
    return outputs.log_probs[:, -seq_len:], outputs


def reference_context(policy, unwrapped_policy, ref_model, gradient_checkpointing_kwargs) -> contextlib.ExitStack:
    """No gradient, no checkpointing, and, for a PEFT policy without a separate reference, its reference adapter:
    none (the base model) for a new adapter, or the copy TRL keeps under the name "ref" of a re-trained one."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(disable_gradient_checkpointing(policy, gradient_checkpointing_kwargs))
    if ref_model is None and is_peft_model(policy):
        adapter = "ref" if "ref" in unwrapped_policy.peft_config else None
        stack.enter_context(use_adapter(unwrapped_policy, adapter_name=adapter))
    return stack


def sequence_logps(
    per_token: torch.Tensor, inputs: dict, ld_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen [B, 1] (or [B, K] under LD-DPO) and of the rejected [B, K]."""
    rejected_mask = inputs["rejected_mask"]
    batch_size = rejected_mask.size(0)
    if ld_alpha is None:
        logps = per_token.sum(dim=1)
        return logps[:batch_size, None], scatter_rejected(logps[batch_size:], rejected_mask)
    # LD-DPO: each chosen is weighed against each of its rejected over their shared length
    mask = inputs["completion_mask"][:, 1:]
    lengths = mask.sum(dim=1)
    shared = torch.minimum(lengths[:batch_size, None], scatter_rejected(lengths[batch_size:], rejected_mask))
    chosen = length_desensitized_logps(per_token[:batch_size], mask[:batch_size], shared, ld_alpha)
    rejected = length_desensitized_logps(
        per_token[batch_size:], mask[batch_size:], shared[rejected_mask][:, None], ld_alpha
    )
    return chosen, scatter_rejected(rejected.squeeze(1), rejected_mask)


def preference_logps(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    inputs: dict,
    dtype: torch.dtype,
) -> PreferenceLogps:
    """The policy's and the reference's sequence log-probs of a batch, with the completion lengths (IPO)."""
    rejected_mask = inputs["rejected_mask"]
    batch_size = rejected_mask.size(0)
    lengths = inputs["completion_mask"].sum(dim=1).to(dtype)
    return PreferenceLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        rejected_mask=rejected_mask,
        chosen_lengths=lengths[:batch_size, None],
        rejected_lengths=scatter_rejected(lengths[batch_size:], rejected_mask),
    )


def reference_sequence_logps(
    inputs: dict, per_token: torch.Tensor | None, ld_alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's chosen [B, 1] and rejected [B, K] log-probs: precomputed ones from the batch, or those of
    the reference forward's `per_token` log-probs."""
    if per_token is None:
        return inputs["ref_chosen_logps"][:, None], inputs["ref_rejected_logps"]
    return sequence_logps(per_token, inputs, ld_alpha)


@torch.no_grad()
def wpo_pair_weights(per_token: torch.Tensor, outputs, inputs: dict) -> torch.Tensor:
    """WPO pair weights [B, K] (Eq. 2 of arXiv 2406.11827): each pair weighs π(y_w)·π(y_l), length-normalised."""
    shift_mask = inputs["completion_mask"][:, 1:]
    batch_size = inputs["rejected_mask"].size(0)
    aligned = (per_token - outputs.log_sum_sq_probs[:, -shift_mask.size(1) :]) * shift_mask
    weights = torch.exp(aligned.sum(dim=1) / shift_mask.sum(dim=1).clamp_min(1))
    return weights[:batch_size, None] * scatter_rejected(weights[batch_size:], inputs["rejected_mask"])


def chosen_nll(per_token: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The `"sft"` loss: NLL of the chosen tokens, averaged over the batch's chosen tokens."""
    batch_size = inputs["rejected_mask"].size(0)
    chosen_mask = inputs["completion_mask"][:batch_size, 1:].bool()
    return -per_token[:batch_size][chosen_mask].mean()


@torch.no_grad()
def logits_forward(model, inputs: dict, extra_inputs: dict | None = None):
    """The plain forward (with logits) of the unshared batch, for `compute_metrics` (`return_outputs=True`), which
    TRL deprecates: the fused LM head does not build the logits."""
    warnings.warn(
        "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in TRL and will be "
        "removed in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra "
        "forward pass.",
        FutureWarning,
        stacklevel=3,
    )
    return model(**model_inputs(inputs), **(extra_inputs or {}))
