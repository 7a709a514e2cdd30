"""trl-dpo-ext: a drop-in `trl.DPOTrainer` for preference data with one chosen and many rejected responses."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .collator import DataCollatorForMultiRejectedPreference
    from .config import DPOConfig
    from .ref_init import train_sft_reference
    from .trainer import DPOTrainer
    from .vision import DataCollatorForMultiRejectedVisionPreference


__version__ = "0.1.0"

# Public name -> module that defines it. Loaded on first access (as peft's optional back-ends are), so that
# `trl-dpo-ext --help` and `trl-dpo-ext env` start without importing torch, transformers and TRL.
_LAZY = {
    "DPOConfig": ".config",
    "DPOTrainer": ".trainer",
    "DataCollatorForMultiRejectedPreference": ".collator",
    "DataCollatorForMultiRejectedVisionPreference": ".vision",
    "train_sft_reference": ".ref_init",
}

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "DataCollatorForMultiRejectedPreference",
    "DataCollatorForMultiRejectedVisionPreference",
    "train_sft_reference",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
