"""Every TRL and transformers internal that trl_dpo_ext relies on, in one place.

TRL's `DPOTrainer` is not built to be extended for several rejected per row, so the package overrides a few of its
private methods and reads a few private attributes. They all go through this module, each with a line on what it
relies on, so that a new TRL release is checked here and in `tests/test_trl_compat.py` (which asserts that every item
below still exists), not across the package. `docs/compatibility.md` lists the same surface.

At import, a TRL version outside `TESTED_TRL_VERSIONS` gives one warning naming the tested versions.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import trl
from packaging.version import Version

# - `DataCollatorMixin`: the base of transformers' (and TRL's) collators, dispatching `__call__` to `torch_call`.
from transformers.data.data_collator import DataCollatorMixin  # noqa: F401

# transformers internals of the packed forward (`trl_dpo_ext.packing`):
# - `sdpa_attention_forward(module, q, k, v, mask, dropout, scaling, **kw)`: transformers' SDPA attention function,
#   which the registered segment-wise SDPA runs on every ordinary (unpacked) forward.
# - `sdpa_mask`: SDPA's mask builder, registered for that implementation so that ordinary forwards get SDPA's masks.
# - Relied on, not imported: a model's extra forward keyword arguments reach its attention function (`**kwargs`, as
#   `cu_seq_lens_q` does); `create_causal_mask` uses a 4D mask (tensor or `BlockMask`) as given, and, given no mask
#   and no cache, finds sequences packed in a row from `position_ids` restarting at 0 (`find_packed_sequence_indices`),
#   which serves `padding_free` without prefix sharing.
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402, F401
from transformers.masking_utils import sdpa_mask  # noqa: E402, F401

# - `TRAINER_STATE_NAME` ("trainer_state.json"): the file `transformers.Trainer._save_checkpoint` writes last, after the
#   weights and the optimizer, scheduler and RNG states; a checkpoint holding it whole is complete (`checkpoints.py`).
from transformers.trainer import TRAINER_STATE_NAME  # noqa: F401

# - `PREFIX_CHECKPOINT_DIR` ("checkpoint"): the prefix of the `checkpoint-N` folders `transformers.Trainer` saves.
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: F401

# `trl dpo`'s resolver: `resolve_accelerate_config_argument(args)` turns `--accelerate_config NAME|PATH` into
# `--config_file PATH`, NAME being a file of `ACCELERATE_CONFIGS_PACKAGE` (used by `launch.py`).
from trl.cli.accelerate_config import resolve_accelerate_config_argument  # noqa: F401

# Helpers of TRL that are not in its top-level API:
# - `_tokenize(processing_class, text_or_messages, **kw)` -> {"input_ids": ...}: tokenizes plain text, or applies the
#   chat template to messages, exactly as TRL's own dataset preparation does.
# - `common_prefix_length(a, b)`: TRL's rule for where the completion starts after the tokenized prompt.
from trl.data_utils import _tokenize as tokenize  # noqa: F401
from trl.data_utils import common_prefix_length  # noqa: F401

# - `disable_gradient_checkpointing(model, kwargs)`: a context manager TRL uses around its reference forward. It calls
#   `is_gradient_checkpointing`, `gradient_checkpointing_disable`/`_enable`, which transformers 5.25 deprecates for
#   `activation_checkpointing*` (a FutureWarning each, every step): those three, by message, are silenced around it.
from trl.models.utils import disable_gradient_checkpointing as _trl_disable_gradient_checkpointing

# - `pad(tensors, padding_value, padding_side, pad_to_multiple_of)`: TRL's collator padding.
# - `get_config_model_id(config)`: the model id TRL names a default output folder and processor after.
# - `global_then_local_main_first()`: the context TRL's dataset preparation runs in across processes.
# - `use_adapter(model, adapter_name)`: TRL's switch to the "ref" adapter (or none) of a PEFT policy.
# - `create_model_from_path(path, **kwargs)`: how TRL loads a model from a path with `model_init_kwargs`.
# - Relied on, not imported: TRL's fused LM head (`add_fused_lm_head`, installed by `trl.DPOTrainer`). With
#   `fused_lm_head=True` the patched forward runs the backbone `model.base_model`, projects its
#   `last_hidden_state[:, :-1]` against `labels[:, 1:]` and masks −100; only the label shapes must agree with the
#   hidden states, which lets `scored_positions.py` hand it the scored positions alone (a hook on the backbone).
#   `tests/test_scored_positions.py` compares the two on every output and gradient.
from trl.trainer.utils import (  # noqa: F401
    create_model_from_path,
    get_config_model_id,
    global_then_local_main_first,
    pad,
    use_adapter,
)


_CHECKPOINTING_DEPRECATION = r"`(is_gradient_checkpointing|gradient_checkpointing_(disable|enable))` is deprecated"


@contextmanager
def disable_gradient_checkpointing(model, gradient_checkpointing_kwargs: dict | None = None) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CHECKPOINTING_DEPRECATION, category=FutureWarning)
        with _trl_disable_gradient_checkpointing(model, gradient_checkpointing_kwargs):
            yield


# The package data of `trl dpo --accelerate_config NAME`: one `<NAME>.yaml` per packaged accelerate config
ACCELERATE_CONFIGS_PACKAGE = "trl.accelerate_configs"

# Class attributes of TRL's trainers that `create_model_card` reads (the method's name, its paper's title, id and
# BibTeX, the tags); `trl_dpo_ext.DPOTrainer` gives `_name` and `_paper` as properties of its `rejected_reduction`
MODEL_CARD_ATTRIBUTES = ("_name", "_paper", "_tag_names")

# Relied on, not imported: TRL 1.16's `DPOTrainer.__init__` sets `self.padding_free = False`, with a warning through
# the `trl.trainer.dpo_trainer` logger, when `args.padding_free` is True ("temporarily unavailable after a refactor");
# it reads the field nowhere else. `trl_dpo_ext.DPOTrainer` implements it and drops that one warning
# (`trl_padding_free_warning_silenced`).
TRL_PADDING_FREE_WARNING = "`padding_free=True` is temporarily unavailable"

# The TRL versions the test suite has passed with (pyproject.toml pins the range `trl>=1.16,<2`)
TESTED_TRL_VERSIONS = ("1.16",)

# Private methods of `trl.DPOTrainer` that `trl_dpo_ext.DPOTrainer` overrides, and why (one line each):
OVERRIDDEN_DPO_METHODS = {
    "_prepare_dataset": "TRL's tokenizes exactly one rejected string per row, inside a closure.",
    "_precompute_ref_logps": "a wrapper: reuse given reference columns, pad K to the dataset's largest, check NaN.",
    "_compute_loss": "TRL's splits every batch into exactly two halves [chosen; rejected].",
    "_set_signature_columns_if_needed": "keep the `scores` and `dataset_index` columns the collator reads.",
    "compute_ref_log_probs": "public, but TRL's also splits the batch into two halves.",
}

# Attributes that `trl.DPOTrainer.__init__` sets and the overrides read (besides `transformers.Trainer`'s public ones)
DPO_INIT_ATTRIBUTES = ("ref_model", "precompute_ref_logps", "aux_loss_enabled", "router_aux_loss_coef")

# Private attributes of TRL's trainers that are read or written:
# - `trainer._metrics[mode][key]`: a list per metric, averaged by TRL's `log()` (DPOTrainer and SFTTrainer).
# - `trainer._total_train_tokens`, `trainer._tp_size`: DPOTrainer's running `num_tokens` count.
# - `trainer._tokenizer`: the tokenizer of the processing class (TRL sets it in `__init__`).
# - `trainer._signature_columns`: the columns `remove_unused_columns` keeps (transformers.Trainer).
# - `config._attn_implementation`: the attention implementation a model was loaded with (transformers).
PRIVATE_TRAINER_ATTRIBUTES = ("_metrics", "_total_train_tokens", "_tp_size", "_tokenizer")


def metrics_of(trainer, mode: str) -> dict[str, list[float]]:
    """TRL's per-mode metric store: `log()` averages each list and clears it."""
    return trainer._metrics[mode]


def prefix_metrics(trainer, mode: str, prefix: str) -> None:
    """Rename every metric of `mode` to `prefix + key` (the SFT stage logs under `sft_ref/`)."""
    trainer._metrics[mode] = defaultdict(list, {f"{prefix}{k}": v for k, v in trainer._metrics[mode].items()})


def clear_metrics(trainer, mode: str) -> None:
    trainer._metrics[mode] = defaultdict(list)


def add_train_tokens(trainer, num_tokens: int) -> int:
    """Add the tokens of one step (summed over processes) to TRL's running count, as TRL does; returns the total."""
    trainer._total_train_tokens += num_tokens // trainer._tp_size
    return trainer._total_train_tokens


def total_train_tokens(trainer) -> int:
    return trainer._total_train_tokens


def tokenizer_of(trainer):
    return trainer._tokenizer


def extend_signature_columns(trainer, columns: list[str]) -> None:
    """Add `columns` to those `remove_unused_columns` keeps (once: transformers calls the setter per dataloader)."""
    trainer._signature_columns = [
        *trainer._signature_columns,
        *(c for c in columns if c not in trainer._signature_columns),
    ]


def attn_implementation(model_or_config) -> str | None:
    """The attention implementation a model (or a model config) runs with: `"sdpa"`, `"eager"`, `"flex_attention"`."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "_attn_implementation", None)


def multimodal_rope_index(model):
    """`get_rope_index` of a model whose tokens have 3D (multimodal) RoPE positions, or None.

    transformers' Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) has it on the inner `model` (a public method, but one that
    only that family has): `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=..., attention_mask=...)`
    returns the [3, B, L] positions the model itself computes when none are given. A PEFT model is looked through.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "model", None), "get_rope_index", None)


@contextlib.contextmanager
def trl_padding_free_warning_silenced():
    """Drop TRL's warning that it turns `padding_free` off (`TRL_PADDING_FREE_WARNING`), and only that one."""

    def keep(record: logging.LogRecord) -> bool:
        return TRL_PADDING_FREE_WARNING not in record.getMessage()  # accelerate prefixes "[RANK i] "

    trl_logger = logging.getLogger("trl.trainer.dpo_trainer")
    trl_logger.addFilter(keep)
    try:
        yield
    finally:
        trl_logger.removeFilter(keep)


def check_trl_version(version: str | None = None) -> bool:
    """Warn once if the installed TRL is not one of `TESTED_TRL_VERSIONS`; returns whether it is."""
    version = trl.__version__ if version is None else version
    release = Version(version).release
    tested = any(release[:2] == Version(v).release[:2] for v in TESTED_TRL_VERSIONS)
    if not tested:
        warnings.warn(
            f"trl_dpo_ext overrides private methods of trl.DPOTrainer and was tested with TRL "
            f"{', '.join(v + '.x' for v in TESTED_TRL_VERSIONS)}; TRL {version} is installed. If training fails or "
            "its numbers look wrong, install a tested version (see docs/compatibility.md).",
            stacklevel=2,
        )
    return tested


def missing_surface() -> list[str]:
    """The items of the surface above that the installed TRL lacks (class-level checks; an empty list is healthy)."""
    missing = [name for name in (*OVERRIDDEN_DPO_METHODS, *MODEL_CARD_ATTRIBUTES) if not hasattr(trl.DPOTrainer, name)]
    return [f"trl.DPOTrainer.{name}" for name in missing]


check_trl_version()
