"""Find mislabeled preference rows from the gradient weights σ(r̂_l − r̂_w) (the experiment of docs/diagnostics.md).

A dataset teaches "a lowercase word beats a string of digits" (1 to 3 rejected per row); `--flip-fraction` of its rows
have their labels flipped. A tiny Llama trains on it with `grad_weight_record=True`, then `write_report` ranks the
rows by their mean weight over the last half of training. Prints how many flipped rows the top `--flip-fraction` of
the ranking holds, and writes the report (figure and CSV) under `--output-dir`, the flipped rows highlighted.

    python examples/mislabel_detection.py --output-dir runs/mislabel --figure docs/grad_weights_mislabel.png

CPU only, nothing downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from trl_dpo_ext import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_ext.grad_weight_record import record_path  # noqa: E402
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, flipped_preference_rows, tiny_causal_lm  # noqa: E402
from trl_dpo_ext.report import write_report  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-rows", type=int, default=1000)
    parser.add_argument("--flip-fraction", type=float, default=0.1)
    parser.add_argument("--max-rejected", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/mislabel")
    parser.add_argument("--figure", default=None, help="Also copy the report's figure here (e.g. under docs/).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    rows, flipped = flipped_preference_rows(args.num_rows, args.flip_fraction, args.max_rejected, seed=args.seed)
    tokenizer = char_tokenizer()
    config = DPOConfig(
        **cpu_training_args(
            args.output_dir,
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            beta=args.beta,
            precompute_ref_log_probs=True,
            grad_weight_record=True,
            logging_steps=25,
            use_cpu=True,
            seed=args.seed,
        )
    )
    trainer = DPOTrainer(
        model=tiny_causal_lm(len(tokenizer), seed=args.seed),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start

    report = write_report(
        record_path(args.output_dir),
        os.path.join(args.output_dir, "report"),
        dataset=rows,
        top_fraction=args.flip_fraction,
        highlight=flipped,
    )
    caught = sorted(set(report["top_indices"]) & set(flipped))
    summary = {
        "rows": args.num_rows,
        "flipped": len(flipped),
        "top": len(report["top_indices"]),
        "flipped_in_top": len(caught),
        "recall": len(caught) / len(flipped),
        "steps": report["steps"][1],
        "train_s": round(train_s, 1),
        "figure": report["figure"],
        "table": report["table"],
    }
    for entry in trainer.state.log_history:
        if "loss" in entry and "grad_weight/mean" in entry:
            print(
                f"step {entry['step']:>4}: loss {entry['loss']:.3f}  grad_weight/mean {entry['grad_weight/mean']:.3f}"
                f"  p90 {entry['grad_weight/p90']:.3f}  frac_above_0.5 {entry['grad_weight/frac_above_0.5']:.3f}"
                f"  frac_below_0.05 {entry['grad_weight/frac_below_0.05']:.3f}"
            )
    print(json.dumps(summary, indent=2))
    if args.figure:
        shutil.copyfile(report["figure"], args.figure)
    return summary


if __name__ == "__main__":
    main()
