"""`DPOTrainer`: `trl.DPOTrainer` for rows with one chosen and K rejected responses.

Swap the import and keep the script: pairwise rows train exactly as with `trl.DPOTrainer`, and rows whose `rejected`
is a list of K responses put the chosen and each rejected through the policy and the reference once per step (K + 1
sequences per example, not the 2K of rows expanded to pairs).

The trainer overrides TRL's seams and delegates (docs/architecture.md): data to `data.py` and `collator.py` (images:
`vision.py`), log-probs to `forward.py` (packed rows: `packing/`), the loss to a `LossSpec`,
metrics to `metrics.py`, gradient weights to `diagnostics.py`, the reference to `ref_init.py`. The private TRL methods
it overrides, and why, are in `_trl_compat.OVERRIDDEN_DPO_METHODS`; every private attribute goes through `_trl_compat`.
"""

from __future__ import annotations

import torch
import trl
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers import ProcessorMixin

from ._trl_compat import (
    add_train_tokens,
    extend_signature_columns,
    metrics_of,
    tokenizer_of,
    total_train_tokens,
    trl_padding_free_warning_silenced,
)
from .checkpoints import resolve_resume_checkpoint
from .collator import DataCollatorForMultiRejectedPreference, mirror_pad_token
from .config import DPOConfig, check_distributed_launch
from .convert import rows_as_dataset
from .data import load_processing_class, model_id, prepare_preference_dataset
from .diagnostics import GradWeightDiagnostics
from .distributed import share_in_memory_dataset
from .forward import (
    chosen_nll,
    logits_forward,
    per_token_logps,
    preference_logps,
    reference_context,
    reference_sequence_logps,
    sequence_logps,
    wpo_pair_weights,
)
from .guards import NonFiniteGuard
from .hard_negatives import KeepExamples, RejectedSelector, kept_rank_metrics
from .loss_spec import LossSpec
from .metrics import NUM_TOKENS, metric_sums, ratios, stack_sums
from .model_card import ModelCardMixin
from .packing import (
    attn_implementation,
    check_model_supports_packing,
    check_packing_setup,
    prepare_packed_models,
)
from .packing.spec import PackingSpec
from .rows import INDEX_COLUMN, model_vocab_size
from .run_identity import RunIdentityCallback
from .score_checks import check_ref_logps_columns
from .setup_checks import check_output_dir, check_reference_source
from .vision import (
    DataCollatorForMultiRejectedVisionPreference,
    image_model_inputs,
    is_image_row,
    prepare_image_datasets,
)


logger = get_logger(__name__)

# Dataset columns the collator reads besides TRL's own
EXTRA_SIGNATURE_COLUMNS = ["scores", INDEX_COLUMN]


class DPOTrainer(ModelCardMixin, trl.DPOTrainer):
    """[`trl.DPOTrainer`] whose rows may carry a list of K ≥ 1 rejected responses (K may vary from row to row).

    Takes the same arguments as [`trl.DPOTrainer`], and a [`trl_dpo_ext.DPOConfig`] (a plain `trl.DPOConfig` works
    too, with the defaults of the new fields). The chosen sequence of an example is forwarded once and compared with
    each of its K rejected; `args.rejected_reduction` combines the K pair losses.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_dpo_ext import DPOConfig, DPOTrainer

    >>> dataset = Dataset.from_list(
    ...     [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": [" 5", " 22", " four hundred"]}]
    ... )
    >>> trainer = DPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=DPOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: trl.DPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | list[dict] | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:  # as TRL
            args = DPOConfig(f"{model_id(model).split('/')[-1]}-DPO")
        args = DPOConfig.from_trl_config(args)  # once: every field is read from our config from here on
        check_distributed_launch(args)  # before any work: the SFT stage, the data, the models
        check_output_dir(args.output_dir)
        train_dataset, eval_dataset = rows_as_dataset(train_dataset), rows_as_dataset(eval_dataset)  # lists of dicts
        # Built (and validated) once; the loss and the gradient-weight diagnostics both use it
        self.loss_spec = LossSpec.from_config(args)
        self.rejected_reduction = self.loss_spec.reduction
        self.packing_spec = PackingSpec.from_config(args)  # the collator, the data and the models read this one

        # Image rows are rendered and processed batch by batch, as TRL does (see `trl_dpo_ext.vision`)
        self._image_rows = isinstance(train_dataset, (Dataset, IterableDataset)) and is_image_row(
            next(iter(train_dataset))
        )

        check_packing_setup(self.packing_spec, data_collator, self._image_rows)
        if self._image_rows and args.rejected_selection != "all":
            raise NotImplementedError(
                f"`rejected_selection={args.rejected_selection!r}` is not implemented for rows with images; set "
                "`rejected_selection='all'`."
            )
        builds_collator = data_collator is None
        if builds_collator:
            # The parent builds its pairwise collator when none is given; build the K-rejected one instead, which
            # needs the tokenizer's pad token, so load the processing class now as the parent would
            processing_class = processing_class or load_processing_class(model, args)
            if not self._image_rows:
                data_collator = DataCollatorForMultiRejectedPreference.from_config(
                    args, processing_class, self.packing_spec
                )
            elif isinstance(processing_class, ProcessorMixin):  # with a tokenizer, TRL raises its text-model error
                data_collator = DataCollatorForMultiRejectedVisionPreference.from_config(
                    args, processing_class, self.packing_spec
                )

        if args.ref_init is not None:
            # As the DPO paper does without π_SFT (arXiv 2305.18290, §4): fine-tune on (prompt, chosen) first; the
            # saved result is both the policy's start and, through `ref_model=None`, the reference (`ref_init.py`)
            from .ref_init import init_from_sft_reference

            model, processing_class = init_from_sft_reference(
                model, ref_model, train_dataset, processing_class, args, peft_config, quantization_config
            )
        if not (self._image_rows and not isinstance(processing_class, ProcessorMixin)):  # else TRL's error first
            check_reference_source(model, ref_model, args, peft_config)

        # Every token id of the data must index a row of the model's input embedding (checked in `_prepare_dataset`)
        self._vocab_size = model_vocab_size(model, args)
        if self.packing_spec.packed:  # fail before the parent's precompute pass, for models given as instances
            for name, instance in (("model", model), ("ref_model", ref_model)):
                if instance is not None and not isinstance(instance, str):
                    check_model_supports_packing(instance, name, self.packing_spec)
        self._precompute_num_rejected: int | None = None
        with trl_padding_free_warning_silenced():  # TRL 1.16 turns `padding_free` off, with a warning; it works here
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        self.padding_free = self.packing_spec.padding_free
        if builds_collator:  # as TRL when it builds the collator: the model agrees with the tokenizer's pad token
            mirror_pad_token(self.accelerator.unwrap_model(self.model), tokenizer_of(self).pad_token_id)
        self._setup_packed_forward()  # the models TRL loaded, and MoE router losses, known only now
        if self._image_rows:  # TRL leaves image rows unprepared: check them here
            models = {"model": self.model, "ref_model": self.ref_model}
            self.train_dataset = prepare_image_datasets(
                self.train_dataset, self.eval_dataset, args, self.loss_spec, self.packing_spec, models, compute_metrics
            )
        self.grad_weight_diagnostics = GradWeightDiagnostics(
            self.loss_spec,
            self.args.report_to,
            self.args.output_dir,
            record=self.args.grad_weight_record,
            callback_handler=self.callback_handler,
        )
        for callback in self.grad_weight_diagnostics.callbacks():
            self.add_callback(callback)
        # A non-finite step stops (or warns) before it is logged and saved (`guards.py`)
        self.nonfinite_guard = NonFiniteGuard(args.on_nonfinite, self.accelerator, not args.fp16)
        self.add_callback(self.nonfinite_guard)
        self._run_identity = RunIdentityCallback()  # saved with each checkpoint, checked on resume
        self.add_callback(self._run_identity)
        self.rejected_selector = None
        if args.rejected_selection != "all":  # the batch keeps its examples, to collate the kept rejected again
            self.rejected_selector = RejectedSelector(
                self.loss_spec, args.rejected_selection, args.num_selected, args.seed, self.data_collator
            )
            self.data_collator = KeepExamples(self.data_collator)

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        eos_token, spec = tokenizer_of(self).eos_token, self.loss_spec
        return prepare_preference_dataset(
            dataset, processing_class, eos_token, args, dataset_name, spec, self._vocab_size, self.packing_spec
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # A checkpoint whose save was interrupted is skipped: transformers would resume from the last one by number
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._run_identity.start(resume_from_checkpoint, self.loss_spec, self.train_dataset, self.args)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def end(self) -> None:
        """Finish the trackers and destroy the process group, as transformers' `Trainer.end` (>= 5.18), which TRL's
        `trl dpo` script calls last; the DDP-wrapped model is dropped first.

        Otherwise the wrapper's reducer holds the last reference to a gloo group once `destroy_process_group` has run,
        and frees it when the trainer goes, holding the GIL: torch's `~ProcessGroupGloo` then joins a worker thread
        that waits for the GIL to free a gathered tensor, and the process never exits (seen with two CPU processes
        under load, rank 0 stuck in that join; pytorch/pytorch#56297). Dropped first, the wrapper leaves the group to
        `destroy_process_group`, which releases the GIL.
        """
        self.model_wrapped = self.model  # the wrapper's only reference (accelerate keeps the unwrapped model)
        super().end()

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        self._setup_packed_forward()  # the parent's `__init__` runs this pass before it returns
        if isinstance(dataset, Dataset) and {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
            # Reference log-probs already given (e.g. computed once for many runs): use them as they are
            check_ref_logps_columns(dataset, name)
            return dataset
        if isinstance(dataset, Dataset):
            dataset = share_in_memory_dataset(dataset, self.accelerator)  # TRL's cache file, read by every process
            # Every row's reference log-probs of the rejected are padded to this length (NaN), so that TRL's
            # precompute can gather and store them; the collator reads each row's first K values.
            self._precompute_num_rejected = max(dataset["num_rejected"], default=1)
        try:
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_num_rejected = None
        check_ref_logps_columns(dataset, name)
        return dataset

    def _set_signature_columns_if_needed(self):
        # Keep the columns the K-rejected collator reads besides TRL's (`remove_unused_columns` drops the others)
        super()._set_signature_columns_if_needed()
        extend_signature_columns(self, EXTRA_SIGNATURE_COLUMNS)

    # ------------------------------------------------------------ log-probs

    def _setup_packed_forward(self) -> None:
        """Check the models for the packed forward and give SDPA ones the segment-wise kernel (idempotent)."""
        if self.packing_spec.packed:
            models = {"model": self.model, "ref_model": self.ref_model}
            prepare_packed_models(models, self.packing_spec, self.aux_loss_enabled, self._image_rows)

    def _per_token_logps(self, model, inputs, reference: bool):
        """Per-token log-probs of the batch under the policy, or under the reference (see `forward.py`)."""
        implementation = attn_implementation(self.accelerator.unwrap_model(model))
        extra = None
        if self._image_rows:
            extra = image_model_inputs(inputs, self.accelerator.unwrap_model(model), self.packing_spec.packed)
        if not reference:
            return per_token_logps(model, inputs, implementation, self.aux_loss_enabled, extra, self.packing_spec)
        unwrapped = self.accelerator.unwrap_model(self.model)
        with reference_context(self.model, unwrapped, self.ref_model, self.args.gradient_checkpointing_kwargs):
            return per_token_logps(model, inputs, implementation, extra_inputs=extra, packing=self.packing_spec)

    def _batch_logps(self, model, inputs, reference_forward: bool):
        """The policy's per-token log-probs and outputs, the batch's `PreferenceLogps` (the reference by a forward, or
        the batch's precomputed values) and the WPO pair weights (None without `use_weighting`)."""
        spec = self.loss_spec
        per_token, outputs = self._per_token_logps(model, inputs, reference=False)
        chosen, rejected = sequence_logps(per_token, inputs, spec.ld_alpha)
        ref_per_token = None
        if reference_forward:
            ref_per_token, _ = self._per_token_logps(self.ref_model or model, inputs, reference=True)
        ref_chosen, ref_rejected = reference_sequence_logps(inputs, ref_per_token, spec.ld_alpha)
        logps = preference_logps(chosen, rejected, ref_chosen, ref_rejected, inputs, per_token.dtype)
        pair_weights = wpo_pair_weights(per_token, outputs, inputs) if spec.use_weighting else None
        return per_token, outputs, logps, pair_weights

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one collated batch: the chosen [B] and the rejected [B, K] (NaN-padded)."""
        with self.accelerator.autocast():
            per_token, _ = self._per_token_logps(model, inputs, reference=True)
        chosen, rejected = sequence_logps(per_token, inputs, self.loss_spec.ld_alpha)
        if chosen.size(1) != 1:
            raise NotImplementedError("LD-DPO reference log-probs of several rejected cannot be precomputed per row.")
        rejected = rejected.masked_fill(~inputs["rejected_mask"], float("nan"))
        width = self._precompute_num_rejected or rejected.size(1)
        rejected = torch.nn.functional.pad(rejected, (0, width - rejected.size(1)), value=float("nan"))
        return chosen.squeeze(1), rejected

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        spec = self.loss_spec
        full, selector = None, self.rejected_selector
        if mode == "train" and selector is not None and selector.needed(inputs, self.accelerator):
            # A no-grad pass over all K picks the rejected this pass trains on (`hard_negatives.py`)
            full = selector.full_pass(self, model, inputs)
            inputs = selector.kept_batch(self, full)
        # The kept batch carries the reference log-probs of the full pass
        reference_forward = not self.precompute_ref_logps and full is None
        per_token, outputs, logps, pair_weights = self._batch_logps(model, inputs, reference_forward)
        if full is not None:
            pair_weights = selector.importance(full, per_token.device, pair_weights)
        loss = spec.preference_loss(logps, pair_weights, inputs.get("scores"))
        if spec.sft_weight:
            loss = loss + chosen_nll(per_token, inputs) * spec.sft_weight
        metrics = metrics_of(self, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        with torch.no_grad():
            if full is not None:  # the metrics and the record describe every rejected, as the no-grad pass saw them
                inputs, outputs, logps, pair_weights = full.inputs, full.outputs, full.logps, full.pair_weights
                kept_ranks = kept_rank_metrics(full.selection, logps.rejected_mask.cpu(), self.accelerator)
                for key, value in kept_ranks.items():
                    metrics[key].append(value)
            if mode == "train":
                self.nonfinite_guard.observe_batch(inputs, loss, logps, spec.beta)
            self._log_metrics(mode, inputs, outputs, logps)
            weights = self.grad_weight_diagnostics.step(
                self.accelerator, mode, inputs, logps, pair_weights, self.state
            )
            for key, value in weights.items():
                metrics[key].append(value)

        if return_outputs:  # deprecated by TRL: the logits `compute_metrics` gets, by an extra forward
            extra = image_model_inputs(inputs, self.accelerator.unwrap_model(model)) if self._image_rows else {}
            return loss, logits_forward(model, inputs, extra)
        return loss

    def _log_metrics(self, mode: str, inputs, outputs, logps) -> None:
        """The batch's metric sums (`metrics.py`), gathered from every process in one collective, then divided."""
        sums = metric_sums(inputs, outputs, logps, self.loss_spec.beta, train=mode == "train")
        totals = self.accelerator.gather(stack_sums(sums, self.accelerator.device).unsqueeze(0)).sum(dim=0)
        metrics = metrics_of(self, mode)
        for key, value in ratios(list(sums), totals).items():
            if key == NUM_TOKENS:
                metrics[key] = [add_train_tokens(self, int(value))]
            else:
                metrics[key].append(value)
        if mode == "eval":
            metrics[NUM_TOKENS] = [total_train_tokens(self)]
