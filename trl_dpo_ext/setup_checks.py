"""Checks of a run's setup, before any work: what would otherwise fail after the first step, or deep inside TRL with a
message that does not say what to do (the rows themselves are checked in `rows.py`)."""

from __future__ import annotations

import os
from typing import Any

from ._trl_compat import get_config_model_id


def check_output_dir(output_dir: str) -> None:
    """`output_dir` is a folder this process can write in, or can be made in one. The Trainer first writes there
    after its first step (a checkpoint, the model card), which would lose that work."""
    path = existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"`output_dir` {output_dir!r} cannot be made: {existing} is a file, not a folder. Set `output_dir` to a "
            "folder you can write in."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == path else f"would be made in {existing}, which is"
        raise ValueError(
            f"`output_dir` {output_dir!r} {where} not writable: the run could save neither its checkpoints nor its "
            "model. Set `output_dir` to a folder you can write in."
        )


def check_reference_source(model: Any, ref_model: Any, args: Any, peft_config: Any) -> None:
    """With no `ref_model`, TRL loads the reference by the name of the model; a model object built from a config has
    none, and TRL then fails with an `OSError` about an empty repo id."""
    if ref_model is not None or isinstance(model, str) or peft_config is not None or hasattr(model, "peft_config"):
        return
    if args.precompute_ref_log_probs and not args.fsdp:  # TRL loads no reference model then
        return
    if get_config_model_id(model.config):
        return
    raise ValueError(
        f"The model ({type(model).__name__}) has no name or path (built from a config?) and no `ref_model` is given, "
        "so the reference model cannot be loaded by its name. Pass `ref_model` (a copy made before training, e.g. "
        "`copy.deepcopy(model)`), use `ref_init='sft_on_chosen'` (which saves the reference it makes), or save the "
        "model (`model.save_pretrained(folder)`) and pass the folder as `model`."
    )
