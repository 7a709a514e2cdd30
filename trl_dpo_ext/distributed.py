"""What the processes of one run share: an in-memory dataset made readable by all of them, for the precompute pass."""

from __future__ import annotations

import os
import uuid

from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset
from datasets.fingerprint import get_temporary_cache_files_directory


def share_in_memory_dataset(dataset: Dataset, accelerator) -> Dataset:
    """`dataset` itself, or, when it lives in memory and several processes run, the same rows from one Arrow file.

    TRL's precompute pass (`DPOTrainer._precompute_ref_logps`) has each process compute its shard, gathers the
    reference log-probs on every process, has the main process write them next to the dataset's cache files, and
    every process read them back from there. An in-memory dataset (`Dataset.from_list`) has no cache files, so each
    process looks in its own temporary folder and all but the main one fail (`FileNotFoundError`). Here the main
    process writes the rows once to an Arrow file in its temporary cache folder and sends the path to the others
    (accelerate's `broadcast_object_list`); from that file-backed copy, TRL's cache lands where every process reads it.
    The rows, their order and the computation are unchanged.
    """
    if dataset.cache_files or accelerator.num_processes == 1:
        return dataset
    path = [None]
    if accelerator.is_main_process:
        path = [os.path.join(get_temporary_cache_files_directory(), f"trl_dpo_ext-{uuid.uuid4().hex}.arrow")]
        dataset.flatten_indices(cache_file_name=path[0])  # writes the rows (in their current order) to the file
    path = broadcast_object_list(path, from_process=0)[0]
    accelerator.wait_for_everyone()
    # Every process checks, and they all fail together rather than leave the others waiting in a collective
    visible = gather_object([os.path.isfile(path)])
    if not all(visible):
        raise ValueError(
            f"`precompute_ref_log_probs=True` with an in-memory dataset on several machines: the processes of "
            f"{visible.count(False)} of {len(visible)} ranks cannot read {path}, written by the main process. Save the "
            "dataset to a filesystem every machine shares (`save_to_disk`, or JSON lines) and load it from there."
        )
    return Dataset.from_file(path)
