"""trl-dpo-ext: a drop-in `trl.DPOTrainer` for preference data with one chosen and many rejected responses."""

from .config import DPOConfig
from .data import DataCollatorForMultiRejectedPreference
from .trainer import DPOTrainer


__version__ = "0.1.0"

__all__ = ["DPOConfig", "DPOTrainer", "DataCollatorForMultiRejectedPreference", "__version__"]
