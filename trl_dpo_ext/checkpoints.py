"""Resuming from the last checkpoint whose save completed.

`transformers.Trainer` writes a checkpoint in place: the weights, then the optimizer, scheduler and RNG states, and
`trainer_state.json` last. A run killed during a save leaves a `checkpoint-N` folder without (or with a truncated)
`trainer_state.json`, which `resume_from_checkpoint=True` would pick, being the highest number, and fail on (or load
its new weights with the old optimizer). Here such a folder is skipped with a warning; it is overwritten when the
resumed run saves step N again.
"""

from __future__ import annotations

import json
import logging
import os
import re

from ._trl_compat import PREFIX_CHECKPOINT_DIR, TRAINER_STATE_NAME


logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str) -> bool:
    """Whether a checkpoint folder's save ran to its end: its `trainer_state.json` is there and whole."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, highest N first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | bool | None:
    """The checkpoint `Trainer.train` resumes from: for `True`, the last complete one (incomplete ones after it are
    skipped with a warning); a path is kept if complete. Raises when the only checkpoints, or the one named, are
    incomplete; `None`/`False`, or no checkpoint at all, are passed on to transformers unchanged."""
    if isinstance(resume_from_checkpoint, str):
        if os.path.isdir(resume_from_checkpoint) and not is_complete_checkpoint(resume_from_checkpoint):
            complete = [path for path in checkpoints(output_dir) if is_complete_checkpoint(path)]
            other = f" The last complete one in `output_dir` is {complete[0]}." if complete else ""
            raise ValueError(
                f"The checkpoint {resume_from_checkpoint} is incomplete (no readable {TRAINER_STATE_NAME}): its save "
                f"was interrupted.{other} Resume from a complete checkpoint, or with `resume_from_checkpoint=True`."
            )
        return resume_from_checkpoint
    if resume_from_checkpoint is not True:
        return resume_from_checkpoint
    found = checkpoints(output_dir)
    incomplete = []
    for path in found:
        if is_complete_checkpoint(path):
            if incomplete:
                logger.warning(
                    f"Skipping {', '.join(incomplete)}: incomplete (no readable {TRAINER_STATE_NAME}), left by an "
                    f"interrupted save. Resuming from {path}; the skipped step is saved again when reached."
                )
            return path
        incomplete.append(path)
    if incomplete:
        raise ValueError(
            f"No complete checkpoint in {output_dir}: {', '.join(incomplete)} were left incomplete by an interrupted "
            f"save (no readable {TRAINER_STATE_NAME}). Remove them and train from the start."
        )
    return True  # transformers says that there is no checkpoint
