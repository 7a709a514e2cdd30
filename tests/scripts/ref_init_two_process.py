"""Two processes make one SFT reference and both load it: run by `tests/test_ref_init.py`.

    HF_HUB_OFFLINE=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/scripts/ref_init_two_process.py OUTPUT_DIR

Each rank writes `OUTPUT_DIR/rank{r}.json`: how many times it ran the SFT stage's `train()` for a first and a second
`DPOTrainer` with the same settings, and a hash of the reference and policy weights each trainer holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import torch
from datasets import Dataset


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from _rows import addition_rows  # noqa: E402  (this script's folder is on sys.path)

from trl_dpo_ext import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    ref_init,  # noqa: E402
)
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm  # noqa: E402


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(output_dir: str) -> None:
    sft_calls = []
    original_train = ref_init._SFTReferenceTrainer.train

    def counted_train(self, *args, **kwargs):
        sft_calls.append(len(self.get_train_dataloader()))  # batches this rank gets: its shard
        return original_train(self, *args, **kwargs)

    ref_init._SFTReferenceTrainer.train = counted_train

    tokenizer = char_tokenizer()
    rows = addition_rows()
    args = DPOConfig(
        **cpu_training_args(
            output_dir,
            use_cpu=True,
            ddp_backend="gloo",
            per_device_train_batch_size=4,
            max_steps=1,
            ref_init="sft_on_chosen",
            ref_init_num_train_epochs=1,
            ref_init_learning_rate=1e-3,
        )
    )
    result = {"rank": args.process_index, "world_size": args.world_size}
    for run in ("first", "second"):
        calls_before = len(sft_calls)
        trainer = DPOTrainer(
            model=tiny_causal_lm(len(tokenizer)),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        result[run] = {
            "sft_train_calls": len(sft_calls) - calls_before,
            "sft_batches_on_this_rank": sft_calls[calls_before:],
            "ref_hash": weights_hash(trainer.accelerator.unwrap_model(trainer.ref_model).state_dict()),
            "policy_hash": weights_hash(trainer.model.state_dict()),
        }
    with open(os.path.join(output_dir, f"rank{args.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
