"""trl-dpo-ext: a drop-in `trl.DPOTrainer` for preference data with one chosen and many rejected responses."""

from .collator import DataCollatorForMultiRejectedPreference
from .config import DPOConfig
from .ref_init import train_sft_reference
from .trainer import DPOTrainer
from .vision import DataCollatorForMultiRejectedVisionPreference


__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "DataCollatorForMultiRejectedPreference",
    "DataCollatorForMultiRejectedVisionPreference",
    "train_sft_reference",
    "__version__",
]
