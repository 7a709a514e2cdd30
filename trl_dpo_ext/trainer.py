"""`DPOTrainer`: `trl.DPOTrainer` for rows with one chosen and K rejected responses.

Swap the import and keep the script: pairwise rows train exactly as with `trl.DPOTrainer`, and rows whose `rejected`
is a list of K responses put the chosen and each rejected through the policy and the reference once per step (K + 1
sequences per example, not the 2K of rows expanded to pairs).

What is overridden, and why (TRL 1.16):

- `__init__`: only to install the K-rejected collator as the default one.
- `_prepare_dataset`: TRL's tokenizes exactly one rejected string per row inside a closure.
- `_precompute_ref_logps`: a thin wrapper, to reuse precomputed columns and check them for NaN.
- `compute_ref_log_probs` and `_compute_loss`: TRL's split the batch in two halves, [chosen; rejected]; the loss
  math itself lives in `trl_dpo_ext.losses`.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import trl
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, ProcessorMixin
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from .config import DPOConfig
from .data import (
    INDEX_COLUMN,
    DataCollatorForMultiRejectedPreference,
    check_ref_logps,
    check_tokenized_row,
    extract_prompt_multi,
    is_conversational_row,
    missing_columns,
    tokenize_row,
)
from .diagnostics import (
    EFFECTIVE_PREFIX,
    GRAD_WEIGHT_PREFIX,
    HISTOGRAM_REPORTERS,
    GradWeightHistogramCallback,
    GradWeightRecordCallback,
    append_record,
    effective_grad_weights,
    format_record,
    gather_pair_values,
    grad_weights,
    record_path,
    weight_statistics,
)
from .losses import BATCH_SORTED_LOSS_TYPES, PreferenceLogps, length_desensitized_logps, multi_rejected_loss
from .prefix_sharing import check_model_supports_prefix_sharing, packed_model_inputs, unpack_outputs


logger = get_logger(__name__)

# Keys of the collated batch that the model's forward takes
MODEL_INPUT_KEYS = ("input_ids", "attention_mask")
# Dataset columns the collator reads besides TRL's own
EXTRA_SIGNATURE_COLUMNS = ["scores", INDEX_COLUMN]


def scatter_rejected(values: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """Place the [R] values of the flattened rejected sequences into [B, K], row by row; 0 where there is none."""
    return values.new_zeros(rejected_mask.shape).masked_scatter(rejected_mask, values)


class DPOTrainer(trl.DPOTrainer):
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

    _tag_names = ["trl", "dpo", "trl-dpo-ext"]

    def __init__(
        self,
        model,
        ref_model=None,
        args: trl.DPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(f"{model_name.split('/')[-1]}-DPO")
        self.rejected_reduction = getattr(args, "rejected_reduction", "mean")

        if train_dataset is not None and isinstance(train_dataset, (Dataset, IterableDataset)):
            first = next(iter(train_dataset))
            if "image" in first or "images" in first:
                raise NotImplementedError(
                    "Vision-language preference data is not supported by trl_dpo_ext yet. Use `trl.DPOTrainer` for it."
                )

        if data_collator is None:
            # The parent builds its pairwise collator when none is given; build the K-rejected one here instead, which
            # needs the tokenizer's pad token, so load the processing class now as the parent would.
            if processing_class is None:
                model_id = model if isinstance(model, str) else get_config_model_id(model.config)
                processing_class = AutoProcessor.from_pretrained(
                    model_id,
                    revision=(args.model_init_kwargs or {}).get("revision"),
                    trust_remote_code=args.trust_remote_code,
                )
            tokenizer = (
                processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
            )
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            data_collator = DataCollatorForMultiRejectedPreference(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                prefix_sharing=getattr(args, "prefix_sharing", False),
            )

        if getattr(args, "ref_init", None) is not None:
            # Seed § 3.4: with no π_SFT, fine-tune on (prompt, chosen) first; the saved result is both the policy's
            # start and, through `ref_model=None`, the reference (see `trl_dpo_ext.ref_init`)
            from .ref_init import init_from_sft_reference

            model, processing_class = init_from_sft_reference(
                model, ref_model, train_dataset, processing_class, args, peft_config, quantization_config
            )

        prefix_sharing = getattr(args, "prefix_sharing", False)
        if prefix_sharing:  # fail before the parent's precompute pass, for models given as instances
            for name, instance in (("model", model), ("ref_model", ref_model)):
                if instance is not None and not isinstance(instance, str):
                    check_model_supports_prefix_sharing(instance, name)
        self._precompute_num_rejected: int | None = None
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
        if prefix_sharing:
            self._check_prefix_sharing()
        self._init_grad_weight_diagnostics()

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        tokenized, missing = missing_columns(dataset.column_names)
        if missing:
            raise ValueError(
                f"The {dataset_name} dataset has no column {missing} (columns: {dataset.column_names}). A preference "
                "dataset needs 'chosen' and 'rejected' (text, with an optional 'prompt'), or 'prompt_ids', "
                "'chosen_ids' and 'rejected_ids' (pre-tokenized)."
            )
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}

        def desc(text: str) -> dict:  # `IterableDataset.map` takes no `desc`
            return {"desc": f"{text} {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}

        with global_then_local_main_first():
            if tokenized:
                dataset = dataset.map(check_tokenized_row, with_indices=True, **map_kwargs, **desc("Checking"))
            else:
                first = next(iter(dataset))
                if "prompt" not in first:
                    dataset = dataset.map(
                        extract_prompt_multi, with_indices=True, **map_kwargs, **desc("Extracting prompt from")
                    )
                    first = next(iter(dataset))
                eos_token = None if is_conversational_row(first) else self._tokenizer.eos_token
                dataset = dataset.map(
                    tokenize_row,
                    with_indices=True,
                    fn_kwargs={"processing_class": processing_class, "eos_token": eos_token},
                    **map_kwargs,
                    **desc("Tokenizing"),
                )

            if isinstance(dataset, Dataset):
                self._check_rejected_counts(dataset, dataset_name, args)

            # As TRL: a prompt that fills `max_length` leaves no completion token under `keep_start` truncation
            if args.max_length is not None and args.truncation_mode == "keep_start":
                num_rows = len(dataset) if isinstance(dataset, Dataset) else None
                dataset = dataset.filter(
                    lambda example: len(example["prompt_ids"]) < args.max_length,
                    **map_kwargs,
                    **desc("Dropping fully truncated examples from"),
                )
                if num_rows is not None and len(dataset) < num_rows:
                    logger.warning(
                        f"Dropped {num_rows - len(dataset)} of {num_rows} rows of the {dataset_name} dataset whose "
                        f"prompt alone fills `max_length={args.max_length}`."
                    )
        return dataset

    def _check_rejected_counts(self, dataset: Dataset, dataset_name: str, args) -> None:
        num_rejected = list(dataset["num_rejected"])
        max_rejected = max(num_rejected, default=1)
        batch_sorted = [t for t in args.loss_type if t in BATCH_SORTED_LOSS_TYPES]
        if batch_sorted and max_rejected > 1:
            row = next(i for i, k in enumerate(num_rejected) if k > 1)
            raise ValueError(
                f"`loss_type={batch_sorted}` sorts one margin per example, so it needs one rejected per row, but row "
                f"{row} of the {dataset_name} dataset has {num_rejected[row]} in column 'rejected'. Use a pairwise "
                "loss such as 'sigmoid' with several rejected, or keep one rejected per row."
            )
        if args.ld_alpha is not None and args.precompute_ref_log_probs and max_rejected > 1:
            raise NotImplementedError(
                "`ld_alpha` with `precompute_ref_log_probs=True` is not supported with several rejected per row: the "
                "LD-DPO chosen log-prob depends on the rejected it is paired with. Set `precompute_ref_log_probs=False`"
                " or keep one rejected per row."
            )
        identical = sum(dataset["num_identical_rejected"])
        if identical:
            warnings.warn(
                f"{identical} rejected response(s) of the {dataset_name} dataset are identical to their chosen "
                "response. They are kept, but such a pair carries no gradient.",
                stacklevel=3,
            )

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if isinstance(dataset, Dataset) and {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
            # Reference log-probs already given (e.g. computed once for many runs): use them as they are
            self._check_ref_logps(dataset, name)
            return dataset
        if isinstance(dataset, Dataset):
            # Every row's reference log-probs of the rejected are padded to this length (NaN), so that TRL's
            # precompute can gather and store them; the collator reads each row's first K values.
            self._precompute_num_rejected = max(dataset["num_rejected"], default=1)
        try:
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_num_rejected = None
        self._check_ref_logps(dataset, name)
        return dataset

    @staticmethod
    def _check_ref_logps(dataset: Dataset, name: str) -> None:
        columns = zip(dataset["ref_chosen_logps"], dataset["ref_rejected_logps"], dataset["rejected_ids"], strict=True)
        for idx, (ref_chosen, ref_rejected, rejected_ids) in enumerate(columns):
            try:
                check_ref_logps(ref_chosen, ref_rejected, len(rejected_ids), idx)
            except ValueError as error:
                raise ValueError(f"{error} (in the {name} dataset)") from None

    def _set_signature_columns_if_needed(self):
        # Keep the columns the K-rejected collator reads besides TRL's (`remove_unused_columns` drops the others)
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *EXTRA_SIGNATURE_COLUMNS]

    # ------------------------------------------------------------ log-probs

    def _per_token_logps(self, model, inputs, reference: bool):
        """Forward the collated batch through the policy (or the reference) with TRL's fused LM head."""
        model_kwargs = {key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled and not reference:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        seq_len = inputs["completion_mask"].size(1) - 1
        if not reference:
            outputs = self._fused_forward(model, model_kwargs, labels, inputs)
            # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
            return outputs.log_probs[:, -seq_len:], outputs

        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            # New adapter: disabling it gives the base model; re-trained adapter: TRL keeps a copy named "ref"
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
        ):
            outputs = self._fused_forward(model, model_kwargs, labels, inputs)
        return outputs.log_probs[:, -seq_len:], outputs

    def _fused_forward(self, model, model_kwargs: dict, labels: torch.Tensor, inputs):
        """The fused-LM-head forward. With prefix sharing it runs on the packed rows, and its per-token outputs are
        laid out as those of the unshared batch [B + R, L_u - 1], so everything after it is unchanged."""
        if "packed_input_ids" not in inputs:
            return model(**model_kwargs, labels=labels, fused_lm_head=True)
        implementation = self.accelerator.unwrap_model(model).config._attn_implementation
        packed_kwargs, packed_labels = packed_model_inputs(inputs, implementation)
        outputs = model(**{**model_kwargs, **packed_kwargs}, labels=packed_labels, fused_lm_head=True)
        return unpack_outputs(outputs, inputs)

    def _check_prefix_sharing(self) -> None:
        """Fail at construction where the packed forward would not give the unshared log-probs."""
        check_model_supports_prefix_sharing(self.model, "model")
        if self.ref_model is not None:
            check_model_supports_prefix_sharing(self.ref_model, "ref_model")
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "`prefix_sharing=True` does not support the router auxiliary loss of Mixture-of-Experts models yet "
                "(it reads a 2D attention mask). Set `router_aux_loss_coef=0.0` or `prefix_sharing=False`."
            )

    def _sequence_logps(self, per_token_logps: torch.Tensor, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of the chosen [B, 1] (or [B, K] under LD-DPO) and of the rejected [B, K]."""
        rejected_mask = inputs["rejected_mask"]
        batch_size = rejected_mask.size(0)
        if self.ld_alpha is None:
            logps = per_token_logps.sum(dim=1)
            return logps[:batch_size, None], scatter_rejected(logps[batch_size:], rejected_mask)
        # LD-DPO: each chosen is weighed against each of its rejected over their shared length
        mask = inputs["completion_mask"][:, 1:]
        lengths = mask.sum(dim=1)
        shared = torch.minimum(lengths[:batch_size, None], scatter_rejected(lengths[batch_size:], rejected_mask))
        chosen = length_desensitized_logps(per_token_logps[:batch_size], mask[:batch_size], shared, self.ld_alpha)
        rejected = length_desensitized_logps(
            per_token_logps[batch_size:], mask[batch_size:], shared[rejected_mask][:, None], self.ld_alpha
        )
        return chosen, scatter_rejected(rejected.squeeze(1), rejected_mask)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one collated batch: the chosen [B] and the rejected [B, K] (NaN-padded)."""
        with self.accelerator.autocast():
            per_token_logps, _ = self._per_token_logps(model, inputs, reference=True)
        chosen, rejected = self._sequence_logps(per_token_logps, inputs)
        if chosen.size(1) != 1:
            raise NotImplementedError("LD-DPO reference log-probs of several rejected cannot be precomputed per row.")
        rejected = rejected.masked_fill(~inputs["rejected_mask"], float("nan"))
        width = self._precompute_num_rejected or rejected.size(1)
        rejected = torch.nn.functional.pad(rejected, (0, width - rejected.size(1)), value=float("nan"))
        return chosen.squeeze(1), rejected

    # ------------------------------------------------------------------ loss

    def _loss_kwargs(self, inputs, pair_weights: torch.Tensor | None) -> dict:
        """The hyper-parameters and per-batch inputs of `multi_rejected_loss`, besides the loss type and β."""
        return dict(
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.args.discopop_tau,
            pair_weights=pair_weights,
            scores=inputs.get("scores"),
            score_temperature=getattr(self.args, "score_temperature", 1.0),
        )

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        rejected_mask = inputs["rejected_mask"]
        batch_size = rejected_mask.size(0)
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]

        per_token_logps, outputs = self._per_token_logps(model, inputs, reference=False)
        chosen, rejected = self._sequence_logps(per_token_logps, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"][:, None], inputs["ref_rejected_logps"]
        else:
            ref_per_token_logps, _ = self._per_token_logps(self.ref_model or model, inputs, reference=True)
            ref_chosen, ref_rejected = self._sequence_logps(ref_per_token_logps, inputs)

        lengths = completion_mask.sum(dim=1).to(per_token_logps.dtype)
        logps = PreferenceLogps(
            chosen=chosen,
            rejected=rejected,
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            rejected_mask=rejected_mask,
            chosen_lengths=lengths[:batch_size, None],
            rejected_lengths=scatter_rejected(lengths[batch_size:], rejected_mask),
        )

        pair_weights = None
        if self.use_weighting:  # WPO, Eq. 2 of arXiv 2406.11827: each pair weighs π(y_w)·π(y_l), length-normalised
            with torch.no_grad():
                aligned = (per_token_logps - outputs.log_sum_sq_probs[:, -shift_mask.size(1) :]) * shift_mask
                weights = torch.exp(aligned.sum(dim=1) / shift_mask.sum(dim=1).clamp_min(1))
            pair_weights = weights[:batch_size, None] * scatter_rejected(weights[batch_size:], rejected_mask)

        loss = 0.0
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":  # NLL of the chosen tokens, averaged over the batch's chosen tokens
                chosen_mask = shift_mask[:batch_size].bool()
                loss = loss + (-per_token_logps[:batch_size][chosen_mask].mean()) * loss_weight
                continue
            per_example = multi_rejected_loss(
                loss_type, self.rejected_reduction, logps, beta=self.beta, **self._loss_kwargs(inputs, pair_weights)
            )
            loss = loss + per_example.mean() * loss_weight

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        with torch.no_grad():
            self._log_metrics(mode, inputs, outputs, logps)
            self._log_grad_weights(mode, inputs, logps, pair_weights)

        if return_outputs:
            warnings.warn(
                "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in TRL and will "
                "be removed in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an "
                "extra forward pass.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**{key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs})
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------- gradient weights

    def _init_grad_weight_diagnostics(self) -> None:
        report_to = self.args.report_to or []
        self._grad_weight_histogram: GradWeightHistogramCallback | None = None
        if any(name in report_to for name in HISTOGRAM_REPORTERS):
            self._grad_weight_histogram = GradWeightHistogramCallback(report_to, self.callback_handler)
            self.add_callback(self._grad_weight_histogram)
        self._grad_weight_record = None
        if getattr(self.args, "grad_weight_record", False):
            self._grad_weight_record = record_path(self.args.output_dir)
            self.add_callback(GradWeightRecordCallback(self._grad_weight_record))

    def _log_grad_weights(self, mode: str, inputs, logps: PreferenceLogps, pair_weights: torch.Tensor | None) -> None:
        """σ(r̂_l − r̂_w) and the effective weight of every pair (see `trl_dpo_ext.diagnostics`): the `grad_weight/...`
        metrics, the histogram, and the per-example record when `grad_weight_record=True`."""
        weights = grad_weights(logps, self.beta)
        effective = effective_grad_weights(
            logps,
            self.beta,
            self.loss_types,
            self.loss_weights,
            self.rejected_reduction,
            **self._loss_kwargs(inputs, pair_weights),
        )
        record = mode == "train" and self._grad_weight_record is not None
        if record and INDEX_COLUMN not in inputs:
            raise ValueError(
                f"`grad_weight_record=True` needs each row's dataset index in the batch (key '{INDEX_COLUMN}'), which "
                f"`DataCollatorForMultiRejectedPreference` adds; the batch has keys {sorted(inputs)}. Use the default "
                "collator, or a collator that passes the 'dataset_index' column through."
            )
        pairs, index = gather_pair_values(
            self.accelerator, torch.stack([weights, effective], dim=2), inputs[INDEX_COLUMN] if record else None
        )
        for prefix, values in ((GRAD_WEIGHT_PREFIX, pairs[..., 0]), (EFFECTIVE_PREFIX, pairs[..., 1])):
            for key, value in weight_statistics(values, prefix).items():
                self._metrics[mode][key].append(value)
        if mode == "train" and self._grad_weight_histogram is not None:
            self._grad_weight_histogram.add(pairs[..., 0], pairs[..., 1])
        if record and self.accelerator.is_main_process:
            # The update this batch enters is step global_step + 1; a resumed run truncates the steps after its own
            step, epoch = self.state.global_step + 1, int(self.state.epoch or 0)
            append_record(self._grad_weight_record, format_record(index, step, epoch, pairs[..., 0], pairs[..., 1]))

    # --------------------------------------------------------------- metrics

    def _log_metrics(self, mode: str, inputs, outputs, logps: PreferenceLogps) -> None:
        """TRL's metrics, with the same meaning over K rejected, plus the K-rejected ones.

        Every metric is a ratio of two sums (over tokens, pairs or examples); the sums of all processes are gathered
        in one collective and added, so the value is exact whatever the number of rejected on each process.
        """
        rejected_mask = logps.rejected_mask
        batch_size = rejected_mask.size(0)
        seq_len = inputs["completion_mask"].size(1) - 1
        mask = inputs["completion_mask"][:, 1:].bool()
        chosen_mask, rejected_tokens_mask = mask[:batch_size], mask[batch_size:]
        num_pairs = rejected_mask.sum()

        chosen_rewards = self.beta * logps.chosen_logratios  # [B, 1] or [B, K]
        rejected_rewards = self.beta * logps.rejected_logratios
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
            "mean_token_accuracy": (
                (outputs.is_top1[:batch_size, -seq_len:] & chosen_mask).sum(),
                chosen_mask.sum(),
            ),
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
        if mode == "train":
            sums["num_tokens"] = (inputs["attention_mask"].sum(), 1)
        device = self.accelerator.device
        local = torch.stack(
            [torch.as_tensor(x, dtype=torch.float64, device=device) for pair in sums.values() for x in pair]
        ).view(-1, 2)
        totals = self.accelerator.gather(local.unsqueeze(0)).sum(dim=0)
        for (key, _), (numerator, denominator) in zip(sums.items(), totals.tolist(), strict=True):
            if key == "num_tokens":
                self._total_train_tokens += int(numerator) // self._tp_size
                self._metrics[mode][key] = [self._total_train_tokens]
            else:
                self._metrics[mode][key].append(numerator / denominator if denominator > 0 else 0.0)
        if mode == "eval":
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
