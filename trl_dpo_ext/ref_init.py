"""SFT-on-chosen reference initialisation (DPO paper, arXiv 2305.18290, §4): π_ref = argmax_π E_{(x, y_w) ~ D}[log π(y_w | x)].

When the model that sampled the preference data (π_SFT) is not available, DPO's reference is made by fine-tuning the
model on the (prompt, chosen) pairs of the preference data, with the loss on the chosen tokens only, and DPO then
starts its policy from that same model. The fine-tuning is `trl.SFTTrainer`'s, on prompt-completion rows.

Make the reference once and reuse it for many DPO runs:

```bash
trl-dpo-ext sft-ref --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prefs.jsonl \
    --output_dir runs/qwen --ref_init_learning_rate 2e-5 --ref_init_num_train_epochs 1
```

The reference is saved in `runs/qwen/sft_ref` (or `--ref_init_output_dir`); pass that folder as `model` (and let DPO
copy it as the reference) or as `ref_model`, or run `DPOTrainer` with `ref_init="sft_on_chosen"` and the same
`output_dir`, which reuses it.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from ._trl_compat import (
    attn_implementation,
    clear_metrics,
    create_model_from_path,
    prefix_metrics,
)
from .config import check_distributed_launch
from .data import load_processing_class, preference_to_sft_dataset
from .ref_identity import (
    METADATA_FILE,
    METADATA_VERSION,
    SETTING_FIELDS,
    check_saved,
    data_fingerprint,
    jsonable,
    model_identity,
    read_metadata,
    sft_reference_dir,
    sft_settings,
    tokenizer_identity,
    weight_checksums,
)
from .rows import model_vocab_size


logger = get_logger(__name__)

LOG_PREFIX = "sft_ref/"
# Fields of the DPO run's `TrainingArguments` that the SFT stage carries over without them being part of the saved
# reference's identity (devices, logging); those that change the weights are `ref_identity.SETTING_FIELDS`.

CARRIED_FIELDS = (
    "tf32",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "activation_offloading",
    "torch_compile",
    "torch_compile_backend",
    "torch_compile_mode",
    "full_determinism",
    "average_tokens_across_devices",
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "disable_tqdm",
    "report_to",
    "skip_memory_metrics",
    "include_num_input_tokens_seen",
    "use_cpu",
    "accelerator_config",
    "parallelism_config",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "ddp_backend",
    "ddp_timeout",
    "ddp_find_unused_parameters",
    "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers",
    "fsdp",
    "fsdp_config",
    "deepspeed",
    "trust_remote_code",
    "dataset_num_proc",
    "pad_to_multiple_of",
)


# -------------------------------------------------------------------------------------------------------- training


class _SFTProgressCallback(ProgressCallback):
    """The progress bar of the SFT stage, labelled so it is not taken for the DPO run's."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("SFT reference (ref_init)")


class _SFTReferenceTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose logs all carry the `sft_ref/` prefix (`sft_ref/loss`, ...), apart from the DPO run's."""

    _tag_names = ["trl", "sft", "trl-dpo-ext", "sft-ref"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix_metrics(self, mode, LOG_PREFIX)
        super().log({f"{LOG_PREFIX}{k}": v for k, v in logs.items()}, start_time)
        clear_metrics(self, mode)


def _sft_config(args, settings: dict[str, Any], output_dir: str, model_is_str: bool) -> SFTConfig:
    kwargs = {name: copy.deepcopy(getattr(args, name)) for name in (*SETTING_FIELDS, *CARRIED_FIELDS)}
    kwargs.update(
        output_dir=output_dir,
        learning_rate=settings["learning_rate"],
        num_train_epochs=args.ref_init_num_train_epochs,
        max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        run_name=f"{args.run_name}-sft_ref" if args.run_name else None,
        model_init_kwargs=copy.deepcopy(args.model_init_kwargs) if model_is_str else None,
        # The reference is saved once, at the end, by `train_sft_reference`
        save_strategy="no",
        eval_strategy="no",
        push_to_hub=False,
        # Loss on the chosen tokens only: log π(y_w | x)
        completion_only_loss=True,
        packing=False,
        padding_free=False,
    )
    return SFTConfig(**kwargs)


def train_sft_reference(
    model: str | PreTrainedModel,
    train_dataset: Dataset | IterableDataset,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
    args,
    peft_config=None,
) -> str:
    """Fine-tune `model` on the (prompt, chosen) pairs of a preference dataset and save it: the SFT reference.

    π_ref = argmax_π E_{(x, y_w) ~ D}[log π(y_w | x)] (DPO paper, §4), by `trl.SFTTrainer` on prompt-completion rows with
    the loss on the completion tokens only. The SFT stage uses `args.ref_init_*` (learning rate, epochs or steps,
    batch size) and the rest of the DPO run's training arguments (precision, optimizer, scheduler, gradient
    accumulation, devices, logging); it logs under `sft_ref/` and shows its own progress bar.

    Args:
        model (`str` or `PreTrainedModel`): the base model, a path or Hub id (loaded with `args.model_init_kwargs`)
            or a model object, which is trained in place (as any trainer trains the model it is given).
        train_dataset (`Dataset` or `IterableDataset`): preference rows in any format `trl_dpo_ext.DPOTrainer`
            takes (standard or conversational, explicit or implicit prompt, pre-tokenized, one or K rejected).
        processing_class: the tokenizer or processor; `None` loads it from `model`.
        args ([`trl_dpo_ext.DPOConfig`]): the DPO run's configuration.
        peft_config (`peft.PeftConfig`, *optional*): train an adapter instead of all weights. It is merged into the
            base before saving, so the saved reference is a plain model (see `docs/ref_init.md`).

    Returns:
        `str`: the folder of the saved reference, `args.ref_init_output_dir` or `<output_dir>/sft_ref`. A folder
        already made with the same base model, data, tokenizer and SFT settings is reused without training; one made
        with others raises `ValueError`, never reused silently.

    Under `accelerate launch` / `torchrun` every process calls this; they train together (each on its shard of the
    data), the main process saves into a temporary folder renamed into place when complete, and the others wait.
    """
    if train_dataset is None:
        raise ValueError(
            "`ref_init='sft_on_chosen'` fine-tunes on the chosen responses, so it needs a `train_dataset`."
        )
    if not isinstance(model, str) and is_peft_model(model):
        raise NotImplementedError(
            "`ref_init` trains from a base model: pass the base model (and a `peft_config` for LoRA), not a "
            "`PeftModel`, or merge its adapter first (`model.merge_and_unload()`)."
        )
    check_distributed_launch(args)
    state = args.distributed_state  # set up by the arguments, with their backend
    sft_dir = sft_reference_dir(args)
    tmp_dir = f"{sft_dir}.incomplete"
    if processing_class is None:
        processing_class = load_processing_class(model, args)
    if isinstance(train_dataset, IterableDataset) and args.ref_init_max_steps < 0:
        raise ValueError(
            "An `IterableDataset` has no length, so the SFT stage of `ref_init` needs `ref_init_max_steps` > 0; got "
            f"`ref_init_max_steps={args.ref_init_max_steps}`."
        )

    sft_dataset = preference_to_sft_dataset(train_dataset, args.dataset_num_proc, model_vocab_size(model, args))
    tokenized = "input_ids" in (sft_dataset.column_names or next(iter(sft_dataset)))
    settings = sft_settings(args, peft_config, state.num_processes)

    # The main process decides (reuse, train, or fail) and tells the others, so that all take the same branch
    decision: list[Any] = [None]
    identity: dict[str, Any] = {}
    error: Exception | None = None
    if state.is_main_process:
        try:
            max_rows = settings["global_batch_size"] * max(args.ref_init_max_steps, 0)
            identity = {
                "base_model": jsonable(model_identity(model, args)),
                "data": data_fingerprint(sft_dataset, max_rows),
                # Text rows are tokenized by the SFT stage, pre-tokenized rows are not
                "tokenizer_sha256": None if tokenized else tokenizer_identity(processing_class),
                "settings": settings,
            }
            decision[0] = "reuse" if check_saved(sft_dir, identity) else "train"
            if decision[0] == "train" and os.path.exists(tmp_dir):
                shutil.rmtree(tmp_dir)  # left by an interrupted run
        except Exception as exc:  # told to the other processes, which would otherwise wait for the decision
            error, decision[0] = exc, f"error:{type(exc).__name__}: {exc}"
    if state.num_processes > 1:
        broadcast_object_list(decision, from_process=0)
    if error is not None:
        raise error
    if decision[0].startswith("error:"):
        raise RuntimeError(f"The main process could not check the SFT reference: {decision[0][len('error:') :]}")
    if decision[0] == "reuse":
        logger.info(f"Reusing the SFT reference in {sft_dir}: same base model, data and SFT settings (ref_init).")
        return sft_dir

    logger.info(f"Training the SFT reference (ref_init='sft_on_chosen') on the chosen responses; saving to {sft_dir}.")
    sft_args = _sft_config(args, settings, tmp_dir, isinstance(model, str))
    trainer = _SFTReferenceTrainer(
        model=model,
        args=sft_args,
        train_dataset=sft_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_SFTProgressCallback)
    trainer.train()

    if is_peft_model(trainer.model):
        # Merged, so that the saved reference is a plain model: DPO trains a new adapter over it, and the reference
        # is that model with the adapter disabled (no second model in memory)
        if state.is_main_process:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(tmp_dir)
            processing_class.save_pretrained(tmp_dir)
    else:
        trainer.save_model(tmp_dir)  # every process calls it, for sharded models; only the main process writes
    state.wait_for_everyone()  # every shard written before the main process reads them
    if state.is_main_process:
        metadata = {
            "version": METADATA_VERSION,
            "identity": identity,
            "weight_sha256": weight_checksums(tmp_dir),
            "run_id": uuid.uuid4().hex,
            "created": datetime.now(timezone.utc).isoformat(),
            "num_processes": state.num_processes,
            "peft": "merged" if peft_config is not None else None,
            "log_history": jsonable(trainer.state.log_history),
        }
        with open(os.path.join(tmp_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
        # Atomic on one filesystem: a process that looks sees no folder or a complete one, never a half-written one
        os.replace(tmp_dir, sft_dir)
    state.wait_for_everyone()
    # Free the SFT stage's optimizer state (and its model, when loaded from a path) before DPO loads its models
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return sft_dir


def init_from_sft_reference(
    model: str | PreTrainedModel,
    ref_model: PreTrainedModel | None,
    train_dataset: Dataset | IterableDataset | None,
    processing_class,
    args,
    peft_config=None,
    quantization_config=None,
):
    """The `model` and `processing_class` a `DPOTrainer` with `args.ref_init` starts from: the saved SFT reference.

    Returns the folder itself when `model` is a path (TRL then loads it with `model_init_kwargs`), else a fresh model
    loaded from the folder in `model`'s dtype. With `ref_model=None`, TRL then makes the reference from the same
    folder (or disables the adapter of a PEFT policy, or, with `precompute_ref_log_probs`, uses the initial policy
    once), so the reference has exactly the saved weights.
    """
    if ref_model is not None:
        logger.warning(
            f"`ref_init={args.ref_init!r}` is ignored because a `ref_model` was passed; that model is the reference."
        )
        return model, processing_class
    if quantization_config is not None or (args.model_init_kwargs or {}).get("quantization_config") is not None:
        raise NotImplementedError(
            "`ref_init` with a quantized model is not supported: the SFT stage's adapter cannot be merged exactly "
            "into quantized weights. Make the SFT reference without quantization (`trl-dpo-ext sft-ref`), then pass "
            "its folder as `model` with `quantization_config` and `ref_init=None`."
        )
    sft_dir = sft_reference_dir(args)
    if read_metadata(sft_dir) is None:
        # A DPO checkpoint was trained against a reference that is no longer here; a new one would differ from it
        checkpoint = args.resume_from_checkpoint
        if not checkpoint and os.path.isdir(args.output_dir):
            checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint:
            raise ValueError(
                f"The DPO run has a checkpoint ({checkpoint}) but its SFT reference is missing from {sft_dir}. "
                "Training a new reference would resume the policy against another reference than the one it was "
                "trained with. Restore the folder (or point `ref_init_output_dir` at it), or start over in a new "
                "`output_dir`."
            )
    if processing_class is None:
        processing_class = load_processing_class(model, args)
    sft_dir = train_sft_reference(model, train_dataset, processing_class, args, peft_config=peft_config)
    if isinstance(model, str):
        return sft_dir, processing_class
    policy = create_model_from_path(sft_dir, dtype=model.dtype, attn_implementation=attn_implementation(model))
    return policy, processing_class
