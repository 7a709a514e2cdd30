"""What defines a training run, saved with each checkpoint and compared when a run resumes from one.

A run resumed after its loss (`rejected_reduction`, `beta`, the loss types, ...) or its training data (K included)
changed would go on as another run, in silence: its curves and its gradient-weight record would mix the two. Each
checkpoint therefore holds `run_identity.json`: the `LossSpec`, the numbers of rejected of the training rows and the
rows' fingerprint (as the SFT reference's, `ref_identity.data_fingerprint`). `train(resume_from_checkpoint=...)`
compares it with the run's before any step: a difference is an error naming the field, its saved and its new value,
unless `resume_allow_changes=True`, which logs the differences and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback

from ._trl_compat import PREFIX_CHECKPOINT_DIR
from .ref_identity import _differences, data_fingerprint, jsonable


logger = logging.getLogger(__name__)

RUN_IDENTITY_FILE = "run_identity.json"
# The prepared columns that define the training rows (images are left out: their text form is not stable)
DATA_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "scores", "prompt", "chosen", "rejected")


def run_identity(loss_spec: Any, train_dataset: Any, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The loss spec, the hard-negative selection (when there is one), and, of a `Dataset` (an `IterableDataset` is
    not read twice), its numbers of rejected and the fingerprint of its rows."""
    identity: dict[str, Any] = {"loss_spec": jsonable(dataclasses.asdict(loss_spec))}
    if selection is not None:
        identity["selection"] = selection
    if isinstance(train_dataset, Dataset):
        if "num_rejected" in train_dataset.column_names:
            identity["num_rejected"] = sorted(set(train_dataset["num_rejected"]))
        columns = [c for c in DATA_COLUMNS if c in train_dataset.column_names]
        identity["train_dataset"] = data_fingerprint(train_dataset.select_columns(columns), None)
    return identity


def check_resume(checkpoint: str, identity: dict[str, Any], allow_changes: bool) -> None:
    """Raise when the checkpoint was saved by a run with another loss or other data, unless `allow_changes`."""
    path = os.path.join(checkpoint, RUN_IDENTITY_FILE)
    if not os.path.isfile(path):
        logger.warning(
            f"The checkpoint {checkpoint} has no {RUN_IDENTITY_FILE} (saved by an earlier version): whether the loss "
            "or the data changed since is not checked."
        )
        return
    with open(path, encoding="utf-8") as f:
        differences = _differences(json.load(f), identity)
    if not differences:
        return
    if allow_changes:
        logger.warning(
            f"Resuming from {checkpoint} with changes (`resume_allow_changes=True`):\n" + "\n".join(differences)
        )
        return
    raise ValueError(
        f"The checkpoint {checkpoint} was saved by a run with another loss or other training data than this one:\n"
        + "\n".join(differences)
        + "\nResume with the settings and data it was saved with, or set `resume_allow_changes=True` "
        "(`--resume_allow_changes true`) to go on with the new ones (logs and the gradient-weight record then mix "
        "both)."
    )


class RunIdentityCallback(TrainerCallback):
    """Writes the run's identity into each checkpoint (a callback rather than an override of the Trainer's private
    `_save_checkpoint`: `on_save` runs right after it, once the folder is whole)."""

    def __init__(self) -> None:
        self.identity: dict[str, Any] | None = None

    def start(self, resume_from_checkpoint: Any, loss_spec: Any, train_dataset: Any, args: Any) -> None:
        """At the start of `train`: the run's identity, checked against the checkpoint resumed from (a path)."""
        selection = None
        if args.rejected_selection != "all":  # which pairs train changes the objective too
            selection = {"rejected_selection": args.rejected_selection, "num_selected": args.num_selected}
        self.identity = run_identity(loss_spec, train_dataset, selection)
        if isinstance(resume_from_checkpoint, str):
            check_resume(resume_from_checkpoint, self.identity, args.resume_allow_changes)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.identity is not None and state.is_world_process_zero and os.path.isdir(folder):
            with open(os.path.join(folder, RUN_IDENTITY_FILE), "w", encoding="utf-8") as f:
                json.dump(self.identity, f, indent=2, sort_keys=True)
