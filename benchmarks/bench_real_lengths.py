"""Throughput on real lengths: AlpacaEval's rated responses as one chosen + K rejected, padded against packed.

The rated rows of ../shared/data/alpacaeval-rated.jsonl.gz become one chosen + K = 3 rejected per prompt
(`trl_dpo_ext.convert.rated_to_multi_rejected`: the best-scored response, and the three lowest-scored), tokenized by a
byte-level BPE trained offline on that text, each prompt + response cut at `--max-length` tokens (TRL's `max_length`,
the same for every arm). Responses run from a few dozen to over a thousand tokens, so a padded batch wastes much of
its work on padding. The arms run side by side in one process, on the same prompts in the same order
(`train_sampling_strategy="sequential"`; stock TRL gets each prompt's K pairs in its own step), each on a fresh model,
taking turns `--repeats` times:

- `stock`: `trl.DPOTrainer` on the rows expanded to K pairs (2K padded sequences per prompt);
- `ext`: this trainer, padded (K + 1 sequences per prompt);
- `shared`: `prefix_sharing=True`, one padded row per example;
- `shared-padding-free`: `prefix_sharing=True, padding_free=True`, the whole batch in one row (`--token-budget` for
  rows of at most that many tokens);
- `padding-free`: `padding_free=True` alone.

For each arm, the medians over the repeats of: prompts/s (the prompts of the timed steps over their wall time; every
arm does the same prompts in each step), prompts/CPU-s, real tokens/s (the non-padding tokens the policy forward
runs, per wall second), the padding share of the forwarded positions, and peak memory (CPU: the peak resident set
size above the one at the start of training; CUDA: `max_memory_allocated`); with `--peak-tflops`, MFU over the
useful FLOPs of the K + 1 unshared sequences (8N per token, as `bench_k_rejected.py`). The ratio to the first arm is
taken within each repeat, then the median.

CPU (the figure in docs/benchmarks.md; the 4-layer width-256 Qwen2 shape, 4 prompts per step):

    python benchmarks/bench_real_lengths.py --threads 1 --repeats 2

`--export DIR` writes the converted rows and the trained tokenizer there (for a machine without ../shared, see
benchmarks/gpu_suite.sh); `--data DIR` reads them back instead of building them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import bench_k_rejected as common
import torch
from bench_prefix_sharing import PACKED_ARMS, packed_arm
from transformers import PreTrainedTokenizerFast, PrinterCallback


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROWS_FILE, TOKENIZER_FILE = "alpacaeval_k_rejected.jsonl", "bpe_tokenizer.json"
SPECIAL_TOKENS = ["<pad>", "<eos>"]


def bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on `texts` (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def load_rows(args: argparse.Namespace) -> tuple[list[dict], PreTrainedTokenizerFast]:
    """The K-rejected rows of the run (a seeded sample of the prompts) and the tokenizer."""
    if args.data:
        folder = Path(args.data)
        with open(folder / ROWS_FILE) as f:
            rows = [json.loads(line) for line in f]
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / TOKENIZER_FILE))
        tokenizer.pad_token, tokenizer.eos_token = SPECIAL_TOKENS
    else:
        from trl_dpo_ext.convert import rated_to_multi_rejected

        with gzip.open(SHARED_DATA / "alpacaeval-rated.jsonl.gz", "rt") as f:
            raw = [json.loads(line) for line in f]
        texts = [r["instruction"] for r in raw] + [c["output"] for r in raw for c in r["completions"]]
        tokenizer = bpe_tokenizer(texts, args.vocab_size)
        rows = rated_to_multi_rejected(raw, num_rejected=args.num_rejected, min_rejected=args.num_rejected)
        rows = [{"prompt": r["prompt"] + "\n", "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    num_prompts = args.prompts_per_step * (args.warmup + args.steps)
    if len(rows) < num_prompts:
        raise SystemExit(f"{num_prompts} prompts needed, {len(rows)} available.")
    rows = random.Random(0).sample(rows, num_prompts)
    if args.export:
        folder = Path(args.export)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ROWS_FILE, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
        print(f"wrote {len(rows)} rows and the tokenizer to {folder}")
    return rows, tokenizer


def forwarded_tokens(trainer, num_batches: int, skip: int) -> tuple[int, int, int]:
    """Positions and non-padding tokens the policy forward runs on batches `skip`..`num_batches - 1` of the
    trainer's (sequential) data loader, and the tokens of the K + 1 unshared sequences (for MFU)."""
    positions = real = unshared = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= num_batches:
            break
        if i < skip:
            continue
        if "packed_input_ids" in batch:
            positions += batch["packed_input_ids"].numel()
            real += int((batch["packed_document_ids"] >= 0).sum())
        else:
            positions += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
        unshared += int(batch["attention_mask"].sum())
    return positions, real, unshared


def run_arm(arm: common.Arm, args: argparse.Namespace, rows: list[dict]) -> dict[str, float]:
    common.release_memory()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = arm.build(args, rows, output_dir)
        positions, real, unshared = forwarded_tokens(trainer, args.warmup + args.steps, args.warmup)
        timer = common.StepTimer()
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)
        common.release_memory()
        with common.PeakRSS() as rss:
            trainer.train()
        wall, cpu = (sum(times) for times in timer.step_times(args.warmup))
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = (rss.peak - rss.start) / 2**30
        del trainer
    prompts = args.prompts_per_step * args.steps
    result = {
        "prompts/s": prompts / wall,
        "prompts/CPU-s": prompts / cpu,
        "real tokens/s": real / wall,
        "padding": 1 - real / positions,
        "peak GiB": peak,
        "wall": wall,
        # Stock forwards each chosen K times: the useful work (for MFU) is counted on the K + 1 sequences of the others
        "unshared tokens": None if arm.name == common.STOCK.name else unshared,
    }
    return result


def main() -> None:
    parser = common.make_parser()
    parser.set_defaults(model="small-qwen2", prompts_per_step=4, steps=3, warmup=1, repeats=2)
    parser.add_argument("--max-length", type=int, default=1024, help="TRL's max_length: each sequence is cut there.")
    parser.add_argument("--vocab-size", type=int, default=4096, help="Size of the BPE vocabulary trained offline.")
    parser.add_argument("--token-budget", type=int, default=None, help="`token_budget` of the padding-free arms.")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention"], help="Packed arms'.")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["stock", "ext", "shared", "shared-padding-free"],
        choices=["stock", "ext", *PACKED_ARMS],
        help="Arms to run, in turn; the first is the reference of the ratios.",
    )
    parser.add_argument("--data", help="Folder written by `--export` to read the rows and tokenizer from.")
    parser.add_argument("--export", help="Write the converted rows and the tokenizer to this folder.")
    args = common.resolve(parser.parse_args())
    args.sampling = "sequential"  # every arm does the same prompts in each step
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common.datasets.disable_progress_bars()
    rows, args.tokenizer = load_rows(args)
    if args.repeats == 0:  # `--export` only
        return
    arms = {"stock": common.STOCK, "ext": common.EXT, **PACKED_ARMS}
    if args.token_budget is not None:
        budget = {"token_budget": args.token_budget}
        arms["padding-free"] = packed_arm(
            f"trl_dpo_ext, padding-free, {args.token_budget}", padding_free=True, **budget
        )
        arms["shared-padding-free"] = packed_arm(
            f"trl_dpo_ext, shared+padding-free, {args.token_budget}", prefix_sharing=True, padding_free=True, **budget
        )
    arms = [arms[name] for name in args.arms]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device={device} threads={torch.get_num_threads()} model={args.model} K={args.num_rejected} "
        f"max_length={args.max_length} vocab={len(args.tokenizer)} prompts/step={args.prompts_per_step} "
        f"steps={args.steps} (+{args.warmup} warm-up) repeats={args.repeats} bf16={args.bf16} attn={args.attn} "
        f"token_budget={args.token_budget}",
        flush=True,
    )
    results: dict[str, list[dict]] = {arm.name: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms:
            start = time.perf_counter()
            result = run_arm(arm, args, rows)
            results[arm.name].append(result)
            print(
                f"  repeat {repeat}: {arm.name:<34} {result['prompts/s']:7.3f} prompts/s "
                f"{result['prompts/CPU-s']:7.3f} prompts/CPU-s  padding {result['padding']:5.1%}  "
                f"peak {result['peak GiB']:5.2f} GiB  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    report(args, arms, results)


def report(args: argparse.Namespace, arms: list[common.Arm], results: dict[str, list[dict]]) -> None:
    base = results[arms[0].name]
    counts = [run["unshared tokens"] for runs in results.values() for run in runs if run["unshared tokens"]]
    useful_tokens = counts[0] if counts else None  # the same prompts in every arm
    num_params = sum(p.numel() for p in common.fresh_models(args, len(args.tokenizer))[0].parameters())
    header = f"\n{'arm':<34} {'prompts/s':>9} {'ratio':>6} {'prompts/CPU-s':>13} {'ratio':>6} {'real tok/s':>10}"
    print(header + f" {'padding':>8} {'peak GiB':>8}" + (f" {'MFU':>6}" if args.peak_tflops else ""))
    for arm in arms:
        runs = results[arm.name]

        def median(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(run[key] for run in runs)

        def ratio(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(run[key] / ref[key] for run, ref in zip(runs, base))

        line = (
            f"{arm.name:<34} {median('prompts/s'):9.3f} {ratio('prompts/s'):5.2f}x {median('prompts/CPU-s'):13.3f} "
            f"{ratio('prompts/CPU-s'):5.2f}x {median('real tokens/s'):10.0f} {median('padding'):8.1%} "
            f"{median('peak GiB'):8.2f}"
        )
        if args.peak_tflops and useful_tokens:
            line += f" {8 * num_params * useful_tokens / median('wall') / (args.peak_tflops * 1e12):6.1%}"
        print(line)
    print(
        f"(medians over {args.repeats} repeats; ratio: median over the repeats of the ratio to the first arm; "
        "real tokens: the non-padding tokens the policy forward runs; padding: its share of the forwarded positions)"
    )


if __name__ == "__main__":
    main()
