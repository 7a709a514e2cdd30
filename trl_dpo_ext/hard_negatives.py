"""Online hard-negative selection in the trainer: a no-grad pass over all K rejected, then the training pass on m.

Per training micro-batch, with `rejected_selection` `"hardest"` or `"sampled"` (the rules: `trl_dpo_ext.selection`):

1. the reference log-probs of the chosen and all K (precomputed, or a no-grad reference forward, as without selection);
2. a no-grad policy forward of the chosen and all K (prefix-shared and packed as configured);
3. each pair's effective gradient weight under the configured loss (`diagnostics.effective_grad_weights`, the
   function the diagnostics log, so the two cannot drift apart);
4. the kept rejected of each row, and the batch of the chosen and the kept only, collated again by the trainer's
   own collator with the reference log-probs of step 1 attached (no second reference forward);
5. the trainer's usual forward, loss and backward on that batch, each kept pair's loss times its importance weight.

The metrics and the gradient-weight record keep describing all K pairs (from step 2), plus which ranks were kept:
`grad_weight/kept_rank_k`, the fraction of the rows with a k-th rejected (from 0, as `grad_weight/rank_k`) that
kept it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from .diagnostics import GRAD_WEIGHT_PREFIX, effective_grad_weights, grad_weights
from .loss_spec import LossSpec
from .losses import PreferenceLogps
from .rows import INDEX_COLUMN
from .selection import Selection, select_hardest, select_sampled


# The batch key under which the collator wrapper passes the examples through, to collate the kept ones again
EXAMPLES_KEY = "selection_examples"
KEPT_RANK_PREFIX = f"{GRAD_WEIGHT_PREFIX}/kept_rank"


@dataclass
class KeepExamples:
    """Wraps a collator: its batch, plus the examples it was made from (not a model input), which the selection
    collates again with only the kept rejected."""

    collator: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.collator(examples), EXAMPLES_KEY: examples}

    def __getattr__(self, name: str):  # the wrapped collator's attributes (`packing`, `pad_token_id`, ...)
        collator = self.__dict__.get("collator")
        if collator is None:  # while unpickling (dataloader workers)
            raise AttributeError(name)
        return getattr(collator, name)


@dataclass
class FullPass:
    """What the no-grad pass over all K saw, for the metrics and the record."""

    inputs: dict
    outputs: Any
    logps: PreferenceLogps
    pair_weights: torch.Tensor | None
    selection: Selection


def kept_example(example: dict[str, Any], kept: list[int], ref_chosen: float, ref_rejected: list[float]) -> dict:
    """One example with only its `kept` rejected (listed order kept), its scores aligned, and the reference
    log-probs of the full pass attached as if precomputed."""
    out = {**example, "rejected_ids": [example["rejected_ids"][k] for k in kept]}
    if "scores" in example:
        out["scores"] = [example["scores"][0]] + [example["scores"][1 + k] for k in kept]
    out["ref_chosen_logps"] = ref_chosen
    out["ref_rejected_logps"] = ref_rejected
    return out


def kept_rank_metrics(selection: Selection, rejected_mask: torch.Tensor, accelerator) -> dict[str, float]:
    """`grad_weight/kept_rank_k` for k = 0..K-1 (K over every process): rows that kept their k-th rejected over the
    rows that have one, summed over the processes in one collective."""
    kept = torch.zeros_like(rejected_mask)
    kept.scatter_(1, selection.index, selection.mask)
    counts = torch.stack([kept.sum(0), rejected_mask.sum(0)]).float().to(accelerator.device)  # [2, K]
    if accelerator.num_processes > 1:  # K differs between processes: pad to the largest, then sum
        counts = accelerator.reduce(accelerator.pad_across_processes(counts, dim=1), "sum")
    return {f"{KEPT_RANK_PREFIX}_{k}": (counts[0, k] / counts[1, k]).item() for k in range(counts.size(1))}


class RejectedSelector:
    """Runs steps 1-4 of the module docstring for one training micro-batch of a trainer."""

    def __init__(self, spec: LossSpec, selection: str, num_selected: int, seed: int, collator):
        self.spec, self.selection, self.num_selected, self.seed = spec, selection, num_selected, seed
        self.collator = collator  # the trainer's own, which batches the kept rejected again
        self._draws: tuple[int, int] = (-1, 0)  # (global step, micro-batches drawn in it)

    def generator(self, global_step: int, process_index: int) -> torch.Generator:
        """A generator seeded by (seed, step, process, micro-batch of the step): the same draws after a resume."""
        step, count = self._draws
        count = count + 1 if step == global_step else 0
        self._draws = (global_step, count)
        key = f"{self.seed}/{global_step}/{process_index}/{count}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def needed(self, inputs: dict, accelerator) -> bool:
        """Whether some row of the batch, on any process, has more rejected than are kept (otherwise the step trains
        as with `"all"`). Every process decides alike: the extra pass of one alone would unbalance collectives."""
        longer = (inputs["rejected_mask"].sum(dim=1).max() > self.num_selected).float()
        if accelerator.num_processes > 1:
            longer = accelerator.reduce(longer.to(accelerator.device), "sum")
        return bool(longer > 0)

    @torch.no_grad()
    def full_pass(self, trainer, model, inputs: dict) -> FullPass:
        """Steps 1-3 and the choice of the kept rejected."""
        spec = self.spec
        _, outputs, logps, pair_weights = trainer._batch_logps(model, inputs, not trainer.precompute_ref_logps)
        # On the host: the kept indices choose the examples to collate again, there
        mask = logps.rejected_mask.cpu()
        effective = effective_grad_weights(logps, spec, pair_weights, inputs.get("scores")).cpu()
        if self.selection == "hardest":
            weights = grad_weights(logps, spec.beta).cpu()
            selection = select_hardest(effective, weights, mask, self.num_selected)
        else:
            generator = self.generator(trainer.state.global_step, trainer.accelerator.process_index)
            selection = select_sampled(effective, mask, self.num_selected, spec.reduction, generator)
        return FullPass(inputs, outputs, logps, pair_weights, selection)

    def kept_batch(self, trainer, full: FullPass) -> dict:
        """Step 4: the batch of the chosen and the kept rejected, on the trainer's device."""
        examples = full.inputs[EXAMPLES_KEY]
        ref_chosen = full.logps.ref_chosen[:, 0].float().cpu().tolist()
        ref_rejected = full.logps.ref_rejected.float().cpu().tolist()
        index, mask = full.selection.index.tolist(), full.selection.mask.tolist()
        rows = []
        for i, example in enumerate(examples):
            kept = [k for k, keep in zip(index[i], mask[i], strict=True) if keep]
            rows.append(kept_example(example, kept, ref_chosen[i], [ref_rejected[i][k] for k in kept]))
        batch = trainer._prepare_inputs(self.collator(rows))
        if INDEX_COLUMN in full.inputs:
            batch[INDEX_COLUMN] = full.inputs[INDEX_COLUMN]
        return batch

    def importance(self, full: FullPass, device: torch.device, pair_weights: torch.Tensor | None):
        """The pair weights of the kept batch: WPO's (if any) times the importance weights (`"sampled"`)."""
        importance = full.selection.importance
        if importance is None:
            return pair_weights
        importance = importance.to(device)
        return importance if pair_weights is None else pair_weights * importance
