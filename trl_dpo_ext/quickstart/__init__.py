"""The embedded main job: an offline preference task with a computed reward, a toy tokenizer and tiny models.

- `task.py`: `SortDigitsTask`, the quickstart's task (prompts, ground-truth `reward`, best-of-n preference rows).
- `toy.py`: `char_tokenizer`, `tiny_causal_lm`, `flipped_preference_rows` and `cpu_training_args`, built offline.
- `demo.py`: `run(QuickstartConfig(...))`, SFT-on-chosen then K-rejected DPO, and its before/after table.
"""

from .demo import (
    QuickstartConfig,
    completion_logps,
    format_table,
    greedy_completions,
    greedy_reward,
    implicit_reward_accuracy,
    main,
    run,
)
from .task import SortDigitsTask
from .toy import char_tokenizer, cpu_training_args, flipped_preference_rows, tiny_causal_lm


__all__ = [
    "QuickstartConfig",
    "SortDigitsTask",
    "char_tokenizer",
    "completion_logps",
    "cpu_training_args",
    "flipped_preference_rows",
    "format_table",
    "greedy_completions",
    "greedy_reward",
    "implicit_reward_accuracy",
    "main",
    "run",
    "tiny_causal_lm",
]
