"""Image rows: vision-encoder passes and step time of stock TRL on pairs, this trainer unshared, and with prefix sharing.

Three arms train, in one process and in turn, a fresh tiny Qwen2.5-VL (or LLaVA) built from a config
(`tests/toy_vision.py`, random weights, fp32) on the same rows of one image, one chosen and K rejected, with the
same number of prompts per optimizer step: stock `trl.DPOTrainer` on the rows expanded to K pairs, this trainer on
the rows as they are, and this trainer with `prefix_sharing=True`. A forward hook on the vision encoders of the policy
and of the reference counts the images they encode; the step times (median of the timed steps, then of the repeats)
give prompts/s and the ratios to stock TRL.

CPU (the figure in docs/benchmarks.md):

    python benchmarks/bench_vision_prefix_sharing.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import bench_k_rejected as common
import torch
import trl
from datasets import Dataset
from transformers import PrinterCallback

import trl_dpo_ext
from trl_dpo_ext.quickstart import cpu_training_args


# The tiny vision-language models are test fixtures (tests/toy_vision.py), not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy_vision import tiny_vlm, tiny_vlm_processor, toy_image, vision_tower  # noqa: E402


ARMS = ("trl.DPOTrainer, K pairs", "trl_dpo_ext, 1 + K", "trl_dpo_ext, 1 + K, prefix_sharing")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "llava"])
    parser.add_argument("--image-size", type=int, default=64, help="Pixels per side (4 × 4 patches).")
    parser.add_argument("--vision-hidden", type=int, default=128, help="Width of the vision encoder.")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128, help="Width of the language model.")
    parser.add_argument("--num-rejected", type=int, default=3)
    parser.add_argument("--response-len", type=int, default=32, help="Characters (= tokens) per response.")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def make_rows(args: argparse.Namespace, num_prompts: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)

    def text() -> str:
        return "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (args.response_len,), generator=generator))

    def turn(role: str, content: str) -> list[dict]:
        return [{"role": role, "content": content}]

    return [
        {
            "images": [toy_image(i, args.image_size)],
            "prompt": turn("user", f"Describe image {i}."),
            "chosen": turn("assistant", text()),
            "rejected": [turn("assistant", text()) for _ in range(args.num_rejected)],
        }
        for i in range(num_prompts)
    ]


def build(arm: str, args: argparse.Namespace, rows: list[dict], output_dir: str) -> trl.DPOTrainer:
    processor = tiny_vlm_processor(args.family, image_size=args.image_size)
    policy, ref = (
        tiny_vlm(
            processor,
            args.family,
            hidden_size=args.hidden,
            image_size=args.image_size,
            vision_hidden_size=args.vision_hidden,
            vision_layers=args.vision_layers,
        )
        for _ in range(2)
    )
    pairs = arm == ARMS[0]
    config = cpu_training_args(
        output_dir,
        per_device_train_batch_size=args.prompts_per_step * (args.num_rejected if pairs else 1),
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        logging_steps=10**6,
        max_length=None,
    )
    if pairs:
        dataset = Dataset.from_list([{**row, "rejected": r} for row in rows for r in row["rejected"]])
        return trl.DPOTrainer(
            model=policy,
            ref_model=ref,
            args=trl.DPOConfig(**config),
            train_dataset=dataset,
            processing_class=processor,
        )
    args_ext = trl_dpo_ext.DPOConfig(**config, prefix_sharing=arm == ARMS[2])
    return trl_dpo_ext.DPOTrainer(
        model=policy, ref_model=ref, args=args_ext, train_dataset=Dataset.from_list(rows), processing_class=processor
    )


def run_arm(arm: str, args: argparse.Namespace, rows: list[dict]) -> tuple[float, float]:
    """Train a fresh model; return the images encoded per prompt per step (policy + reference) and the median wall
    seconds of a timed step."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(arm, args, rows, output_dir)
        counts = []

        def count(module, hook_args, kwargs, output):
            grid = kwargs.get("grid_thw")
            counts.append(grid.size(0) if grid is not None else hook_args[0].size(0))

        for model in (trainer.model, trainer.ref_model):
            vision_tower(model).register_forward_hook(count, with_kwargs=True)
        timer = common.StepTimer()
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        wall, _ = timer.step_times(args.warmup)
    steps = args.warmup + args.steps
    return sum(counts) / (steps * args.prompts_per_step), statistics.median(wall)


def main() -> None:
    args = make_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common.datasets.disable_progress_bars()
    rows = make_rows(args, args.prompts_per_step * (args.warmup + args.steps))
    images, times = {arm: [] for arm in ARMS}, {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            per_prompt, step = run_arm(arm, args, rows)
            images[arm].append(per_prompt)
            times[arm].append(step)
    stock = statistics.median(times[ARMS[0]])
    print(
        f"{args.family}, image {args.image_size}², vision {args.vision_layers} × {args.vision_hidden}, text width "
        f"{args.hidden}, K = {args.num_rejected}, {args.prompts_per_step} prompts/step, {args.repeats} repeats"
    )
    print("| arm | images encoded per prompt per step (policy + reference) | prompts/s | vs stock |")
    print("|---|---|---|---|")
    for arm in ARMS:
        step = statistics.median(times[arm])
        print(
            f"| {arm} | {statistics.median(images[arm]):g} | {args.prompts_per_step / step:.2f} | "
            f"{stock / step:.2f}× |"
        )
    shared, unshared = statistics.median(times[ARMS[2]]), statistics.median(times[ARMS[1]])
    print(f"prefix sharing against unshared: {unshared / shared:.2f}× prompts/s")


if __name__ == "__main__":
    main()
