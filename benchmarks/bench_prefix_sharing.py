"""Throughput of prefix sharing: stock TRL on pairs, this trainer unshared, and this trainer with `prefix_sharing`.

The three arms run in one process, side by side, on the same rows and the same number of prompts per optimizer step
(stock TRL gets the rows expanded to K pairs), each on a fresh model; they take turns `--repeats` times and the
medians are reported with their ratios to stock TRL and of the shared arm to the unshared one, and peak memory (see
`bench_k_rejected.py`, whose flags, measures and machinery this script shares).

CPU (the figure in docs/benchmarks.md):

    python benchmarks/bench_prefix_sharing.py --threads 1 --repeats 5

GPU, a Qwen2.5-0.5B-shaped model with random weights in bf16, prompt and responses of 256 tokens, with MFU against
the H100's dense bf16 peak; `--attn flex_attention` gives the shared arm FlexAttention's block-sparse kernel:

    python benchmarks/bench_prefix_sharing.py --preset qwen2.5-0.5b --peak-tflops 989 --attn flex_attention
"""

from __future__ import annotations

import bench_k_rejected as common
import torch


def main() -> None:
    parser = common.make_parser()
    parser.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager", "flex_attention"],
        help="Attention implementation of the shared arm (the unshared arms keep SDPA).",
    )
    args = common.resolve(parser.parse_args())
    if args.warmup < 1:
        raise SystemExit("`--warmup` must be at least 1: a timed step starts where the step before it ends.")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common.datasets.disable_progress_bars()

    def build_shared(args, rows, output_dir):
        model_kwargs = {"attn_implementation": args.attn}
        return common.build_ext(args, rows, output_dir, model_kwargs=model_kwargs, prefix_sharing=True)

    shared = common.Arm("trl_dpo_ext, 1 + K, shared", build_shared, lambda args: 1)
    common.run_benchmark(args, [common.STOCK, common.EXT, shared], pairs=((shared.name, common.EXT.name),))


if __name__ == "__main__":
    main()
