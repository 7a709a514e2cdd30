"""The logged metrics of one batch, as pure functions: each metric is a (numerator, denominator) pair of sums.

TRL's metrics keep their names and meaning over the K pairs of an example; `rewards/accuracies_all`,
`rewards/margins_min` and `num_rejected` are added (docs/api.md, "Logged metrics"). Every metric is a ratio of two sums
(over tokens, pairs or examples), so the sums of all processes can be gathered in one collective and added, and the
value is exact whatever the number of rejected on each process. Nothing here touches a trainer.
"""

from __future__ import annotations

import torch

from .losses import PreferenceLogps


# A count, not a ratio: the trainer adds it to its running total of training tokens
NUM_TOKENS = "num_tokens"


def metric_sums(inputs: dict, outputs, logps: PreferenceLogps, beta: float, train: bool) -> dict[str, tuple]:
    """(numerator, denominator) of every metric of one batch.

    Args:
        inputs: the collated batch (`completion_mask` [B + R, L], `attention_mask`).
        outputs: the fused-LM-head outputs laid out as the unshared batch (`entropy`, `mean_logits`, `is_top1`).
        logps: the sequence log-probs of the batch.
        beta: β of the implicit reward.
        train: whether to count the batch's tokens (`num_tokens`, training only, as TRL).
    """
    rejected_mask = logps.rejected_mask
    batch_size = rejected_mask.size(0)
    seq_len = inputs["completion_mask"].size(1) - 1
    mask = inputs["completion_mask"][:, 1:].bool()
    chosen_mask, rejected_tokens_mask = mask[:batch_size], mask[batch_size:]
    num_pairs = rejected_mask.sum()

    chosen_rewards = beta * logps.chosen_logratios  # [B, 1] or [B, K]
    rejected_rewards = beta * logps.rejected_logratios
    margins = chosen_rewards - rejected_rewards  # [B, K]
    won = (margins > 0) & rejected_mask
    # With LD-DPO the chosen depends on the pair: report its mean over the pairs
    chosen_reward = (chosen_rewards.expand_as(margins) * rejected_mask).sum(1) / rejected_mask.sum(1)
    chosen_logps = (logps.chosen.expand_as(margins) * rejected_mask).sum(1) / rejected_mask.sum(1)

    sums = {
        "entropy": ((outputs.entropy[:, -seq_len:] * mask).sum(), mask.sum()),
        "logits/chosen": (outputs.mean_logits[:batch_size, -seq_len:][chosen_mask].sum(), chosen_mask.sum()),
        "logits/rejected": (
            outputs.mean_logits[batch_size:, -seq_len:][rejected_tokens_mask].sum(),
            rejected_tokens_mask.sum(),
        ),
        "mean_token_accuracy": ((outputs.is_top1[:batch_size, -seq_len:] & chosen_mask).sum(), chosen_mask.sum()),
        "rewards/chosen": (chosen_reward.sum(), batch_size),
        "rewards/rejected": (rejected_rewards[rejected_mask].sum(), num_pairs),
        "rewards/accuracies": (won.sum(), num_pairs),
        "rewards/accuracies_all": ((won.sum(1) == rejected_mask.sum(1)).sum(), batch_size),
        "rewards/margins": (margins[rejected_mask].sum(), num_pairs),
        "rewards/margins_min": (margins.masked_fill(~rejected_mask, float("inf")).amin(1).sum(), batch_size),
        "logps/chosen": (chosen_logps.sum(), batch_size),
        "logps/rejected": (logps.rejected[rejected_mask].sum(), num_pairs),
        "num_rejected": (num_pairs, batch_size),
    }
    if train:
        sums[NUM_TOKENS] = (inputs["attention_mask"].sum(), 1)
    return sums


def stack_sums(sums: dict[str, tuple], device: torch.device) -> torch.Tensor:
    """The sums as one float64 tensor [M, 2], ready for a single gather."""
    values = [torch.as_tensor(x, dtype=torch.float64, device=device) for pair in sums.values() for x in pair]
    return torch.stack(values).view(-1, 2)


def ratios(keys: list[str], totals: torch.Tensor) -> dict[str, float]:
    """numerator / denominator of each metric from the summed [M, 2] totals (0 where nothing was counted); the
    `num_tokens` count is returned as its numerator."""
    values = {}
    for key, (numerator, denominator) in zip(keys, totals.tolist(), strict=True):
        if key == NUM_TOKENS:
            values[key] = numerator
        else:
            values[key] = numerator / denominator if denominator > 0 else 0.0
    return values
