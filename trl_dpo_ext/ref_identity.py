"""The identity of a saved SFT reference: what it was made from, and whether a saved one may be reused.

`ref_init` saves the reference with `sft_ref_metadata.json`, which records the base model, the data, the tokenizer
and the SFT settings. A later run reuses the folder only when all of them match, and fails (listing what differs)
otherwise: a DPO run resumed from a checkpoint must keep the reference it started with. The metadata also holds the
SHA-256 of each weight file, checked before a reused reference is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, ProcessorMixin


logger = logging.getLogger(__name__)

METADATA_FILE = "sft_ref_metadata.json"
# 2: with the SHA-256 of each weight file (`weight_sha256`)
METADATA_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")

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


def jsonable(value: Any) -> Any:
    """JSON form of the values that appear in settings and configs (enums, sets, dtypes, paths)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))  # enums keep their value, everything else its text


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(value), sort_keys=True).encode()).hexdigest()


def model_identity(model: str | PreTrainedModel, args) -> dict[str, Any]:
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
                if name.endswith(WEIGHT_SUFFIXES)
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


def tokenizer_identity(processing_class) -> str:
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _sha256([vocab, tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token])


def data_fingerprint(sft_dataset: Dataset | IterableDataset, max_rows: int | None) -> dict[str, Any]:
    """SHA-256 of the SFT rows, in order: one pass over the data. Of an `IterableDataset`, only the first `max_rows`
    rows are read, the ones the SFT stage's `ref_init_max_steps` consumes."""
    digest = hashlib.sha256()
    num_rows = 0
    rows = sft_dataset if isinstance(sft_dataset, Dataset) else sft_dataset.take(max_rows)
    batches = rows.iter(batch_size=1000)
    for batch in batches:
        digest.update(json.dumps(jsonable(batch), sort_keys=True, ensure_ascii=False).encode())
        num_rows += len(next(iter(batch.values())))
    return {"sha256": digest.hexdigest(), "num_rows": num_rows}


def sft_reference_dir(args) -> str:
    """Where the SFT reference of a run is saved: `args.ref_init_output_dir`, or `<output_dir>/sft_ref`."""
    path = args.ref_init_output_dir or os.path.join(args.output_dir, "sft_ref")
    return os.path.normpath(os.path.abspath(path))


def sft_settings(args, peft_config, num_processes: int) -> dict[str, Any]:
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
    return jsonable(settings)


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


def check_saved(sft_dir: str, identity: dict[str, Any]) -> bool:
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
    _verify_weights(sft_dir, metadata)
    return True


def weight_checksums(folder: str) -> dict[str, str]:
    """SHA-256 of every weight file of a saved model folder, by file name."""
    checksums = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(WEIGHT_SUFFIXES):
            digest = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            checksums[name] = digest.hexdigest()
    return checksums


def _verify_weights(sft_dir: str, metadata: dict[str, Any]) -> None:
    """The weight files of a saved reference are those written with it: an error, before anything loads them, when
    one was changed, truncated or removed since."""
    advice = (
        f"Remove the folder ({sft_dir}) to make the reference again (a DPO run resumed from a checkpoint must keep "
        "the reference it started with)."
    )
    for name in sorted(os.listdir(sft_dir)):
        if name.endswith(".safetensors"):
            try:  # reads the header and checks that the file holds every tensor it lists
                with safe_open(os.path.join(sft_dir, name), framework="pt"):
                    pass
            except SafetensorError as error:
                message = f"The SFT reference's weight file {name} in {sft_dir} is damaged ({error}). {advice}"
                raise ValueError(message) from error
    expected = metadata.get("weight_sha256")
    if expected is None:
        logger.warning(
            f"The SFT reference in {sft_dir} was saved without weight checksums (metadata version "
            f"{metadata.get('version')}), so its weights are not verified."
        )
        return
    actual = weight_checksums(sft_dir)
    changed = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    if changed:
        raise ValueError(
            f"The weight files {changed} of the SFT reference in {sft_dir} differ from those written with it (their "
            f"SHA-256 in {METADATA_FILE} does not match, or the file is missing or new): the folder was modified or "
            f"damaged. {advice}"
        )
