"""A small DPO run with `ref_init="sft_on_chosen"` and checkpoints, that kills itself (SIGKILL) at a chosen point:
run by `tests/test_faults.py`.

    HF_HUB_OFFLINE=1 KILL_AT=sft_saved python tests/scripts/fault_run.py OUTPUT_DIR

`KILL_AT` names where the process kills itself, deterministically (no timing):

- `sft_saved`: the SFT stage has written its weights into `sft_ref.incomplete`, before its metadata and the rename;
- `checkpoint-4`: the checkpoint of step 4 holds its weights, but not yet its optimizer, scheduler, RNG and trainer
  state;
- unset: the run completes and saves its final model to OUTPUT_DIR.

Like a user's script, a run resumes (`resume_from_checkpoint=True`) when OUTPUT_DIR holds a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

from datasets import Dataset


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

from _rows import addition_rows  # noqa: E402  (this script's folder is on sys.path)

from trl_dpo_ext import DPOConfig, DPOTrainer, ref_init  # noqa: E402
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm  # noqa: E402


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(point: str | None) -> None:
    if point == "sft_saved":
        save_model = ref_init._SFTReferenceTrainer.save_model

        def save_then_kill(self, *args, **kwargs):
            save_model(self, *args, **kwargs)
            kill()

        ref_init._SFTReferenceTrainer.save_model = save_then_kill
    elif point is not None and point.startswith("checkpoint-"):
        step = int(point.removeprefix("checkpoint-"))
        # `Trainer._save_checkpoint` writes the weights, then calls this, then writes the trainer state
        save_optimizer = DPOTrainer._save_optimizer_and_scheduler

        def kill_at_step(self, output_dir):
            if self.state.global_step == step:
                kill()
            return save_optimizer(self, output_dir)

        DPOTrainer._save_optimizer_and_scheduler = kill_at_step
    elif point is not None:
        raise ValueError(f"Unknown KILL_AT={point!r}")


def main(output_dir: str) -> None:
    install_kill(os.environ.get("KILL_AT"))
    tokenizer = char_tokenizer()
    rows = addition_rows()
    args = DPOConfig(
        **cpu_training_args(
            output_dir,
            use_cpu=True,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            ref_init="sft_on_chosen",
            ref_init_max_steps=2,
            ref_init_learning_rate=3e-3,
        )
    )
    trainer = DPOTrainer(
        model=tiny_causal_lm(len(tokenizer)),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    resume = any(path.name.startswith("checkpoint-") for path in Path(output_dir).iterdir())
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(output_dir)


if __name__ == "__main__":
    main(sys.argv[1])
