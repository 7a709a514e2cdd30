"""Overhead of the gradient-weight diagnostics: the per-example record and the `grad_weight/...` metrics.

Trains the same small model on the same rows with `grad_weight_record=False` and `=True`, the two arms taking turns
`--repeats` times, each a fresh model for `--warmup` + `--steps` optimizer steps, and reports:

- the time spent inside the record's own work (formatting the JSON lines and appending them to the file), and
  inside the whole diagnostics call (`GradWeightDiagnostics.step`: the weights, the effective weights by autograd,
  the gather, the statistics, and the record when on), measured in-process around those functions, as a share of
  the step time. These are precise even on a busy machine;
- the median step time of each arm, and their ratio: the end-to-end check, which on a shared CPU carries a noise of a
  few percent.

The model and data are those of the CPU preset of `benchmarks/bench_k_rejected.py`: a 4-layer Llama of width 256
(random weights), prompts and responses of 64 tokens of random characters, 8 prompts of K = 3 rejected per step.

    python benchmarks/bench_grad_weight_record.py --threads 1

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from bench_k_rejected import StepTimer, make_rows  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

import trl_dpo_ext.diagnostics as diagnostics_module  # noqa: E402
from trl_dpo_ext import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm  # noqa: E402


MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=768)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-rejected", "-k", type=int, default=3, help="K, rejected responses per prompt.")
    parser.add_argument("--prompt-len", type=int, default=64, help="Prompt tokens.")
    parser.add_argument("--response-len", type=int, default=64, help="Tokens of each response, EOS included.")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="Prompts per optimizer step.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per repeat.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before them.")
    parser.add_argument("--repeats", type=int, default=3, help="Times each arm runs; medians are reported.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; 1 steadies a shared CPU.")
    return parser


class Timed:
    """Wraps a function of a module (or a method of a class) and adds up the seconds spent in it, per arm."""

    def __init__(self, owner, name: str, totals: dict[str, float], key: str):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        original = self.original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        setattr(owner, name, timed)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)


def run_arm(args: argparse.Namespace, rows: list[dict], record: bool) -> dict[str, float]:
    tokenizer = char_tokenizer()
    policy, ref = (tiny_causal_lm(len(tokenizer), seed=0, **MODEL) for _ in range(2))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            **cpu_training_args(
                output_dir,
                per_device_train_batch_size=args.prompts_per_step,
                max_steps=args.warmup + args.steps,
                learning_rate=1e-5,
                logging_steps=1,
                use_cpu=True,
                grad_weight_record=record,
            )
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)
        totals: dict[str, float] = defaultdict(float)
        # Count only the timed steps: reset the totals when the warmup ends
        warmup_end = args.warmup

        class ResetAfterWarmup(TrainerCallback):
            def on_step_end(self, targs, state, control, **kwargs):
                if state.global_step == warmup_end:
                    totals.clear()

        trainer.add_callback(ResetAfterWarmup())
        wrappers = [
            Timed(diagnostics_module, "format_record", totals, "record"),
            Timed(diagnostics_module, "append_record", totals, "record"),
            Timed(diagnostics_module.GradWeightDiagnostics, "step", totals, "diagnostics"),
        ]
        try:
            trainer.train()
        finally:
            for wrapper in wrappers:
                wrapper.restore()
        lines = sum(1 for _ in open(os.path.join(output_dir, "grad_weights.jsonl"))) if record else 0
    steps, _ = timer.step_times(args.warmup)
    total = sum(steps)
    return {
        "step_s": statistics.median(steps),
        "record_share": totals["record"] / total,
        "diagnostics_share": totals["diagnostics"] / total,
        "record_ms_per_step": 1000 * totals["record"] / len(steps),
        "diagnostics_ms_per_step": 1000 * totals["diagnostics"] / len(steps),
        "lines": lines,
    }


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = make_rows(args, args.prompts_per_step * (args.warmup + args.steps))
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for record in (False, True):
            result = run_arm(args, rows, record)
            results[record].append(result)
            print(
                f"repeat {repeat} record={record!s:5}: step {result['step_s'] * 1000:.1f} ms, diagnostics "
                f"{result['diagnostics_ms_per_step']:.2f} ms/step, record {result['record_ms_per_step']:.3f} "
                f"ms/step ({result['lines']} lines)"
            )

    def median(record: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[record])

    off, on = median(False, "step_s"), median(True, "step_s")
    print(
        f"\nK={args.num_rejected}, {args.prompts_per_step} prompts/step, prompt {args.prompt_len} + responses "
        f"{args.response_len} tokens, torch threads {torch.get_num_threads()}, {args.steps} timed steps x "
        f"{args.repeats} repeats"
    )
    print(
        f"| | record off | record on |\n|---|---|---|\n| median step time | {off * 1000:.1f} ms | {on * 1000:.1f} ms |"
    )
    print(
        f"| diagnostics call (always on) | {median(False, 'diagnostics_ms_per_step'):.2f} ms/step "
        f"({100 * median(False, 'diagnostics_share'):.2f}%) | {median(True, 'diagnostics_ms_per_step'):.2f} ms/step "
        f"({100 * median(True, 'diagnostics_share'):.2f}%) |"
    )
    print(
        f"| record: format + append | – | {median(True, 'record_ms_per_step'):.3f} ms/step "
        f"({100 * median(True, 'record_share'):.3f}%) |"
    )
    print(f"| step time ratio on/off | | {on / off:.3f} |")


if __name__ == "__main__":
    main()
