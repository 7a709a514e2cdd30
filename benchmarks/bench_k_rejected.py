"""Throughput of one chosen + K rejected against stock TRL on the same data expanded to K pairs.

Runs, in one process and side by side, `trl.DPOTrainer` on the rows expanded to pairs and `trl_dpo_ext.DPOTrainer`
on the same rows kept as one chosen + K rejected, with the same number of prompts per optimizer step (stock TRL gets
K pair rows per prompt, so its batch holds K × prompts pair rows). Each arm trains a fresh model for `--warmup` +
`--steps` steps, the arms take turns `--repeats` times, and for each arm the median over the repeats is reported of:

- prompts/s: prompts per step over the median wall time of a step (data collation, forward, backward, optimizer);
- prompts/CPU-s: the same over the median CPU time of the process for a step. With `--threads 1` on a CPU shared
  with other jobs, this is the figure that other jobs disturb least;
- peak memory of the step: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set size above the
  one at the start of training, sampled every 5 ms;

and the ratio to the first arm, taken within each repeat and then the median.

CPU (the figure in docs/benchmarks.md):

    python benchmarks/bench_k_rejected.py --threads 1 --repeats 5

GPU, a Qwen2.5-0.5B-shaped model (random weights, bf16 weights and autocast, tied LM head), prompt and responses of
256 tokens, with MFU against the H100's dense bf16 peak:

    python benchmarks/bench_k_rejected.py --preset qwen2.5-0.5b --peak-tflops 989

Data are random printable characters through the offline character tokenizer of `trl_dpo_ext.quickstart.toy` (one token per
character; standard text rows end with EOS, so a response of `--response-len` tokens holds `--response-len - 1`
characters). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import string
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets  # noqa: E402
import psutil  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402

import trl_dpo_ext  # noqa: E402
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm  # noqa: E402


# Model shapes: the CPU default, and Qwen2.5-0.5B's (Qwen2Config of Qwen/Qwen2.5-0.5B, random weights)
MODEL_SHAPES = {
    "small": dict(
        arch="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=768,
    ),
    "small-qwen2": dict(
        arch="qwen2", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=768,
    ),
    "qwen2.5-0.5b": dict(
        arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}  # fmt: skip
PRESETS = {
    "cpu": dict(model="small", prompt_len=64, response_len=64, prompts_per_step=8, bf16=False),
    "qwen2.5-0.5b": dict(model="qwen2.5-0.5b", prompt_len=256, response_len=256, prompts_per_step=8, bf16=True),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="Defaults for the flags below.")
    parser.add_argument("--model", choices=list(MODEL_SHAPES), help="Model shape (random weights).")
    parser.add_argument("--num-rejected", "-k", type=int, default=3, help="K, rejected responses per prompt.")
    parser.add_argument("--prompt-len", type=int, help="Prompt tokens.")
    parser.add_argument("--response-len", type=int, help="Tokens of each response, EOS included.")
    parser.add_argument("--prompts-per-step", type=int, help="Prompts per optimizer step, for every arm.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per repeat.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before them.")
    parser.add_argument("--repeats", type=int, default=3, help="Times each arm runs; the median is reported.")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 mixed precision.")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Gradient checkpointing in every arm.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 steadies a shared CPU."
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="Accelerator peak (e.g. 989 for H100 bf16) to print MFU."
    )
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the preset."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_rows(args: argparse.Namespace, num_prompts: int, seed: int = 0) -> list[dict]:
    """Rows of random characters: one prompt, one chosen and K rejected, each of the requested token length."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,"

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    response_chars = args.response_len - 1  # the trainers append EOS to standard text
    return [
        {
            "prompt": text(args.prompt_len),
            "chosen": text(response_chars),
            "rejected": [text(response_chars) for _ in range(args.num_rejected)],
        }
        for _ in range(num_prompts)
    ]


def expand_to_pairs(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rej} for r in rows for rej in r["rejected"]]


class StepTimer(TrainerCallback):
    """Wall and CPU time between the ends of consecutive optimizer steps (data collation included)."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append((time.perf_counter(), time.process_time()))

    def step_times(self, warmup: int) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of each step after the first `warmup` ones."""
        pairs = list(zip(self.ends[warmup - 1 : -1], self.ends[warmup:]))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled from a background thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def release_memory() -> None:
    """Free what the previous arm left, so that each arm's CPU peak starts from a comparable heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:  # glibc keeps freed pages; hand them back so the RSS baseline is the live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@dataclass
class Arm:
    """One side of the comparison: how to build its trainer, and how many rows make one prompt."""

    name: str
    build: Callable[[argparse.Namespace, list[dict], str], trl.DPOTrainer]
    rows_per_prompt: Callable[[argparse.Namespace], int]


def fresh_models(args: argparse.Namespace, vocab_size: int, **model_kwargs):
    """A fresh policy and reference with the same seeded weights (`model_kwargs` go to their config)."""
    shape = {**MODEL_SHAPES[args.model], **model_kwargs}
    shape.setdefault("vocab_size", vocab_size)
    vocab = shape.pop("vocab_size")
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # bf16 weights, as those of a bf16 checkpoint
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialised where they run: a 0.5B model inits in seconds on the GPU
        if shape.pop("tie_word_embeddings", False):  # Qwen2.5-0.5B ties its LM head; `tiny_causal_lm` unties it
            config = Qwen2Config(
                **{k: v for k, v in shape.items() if k != "arch"}, vocab_size=vocab, tie_word_embeddings=True
            )
            models = []
            for _ in range(2):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    models.append(Qwen2ForCausalLM(config).to(dtype))
        else:
            models = [tiny_causal_lm(vocab, seed=0, dtype=dtype, **shape) for _ in range(2)]
    return [m.to(device) for m in models]


def common_config(args: argparse.Namespace, output_dir: str, batch_size: int) -> dict:
    return cpu_training_args(
        output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        logging_steps=10**6,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        max_length=getattr(args, "max_length", None),
        train_sampling_strategy=getattr(args, "sampling", "random"),
    )


def tokenizer_of(args: argparse.Namespace):
    """The tokenizer of the run: `args.tokenizer` when a script sets one, else the offline character tokenizer."""
    return getattr(args, "tokenizer", None) or char_tokenizer()


def build_stock(args: argparse.Namespace, rows: list[dict], output_dir: str) -> trl.DPOTrainer:
    tokenizer = tokenizer_of(args)
    policy, ref = fresh_models(args, len(tokenizer))
    config = trl.DPOConfig(**common_config(args, output_dir, args.prompts_per_step * args.num_rejected))
    return trl.DPOTrainer(
        model=policy,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(expand_to_pairs(rows)),
        processing_class=tokenizer,
    )


def build_ext(
    args: argparse.Namespace, rows: list[dict], output_dir: str, model_kwargs: dict | None = None, **extra
) -> trl.DPOTrainer:
    tokenizer = tokenizer_of(args)
    policy, ref = fresh_models(args, len(tokenizer), **(model_kwargs or {}))
    config = trl_dpo_ext.DPOConfig(**common_config(args, output_dir, args.prompts_per_step), **extra)
    return trl_dpo_ext.DPOTrainer(
        model=policy,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


STOCK = Arm("trl.DPOTrainer, K pairs", build_stock, lambda args: args.num_rejected)
EXT = Arm("trl_dpo_ext, 1 + K", build_ext, lambda args: 1)


def run_arm(arm: Arm, args: argparse.Namespace, rows: list[dict]) -> tuple[float, float, float]:
    """Train a fresh model; return prompts per wall second and per CPU second (the median step of each) over the
    timed steps, and the peak memory in GiB."""
    release_memory()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = arm.build(args, rows, output_dir)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)  # keep the output to the table
        release_memory()
        with PeakRSS() as rss:
            trainer.train()
        wall, cpu = timer.step_times(args.warmup)
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = (rss.peak - rss.start) / 2**30
        del trainer
    return args.prompts_per_step / statistics.median(wall), args.prompts_per_step / statistics.median(cpu), peak


def flops_per_prompt(args: argparse.Namespace, num_params: int) -> float:
    """Useful FLOPs per prompt, the same for every arm: 6N per token for the policy (forward and backward) and 2N for
    the reference forward, over the K + 1 sequences of a prompt (attention FLOPs left out)."""
    tokens = (args.num_rejected + 1) * (args.prompt_len + args.response_len)
    return 8 * num_params * tokens


def run_benchmark(
    args: argparse.Namespace, arms: list[Arm], pairs: tuple[tuple[str, str], ...] = ()
) -> dict[str, tuple[float, float, float]]:
    """Run the arms in turn `--repeats` times; print and return, for each, the medians over the repeats of prompts
    per wall second, prompts per CPU second and peak memory (GiB). `pairs` of arm names get their own ratio line."""
    num_prompts = args.prompts_per_step * (args.warmup + args.steps)
    rows = make_rows(args, num_prompts)
    cuda = torch.cuda.is_available()
    device = (
        torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    print(
        f"device={device} model={args.model} K={args.num_rejected} prompt={args.prompt_len} "
        f"response={args.response_len} prompts/step={args.prompts_per_step} bf16={args.bf16} "
        f"gradient_checkpointing={args.gradient_checkpointing} steps={args.steps} (+{args.warmup} warm-up) "
        f"repeats={args.repeats}",
        flush=True,
    )
    results: dict[str, list[tuple[float, float, float]]] = {arm.name: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms:
            wall, cpu, peak = run_arm(arm, args, rows)
            results[arm.name].append((wall, cpu, peak))
            print(
                f"  repeat {repeat}: {arm.name:<30} {wall:8.2f} prompts/s  {cpu:8.2f} prompts/CPU-s  peak {peak:6.2f} GiB",
                flush=True,
            )

    medians = {name: tuple(statistics.median(values) for values in zip(*runs)) for name, runs in results.items()}
    base = results[arms[0].name]

    def paired_ratio(runs: list[tuple[float, float, float]], column: int, reference=base) -> float:
        # Ratio to the reference arm within each repeat (the arms of a repeat ran back to back), then the median
        return statistics.median(run[column] / ref[column] for run, ref in zip(runs, reference))

    num_params = sum(p.numel() for p in fresh_models(args, len(tokenizer_of(args)))[0].parameters())
    memory_kind = "max_memory_allocated" if cuda else "peak RSS above start"
    header = f"\n{'arm':<30} {'prompts/s':>10} {'ratio':>7} {'prompts/CPU-s':>14} {'ratio':>7} {'peak GiB':>9}"
    print(header + (f" {'MFU':>6}" if args.peak_tflops else ""))
    for name, (wall, cpu, peak) in medians.items():
        wall_ratio, cpu_ratio = paired_ratio(results[name], 0), paired_ratio(results[name], 1)
        line = f"{name:<30} {wall:10.2f} {wall_ratio:6.2f}x {cpu:14.2f} {cpu_ratio:6.2f}x {peak:9.2f}"
        if args.peak_tflops:
            line += f" {wall * flops_per_prompt(args, num_params) / (args.peak_tflops * 1e12):6.1%}"
        print(line)
    for name, reference in pairs:
        wall_ratio = paired_ratio(results[name], 0, results[reference])
        cpu_ratio = paired_ratio(results[name], 1, results[reference])
        print(f"{name} / {reference}: {wall_ratio:.2f}x prompts/s, {cpu_ratio:.2f}x prompts/CPU-s")
    print(
        f"(medians over {args.repeats} repeats; ratio: median over the repeats of the ratio to the first arm; "
        f"peak memory: {memory_kind})"
    )
    return medians


def main() -> None:
    args = resolve(make_parser().parse_args())
    if args.warmup < 1:
        raise SystemExit("`--warmup` must be at least 1: a timed step starts where the step before it ends.")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    datasets.disable_progress_bars()
    run_benchmark(args, [STOCK, EXT])


if __name__ == "__main__":
    main()
