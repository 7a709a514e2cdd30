"""Does a list of rejected pay, and which loss should a user pick? (docs/experiments.md)

Part A, the sort-the-digits task of the quickstart (`trl_dpo_ext.quickstart.task`), with its ground-truth reward. Per seed: the
reference is made once by SFT on the chosen answers (`ref_init="sft_on_chosen"`'s function); every arm then trains
DPO from it at an EQUAL BUDGET of forwarded sequences (`--sequences_per_step` × `--steps`, policy side; the reference
log-probs are precomputed for every arm alike). Arms: one rejected (pairwise), stock `trl.DPOTrainer` on the K-list
expanded to pairs (2K sequences per prompt), and this trainer on one chosen + K rejected with `mean`, `softmax`,
`min`, `plackett_luce` and `infonca` (targets: the ground-truth scores). Reported on held-out prompts: the mean
ground-truth reward of greedy answers, and the preference accuracy of the implicit reward on held-out pairs.

Part B (`--part alpacaeval`), ../shared/data/alpacaeval-rated.jsonl.gz: held-out prompts, 8 judge-rated responses
each; after SFT on the best response and DPO with each loss (K = 7, judge scores kept), how well the implicit reward
ranks the held-out responses against the judge (Kendall τ per prompt, averaged; top-1 accuracy).

    python benchmarks/experiment_losses.py --part sort --seeds 0 1 2 --output docs/experiments_sort.json
    python benchmarks/experiment_losses.py --part sort --p_correct 0.03 --output docs/experiments_sort_hard.json
    python benchmarks/experiment_losses.py --part alpacaeval --output docs/experiments_alpacaeval.json
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


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from trl_dpo_ext import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_ext.quickstart import (  # noqa: E402  # noqa: E402
    QuickstartConfig,
    SortDigitsTask,  # noqa: E402
    _pairs,
    _train_args,
    char_tokenizer,
    completion_logps,
    greedy_reward,
    implicit_reward_accuracy,
    tiny_causal_lm,
)
from trl_dpo_ext.ref_init import train_sft_reference  # noqa: E402


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LOSSES = ("mean", "softmax", "min", "plackett_luce", "infonca")
# InfoNCA's target softmax(s/α): the scores of both parts lie in [0, 1], so α = 1 would give near-uniform targets
SCORE_TEMPERATURE = 0.1


def truncate_rows(rows: list[dict], k: int) -> list[dict]:
    """Keep the first `k` rejected of each row (rows list them best-rated first) and their scores."""
    out = []
    for r in rows:
        n = min(k, len(r["rejected"]))
        out.append(
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"][:n],
                "scores": r["scores"][: 1 + n],
            }
        )
    return out


def sft_reference(model, rows: list[dict], tokenizer, qc: QuickstartConfig, output_dir: str) -> str:
    """The SFT-on-chosen reference every arm of a seed starts from (saved in `<output_dir>/sft_ref`)."""
    args = DPOConfig(
        **_train_args(qc, output_dir),
        ref_init="sft_on_chosen",
        ref_init_learning_rate=qc.sft_learning_rate,
        ref_init_num_train_epochs=qc.sft_epochs,
        ref_init_batch_size=qc.batch_size,
        max_length=None,
    )
    data = Dataset.from_list([{c: r[c] for c in ("prompt", "chosen", "rejected")} for r in rows])
    return train_sft_reference(model, data, tokenizer, args)


def train_arm(
    arm: str, k: int, rows: list[dict], sft_dir: str, tokenizer, qc: QuickstartConfig, steps: int, seqs: int, out: str
):
    """DPO from the SFT reference for `steps` steps of about `seqs` forwarded sequences each."""
    rows = truncate_rows(rows, k)
    mean_k = statistics.mean(len(r["rejected"]) for r in rows)
    stock = arm == "stock_pairs"
    if stock:
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": j} for r in rows for j in r["rejected"]]
        batch = max(1, round(seqs / 2))  # 2 sequences per pair
    else:
        batch = max(1, round(seqs / (1 + mean_k)))
    reduction = "mean" if stock or arm == "pairwise" else arm
    config = dict(
        **_train_args(qc, out),
        max_steps=steps,
        learning_rate=qc.dpo_learning_rate,
        beta=qc.beta,
        precompute_ref_log_probs=True,
        max_length=None,
    )
    config["per_device_train_batch_size"] = batch
    config["disable_tqdm"] = True
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    if stock:
        args = trl.DPOConfig(**config)
        data = Dataset.from_list(rows)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    else:
        args = DPOConfig(**config, rejected_reduction=reduction, score_temperature=SCORE_TEMPERATURE)
        keep = (
            ("prompt", "chosen", "rejected", "scores") if reduction == "infonca" else ("prompt", "chosen", "rejected")
        )
        data = Dataset.from_list([{c: r[c] for c in keep} for r in rows])
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer.model, mean_k, batch


def part_sort(args) -> dict:
    task = SortDigitsTask(p_correct=args.p_correct)
    qc = QuickstartConfig(num_train_prompts=args.train_prompts)
    results = []
    for seed in args.seeds:
        qc.seed = seed
        torch.manual_seed(seed)
        train_prompts = task.prompts(qc.num_train_prompts, seed=seed)
        eval_prompts = task.prompts(qc.num_eval_prompts, seed=seed + 1, exclude=train_prompts)
        train_rows = task.preference_rows(train_prompts, seed=seed, num_candidates=8, keep_scores=True)
        eval_rows = task.preference_rows(eval_prompts, seed=seed + 1, num_candidates=8)
        tokenizer = char_tokenizer(chat_template=None)
        with tempfile.TemporaryDirectory() as tmp:
            model = tiny_causal_lm(
                len(tokenizer), seed=seed, hidden_size=qc.hidden_size, num_hidden_layers=qc.num_layers
            )
            sft_dir = sft_reference(model, train_rows, tokenizer, qc, tmp)
            reference = AutoModelForCausalLM.from_pretrained(sft_dir)
            eval_pairs = _pairs(eval_rows)
            ref_logps = completion_logps(reference, tokenizer, eval_pairs)
            sft_reward, _ = greedy_reward(reference, tokenizer, task, eval_prompts)
            results.append({"seed": seed, "arm": "sft", "k": 0, "greedy_reward": sft_reward, "accuracy": 0.5})
            arms = [("pairwise", 1)] + [(a, k) for k in args.ks if k > 1 for a in ("stock_pairs", *LOSSES)]
            for arm, k in arms:
                start = time.perf_counter()
                out = os.path.join(tmp, f"{arm}-{k}")
                policy, mean_k, batch = train_arm(
                    arm, k, train_rows, sft_dir, tokenizer, qc, args.steps, args.sequences_per_step, out
                )
                accuracy = implicit_reward_accuracy(
                    completion_logps(policy, tokenizer, eval_pairs), ref_logps, eval_rows
                )
                reward, _ = greedy_reward(policy, tokenizer, task, eval_prompts)
                row = dict(seed=seed, arm=arm, k=k, mean_k=mean_k, prompts_per_step=batch, greedy_reward=reward)
                row.update(accuracy=accuracy, seconds=time.perf_counter() - start)
                results.append(row)
                print(json.dumps(row), flush=True)
    return {
        "part": "sort",
        "p_correct": args.p_correct,
        "steps": args.steps,
        "sequences_per_step": args.sequences_per_step,
        "runs": results,
    }


# ----------------------------------------------------------------------------------------------- AlpacaEval


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall τ-b between two rankings of the same items (ties in either count as neither concordant nor not)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else 0.0


def part_alpacaeval(args) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trl_dpo_ext.convert import rated_to_multi_rejected

    with gzip.open(SHARED_DATA / "alpacaeval-rated.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    random.Random(0).shuffle(raw)
    chars = args.max_chars
    for r in raw:
        r["instruction"] = r["instruction"][: chars // 2]
        for c in r["completions"]:
            c["output"] = c["output"][:chars]
    held_out, train = raw[: args.held_out], raw[args.held_out :]

    # A byte-level BPE trained on the training text only (no hub)
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [r["instruction"] for r in train] + [c["output"] for r in train for c in r["completions"]]
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")

    rows = rated_to_multi_rejected(train, num_rejected=7)
    for r in rows:
        r["prompt"] = r["prompt"] + "\n"
    qc = QuickstartConfig(batch_size=16, seed=0, sft_learning_rate=1e-3, sft_epochs=2.0, dpo_learning_rate=2e-4)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_causal_lm(len(tokenizer), seed=0, hidden_size=args.hidden_size, num_hidden_layers=args.layers)
        sft_dir = sft_reference(model, rows, tokenizer, qc, tmp)
        reference = AutoModelForCausalLM.from_pretrained(sft_dir)
        pairs = [(r["instruction"] + "\n", c["output"]) for r in held_out for c in r["completions"]]
        judge = [[c["score"] for c in r["completions"]] for r in held_out]
        ref_logps = completion_logps(reference, tokenizer, pairs, batch_size=16)

        def ranking_quality(values: torch.Tensor) -> tuple[float, float]:
            per_prompt = values.view(len(held_out), -1).tolist()
            taus = [kendall_tau(v, s) for v, s in zip(per_prompt, judge, strict=True)]
            top1 = [
                max(range(len(v)), key=v.__getitem__) == max(range(len(s)), key=s.__getitem__)
                for v, s in zip(per_prompt, judge, strict=True)
            ]
            return statistics.mean(taus), statistics.mean(top1)

        tau, top1 = ranking_quality(ref_logps)
        results.append({"arm": "sft log-likelihood", "k": 0, "kendall_tau": tau, "top1": top1})
        print(json.dumps(results[-1]), flush=True)
        for arm, k in [("pairwise", 1), ("stock_pairs", 7), *[(a, 7) for a in LOSSES]]:
            start = time.perf_counter()
            policy, mean_k, batch = train_arm(
                arm, k, rows, sft_dir, tokenizer, qc, args.steps, args.sequences_per_step, os.path.join(tmp, arm)
            )
            tau, top1 = ranking_quality(completion_logps(policy, tokenizer, pairs, batch_size=16) - ref_logps)
            row = dict(arm=arm, k=k, mean_k=mean_k, prompts_per_step=batch, kendall_tau=tau, top1=top1)
            row["seconds"] = time.perf_counter() - start
            results.append(row)
            print(json.dumps(row), flush=True)
    return {"part": "alpacaeval", "steps": args.steps, "sequences_per_step": args.sequences_per_step, "runs": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["sort", "alpacaeval"], default="sort")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument("--train_prompts", type=int, default=3000)
    parser.add_argument(
        "--p_correct", type=float, default=0.1, help="Sort task: how often the annotator writes the right answer."
    )
    parser.add_argument("--steps", type=int, default=60, help="DPO optimizer steps of every arm.")
    parser.add_argument("--sequences_per_step", type=int, default=96, help="Policy sequences per step (the budget).")
    parser.add_argument("--held_out", type=int, default=205, help="AlpacaEval: held-out prompts.")
    parser.add_argument("--max_chars", type=int, default=400, help="AlpacaEval: characters kept per response.")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--output", type=str, default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = part_sort(args) if args.part == "sort" else part_alpacaeval(args)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
