"""A few K-rejected DPO steps on a tiny model, per setting; the main process saves the losses and final weights.

The same script on one process or on several, with no code change (`tests/test_multiprocess.py` runs both):

```bash
python tests/scripts/multiprocess_dpo.py rows.jsonl out_1x4 --per_device_train_batch_size 4
torchrun --standalone --nproc_per_node 2 tests/scripts/multiprocess_dpo.py rows.jsonl out_2x2 \
    --per_device_train_batch_size 2
```

Each setting of `SETTINGS` trains a fresh model in `<out>/<setting>/` and saves `<out>/<setting>.pt`. The rows are
read from a JSON-lines file, as `trl-dpo-ext dpo` reads them: precomputed reference log-probs are cached next to the
dataset's own cache files, which every process must see (`datasets` keeps the cache of an in-memory dataset in a
per-process temporary folder, where the other processes cannot find it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from datasets import load_dataset

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.quickstart import char_tokenizer, tiny_causal_lm


# name -> DPOConfig fields of the setting (the K-rejected "mean" loss in all of them)
SETTINGS = {
    "precompute_ref": {"precompute_ref_log_probs": True},
    "sft_ref_init": {
        "precompute_ref_log_probs": True,
        "ref_init": "sft_on_chosen",
        "ref_init_max_steps": 2,
        "ref_init_learning_rate": 1e-2,
    },
}


def tiny_model(vocab_size: int):
    return tiny_causal_lm(vocab_size, seed=0, hidden_size=32, num_hidden_layers=1)


def train(data: str, out: str, setting: str, batch_size: int, max_steps: int) -> None:
    tokenizer = char_tokenizer(chat_template=None)
    dataset = load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(out, "hf_cache"))
    config = DPOConfig(
        output_dir=os.path.join(out, setting),  # shared by the processes: the SFT reference is saved there
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=1e-2,  # large, so that a few steps move the weights far beyond float32 noise
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **SETTINGS[setting],
    )
    # A fresh model from the seeded config (the reference comes from it: precomputed, never a copy of the policy)
    trainer = DPOTrainer(
        model=tiny_model(len(tokenizer)), args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    logs = trainer.state.log_history
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save(
            {
                "losses": [log["loss"] for log in logs if "loss" in log],
                "accuracies": [log["rewards/accuracies"] for log in logs if "rewards/accuracies" in log],
                "sft_losses": [log["sft_ref/loss"] for log in _sft_logs(config) if "sft_ref/loss" in log],
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "world_size": trainer.accelerator.num_processes,
            },
            os.path.join(out, f"{setting}.pt"),
        )
    trainer.accelerator.wait_for_everyone()


def _sft_logs(config: DPOConfig) -> list[dict]:
    """The SFT stage's logs, from the metadata saved with the reference (none without `ref_init`)."""
    if config.ref_init is None:
        return []
    from trl_dpo_ext.ref_identity import read_metadata, sft_reference_dir

    return (read_metadata(sft_reference_dir(config)) or {}).get("log_history", [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", help="JSON lines of {'prompt', 'chosen', 'rejected': [...]}")
    parser.add_argument("out", help="folder for the runs and the saved results")
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for setting in args.settings.split(","):
        train(args.data, args.out, setting, args.per_device_train_batch_size, args.max_steps)


if __name__ == "__main__":
    main(sys.argv[1:])
