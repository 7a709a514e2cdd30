"""SFT-on-chosen reference initialisation (seed § 3.4): π_ref = argmax_π E_{(x, y_w) ~ D}[log π(y_w | x)].

When the model that sampled the preference data (π_SFT) is not available, DPO's reference is made by fine-tuning the
model on the (prompt, chosen) pairs of the preference data, with the loss on the chosen tokens only, and DPO then
starts its policy from that same model. The fine-tuning is `trl.SFTTrainer`'s, on prompt-completion rows.

Make the reference once and reuse it for many DPO runs:

```bash
trl-dpo-ext sft-ref --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prefs.jsonl \
    --output_dir runs/qwen --ref_init_learning_rate 2e-5 --ref_init_num_train_epochs 1
# or, without the CLI:
python -m trl_dpo_ext.ref_init --model_name_or_path ... --dataset_name prefs.jsonl --output_dir runs/qwen
```

The reference is saved in `runs/qwen/sft_ref` (or `--ref_init_output_dir`); pass that folder as `model` (and let DPO
copy it as the reference) or as `ref_model`, or run `DPOTrainer` with `ref_init="sft_on_chosen"` and the same
`output_dir`, which reuses it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import shutil
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path, get_config_model_id, global_then_local_main_first

from .data import (
    TEXT_COLUMNS,
    _is_messages,
    check_scores,
    check_tokenized_row,
    extract_prompt_multi,
    missing_columns,
    rejected_as_list,
)


logger = get_logger(__name__)

METADATA_FILE = "sft_ref_metadata.json"
METADATA_VERSION = 1
LOG_PREFIX = "sft_ref/"
# Columns of a text row that SFTTrainer reads besides the prompt and completion
SFT_EXTRA_COLUMNS = ("tools", "chat_template_kwargs")

# Fields of the DPO run's `TrainingArguments` that the SFT stage keeps. Those in the first group change the trained
# weights, so they are part of the saved reference's identity; the second group (devices, logging) does not.
SETTING_FIELDS = (
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "bf16",
    "fp16",
    "max_length",
    "truncation_mode",
)
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


# ------------------------------------------------------------------------------------------------------------ data


def _check_text_row(example: dict[str, Any], idx: int) -> dict[str, Any]:
    """Validate a text row as the DPO trainer will (so a bad row fails before the SFT stage, not after it), and keep
    the prompt and the chosen as SFTTrainer's prompt-completion pair."""
    for column in ("prompt", *TEXT_COLUMNS):
        if example.get(column) is None:
            raise ValueError(f"Row {idx}, column '{column}': missing value (None).")
    conversational = _is_messages(example["chosen"])
    if not conversational and not isinstance(example["chosen"], str):
        raise ValueError(
            f"Row {idx}, column 'chosen': expected a str or a list of messages, got {type(example['chosen']).__name__}."
        )
    rejected = rejected_as_list(example["rejected"], conversational, idx)
    check_scores(example, len(rejected), idx)
    row = {"prompt": example["prompt"], "completion": example["chosen"]}
    for column in SFT_EXTRA_COLUMNS:
        if column in example:
            row[column] = example[column]
    return row


def _tokenized_sft_row(example: dict[str, Any], idx: int) -> dict[str, Any]:
    """A pre-tokenized row as SFTTrainer's own tokenized format: nothing is re-tokenized, and the loss mask is the
    chosen tokens (`completion_mask`, used because the SFT stage sets `completion_only_loss=True`)."""
    row = check_tokenized_row(example, idx)
    prompt_ids, chosen_ids = row["prompt_ids"], row["chosen_ids"]
    return {"input_ids": prompt_ids + chosen_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(chosen_ids)}


def preference_to_sft_dataset(
    dataset: Dataset | IterableDataset, dataset_num_proc: int | None = None
) -> Dataset | IterableDataset:
    """The SFT rows of a preference dataset: one (prompt, chosen) row per example, whatever its number of rejected.

    Text rows (standard or conversational, explicit or implicit prompt) become `{"prompt", "completion"}` rows that
    `trl.SFTTrainer` tokenizes as it tokenizes any prompt-completion data; pre-tokenized rows (`prompt_ids`,
    `chosen_ids`, `rejected_ids`) become `{"input_ids", "completion_mask"}` rows, used as given. Every row is
    validated as the DPO trainer validates it, rejected included.
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"The training dataset must be a `datasets.Dataset` or `IterableDataset`, got {type(dataset)}."
        )
    first = next(iter(dataset))
    if "image" in first or "images" in first:
        raise NotImplementedError("Vision-language preference data is not supported by `ref_init`.")
    column_names = dataset.column_names or list(first)
    tokenized, missing = missing_columns(column_names)
    if missing:
        raise ValueError(
            f"The preference dataset has no column {missing} (columns: {column_names}). It needs 'chosen' and "
            "'rejected' (text, with an optional 'prompt'), or 'prompt_ids', 'chosen_ids' and 'rejected_ids'."
        )
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither
        map_kwargs = {"num_proc": dataset_num_proc, "desc": "Building the SFT-on-chosen rows of the dataset"}
    with global_then_local_main_first():
        if tokenized:
            return dataset.map(_tokenized_sft_row, with_indices=True, remove_columns=column_names, **map_kwargs)
        if "prompt" not in column_names:
            dataset = dataset.map(extract_prompt_multi, with_indices=True, **map_kwargs)
            column_names = dataset.column_names or list(next(iter(dataset)))
        return dataset.map(_check_text_row, with_indices=True, remove_columns=column_names, **map_kwargs)


# ------------------------------------------------------------------------------------------------------- identity


def _jsonable(value: Any) -> Any:
    """JSON form of the values that appear in settings and configs (enums, sets, dtypes, paths)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))  # enums keep their value, everything else its text


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(value), sort_keys=True).encode()).hexdigest()


def _model_identity(model: str | PreTrainedModel, args) -> dict[str, Any]:
    """What identifies the base model. A path or Hub id is named (with its revision; for a local folder also its
    config and its weight files' sizes); a model object is fingerprinted from its config and a strided sample of every
    tensor, which needs no pass over all the weights and is the same on any device."""
    if isinstance(model, str):
        # A local folder has no revision; on the Hub, no revision means "main"
        revision = (args.model_init_kwargs or {}).get("revision") or "main"
        if os.path.isdir(model):
            model = os.path.abspath(model)  # the same folder, however it is written
        identity: dict[str, Any] = {"name_or_path": model, "revision": None if os.path.isdir(model) else revision}
        if os.path.isdir(model):
            config_file = os.path.join(model, "config.json")
            if os.path.isfile(config_file):
                with open(config_file, "rb") as f:
                    identity["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
            identity["weight_files"] = {
                name: os.path.getsize(os.path.join(model, name))
                for name in sorted(os.listdir(model))
                if name.endswith((".safetensors", ".bin", ".pt"))
            }
        return identity
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(model, "name_or_path", None) or None,
        "config_sha256": _sha256(config),
        "weights_sample_sha256": digest.hexdigest(),
    }


def _tokenizer_identity(processing_class) -> str:
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _sha256([vocab, tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token])


def _data_fingerprint(sft_dataset: Dataset | IterableDataset, max_rows: int | None) -> dict[str, Any]:
    """SHA-256 of the SFT rows, in order: one pass over the data. Of an `IterableDataset`, only the first `max_rows`
    rows are read, the ones the SFT stage's `ref_init_max_steps` consumes."""
    digest = hashlib.sha256()
    num_rows = 0
    rows = sft_dataset if isinstance(sft_dataset, Dataset) else sft_dataset.take(max_rows)
    batches = rows.iter(batch_size=1000)
    for batch in batches:
        digest.update(json.dumps(_jsonable(batch), sort_keys=True, ensure_ascii=False).encode())
        num_rows += len(next(iter(batch.values())))
    return {"sha256": digest.hexdigest(), "num_rows": num_rows}


def sft_reference_dir(args) -> str:
    """Where the SFT reference of a run is saved: `args.ref_init_output_dir`, or `<output_dir>/sft_ref`."""
    path = args.ref_init_output_dir or os.path.join(args.output_dir, "sft_ref")
    return os.path.normpath(os.path.abspath(path))


def _settings(args, peft_config, num_processes: int) -> dict[str, Any]:
    """The SFT settings that change the trained weights (compared when a saved reference is reused)."""
    batch_size = args.ref_init_batch_size or args.per_device_train_batch_size
    settings = {
        "learning_rate": args.ref_init_learning_rate,
        # The number of epochs is unused when a number of steps is given; leave it out so changing it changes nothing
        "num_train_epochs": args.ref_init_num_train_epochs if args.ref_init_max_steps < 0 else None,
        "max_steps": args.ref_init_max_steps,
        "per_device_train_batch_size": batch_size,
        "global_batch_size": batch_size * args.gradient_accumulation_steps * num_processes,
        **{name: getattr(args, name) for name in SETTING_FIELDS},
        "peft_config": peft_config.to_dict() if peft_config is not None else None,
    }
    return _jsonable(settings)


def _differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and key != "peft_config":
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"  {prefix}{key}: saved {str(old)[:200]}, now {str(new)[:200]}")
    return lines


def read_metadata(sft_dir: str) -> dict[str, Any] | None:
    """The metadata of a saved SFT reference, or None when the folder holds none (absent, or not made here)."""
    path = os.path.join(sft_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_saved(sft_dir: str, identity: dict[str, Any]) -> bool:
    """True to reuse the saved reference, False to train one; raise when the folder is not the one asked for."""
    if not os.path.exists(sft_dir):
        return False
    metadata = read_metadata(sft_dir)
    if metadata is None:
        raise ValueError(
            f"`ref_init_output_dir` {sft_dir} exists but has no {METADATA_FILE}, so it is not an SFT reference made "
            "by `ref_init` and is not reused or overwritten. Remove it, or set `ref_init_output_dir` to another "
            "folder. (To use an SFT model of your own as the reference, pass it as `model` and leave `ref_init=None`.)"
        )
    differences = _differences(metadata.get("identity", {}), identity)
    if differences:
        raise ValueError(
            f"The SFT reference saved in {sft_dir} was made with other settings, data or base model than this run's, "
            "so it is not reused:\n" + "\n".join(differences) + "\nRemove the folder to make a new reference (a "
            "DPO run resumed from a checkpoint must keep the reference it started with), or set `ref_init_output_dir`"
            " to another folder."
        )
    return True


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
        self._metrics[mode] = defaultdict(list, {f"{LOG_PREFIX}{k}": v for k, v in self._metrics[mode].items()})
        super().log({f"{LOG_PREFIX}{k}": v for k, v in logs.items()}, start_time)
        self._metrics[mode] = defaultdict(list)


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


def _load_processing_class(model: str | PreTrainedModel, args):
    model_id = model if isinstance(model, str) else get_config_model_id(model.config)
    return AutoProcessor.from_pretrained(
        model_id, revision=(args.model_init_kwargs or {}).get("revision"), trust_remote_code=args.trust_remote_code
    )


def train_sft_reference(
    model: str | PreTrainedModel,
    train_dataset: Dataset | IterableDataset,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
    args,
    peft_config=None,
) -> str:
    """Fine-tune `model` on the (prompt, chosen) pairs of a preference dataset and save it: the SFT reference.

    π_ref = argmax_π E_{(x, y_w) ~ D}[log π(y_w | x)] (seed § 3.4), by `trl.SFTTrainer` on prompt-completion rows with
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
    state = args.distributed_state  # set up by the arguments, with their backend
    sft_dir = sft_reference_dir(args)
    tmp_dir = f"{sft_dir}.incomplete"
    if processing_class is None:
        processing_class = _load_processing_class(model, args)
    if isinstance(train_dataset, IterableDataset) and args.ref_init_max_steps < 0:
        raise ValueError(
            "An `IterableDataset` has no length, so the SFT stage of `ref_init` needs `ref_init_max_steps` > 0; got "
            f"`ref_init_max_steps={args.ref_init_max_steps}`."
        )

    sft_dataset = preference_to_sft_dataset(train_dataset, args.dataset_num_proc)
    tokenized = "input_ids" in (sft_dataset.column_names or next(iter(sft_dataset)))
    settings = _settings(args, peft_config, state.num_processes)

    # The main process decides (reuse, train, or fail) and tells the others, so that all take the same branch
    decision: list[Any] = [None]
    identity: dict[str, Any] = {}
    error: Exception | None = None
    if state.is_main_process:
        try:
            max_rows = settings["global_batch_size"] * max(args.ref_init_max_steps, 0)
            identity = {
                "base_model": _jsonable(_model_identity(model, args)),
                "data": _data_fingerprint(sft_dataset, max_rows),
                # Text rows are tokenized by the SFT stage, pre-tokenized rows are not
                "tokenizer_sha256": None if tokenized else _tokenizer_identity(processing_class),
                "settings": settings,
            }
            decision[0] = "reuse" if _check_saved(sft_dir, identity) else "train"
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
    if state.is_main_process:
        metadata = {
            "version": METADATA_VERSION,
            "identity": identity,
            "run_id": uuid.uuid4().hex,
            "created": datetime.now(timezone.utc).isoformat(),
            "num_processes": state.num_processes,
            "peft": "merged" if peft_config is not None else None,
            "log_history": _jsonable(trainer.state.log_history),
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
        processing_class = _load_processing_class(model, args)
    sft_dir = train_sft_reference(model, train_dataset, processing_class, args, peft_config=peft_config)
    if isinstance(model, str):
        return sft_dir, processing_class
    policy = create_model_from_path(sft_dir, dtype=model.dtype, attn_implementation=model.config._attn_implementation)
    return policy, processing_class


# --------------------------------------------------------------------------------------------------------- command


def load_preference_dataset(name: str, config: str | None = None, split: str = "train") -> Dataset:
    """A preference dataset from a JSON lines file, a folder (`save_to_disk` or data files) or a Hub id."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isfile(name):
        return load_dataset("json", data_files=name, split="train")
    if os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_info.json"))
        or os.path.isfile(os.path.join(name, "dataset_dict.json"))
    ):
        dataset = load_from_disk(name)
        return dataset[split] if isinstance(dataset, DatasetDict) else dataset
    return load_dataset(name, config, split=split)


def make_parser(subparsers=None):
    """The parser of `trl-dpo-ext sft-ref`: `ScriptArguments` (dataset), `DPOConfig` (with `ref_init_*`), and
    `ModelConfig` (model and LoRA)."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import DPOConfig

    dataclass_types = (ScriptArguments, DPOConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser(
            "sft-ref", help="Make the SFT-on-chosen reference of a preference dataset", dataclass_types=dataclass_types
        )
    return TrlParser(dataclass_types)


def main(argv: list[str] | None = None) -> str:
    """`trl-dpo-ext sft-ref`: make the SFT reference of a preference dataset, save it, and print its folder."""
    from trl import get_peft_config

    script_args, args, model_args = make_parser().parse_args_and_config(args=argv)
    if not model_args.model_name_or_path:
        raise ValueError("`--model_name_or_path` is required: the base model to fine-tune on the chosen responses.")
    if not script_args.dataset_name:
        raise ValueError("`--dataset_name` is required: a JSON lines file, a dataset folder or a Hub dataset id.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise NotImplementedError(
            "The SFT reference is made without quantization; drop --load_in_4bit/--load_in_8bit."
        )
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
    }
    model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}
    args.model_init_kwargs = {**model_init_kwargs, **(args.model_init_kwargs or {})}
    dataset = load_preference_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
    )
    sft_dir = train_sft_reference(
        model_args.model_name_or_path, dataset, None, args, peft_config=get_peft_config(model_args)
    )
    if args.distributed_state.is_main_process:
        print(sft_dir)
    return sft_dir


if __name__ == "__main__":
    main()
