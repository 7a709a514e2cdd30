"""Throughput of prefix sharing and padding-free: stock TRL on pairs, this trainer padded, shared, padding-free and
shared + padding-free.

The arms run in one process, side by side, on the same rows and the same number of prompts per optimizer step
(stock TRL gets the rows expanded to K pairs), each on a fresh model; they take turns `--repeats` times and the
medians are reported with their ratios to stock TRL, and peak memory (see `bench_k_rejected.py`, whose flags,
measures and machinery this script shares). `--arms` picks the arms; `shared-dense` is the shared arm on the
dense-mask fallback (transformers' SDPA with a 4D mask) instead of the segment-wise SDPA the trainer uses.

CPU (the figure in docs/benchmarks.md):

    python benchmarks/bench_prefix_sharing.py --threads 1 --repeats 3

GPU, a Qwen2.5-0.5B-shaped model with random weights in bf16, prompt and responses of 256 tokens, with MFU against
the H100's dense bf16 peak; `--attn flex_attention` gives the packed arms FlexAttention's block-sparse kernel:

    python benchmarks/bench_prefix_sharing.py --preset qwen2.5-0.5b --peak-tflops 989 --attn flex_attention
"""

from __future__ import annotations

import bench_k_rejected as common
import torch


def packed_arm(name: str, dense: bool = False, **packing) -> common.Arm:
    def build(args, rows, output_dir):
        trainer = common.build_ext(args, rows, output_dir, model_kwargs={"attn_implementation": args.attn}, **packing)
        if dense:  # back to transformers' SDPA: the packed rows then take the dense 4D mask
            for model in (trainer.model, trainer.ref_model):
                model.set_attn_implementation("sdpa")
        return trainer

    return common.Arm(name, build, lambda args: 1)


PACKED_ARMS = {
    "shared": packed_arm("trl_dpo_ext, shared", prefix_sharing=True),
    "shared-dense": packed_arm("trl_dpo_ext, shared, dense mask", dense=True, prefix_sharing=True),
    "padding-free": packed_arm("trl_dpo_ext, padding-free", padding_free=True),
    "shared-padding-free": packed_arm("trl_dpo_ext, shared+padding-free", prefix_sharing=True, padding_free=True),
}
ARMS = {"stock": common.STOCK, "ext": common.EXT, **PACKED_ARMS}


def main() -> None:
    parser = common.make_parser()
    parser.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager", "flex_attention"],
        help="Attention implementation of the packed arms (the padded arms keep SDPA).",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["stock", "ext", "shared", "padding-free", "shared-padding-free"],
        choices=list(ARMS),
        help="Arms to run, in turn; the first is the reference of the ratios.",
    )
    args = common.resolve(parser.parse_args())
    if args.warmup < 1:
        raise SystemExit("`--warmup` must be at least 1: a timed step starts where the step before it ends.")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common.datasets.disable_progress_bars()
    arms = [ARMS[name] for name in args.arms]
    pairs = tuple(
        (ARMS[name].name, common.EXT.name) for name in args.arms if name in PACKED_ARMS and "ext" in args.arms
    )
    common.run_benchmark(args, arms, pairs=pairs)


if __name__ == "__main__":
    main()
