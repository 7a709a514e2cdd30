"""Real-model speed: SmolLM2-135M-Instruct on AlpacaEval rows, stock TRL on pairs against this trainer's arms.

The rated rows of ../shared/data/alpacaeval-rated.jsonl.gz become one chosen + K rejected per prompt
(`trl_dpo_ext.convert.rated_to_multi_rejected`: the best-scored response and the K lowest-scored), as conversational
rows that both trainers render through the model's chat template; each response is cut at `--response-tokens` tokens
(the prompts are whole). A seeded sample of `--prompts-per-step` × (`--warmup` + `--rounds`) prompts, in order: every
arm gets the same prompts in each optimizer step (`train_sampling_strategy="sequential"`), which is asserted on the
tokenized rows each arm's collator receives before any number is reported. The arms:

- `stock`: `trl.DPOTrainer` on the rows expanded to K pairs; `--stock-micro-batch` pair rows per forward (`stock:M`
  in `--arms` for another), with gradient accumulation making up the same prompts per optimizer step;
- `ext`: this trainer, padded (K + 1 sequences per prompt, one micro-batch);
- `shared`: `prefix_sharing=True` (segment-wise SDPA), one packed row per example;
- `shared-padding-free`: `prefix_sharing=True, padding_free=True`, the whole step in one row.

All arms live in one process, each with its own trainer and policy (the frozen reference is shared by the padded
arms, and another copy by the packed ones, which switch it to segment-wise SDPA), and they take turns **one optimizer
step at a time**: each trainer runs its ordinary `train()` loop in its own thread, and a baton passed at the end of
every step lets exactly one arm work at a time (data collation, forward, backward and optimizer step all inside its
turn). A timed fp32 matmul of the model's shapes takes a turn too, so the matmul rate is measured in the same rounds.
Round r is step r of every arm, on the same prompts; the first `--warmup` rounds are not counted. Reported per arm:
prompts/s (median over rounds), the ratio to the first arm (median of the per-round ratios, with min-max), the
positions the policy forward runs (padding included) and its real tokens, the achieved model FLOP rate against the
matmul rate, and the peak memory of its step above that at the step's start (CPU: the bytes malloc has handed out,
glibc `mallinfo2`, sampled every 10 ms, not the RSS, which is per process and keeps freed pages; GPU:
`max_memory_allocated`): activations, gradients and transient buffers. The weights, AdamW states and references of
all arms stay allocated throughout (about 13 GB on the CPU for the four default arms); the warm-up step allocates the
AdamW states.

FLOPs of a step: 8 × (N_body × positions + N_head × scored tokens): 6 for the policy's forward and backward, 2 for
the reference forward (6 alone when the reference is precomputed; with hard-negative selection, 2 for the no-grad pass
over all K and 6 for the training pass over the kept, whose positions are counted apart: `step_flops`); N_body is
the non-embedding parameters (the embedding is a lookup), N_head the LM head's (tied to the embedding, a real
matmul), counted on the scored (completion) tokens only: the useful work. This trainer's head projects only those
(`trl_dpo_ext.scored_positions`); stock TRL's head does where Triton runs, but on the CPU it projects every position,
which the count does not credit. Attention's own FLOPs are left out. "Real" FLOPs count real tokens instead of
positions (no padding).

CPU (docs/benchmarks.md; the default is about 12-15 minutes on 2 quiet cores, 2 prompts per step, responses cut
at 64 tokens, 3 rounds after 1 warm-up, K = 3 then 7):

    python benchmarks/bench_real_model.py --threads 2 --k 3 7 --rounds 3
    python benchmarks/bench_real_model.py --threads 2 --k 7 --rounds 1 --profile   # CPU time by op, per arm

GPU (benchmarks/gpu_suite.sh): `--random-init` builds the model from the folder's config with random weights (the
device gets the config and tokenizer, not the weights), `--data DIR` reads rows written by `--export DIR`.
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv() -> None:
    """Set the OpenMP thread count before torch is imported, so that every thread of the process uses it."""
    if "--threads" in sys.argv:
        value = sys.argv[sys.argv.index("--threads") + 1]
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = value


_threads_from_argv()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from bench_k_rejected import expand_to_pairs  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402


# ../shared/data from the project root; from a worktree under /work/wt/, the first such folder above it
SHARED_DATA = next(
    (d / "shared" / "data" for d in Path(__file__).resolve().parents[1].parents if (d / "shared" / "data").is_dir()),
    Path(__file__).resolve().parents[1].parent / "shared" / "data",
)
ROWS_FILE = "alpacaeval_k{k}_smollm2.jsonl"
PACKED = {
    "ext": {},
    "shared": {"prefix_sharing": True},
    "shared-padding-free": {"prefix_sharing": True, "padding_free": True},
    "padding-free": {"padding_free": True},
    # Hard-negative selection (docs/concepts.md) and its baseline: the same packing, the reference precomputed
    "shared-padding-free-pre": {"prefix_sharing": True, "padding_free": True, "precompute_ref_log_probs": True},
    "hardest-1": {
        "prefix_sharing": True,
        "padding_free": True,
        "precompute_ref_log_probs": True,
        "rejected_selection": "hardest",
        "num_selected": 1,
    },
    "hardest-2": {
        "prefix_sharing": True,
        "padding_free": True,
        "precompute_ref_log_probs": True,
        "rejected_selection": "hardest",
        "num_selected": 2,
    },
    "sampled-2": {
        "prefix_sharing": True,
        "padding_free": True,
        "precompute_ref_log_probs": True,
        "rejected_selection": "sampled",
        "num_selected": 2,
    },
}
LABELS = {
    "stock": "trl.DPOTrainer, K pairs",
    "ext": "trl_dpo_ext, 1 + K, padded",
    "shared": "prefix_sharing",
    "shared-padding-free": "prefix_sharing + padding_free",
    "padding-free": "padding_free",
    "shared-padding-free-pre": "prefix_sharing + padding_free, reference precomputed",
    "hardest-1": "… + rejected_selection='hardest', m = 1",
    "hardest-2": "… + rejected_selection='hardest', m = 2",
    "sampled-2": "… + rejected_selection='sampled', m = 2",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[3, 7], help="K values, one run each.")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["stock", "ext", "shared", "shared-padding-free"],
        help="Arms in turn order; the first is the reference of the ratios. stock:M = stock at micro-batch M.",
    )
    parser.add_argument("--prompts-per-step", type=int, default=2, help="Prompts per optimizer step, every arm.")
    parser.add_argument("--response-tokens", type=int, default=64, help="Each response is cut at this many tokens.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed optimizer steps per arm (one round each).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds before them.")
    parser.add_argument(
        "--stock-micro-batch", type=int, default=None, help="Pair rows per stock forward (default: K, one prompt)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 or 2 here).")
    parser.add_argument("--profile", action="store_true", help="One more step per arm under torch.profiler.")
    parser.add_argument("--random-init", action="store_true", help="Random weights from the model folder's config.")
    parser.add_argument("--model", default=None, help="Model folder (default: trl_dpo_ext.real_model's SmolLM2).")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (GPU).")
    parser.add_argument(
        "--rows",
        choices=["alpacaeval", "hh"],
        default="alpacaeval",
        help="alpacaeval: rated responses, best chosen, K lowest rejected; hh: HH-RLHF harmless test pairs, whole "
        "dialogues as the prompt (K = 1 only).",
    )
    parser.add_argument("--data", help="Folder written by --export to read the rows from.")
    parser.add_argument("--export", help="Write the rows (and the model's config and tokenizer) to this folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompt sample.")
    return parser


# ---------------------------------------------------------------------------------------------------------- rows


def build_rows(args: argparse.Namespace, k: int, tokenizer) -> list[dict]:
    """The run's conversational one chosen + K rejected rows, responses cut at `--response-tokens` tokens."""
    num_prompts = args.prompts_per_step * (args.warmup + args.rounds + args.profile)
    if args.data:
        with open(Path(args.data) / ROWS_FILE.format(k=k)) as f:
            rows = [json.loads(line) for line in f]
        if len(rows) < num_prompts:
            raise SystemExit(f"{num_prompts} prompts needed, {args.data} holds {len(rows)} rows at K = {k}.")
        # The run's prompts only: a precomputed reference covers every row of the dataset
        return rows[:num_prompts]

    def cut(text: str) -> list[dict]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.response_tokens]
        return [{"role": "assistant", "content": tokenizer.decode(ids)}]

    if args.rows == "hh":
        rows = hh_rows(k, num_prompts, args.seed)
    else:
        from trl_dpo_ext.convert import rated_to_multi_rejected

        with gzip.open(SHARED_DATA / "alpacaeval-rated.jsonl.gz", "rt") as f:
            raw = [json.loads(line) for line in f]
        rows = rated_to_multi_rejected(raw, num_rejected=k, min_rejected=k)
        if len(rows) < num_prompts:
            raise SystemExit(f"{num_prompts} prompts needed, {len(rows)} rows have K = {k} rejected.")
        rows = random.Random(args.seed).sample(rows, num_prompts)
        rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    rows = [
        {"prompt": r["prompt"], "chosen": cut(r["chosen"]), "rejected": [cut(text) for text in r["rejected"]]}
        for r in rows
    ]
    if args.export:
        folder = Path(args.export)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ROWS_FILE.format(k=k), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def hh_rows(k: int, num_prompts: int, seed: int) -> list[dict]:
    """`num_prompts` HH-RLHF harmless test pairs (seeded draw): the dialogue before the last assistant turn as the
    prompt's messages, the two last assistant turns as the chosen and the rejected text (which `build_rows` cuts)."""
    if k != 1:
        raise SystemExit(f"--rows hh has one rejected per prompt: run it with --k 1, not {k}.")
    from experiment_real_model import hh_pair

    with gzip.open(SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    random.Random(seed).shuffle(raw)
    rows = []
    for row in raw:
        if (pair := hh_pair(row)) is None:
            continue
        prompt, chosen, rejected = pair
        if chosen.strip() and rejected.strip():
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": [rejected]})
        if len(rows) == num_prompts:
            return rows
    raise SystemExit(f"{num_prompts} prompts needed, {len(rows)} HH-RLHF rows qualify.")


# ------------------------------------------------------------------------------------------------------ the arms


@dataclass
class Step:
    wall: float = 0.0
    cpu: float = 0.0
    rss: float = 0.0  # bytes above the step's start
    positions: int = 0  # policy forward positions, padding included
    real: int = 0  # non-padding tokens of the policy forward
    scored: int = 0  # completion tokens (the fused LM head's)
    kept_positions: int = 0  # hard-negative selection: the training pass's (the counts above: the no-grad pass's)
    kept_real: int = 0
    kept_scored: int = 0
    prompts: dict = field(default_factory=dict)  # of a batch: prompt ids -> [(chosen ids, [rejected ids])]


@dataclass
class Arm:
    name: str
    label: str
    trainer: object = None
    micro_batch: int = 0
    accumulation: int = 1
    steps: list[Step] = field(default_factory=list)
    profile: str = ""
    profile_matmul_s: float = 0.0  # the profiled step: self time of the matmul kernels, and of every op
    profile_ops_s: float = 0.0
    batches: list[Step] = field(default_factory=list)
    kept: list[Step] = field(default_factory=list)  # hard-negative selection: the batches of the training pass
    precomputed: bool = False  # the reference log-probs precomputed: no reference forward in the step


class Baton:
    """One arm works at a time, in a fixed order; an arm that has finished leaves the rotation."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.turn, self.done, self.error = names, 0, set(), None
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or self.names[self.turn] == name)
            if self.error is not None:
                raise RuntimeError(f"another arm failed: {self.error!r}")

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            for _ in self.names:
                self.turn = (self.turn + 1) % len(self.names)
                if self.names[self.turn] not in self.done:
                    break
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()


class CountingCollator:
    """The trainer's collator, recording each collated batch: its tokenized rows (for the identity check) and its
    positions, real and scored tokens. Batches, not steps: accelerate's data loader collates one batch ahead, so the
    batches of step i are the arm's batches i × accumulation ... (i + 1) × accumulation − 1."""

    def __init__(self, collator, arm: Arm, kept: bool = False) -> None:
        self.collator, self.arm, self.kept = collator, arm, kept

    def __call__(self, examples: list[dict]) -> dict:
        record = Step()
        for ex in examples:
            rejected = ex["rejected_ids"]
            rejected = [rejected] if rejected and isinstance(rejected[0], int) else rejected
            record.prompts.setdefault(tuple(ex["prompt_ids"]), []).append(
                (tuple(ex["chosen_ids"]), [tuple(r) for r in rejected])
            )
        batch = self.collator(examples)
        if "packed_input_ids" in batch:
            record.positions = batch["packed_input_ids"].numel()
            record.real = int((batch["packed_document_ids"] >= 0).sum())
        else:
            record.positions = batch["input_ids"].numel()
            record.real = int(batch["attention_mask"].sum())
        record.scored = int(batch["completion_mask"].sum())
        (self.arm.kept if self.kept else self.arm.batches).append(record)
        return batch


def step_rows(arm: Arm, step: int) -> dict:
    """Prompt ids -> (chosen ids, sorted rejected ids) of the arm's optimizer step `step`."""
    rows: dict = {}
    for batch in arm.batches[step * arm.accumulation : (step + 1) * arm.accumulation]:
        for prompt, entries in batch.prompts.items():
            for chosen, rejected in entries:
                seen_chosen, seen = rows.get(prompt, (chosen, []))
                assert seen_chosen == chosen, f"{arm.name}: one prompt with two chosen in step {step}"
                rows[prompt] = (chosen, sorted(seen + rejected))
    return rows


def add_counts(arm: Arm) -> None:
    """The positions, real and scored tokens of each step, from its batches (and its kept batches, with selection)."""
    for i, step in enumerate(arm.steps):
        batches = arm.batches[i * arm.accumulation : (i + 1) * arm.accumulation]
        step.positions = sum(b.positions for b in batches)
        step.real = sum(b.real for b in batches)
        step.scored = sum(b.scored for b in batches)
        if arm.kept:
            kept = arm.kept[i]
            step.kept_positions, step.kept_real, step.kept_scored = kept.positions, kept.real, kept.scored


def step_flops(arm: Arm, body: int, head: int, real: bool = False) -> int:
    """Model FLOPs of the arm's timed steps: 2 per parameter and token for a forward, 6 for forward and backward.
    The reference's forward counts unless precomputed; with selection, the no-grad pass over all K (2) and the
    training pass over the kept (6)."""
    total = 0
    for step in arm.steps:
        full = body * (step.real if real else step.positions) + head * step.scored
        reference = 0 if arm.precomputed else 2 * full
        if arm.kept:
            kept = body * (step.kept_real if real else step.kept_positions) + head * step.kept_scored
            total += reference + 2 * full + 6 * kept
        else:
            total += reference + 6 * full
    return total


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks".split()
    ]
    _fields_ += [(name, ctypes.c_size_t) for name in ("fordblks", "keepcost")]


class PeakLive:
    """Peak of the bytes malloc has handed out and not taken back (glibc `mallinfo2`: heap in use + mmapped), sampled
    every 10 ms from a thread. Unlike the RSS, it does not count the pages glibc keeps after a free, so an arm's peak
    above its step's start is its own transient memory even when it reuses pages another arm freed."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s, self._stop = interval_s, threading.Event()
        self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo2.restype = _MallInfo2

    def live(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.live())

    def __enter__(self) -> PeakLive:
        self.start = self.peak = self.live()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.live())


# The kernels of the model's matmuls (projections, the LM head): the FLOPs counted; attention's are not
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


class Turns(TrainerCallback):
    """Waits for the arm's turn before each optimizer step and passes the baton at its end, timing the step."""

    def __init__(self, arm: Arm, baton: Baton, profile_step: int | None) -> None:
        self.arm, self.baton, self.profile_step = arm, baton, profile_step
        self.profiler = None

    def _begin(self, step: int) -> None:
        self.baton.wait(self.arm.name)
        gc.collect()  # no malloc_trim: in steady training a step reuses the pages the step before it freed
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if step == self.profile_step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        self.rss = PeakLive().__enter__()
        self.allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        self.start = (time.perf_counter(), time.process_time())

    def on_train_begin(self, args, state, control, **kwargs):
        self._begin(0)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        self.rss.__exit__()
        step = Step(wall=wall, cpu=cpu)
        step.rss = (
            torch.cuda.max_memory_allocated() - self.allocated
            if torch.cuda.is_available()
            else self.rss.peak - self.rss.start
        )
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            # By self time (which ops), then by total time (which functions: TRL's LM head, attention, backward)
            averages = self.profiler.key_averages()
            table = "\n".join(
                averages.table(sort_by=key, row_limit=14, max_name_column_width=48)
                for key in ("self_cpu_time_total", "cpu_time_total")
            )
            self.arm.profile, self.profiler = table, None
            self.arm.profile_ops_s = sum(e.self_cpu_time_total for e in averages) / 1e6
            self.arm.profile_matmul_s = sum(e.self_cpu_time_total for e in averages if e.key in MATMUL_OPS) / 1e6
        self.arm.steps.append(step)
        last = state.global_step >= state.max_steps
        self.baton.pass_on(self.arm.name, finished=last)
        if not last:
            self._begin(state.global_step)


def load_model(args: argparse.Namespace, path: str):
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.random_init:
        config = AutoConfig.from_pretrained(path)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)


def build_arm(spec: str, args, k: int, rows: list[dict], path: str, tokenizer, refs: dict, output_dir: str) -> Arm:
    import trl
    from datasets import Dataset

    import trl_dpo_ext
    from trl_dpo_ext.quickstart import cpu_training_args

    name, _, micro = spec.partition(":")
    if name not in LABELS:
        raise SystemExit(f"unknown arm {spec!r}: one of {sorted(LABELS)} (stock:M for a micro-batch of M)")
    steps = args.warmup + args.rounds + args.profile
    common = dict(
        max_steps=steps,
        learning_rate=1e-6,
        logging_steps=10**6,
        bf16=args.bf16,
        max_length=None,  # the responses are cut already; no arm truncates
        train_sampling_strategy="sequential",
    )
    family = "padded" if name in ("stock", "ext") else "packed"
    if family not in refs:
        refs[family] = load_model(args, path)
    policy = load_model(args, path)
    if name == "stock":
        pairs = args.prompts_per_step * k
        micro_batch = int(micro) if micro else (args.stock_micro_batch or k)
        if pairs % micro_batch:
            raise SystemExit(f"stock micro-batch {micro_batch} does not divide the {pairs} pair rows of a step")
        accumulation = pairs // micro_batch
        config = trl.DPOConfig(
            **cpu_training_args(
                output_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation, **common
            )
        )
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=refs[family],
            args=config,
            train_dataset=Dataset.from_list(expand_to_pairs(rows)),
            processing_class=tokenizer,
        )
        label = f"{LABELS[name]} (micro-batch {micro_batch} × {accumulation})"
    else:
        micro_batch, accumulation = args.prompts_per_step, 1
        config = trl_dpo_ext.DPOConfig(
            **cpu_training_args(output_dir, per_device_train_batch_size=micro_batch, **common), **PACKED[name]
        )
        trainer = trl_dpo_ext.DPOTrainer(
            model=policy,
            ref_model=refs[family],
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        label = LABELS[name]
    trainer.remove_callback(PrinterCallback)
    arm = Arm(spec, label, trainer, micro_batch, accumulation, precomputed=config.precompute_ref_log_probs)
    trainer.data_collator = CountingCollator(trainer.data_collator, arm)
    selector = getattr(trainer, "rejected_selector", None)
    if selector is not None:  # the kept batches, counted apart: they are the training pass, not the step's rows
        selector.collator = CountingCollator(selector.collator, arm, kept=True)
    return arm


# ---------------------------------------------------------------------------------------------------- measures


def model_params(model) -> tuple[int, int]:
    """Non-embedding parameters (the body) and the LM head's (a matmul, tied or not)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not embedding and p is not head)
    return body, head.numel()


def matmul_rate(config, dtype: torch.dtype, seconds: float = 0.6) -> float:
    """FLOP/s of the model's matmuls in `dtype`: its projections on 512 tokens (8,192 on a GPU), forward shapes."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = 8192 if device == "cuda" else 512
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    shapes.append((inter, hidden))
    x = {n: torch.randn(tokens, n, device=device, dtype=dtype) for n in {hidden, inter}}
    w = [torch.randn(a, b, device=device, dtype=dtype) for a, b in shapes]
    flops = sum(2 * tokens * a * b for a, b in shapes)
    done, start = 0, time.perf_counter()
    while True:
        for (a, _), weight in zip(shapes, w):
            torch.mm(x[a], weight)
        done += flops
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if time.perf_counter() - start > seconds:
            return done / (time.perf_counter() - start)


def run_k(args: argparse.Namespace, k: int, path: str, tokenizer) -> None:
    rows = build_rows(args, k, tokenizer)
    refs: dict = {}
    with tempfile.TemporaryDirectory() as output_dir:
        arms = [build_arm(spec, args, k, rows, path, tokenizer, refs, output_dir) for spec in args.arms]
        body, head = model_params(arms[0].trainer.model)
        config = arms[0].trainer.model.config
        gc.collect()
        baton = Baton([arm.name for arm in arms] + ["matmul"])
        rates: list[float] = []
        profile_step = args.warmup + args.rounds if args.profile else None

        def train(arm: Arm) -> None:
            try:
                arm.trainer.add_callback(Turns(arm, baton, profile_step))
                arm.trainer.train()
            except BaseException as error:  # noqa: BLE001
                baton.fail(error)
                raise

        def matmul() -> None:
            for step in range(args.warmup + args.rounds + args.profile):
                baton.wait("matmul")
                rates.append(matmul_rate(config, torch.bfloat16 if args.bf16 else torch.float32))
                walls = "  ".join(f"{a.name} {a.steps[-1].wall:6.1f} s" for a in arms)
                print(f"  round {step}: {walls}  matmul {rates[-1] / 1e9:.0f} GFLOP/s", flush=True)
                baton.pass_on("matmul", finished=step == args.warmup + args.rounds + args.profile - 1)

        threads = [threading.Thread(target=train, args=(arm,)) for arm in arms] + [threading.Thread(target=matmul)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if baton.error is not None:
            raise SystemExit(f"an arm failed: {baton.error!r}")
        report(args, k, arms, rates, body, head)
        for arm in arms:
            arm.trainer = None


def check_same_rows(arms: list[Arm], steps: int, prompts_per_step: int) -> None:
    """Every arm got the same prompts, chosen and rejected token ids, in every step."""
    for arm in arms:
        if len(arm.steps) != steps:
            raise AssertionError(f"{arm.name} ran {len(arm.steps)} steps, not {steps}")
        add_counts(arm)
    for i in range(steps):
        reference = step_rows(arms[0], i)
        assert len(reference) == prompts_per_step, f"step {i}: {arms[0].name} got {len(reference)} prompts"
        for arm in arms[1:]:
            assert step_rows(arm, i) == reference, f"step {i}: {arm.name} got other rows than {arms[0].name}"


def report(args, k: int, arms: list[Arm], rates: list[float], body: int, head: int) -> None:
    steps = args.warmup + args.rounds + args.profile
    check_same_rows(arms, steps, args.prompts_per_step)
    timed = slice(args.warmup, args.warmup + args.rounds)
    rate = statistics.median(rates[timed])
    base = arms[0].steps[timed]
    cut = f"rows of {args.data}" if args.data else f"responses cut at {args.response_tokens} tokens"
    print(
        f"\nK = {k}: {args.prompts_per_step} prompts/step, {args.rounds} rounds after {args.warmup} warm-up, "
        f"{cut}; matmul rate {rate / 1e9:.0f} GFLOP/s "
        f"(rounds: {', '.join(f'{r / 1e9:.0f}' for r in rates[timed])}); rows checked identical in every step"
    )
    header = (
        f"| arm | prompts/s | vs {arms[0].name} (median, min-max) | CPU-s/step | vs {arms[0].name}, CPU | positions "
        "| real tokens "
        "| GFLOP/s | % matmul | real GFLOP/s | step peak memory above start |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for arm in arms:
        runs = arm.steps[timed]
        ratios = [ref.wall / run.wall for run, ref in zip(runs, base)]
        cpu_ratios = [ref.cpu / run.cpu for run, ref in zip(runs, base)]
        positions = sum(run.positions for run in runs)
        real = sum(run.real for run in runs)
        if arm.kept:  # the no-grad pass's positions, then the training pass's
            kept = sum(run.kept_positions for run in runs)
            positions, real = f"{positions:,} + {kept:,} kept", f"{real:,} + {sum(r.kept_real for r in runs):,} kept"
        else:
            positions, real = f"{positions:,}", f"{real:,}"
        wall = sum(run.wall for run in runs)
        timed_arm = Arm(arm.name, arm.label, steps=runs, kept=arm.kept, precomputed=arm.precomputed)
        flops, real_flops = step_flops(timed_arm, body, head), step_flops(timed_arm, body, head, real=True)
        memory = "GiB allocated" if torch.cuda.is_available() else "GiB malloc"
        print(
            f"| {arm.label} | {statistics.median(args.prompts_per_step / r.wall for r in runs):.3f} "
            f"| {statistics.median(ratios):.2f}× ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {statistics.median(r.cpu for r in runs):.1f} | {statistics.median(cpu_ratios):.2f}× "
            f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}) | {positions} | {real} "
            f"| {flops / wall / 1e9:.0f} | {flops / wall / rate:.0%} | {real_flops / wall / 1e9:.0f} "
            f"| {max(r.rss for r in runs) / 2**30:.2f} {memory} |"
        )
    print(
        "(per-round wall s: "
        + "; ".join(f"{a.name}: " + ", ".join(f"{r.wall:.1f}" for r in a.steps[timed]) for a in arms)
        + ")"
    )
    for arm in arms:
        if arm.profile:
            print(f"\nprofile of one step, {arm.label} (K = {k}):\n{arm.profile}")
    if args.profile:
        print(matmul_ceilings(arms, timed, rate, body, head))


def matmul_ceilings(arms: list[Arm], timed: slice, rate: float, body: int, head: int) -> str:
    """What the profiled step says each arm could reach were every op but its matmuls free: its FLOPs over its matmul
    kernels' time against the matmul rate, and its median step cut to that share against the first arm's median."""
    base = statistics.median(r.wall for r in arms[0].steps[timed])
    lines = [
        "\nCeilings from the profiled step (every op but the matmul kernels taking no time; attention counted as free):",
        f"| arm | matmul kernels, s | all ops, s | matmul share | GFLOP/s over the matmul time | % matmul rate | "
        f"vs {arms[0].name}, ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        if not arm.profile_ops_s:
            continue
        profiled = Arm(arm.name, arm.label, steps=arm.steps[-1:], kept=arm.kept, precomputed=arm.precomputed)
        over_matmuls = step_flops(profiled, body, head) / arm.profile_matmul_s
        share = arm.profile_matmul_s / arm.profile_ops_s
        ceiling = base / (statistics.median(r.wall for r in arm.steps[timed]) * share)
        lines.append(
            f"| {arm.label} | {arm.profile_matmul_s:.2f} | {arm.profile_ops_s:.2f} | {share:.0%} | "
            f"{over_matmuls / 1e9:.0f} | {over_matmuls / rate:.0%} | {ceiling:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    args = make_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()
    if args.model:
        path = args.model
    else:
        from trl_dpo_ext.real_model import smollm2_instruct

        path = str(smollm2_instruct())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.export:
        Path(args.export).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(args.export)
        AutoConfig.from_pretrained(path).save_pretrained(args.export)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device={device} threads={torch.get_num_threads()} model={path} random_init={args.random_init} "
        f"bf16={args.bf16} K={args.k} arms={args.arms} prompts/step={args.prompts_per_step} "
        f"response_tokens={args.response_tokens} rounds={args.rounds} warmup={args.warmup}",
        flush=True,
    )
    for k in args.k:
        if args.export:
            build_rows(args, k, tokenizer)
            continue
        run_k(args, k, path, tokenizer)


if __name__ == "__main__":
    main()
