"""Which data shape and which loss give the better model for the same cost? (docs/experiments.md)

Two tasks, the same arms and seeds, two budgets.

- `--part sort`: the sort-the-digits task of the quickstart (`trl_dpo_ext.quickstart.task`), with its ground-truth reward;
  metrics on held-out prompts: the mean ground-truth reward of greedy answers, and the preference accuracy of the
  implicit reward on held-out (chosen, rejected) pairs.
- `--part alpacaeval`: ../shared/data/alpacaeval-rated.jsonl.gz, 8 judge-rated responses per prompt; metric: how
  well the implicit reward ranks the 8 responses of each held-out prompt against the judge (Kendall τ-b averaged
  over prompts; top-1: the judge's best has the highest implicit reward).

Per seed, the reference is made once by SFT on the chosen (`train_sft_reference`) and every arm trains DPO from it.
Arms: `pairwise_best` (one rejected per prompt: the best-rated, the nearest miss), `pairwise_random` (one random
rejected per prompt, the way most pairwise data is built), `stock_pairs` (stock `trl.DPOTrainer` on the K-list
expanded to K pairs), and this trainer on one chosen + K rejected with `mean`, `softmax`, `min`, `plackett_luce`,
`infonca` and `nca`. Every arm keeps the `scores` column, rejected listed best first; `check_arm` asserts it before
training and prints one line per arm.

Budgets, both reported:
- `sequences`: the same optimizer steps for every arm, each of about `--sequences_per_step` forwarded policy
  sequences (fewer prompts per step as K grows);
- `wall`: the same training seconds for every arm. Each arm's seconds per step are measured in a short timed warm-up
  in this process, as CPU time of the single-threaded process (= wall-clock on one idle core, whatever else runs on
  the machine), and the budget of `stock_pairs` at the sequence budget (`--steps` × its seconds per step) is
  converted into steps per arm. K-list arms use prefix sharing where the warm-up finds it faster.
The reference forward runs every step for every arm (no precompute), as it does in a real run.

Resumable: runs already in `--output` (seed, arm, budget) are skipped, the SFT reference and the warm-up timings of a
seed are reused (`--work_dir`), and the JSON is rewritten after every run.

The runs of docs/experiments.md (which lists every command):

    python benchmarks/experiment_losses.py --part sort --k 3 --p_correct 0.1 --steps 120 --sequences_per_step 64 \
        --train_prompts 2000 --held_out 200 --sft_epochs 3 --seeds 0 1 2 --output docs/experiments_sort.json
    python benchmarks/experiment_losses.py --part alpacaeval --k 7 --steps 30 --sequences_per_step 48 \
        --train_prompts 655 --held_out 150 --max_chars 200 --vocab_size 1024 --sft_epochs 2 --seeds 0 1 2 3 4 \
        --output docs/experiments_alpacaeval.json
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402

from trl_dpo_ext import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_ext.quickstart import (  # noqa: E402
    QuickstartConfig,
    SortDigitsTask,
    char_tokenizer,
    completion_logps,
    greedy_reward,
    implicit_reward_accuracy,
    tiny_causal_lm,
)
from trl_dpo_ext.quickstart.demo import _pairs, _train_args  # noqa: E402
from trl_dpo_ext.ref_init import train_sft_reference  # noqa: E402


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAIRWISE_ARMS = ("pairwise_best", "pairwise_random", "stock_pairs")
LIST_ARMS = ("mean", "softmax", "min", "plackett_luce", "infonca", "nca")
DPO_ARMS = PAIRWISE_ARMS + LIST_ARMS
BUDGETS = ("sequences", "wall")
# The wall budget is what `stock_pairs` spends at the sequence budget
WALL_ANCHOR = "stock_pairs"
# InfoNCA/NCA targets softmax(s/α): the scores of both tasks lie in [0, 1], so α = 1 would give near-uniform targets
SCORE_TEMPERATURE = 0.1


# ------------------------------------------------------------------------------------------------- the arms' data


def arm_rows(arm: str, rows: list[dict], seed: int) -> list[dict]:
    """The training rows of one arm, from rows whose rejected are listed best first with aligned `scores`."""
    if arm == "pairwise_best":
        return [{**r, "rejected": r["rejected"][:1], "scores": r["scores"][:2]} for r in rows]
    if arm == "pairwise_random":
        rng, out = random.Random(seed), []
        for r in rows:
            k = rng.randrange(len(r["rejected"]))
            out.append({**r, "rejected": [r["rejected"][k]], "scores": [r["scores"][0], r["scores"][1 + k]]})
        return out
    if arm == "stock_pairs":  # TRL's pairwise format: one row per (chosen, rejected_k), the pair's scores kept
        return [
            {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rejected, "scores": [r["scores"][0], score]}
            for r in rows
            for rejected, score in zip(r["rejected"], r["scores"][1:], strict=True)
        ]
    return [dict(r) for r in rows]


def check_arm(arm: str, data: list[dict], source: list[dict]) -> str:
    """Assert that an arm's rows carry what its loss needs, before training; return the line that says so."""
    for i, r in enumerate(data):
        rejected = r["rejected"] if isinstance(r["rejected"], list) else [r["rejected"]]
        scores = r["scores"]
        assert {"prompt", "chosen", "rejected", "scores"} <= set(r), f"{arm}: row {i} lacks a column: {sorted(r)}"
        assert len(scores) == 1 + len(rejected), f"{arm}: row {i}: {len(scores)} scores for {len(rejected)} rejected"
        assert all(scores[0] > s for s in scores[1:]), f"{arm}: row {i}: a rejected scores >= the chosen: {scores}"
        assert scores[1:] == sorted(scores[1:], reverse=True), f"{arm}: row {i}: rejected not best first: {scores}"
    if arm == "pairwise_best":
        assert all(r["scores"][1] == max(s["scores"][1:]) for r, s in zip(data, source, strict=True))
    if arm == "stock_pairs":
        assert len(data) == sum(len(s["rejected"]) for s in source), f"{arm}: not one row per (chosen, rejected_k)"
    if arm in LIST_ARMS:
        assert all(r["rejected"] == s["rejected"] for r, s in zip(data, source, strict=True)), f"{arm}: list changed"
    note = ""
    if arm == "pairwise_random":
        best = sum(r["scores"][1] == max(s["scores"][1:]) for r, s in zip(data, source, strict=True))
        note = f", the best-rated rejected in {best / len(data):.0%} of rows"
    mean_k = statistics.mean(len(r["rejected"]) if isinstance(r["rejected"], list) else 1 for r in data)
    return (
        f"check {arm}: {len(data)} rows, columns {sorted(data[0])}, mean K {mean_k:.2f}, scores 1 + K and aligned, "
        f"rejected best first, chosen above every rejected{note}: ok"
    )


# ------------------------------------------------------------------------------------------------- training


class StepTimer(TrainerCallback):
    """CPU seconds of every optimizer step (forward, backward, optimizer), nothing else.

    The run is single-threaded, so the process's CPU time is the wall-clock the step takes on one idle core, whatever
    else the machine runs (wall-clock itself varied 1.7× between two arms of identical shape on the shared machine).
    """

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.process_time() - self._start)


def prompts_per_step(arm: str, mean_k: float, sequences: int) -> int:
    """Prompts (rows) per step for about `sequences` forwarded policy sequences: 2 per pair, 1 + K per K-list row."""
    return max(1, round(sequences / (2 if arm in PAIRWISE_ARMS else 1 + mean_k)))


def build_trainer(
    arm: str,
    data: list[dict],
    sft_dir: str,
    tokenizer,
    qc: QuickstartConfig,
    steps: int,
    batch: int,
    prefix_sharing: bool,
    out: str,
):
    """A DPO trainer of one arm from the SFT reference: the policy and a frozen reference both loaded from it."""
    config = dict(
        **_train_args(qc, out),
        max_steps=steps,
        learning_rate=qc.dpo_learning_rate,
        beta=qc.beta,
        max_length=None,
    )
    config.update(per_device_train_batch_size=batch, disable_tqdm=True, warmup_steps=min(10, steps // 6))
    model = AutoModelForCausalLM.from_pretrained(sft_dir, attn_implementation="sdpa")
    ref_model = AutoModelForCausalLM.from_pretrained(sft_dir, attn_implementation="sdpa")
    dataset = Dataset.from_list(data)
    if arm == "stock_pairs":
        args = trl.DPOConfig(**config)
        trainer = trl.DPOTrainer(model, ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        reduction = "mean" if arm in PAIRWISE_ARMS else arm
        args = DPOConfig(
            **config, rejected_reduction=reduction, score_temperature=SCORE_TEMPERATURE, prefix_sharing=prefix_sharing
        )
        trainer = DPOTrainer(model, ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # the end-of-training summary dict of every run
    timer = StepTimer()
    trainer.add_callback(timer)
    return trainer, timer


def calibrate(arms_data, sft_dir, tokenizer, qc, sequences, out, steps: int = 6, rounds: int = 1) -> dict:
    """CPU seconds per step of every arm: the median step of a short run (the first left out), the arms interleaved,
    `rounds` times, the least kept.

    Prefix sharing is timed on `mean` (every K-list arm forwards the same batch; only the few tensor ops of the loss
    differ) and used by every K-list arm when it is the faster.
    """
    variants = [(a, False) for a in DPO_ARMS] + [(LIST_ARMS[0], True)]
    best: dict[tuple[str, bool], float] = {}
    for _ in range(rounds):
        for arm, sharing in variants:
            data, mean_k = arms_data[arm]
            batch = prompts_per_step(arm, mean_k, sequences)
            trainer, timer = build_trainer(arm, data, sft_dir, tokenizer, qc, steps, batch, sharing, out)
            trainer.train()
            seconds = statistics.median(timer.seconds[1:])  # the first step warms caches up
            best[(arm, sharing)] = min(best.get((arm, sharing), float("inf")), seconds)
    sharing = best[(LIST_ARMS[0], True)] < best[(LIST_ARMS[0], False)]
    ratio = best[(LIST_ARMS[0], True)] / best[(LIST_ARMS[0], False)]
    result = {}
    for arm in DPO_ARMS:
        shared = arm in LIST_ARMS and sharing
        result[arm] = {"seconds_per_step": best[(arm, False)] * (ratio if shared else 1.0), "prefix_sharing": shared}
    result["prefix_sharing_speedup"] = 1 / ratio
    return result


def sft_reference(model, rows: list[dict], tokenizer, qc: QuickstartConfig, output_dir: str) -> str:
    """The SFT-on-chosen reference every arm of a seed starts from (`<output_dir>/sft_ref`, reused when there)."""
    args = DPOConfig(
        **_train_args(qc, output_dir),
        ref_init="sft_on_chosen",
        ref_init_learning_rate=qc.sft_learning_rate,
        ref_init_num_train_epochs=qc.sft_epochs,
        ref_init_batch_size=qc.batch_size,
        max_length=None,
    )
    args.disable_tqdm = True
    data = Dataset.from_list([{c: r[c] for c in ("prompt", "chosen", "rejected")} for r in rows])
    return train_sft_reference(model, data, tokenizer, args)


# ------------------------------------------------------------------------------------------------- the driver


class Results:
    """The JSON file of one part, rewritten after every run; what is already in it is skipped."""

    def __init__(self, path: str | None, header: dict):
        self.path = path
        self.data = {**header, "calibration": {}, "runs": []}
        if path and Path(path).exists():
            old = json.loads(Path(path).read_text())
            if old.get("config") != header["config"]:
                sys.exit(f"{path} was made with another configuration: {old.get('config')}; use another --output.")
            self.data.update(calibration=old.get("calibration", {}), runs=old.get("runs", []))

    def has(self, seed: int, arm: str, budget: str) -> bool:
        return any((r["seed"], r["arm"], r["budget"]) == (seed, arm, budget) for r in self.data["runs"])

    def add(self, row: dict) -> None:
        self.data["runs"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1) + "\n")


def run_seed(seed: int, rows: list[dict], make_model, tokenizer, qc, args, results: Results, evaluate) -> None:
    """SFT reference, warm-up timings, then every arm at both budgets, for one seed; `evaluate(policy)` → metrics."""
    todo = [(a, b) for a in args.arms for b in args.budgets if not results.has(seed, a, b)]
    if results.has(seed, "sft", "none") and not todo:
        return
    seed_dir = os.path.join(args.work_dir, f"{args.part}-k{args.k}-seed{seed}")
    qc.seed = seed
    torch.manual_seed(seed)
    sft_dir = sft_reference(make_model(seed=seed), rows, tokenizer, qc, seed_dir)
    if not results.has(seed, "sft", "none"):
        results.add({"seed": seed, "arm": "sft", "budget": "none", "k": 0, **evaluate(None, sft_dir)})
    arms_data = {}
    for arm in DPO_ARMS:
        data = arm_rows(arm, rows, seed)
        print(check_arm(arm, data, rows), flush=True)
        mean_k = statistics.mean(len(r["rejected"]) for r in rows) if arm in LIST_ARMS else 1.0
        arms_data[arm] = (data, mean_k)
    key = str(seed)
    if "wall" in args.budgets and key not in results.data["calibration"]:
        results.data["calibration"][key] = calibrate(
            arms_data, sft_dir, tokenizer, qc, args.sequences_per_step, os.path.join(seed_dir, "warmup")
        )
        results.save()
        print(json.dumps({"seed": seed, "calibration": results.data["calibration"][key]}), flush=True)
    calibration = results.data["calibration"].get(key)
    wall_budget = args.steps * calibration[WALL_ANCHOR]["seconds_per_step"] if calibration else None
    for arm, budget in todo:
        if arm == WALL_ANCHOR and budget == "wall" and results.has(seed, arm, "sequences"):
            # Its wall budget is its sequence budget by definition: the same run, not trained twice
            same = next(
                r for r in results.data["runs"] if (r["seed"], r["arm"], r["budget"]) == (seed, arm, "sequences")
            )
            results.add({**same, "budget": "wall"})
            continue
        data, mean_k = arms_data[arm]
        sharing = calibration[arm]["prefix_sharing"] if calibration else False
        steps = args.steps
        if budget == "wall":
            steps = max(1, round(wall_budget / calibration[arm]["seconds_per_step"]))
        batch = prompts_per_step(arm, mean_k, args.sequences_per_step)
        out = os.path.join(seed_dir, f"{arm}-{budget}")
        start = time.perf_counter()
        trainer, timer = build_trainer(arm, data, sft_dir, tokenizer, qc, steps, batch, sharing, out)
        trainer.train()
        row = dict(seed=seed, arm=arm, budget=budget, k=args.k, mean_k=mean_k, prompts_per_step=batch, steps=steps)
        row.update(prefix_sharing=sharing, train_seconds=sum(timer.seconds), wall_budget_seconds=wall_budget)
        row.update(evaluate(trainer.model, sft_dir))
        row["seconds"] = time.perf_counter() - start
        results.add(row)


def header(args, extra: dict) -> dict:
    keys = ("steps", "sequences_per_step", "k", "hidden_size", "layers", "sft_epochs", "train_prompts")
    config = {k: getattr(args, k) for k in keys} | extra
    return {"part": args.part, "command": "python " + " ".join(sys.argv), "config": config}


def sort_metrics(policy, sft_dir: str, *, cache: dict, task, tokenizer, prompts: list[str], rows: list[dict]) -> dict:
    """Greedy reward on the held-out prompts, and the implicit reward's accuracy on their pairs (SFT: the reward)."""
    pairs = _pairs(rows)
    if "ref" not in cache:
        reference = AutoModelForCausalLM.from_pretrained(sft_dir)
        cache["ref"] = completion_logps(reference, tokenizer, pairs)
        cache["sft_reward"] = greedy_reward(reference, tokenizer, task, prompts)[0]
    if policy is None:
        return {"greedy_reward": cache["sft_reward"], "accuracy": 0.5}
    accuracy = implicit_reward_accuracy(completion_logps(policy, tokenizer, pairs), cache["ref"], rows)
    return {"greedy_reward": greedy_reward(policy, tokenizer, task, prompts)[0], "accuracy": accuracy}


def part_sort(args) -> None:
    task = SortDigitsTask(p_correct=args.p_correct)
    qc = QuickstartConfig(num_train_prompts=args.train_prompts, num_eval_prompts=args.held_out)
    qc.hidden_size, qc.num_layers, qc.sft_epochs = args.hidden_size, args.layers, args.sft_epochs
    results = Results(args.output, header(args, {"p_correct": args.p_correct, "held_out": args.held_out}))
    tokenizer = char_tokenizer(chat_template=None)
    for seed in args.seeds:
        train_prompts = task.prompts(qc.num_train_prompts, seed=seed)
        eval_prompts = task.prompts(qc.num_eval_prompts, seed=seed + 1, exclude=train_prompts)
        rows = task.preference_rows(train_prompts, seed=seed, num_candidates=args.k + 1, keep_scores=True)
        eval_rows = task.preference_rows(eval_prompts, seed=seed + 1, num_candidates=args.k + 1)
        evaluate = functools.partial(
            sort_metrics, cache={}, task=task, tokenizer=tokenizer, prompts=eval_prompts, rows=eval_rows
        )
        make_model = functools.partial(
            tiny_causal_lm, len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers
        )
        run_seed(seed, rows, make_model, tokenizer, qc, args, results, evaluate)


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


def ranking_quality(values: torch.Tensor, judge: list[list[float]]) -> dict:
    """Kendall τ-b per held-out prompt between `values` and the judge's scores, averaged; and the top-1 agreement."""
    per_prompt = values.view(len(judge), -1).tolist()
    taus = [kendall_tau(v, s) for v, s in zip(per_prompt, judge, strict=True)]
    top1 = [
        max(range(len(v)), key=v.__getitem__) == max(range(len(s)), key=s.__getitem__)
        for v, s in zip(per_prompt, judge, strict=True)
    ]
    return {"kendall_tau": statistics.mean(taus), "top1": statistics.mean(top1)}


def alpaca_metrics(policy, sft_dir: str, *, cache: dict, tokenizer, pairs, judge) -> dict:
    """How the implicit reward ranks the held-out responses (SFT: its own log-likelihood) against the judge."""
    if "ref" not in cache:
        reference = AutoModelForCausalLM.from_pretrained(sft_dir)
        cache["ref"] = completion_logps(reference, tokenizer, pairs, batch_size=32)
    if policy is None:
        return ranking_quality(cache["ref"], judge)
    return ranking_quality(completion_logps(policy, tokenizer, pairs, batch_size=32) - cache["ref"], judge)


def part_alpacaeval(args) -> None:
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
    held_out, train = raw[: args.held_out], raw[args.held_out :][: args.train_prompts]

    # A byte-level BPE trained on the training text only (no hub)
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [r["instruction"] for r in train] + [c["output"] for r in train for c in r["completions"]]
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")

    rows = rated_to_multi_rejected(train, num_rejected=args.k)  # rejected best first, scores aligned
    for r in rows:
        r["prompt"] = r["prompt"] + "\n"
    qc = QuickstartConfig(batch_size=16, sft_learning_rate=1e-3, sft_epochs=args.sft_epochs, dpo_learning_rate=2e-4)
    extra = {"held_out": args.held_out, "max_chars": chars, "vocab_size": args.vocab_size}
    results = Results(args.output, header(args, extra))
    pairs = [(r["instruction"] + "\n", c["output"]) for r in held_out for c in r["completions"]]
    judge = [[c["score"] for c in r["completions"]] for r in held_out]

    for seed in args.seeds:
        evaluate = functools.partial(alpaca_metrics, cache={}, tokenizer=tokenizer, pairs=pairs, judge=judge)
        make_model = functools.partial(
            tiny_causal_lm, len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers
        )
        run_seed(seed, rows, make_model, tokenizer, qc, args, results, evaluate)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["sort", "alpacaeval"], default="sort")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=7, help="Rejected kept per prompt (sort: K + 1 annotator answers).")
    parser.add_argument("--train_prompts", type=int, default=1000)
    parser.add_argument("--held_out", type=int, default=200, help="Held-out prompts.")
    parser.add_argument("--p_correct", type=float, default=0.1, help="Sort: how often the annotator is right.")
    parser.add_argument("--steps", type=int, default=40, help="DPO optimizer steps at the sequence budget.")
    parser.add_argument("--sequences_per_step", type=int, default=64, help="Policy sequences per step.")
    parser.add_argument("--sft_epochs", type=float, default=3.0)
    parser.add_argument("--max_chars", type=int, default=200, help="AlpacaEval: characters kept per response.")
    parser.add_argument("--vocab_size", type=int, default=1024, help="AlpacaEval: BPE vocabulary.")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work_dir", type=str, default="/tmp/experiment_losses", help="SFT references, warm-ups.")
    parser.add_argument("--output", type=str, default=None, help="The JSON results (read first, to resume).")
    parser.add_argument("--arms", nargs="+", choices=DPO_ARMS, default=list(DPO_ARMS), help="DPO arms to run.")
    parser.add_argument("--budgets", nargs="+", choices=BUDGETS, default=list(BUDGETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    part_sort(args) if args.part == "sort" else part_alpacaeval(args)


if __name__ == "__main__":
    main()
