"""The evidence on a real model: what K rejected and each loss buy SmolLM2-135M-Instruct (docs/experiments.md).

One grid of cells, each `(K, budget, seed, arm)`: a DPO run from SmolLM2-135M-Instruct (the checked offline copy of
`trl_dpo_ext.real_model.smollm2_instruct()`) with a LoRA adapter on its top layers, on AlpacaEval rows of
../shared/data (8 judge-rated responses per instruction) through the model's chat template, then evaluated on
held-out prompts. Each finished cell is one JSON file under `--results` (default docs/experiments_real_model/) that
carries the commit, the library versions and the command that reruns it; a finished cell is never rerun, so the grid
resumes where it stopped, across sessions. `benchmarks/summarize_real_model.py` makes the tables of
docs/experiments.md from those files.

    python benchmarks/experiment_real_model.py prepare            # the reference pass, cached (about 10 min)
    python benchmarks/experiment_real_model.py run &               # a worker: claims and runs cells until none is left
    python benchmarks/experiment_real_model.py run &               # a second one on the second core
    python benchmarks/experiment_real_model.py cell --k 7 --budget prompts --seed 0 --arm mean   # one cell

Data, the same for every cell: instructions deduplicated on normalised text (before and after the cut), shuffled
with `--split_seed`; the first `--held_out` are held out, the next `--pool` train. Instructions cut at
`--max_prompt_tokens`, responses at `--max_response_tokens` (tokens of the model's tokenizer), before anything else.
`rated_to_multi_rejected`: the judge's best response is the chosen, the other 7 the rejected (best first, scores
aligned). K = 3 keeps the three lowest-rated (the clearest negatives).

Arms (our trainer unless said): `pairwise_random` (one rejected drawn per prompt with the seed, how most pairwise
data is built), `pairwise_best` (the best-rated rejected, the nearest miss), `pairwise_mu2sigma` (the rejected whose
score is nearest μ − 2σ of the prompt's 8 scores, arXiv 2502.16825), `stock_pairs` (stock `trl.DPOTrainer` on the K
expanded pairs), the K-list losses `mean`, `min`, `softmax`, `plackett_luce`, `nca` (`score_temperature` 0.1: the
judge's scores lie in [0, 1]), and online hard-negative selection on the `mean` loss (`hardest_1`, `hardest_2`,
`sampled_2`). K = 3 has its own `pairwise_random` (one of the three) to separate K from the choice of negatives.

Budgets, both enforced at run time:
- `prompts`: every arm trains one epoch on the same `--train_prompts` prompts (the seed's first ones of the pool),
  `--prompts_per_step` prompts per optimizer step (stock: their K pairs each);
- `cpu`: every arm trains on the pool (the seed's order) until its process CPU seconds in training steps reach those
  the `mean` arm of the same K and seed spent at the `prompts` budget (`CPUBudget` stops it at the step end nearest
  the budget); cheaper arms see more prompts.
One thread per process, so CPU seconds are the time on one idle core; reference log-probs computed once for all
cells (`prepare`) and given to every trainer as columns (TRL's `precompute_ref_log_probs`), so no arm pays a
reference forward in its budget. Our arms run with `prefix_sharing` and `padding_free`.

Evaluation of each cell, on the held-out prompts (all 8 responses of each) and on `--hh_pairs` HH-RLHF harmless test
pairs: the implicit reward β·(log π − log π_ref) summed over the response and per token, and the policy's own
log-likelihood per token. Per held-out prompt the JSON keeps, per scorer, the concordant and discordant counts over
judge-separated pairs (judge scores at least `--judge_tie` apart) and whether its top response is the judge's; per
HH pair, 1 / ½ / 0 for chosen above / tied / below. Only the top `--train_layers` layers carry the adapter, so the
layers below are the reference's: their output on the evaluation sequences is computed once (`prepare`) and each
evaluation runs the top layers from it (checked against the full forward in `prepare`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402

from trl_dpo_ext import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_ext.convert import rated_to_multi_rejected  # noqa: E402
from trl_dpo_ext.evaluation import (  # noqa: E402
    JudgeCounts,
    cut_to_tokens,
    judge_counts,
    normalised,
    padded_batch,
    response_token_ids,
    summed_logps,
)
from trl_dpo_ext.quickstart import cpu_training_args  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PAIRWISE = ("pairwise_random", "pairwise_best", "pairwise_mu2sigma")
LISTS = ("mean", "min", "softmax", "plackett_luce", "nca")
SELECTION = {"hardest_1": ("hardest", 1), "hardest_2": ("hardest", 2), "sampled_2": ("sampled", 2)}
ARMS = {
    7: (*PAIRWISE, "stock_pairs", *LISTS, *SELECTION),
    3: ("pairwise_random", "stock_pairs", *LISTS),
}
BUDGETS = ("prompts", "cpu")
ANCHOR = "mean"  # the CPU budget of a (K, seed) is what this arm spent at the `prompts` budget
SCORE_TEMPERATURE = 0.1  # nca: softmax(scores / 0.1) over judge scores in [0, 1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class GridConfig:
    """Everything that makes two cells comparable; a cell made with another configuration is refused."""

    held_out: int = 40
    pool: int = 160
    train_prompts: int = 48
    prompts_per_step: int = 4
    max_prompt_tokens: int = 32
    max_response_tokens: int = 24
    hh_pairs: int = 64
    hh_max_prompt_tokens: int = 96
    lora_r: int = 8
    train_layers: int = 4
    learning_rate: float = 1e-3
    beta: float = 0.1
    judge_tie: float = 0.01
    split_seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------- the data


def alpaca_split(cfg: GridConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(held-out, pool) rated rows: deduplicated on normalised text before and after the cut, shuffled, cut."""
    with gzip.open(SHARED_DATA / "alpacaeval-rated.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    seen, rows = set(), []
    for row in raw:
        instruction = cut_to_tokens(tokenizer, row["instruction"], cfg.max_prompt_tokens)
        keys = {normalised(row["instruction"]), normalised(instruction)}
        if keys & seen:
            continue
        seen |= keys
        completions = [
            {"output": cut_to_tokens(tokenizer, c["output"], cfg.max_response_tokens), "score": float(c["score"])}
            for c in row["completions"]
        ]
        rows.append({"id": row["id"], "instruction": instruction, "completions": completions})
    random.Random(cfg.split_seed).shuffle(rows)
    held_out, pool = rows[: cfg.held_out], rows[cfg.held_out : cfg.held_out + cfg.pool]
    assert not {normalised(r["instruction"]) for r in held_out} & {normalised(r["instruction"]) for r in pool}
    return held_out, pool


def hh_messages(text: str) -> list[dict]:
    """An HH-RLHF dialogue ("\\n\\nHuman: …\\n\\nAssistant: …") as chat messages."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n"))
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def hh_pair(row: dict) -> tuple[list[dict], str, str] | None:
    """An HH-RLHF row as (the prompt's messages, the chosen answer, the rejected answer), or None where its two
    dialogues differ elsewhere than in their last assistant turn."""
    chosen, rejected = hh_messages(row["chosen"]), hh_messages(row["rejected"])
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
        return None
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def hh_split(cfg: GridConfig, tokenizer) -> list[dict]:
    """`--hh_pairs` HH-RLHF harmless test pairs (seeded draw) whose prompt fits `--hh_max_prompt_tokens` through the
    chat template, responses cut like AlpacaEval's; pairs whose cut responses are equal are left out."""
    with gzip.open(SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    random.Random(cfg.split_seed).shuffle(raw)
    pairs = []
    for row in raw:
        if (pair := hh_pair(row)) is None:
            continue
        prompt, chosen, rejected = pair
        length = len(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        answers = [cut_to_tokens(tokenizer, answer, cfg.max_response_tokens) for answer in (chosen, rejected)]
        if length > cfg.hh_max_prompt_tokens or not all(answers) or answers[0] == answers[1]:
            continue
        pairs.append({"prompt": prompt, "responses": answers})
        if len(pairs) == cfg.hh_pairs:
            break
    return pairs


def rows_k(pool_rows: list[dict], k: int) -> list[dict]:
    """K = 7: every rejected; K = 3: the three lowest-rated (the last three of the best-first list)."""
    if k == 7:
        return pool_rows
    return [
        {
            **r,
            "rejected": r["rejected"][-k:],
            "scores": [r["scores"][0], *r["scores"][1:][-k:]],
            "ref_rejected_logps": r["ref_rejected_logps"][-k:],
        }
        for r in pool_rows
    ]


def arm_rows(arm: str, rows: list[dict], seed: int) -> list[dict]:
    """The training rows of one arm from K-list rows (rejected best first, scores aligned, reference columns)."""

    def pick(r, j):
        return {
            **r,
            "rejected": [r["rejected"][j]],
            "scores": [r["scores"][0], r["scores"][1 + j]],
            "ref_rejected_logps": [r["ref_rejected_logps"][j]],
        }

    if arm == "pairwise_random":
        rng = random.Random(seed)
        return [pick(r, rng.randrange(len(r["rejected"]))) for r in rows]
    if arm == "pairwise_best":
        return [pick(r, 0) for r in rows]
    if arm == "pairwise_mu2sigma":
        out = []
        for r in rows:
            target = statistics.mean(r["scores"]) - 2 * statistics.pstdev(r["scores"])
            out.append(pick(r, min(range(len(r["rejected"])), key=lambda j: abs(r["scores"][1 + j] - target))))
        return out
    if arm == "stock_pairs":  # TRL's format: one row per (chosen, rejected_k)
        return [
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": rejected,
                "ref_chosen_logps": r["ref_chosen_logps"],
                "ref_rejected_logps": ref,
            }
            for r in rows
            for rejected, ref in zip(r["rejected"], r["ref_rejected_logps"], strict=True)
        ]
    return [dict(r) for r in rows]


def check_arm(arm: str, data: list[dict], source: list[dict]) -> str:
    """Assert, before training, that an arm's rows carry what its loss needs; return the line that says so."""
    if arm == "stock_pairs":
        assert len(data) == sum(len(s["rejected"]) for s in source), (
            "stock_pairs: not one row per (chosen, rejected_k)"
        )
        assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(data[0])
        return f"check {arm}: {len(data)} pair rows from {len(source)} prompts, reference columns: ok"
    for i, (r, s) in enumerate(zip(data, source, strict=True)):
        assert r["prompt"] == s["prompt"] and r["chosen"] == s["chosen"], f"{arm}: row {i} is another prompt"
        assert len(r["scores"]) == 1 + len(r["rejected"]) == 1 + len(r["ref_rejected_logps"]), f"{arm}: row {i}"
        assert all(r["scores"][0] > x for x in r["scores"][1:]), f"{arm}: row {i}: a rejected scores >= the chosen"
        for rejected, ref in zip(r["rejected"], r["ref_rejected_logps"], strict=True):
            assert ref == s["ref_rejected_logps"][s["rejected"].index(rejected)], f"{arm}: row {i}: reference moved"
    if arm == "pairwise_best":
        assert all(r["scores"][1] == s["scores"][1] for r, s in zip(data, source, strict=True))
    if arm in LISTS or arm in SELECTION:
        assert all(r["rejected"] == s["rejected"] for r, s in zip(data, source, strict=True)), f"{arm}: list changed"
    best = sum(r["scores"][1] == s["scores"][1] for r, s in zip(data, source, strict=True))
    return (
        f"check {arm}: {len(data)} rows, K {len(data[0]['rejected'])}, scores and reference aligned, chosen above "
        f"every rejected, the best-rated rejected in {best / len(data):.0%} of rows: ok"
    )


# ------------------------------------------------------------------------------------------ forwards and metrics


def top_layers_logits(model, hidden: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """Last hidden states (after the final norm) of `model` from the input of its decoder layer `first` (the layers
    below are frozen, so that input is the reference's): the decoder runs only its layers from `first` on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[first:])
    try:
        with torch.no_grad():
            return decoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
    finally:
        decoder.layers = layers


def top_layers_logps(model, item: dict, first: int) -> list[float]:
    """log π(response | prompt) of each sequence of an evaluation item, from the cached input of layer `first`; the
    LM head runs on the positions that predict a response token only (most of a short row is its prompt)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    states = top_layers_logits(model, item["hidden"], item["mask"], first)
    start = item["prompt_len"] - 1
    out = []
    with torch.no_grad():
        for j, n in enumerate(item["lengths"]):
            log_probs = base.lm_head(states[j, start : start + n]).float().log_softmax(-1)
            targets = item["input_ids"][j, start + 1 : start + 1 + n]
            out.append(log_probs.gather(1, targets[:, None]).sum().item())
    return out


def alpaca_metrics(scorers: dict[str, list[list[float]]], judge: list[list[float]], tie: float) -> dict:
    out = {}
    for name, values in scorers.items():
        counts = [judge_counts(v, s, tie) for v, s in zip(values, judge, strict=True)]
        out[name] = {key: [getattr(c, key) for c in counts] for key in JudgeCounts._fields}
    return out


def hh_metrics(scorers: dict[str, list[list[float]]]) -> dict:
    """Per HH pair: 1 if the scorer puts the chosen above the rejected, ½ on a tie, 0 below."""
    return {name: [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in values] for name, values in scorers.items()}


# ------------------------------------------------------------------------------------------------ prepare


def model_path() -> str:
    from trl_dpo_ext.real_model import smollm2_instruct

    return smollm2_instruct()


def prepare(cfg: GridConfig, work: Path) -> dict:
    """Data, reference log-probs of every pool response, and the evaluation sets with their reference log-probs
    and the input of the first adapted layer; cached in `work` under the configuration's key."""
    cache = work / f"prepared-{cfg.key()}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    first = reference.config.num_hidden_layers - cfg.train_layers
    pad = tokenizer.pad_token_id
    held_out, pool = alpaca_split(cfg, tokenizer)
    hh = hh_split(cfg, tokenizer)
    start = time.perf_counter()

    pool_rows = rated_to_multi_rejected(pool, num_rejected=7, conversational=True)
    assert len(pool_rows) == len(pool), "a pool prompt was dropped by rated_to_multi_rejected"
    for i, row in enumerate(pool_rows):
        responses = [row["chosen"][0]["content"], *(m[0]["content"] for m in row["rejected"])]
        prompt, ids = response_token_ids(tokenizer, row["prompt"], responses, i)
        input_ids, mask = padded_batch(prompt, ids, pad)
        with torch.no_grad():
            logps = summed_logps(
                reference(input_ids=input_ids, attention_mask=mask).logits, input_ids, len(prompt), list(map(len, ids))
            )
        row["ref_chosen_logps"], row["ref_rejected_logps"] = logps[0], logps[1:]
        row["id"] = pool[i]["id"]
    print(
        f"prepare: reference log-probs of {len(pool_rows)} pool prompts x 8 in {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    def eval_set(items):
        out = []
        for i, (prompt_messages, responses) in enumerate(items):
            prompt, ids = response_token_ids(tokenizer, prompt_messages, responses, i)
            input_ids, mask = padded_batch(prompt, ids, pad)
            with torch.no_grad():
                outputs = reference(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            lengths = list(map(len, ids))
            ref = summed_logps(outputs.logits, input_ids, len(prompt), lengths)
            hidden = outputs.hidden_states[first]
            item = dict(
                input_ids=input_ids, mask=mask, prompt_len=len(prompt), lengths=lengths, ref=ref, hidden=hidden
            )
            check = top_layers_logps(reference, item, first)
            assert max(abs(a - b) for a, b in zip(ref, check, strict=True)) < 1e-3, (ref, check)
            out.append(item)
        return out

    alpaca = eval_set(
        [([{"role": "user", "content": r["instruction"]}], [c["output"] for c in r["completions"]]) for r in held_out]
    )
    hh_set = eval_set([(p["prompt"], p["responses"]) for p in hh])
    print(
        f"prepare: evaluation sets ({len(alpaca)} prompts x 8, {len(hh_set)} HH pairs) at {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    prepared = {
        "config": dataclasses.asdict(cfg),
        "first_adapted_layer": first,
        "pool_rows": pool_rows,
        "judge": [[c["score"] for c in r["completions"]] for r in held_out],
        "held_out_ids": [r["id"] for r in held_out],
        "alpaca": alpaca,
        "hh": hh_set,
    }
    work.mkdir(parents=True, exist_ok=True)
    torch.save(prepared, cache)
    return prepared


def evaluate(model, prepared: dict, cfg: GridConfig) -> dict:
    """The cell's metrics (see the module docstring); `model` None: the trivial rankers, from `prepare`'s data."""
    first = prepared["first_adapted_layer"]

    def scores(items):
        policy = []
        for item in items:
            policy.append(top_layers_logps(model, item, first))
        return policy

    def scorers(items, policy):
        reward = [
            [cfg.beta * (p - r) for p, r in zip(ps, item["ref"], strict=True)]
            for ps, item in zip(policy, items, strict=True)
        ]
        return {
            "reward_sum": reward,
            "reward_per_token": [
                [x / n for x, n in zip(xs, item["lengths"], strict=True)]
                for xs, item in zip(reward, items, strict=True)
            ],
            "policy_ll_per_token": [
                [x / n for x, n in zip(xs, item["lengths"], strict=True)]
                for xs, item in zip(policy, items, strict=True)
            ],
        }

    if model is None:
        rng = random.Random(1234)

        def trivial(items):
            return {
                "token_count": [list(map(float, item["lengths"])) for item in items],
                "reference_sum": [item["ref"] for item in items],
                "reference_per_token": [
                    [x / n for x, n in zip(item["ref"], item["lengths"], strict=True)] for item in items
                ],
                "random": [[rng.random() for _ in item["lengths"]] for item in items],
            }

        alpaca, hh = trivial(prepared["alpaca"]), trivial(prepared["hh"])
    else:
        model.eval()
        alpaca = scorers(prepared["alpaca"], scores(prepared["alpaca"]))
        hh = scorers(prepared["hh"], scores(prepared["hh"]))
    return {"alpaca": alpaca_metrics(alpaca, prepared["judge"], cfg.judge_tie), "hh": hh_metrics(hh)}


# ----------------------------------------------------------------------------------------------------- training


class StockPairs(trl.DPOTrainer):
    """Stock TRL, given the reference log-probs computed once in `prepare` (TRL's precompute pass would recompute
    the same numbers for every cell): the one override of this harness."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset


class CPUBudget(TrainerCallback):
    """CPU seconds of every training step; with a budget, stops at the step end nearest it (spent ≥ budget − half a
    mean step), whatever the step count."""

    def __init__(self, budget: float | None):
        self.budget, self.seconds = budget, []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.process_time() - self._start)
        if self.budget is not None and sum(self.seconds) >= self.budget - statistics.mean(self.seconds) / 2:
            control.should_training_stop = True


def provenance(argv: list[str]) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    import peft

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "process_command": "python benchmarks/experiment_real_model.py " + " ".join(argv),
    }


def cell_name(k: int, budget: str, seed: int, arm: str) -> str:
    return f"k{k}-{budget}-seed{seed}-{arm}"


def run_cell(cfg, prepared, k, budget, seed, arm, results: Path, argv, max_steps: int | None = None) -> dict:
    name = cell_name(k, budget, seed, arm)
    work = Path("outputs/experiment_real_model") / name
    rows = rows_k(prepared["pool_rows"], k)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order]
    budget_seconds = None
    if budget == "prompts":
        rows = rows[: cfg.train_prompts]
    elif max_steps is None:  # the CPU budget; a rerun with --max_steps replays the step count it reached
        anchor = json.loads((results / f"{cell_name(k, 'prompts', seed, ANCHOR)}.json").read_text())
        budget_seconds = anchor["train_cpu_seconds"]
    data = arm_rows(arm, rows, seed)
    print(check_arm(arm, data, rows), flush=True)
    common = cpu_training_args(
        str(work),
        seed=seed,
        data_seed=seed,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        beta=cfg.beta,
        max_length=None,  # the data are cut to their stated token lengths
        precompute_ref_log_probs=True,
        logging_steps=1,
    )
    if budget == "prompts" and max_steps is None:
        common["num_train_epochs"] = 1
    else:
        common["max_steps"] = max_steps or 10**6  # the budget stops it
    torch.manual_seed(seed)  # the adapter's initialisation
    model = AutoModelForCausalLM.from_pretrained(prepared["model_path"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_path"])
    first = prepared["first_adapted_layer"]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        layers_to_transform=list(range(first, model.config.num_hidden_layers)),
        task_type="CAUSAL_LM",
    )
    dataset = Dataset.from_list(data)
    if arm == "stock_pairs":
        args = trl.DPOConfig(**common, per_device_train_batch_size=cfg.prompts_per_step * k)
        trainer = StockPairs(model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    else:
        extra = {}
        if arm in SELECTION:
            extra = dict(zip(("rejected_selection", "num_selected"), SELECTION[arm], strict=True))
        reduction = arm if arm in LISTS else "mean"
        args = DPOConfig(
            **common,
            per_device_train_batch_size=cfg.prompts_per_step,
            rejected_reduction=reduction,
            score_temperature=SCORE_TEMPERATURE,
            prefix_sharing=True,
            padding_free=True,
            **extra,
        )
        trainer = DPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    adapted = {
        int(m.group(1))
        for n, _ in trainer.model.named_parameters()
        if "lora_" in n
        for m in [re.search(r"layers\.(\d+)\.", n)]
    }
    assert adapted == set(range(first, model.config.num_hidden_layers)), f"adapter on layers {sorted(adapted)}"
    trainer.remove_callback(PrinterCallback)
    timer = CPUBudget(budget_seconds)
    trainer.add_callback(timer)
    wall = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - wall
    steps = trainer.state.global_step
    rows_per_prompt = k if arm == "stock_pairs" else 1
    rows_seen = steps * args.per_device_train_batch_size
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics = evaluate(trainer.model, prepared, cfg)
    rerun = ["cell", "--k", str(k), "--budget", budget, "--seed", str(seed), "--arm", arm]
    if budget == "cpu":
        rerun += ["--max_steps", str(steps)]
    row = {
        "k": k,
        "budget": budget,
        "seed": seed,
        "arm": arm,
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "steps": steps,
        "prompts_seen": rows_seen / rows_per_prompt,
        "epochs": rows_seen / len(data),
        "train_cpu_seconds": sum(timer.seconds),
        "cpu_budget_seconds": budget_seconds,
        "train_wall_seconds": wall,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "metrics": metrics,
        "provenance": {**provenance(argv), "command": "python benchmarks/experiment_real_model.py " + " ".join(rerun)},
    }
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / f".{name}.json.tmp"
    tmp.write_text(json.dumps(row, indent=None) + "\n")
    tmp.replace(results / f"{name}.json")
    print(
        f"{name}: {steps} steps, {row['train_cpu_seconds']:.0f} CPU-s, {row['prompts_seen']:.0f} prompts", flush=True
    )
    return row


def load_prepared(cfg: GridConfig, work: Path) -> dict:
    prepared = prepare(cfg, work)
    assert prepared["config"] == dataclasses.asdict(cfg)
    prepared["model_path"] = model_path()
    return prepared


def baseline(cfg: GridConfig, prepared: dict, results: Path, argv) -> None:
    path = results / "baseline.json"
    if path.exists():
        return
    row = {
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "held_out_ids": prepared["held_out_ids"],
        "pool_ids": [r["id"] for r in prepared["pool_rows"]],
        "metrics": evaluate(None, prepared, cfg),
        "provenance": {**provenance(argv), "command": "python benchmarks/experiment_real_model.py prepare"},
    }
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n")


def tasks(ks, budgets, seeds):
    """The grid in the order it is run: K = 7 before K = 3, the `prompts` budget before `cpu`, seeds inner."""
    for k in ks:
        for budget in budgets:
            for seed in seeds:
                for arm in ARMS[k]:
                    yield k, budget, seed, arm


def worker(cfg, args, argv) -> None:
    """Claim the next cell nobody has finished or claimed (a `.claim` file made atomically) and run it; a CPU-budget
    cell waits for its anchor."""
    results = Path(args.results)
    prepared = load_prepared(cfg, Path(args.work_dir))
    baseline(cfg, prepared, results, argv)
    claims = results / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    while True:
        ran = waiting = False
        for k, budget, seed, arm in tasks(args.k, args.budgets, args.seeds):
            name = cell_name(k, budget, seed, arm)
            if (results / f"{name}.json").exists():
                continue
            if budget == "cpu" and not (results / f"{cell_name(k, 'prompts', seed, ANCHOR)}.json").exists():
                waiting = True
                continue
            try:
                os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            run_cell(cfg, prepared, k, budget, seed, arm, results, argv)
            ran = True
            break
        if not ran:
            if not waiting:
                return
            time.sleep(30)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prepare", "run", "cell"])
    parser.add_argument("--results", default=str(ROOT / "docs" / "experiments_real_model"))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "experiment_real_model"))
    parser.add_argument("--k", type=int, nargs="+", default=[7, 3], choices=[7, 3])
    parser.add_argument("--budget", "--budgets", dest="budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arm", default=None, help="cell: the arm.")
    parser.add_argument("--max_steps", type=int, default=None, help="cell: replay a CPU-budget cell's step count.")
    parser.add_argument("--threads", type=int, default=1)
    for field in dataclasses.fields(GridConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = GridConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GridConfig)})
    torch.set_num_threads(args.threads)
    if args.command == "prepare":
        prepared = load_prepared(cfg, Path(args.work_dir))
        baseline(cfg, prepared, Path(args.results), argv)
    elif args.command == "run":
        worker(cfg, args, argv)
    else:
        prepared = load_prepared(cfg, Path(args.work_dir))
        (k,), (budget,), (seed,) = args.k, args.budgets, args.seeds
        if args.arm not in ARMS[k]:
            parser.error(f"--arm: one of {', '.join(ARMS[k])} at K = {k}, got {args.arm!r}")
        run_cell(cfg, prepared, k, budget, seed, args.arm, Path(args.results), argv, args.max_steps)


if __name__ == "__main__":
    main()
