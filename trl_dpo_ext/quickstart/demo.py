"""The quickstart: SFT-on-chosen, then one-chosen-many-rejected DPO, on a task whose reward the code computes.

```bash
pip install -e . && trl-dpo-ext quickstart          # or: python -m trl_dpo_ext quickstart
```

Everything is built offline: the preference data (`trl_dpo_ext.quickstart.SortDigitsTask`, best-of-4 answers of a noisy
annotator, each rated by the ground-truth reward), a character tokenizer and a tiny Llama from a config. The run

1. initialises the reference by supervised fine-tuning on the chosen answers (SFT-on-chosen),
2. trains that model with DPO on one chosen and up to 3 rejected answers per prompt,
3. prints, on held-out prompts, the preference accuracy of the implicit reward and the ground-truth reward of the
   greedy answers, after SFT and after DPO.

It takes about a minute on one CPU core (two or three on a busy machine). `run(QuickstartConfig(...))` returns the
numbers of the table; `--output_dir` keeps the SFT reference (`<output_dir>/sft_ref`, reused by a rerun) and the DPO
model.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import TextIO

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProgressCallback

from .task import SortDigitsTask
from .toy import char_tokenizer, cpu_training_args, tiny_causal_lm


@dataclass
class QuickstartConfig:
    """Sizes and hyper-parameters of the quickstart; the defaults are the tuned run of the README."""

    num_train_prompts: int = 3000  # prompts given to the annotator; about 8% give no row (all answers tie)
    num_eval_prompts: int = 200  # held-out prompts, none of them seen in training
    num_candidates: int = 4  # annotator answers per prompt: best one chosen, those rated lower rejected
    hidden_size: int = 64
    num_layers: int = 2
    batch_size: int = 32
    sft_epochs: float = 6.0
    sft_learning_rate: float = 3e-3
    dpo_epochs: float = 2.0
    dpo_learning_rate: float = 5e-4
    beta: float = 0.1
    rejected_reduction: str = "mean"
    seed: int = 0
    output_dir: str | None = None  # keeps the SFT reference and the DPO model; a temporary folder by default
    num_threads: int | None = 1  # torch CPU threads; one is the fastest for a model this small (0: torch's default)


class _QuietProgressCallback(ProgressCallback):
    """The trainers' progress bars, without the dict of logs printed under them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _quiet(trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_QuietProgressCallback())


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers, in the order of `prompts`; prompts of one length are batched together, so nothing is padded."""
    model.eval()
    by_length: dict[int, list[int]] = {}
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    for indices in tqdm(list(by_length.values()), desc="Greedy answers to the held-out prompts", leave=False):
        input_ids = torch.tensor([encoded[i] for i in indices], device=model.device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, ids in zip(indices, generated[:, input_ids.size(1) :].tolist(), strict=True):
            out[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return out


@torch.no_grad()
def completion_logps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> torch.Tensor:
    """log π(completion + EOS | prompt) of each (prompt, completion), tokenized as the trainers do for plain text."""
    model.eval()
    values = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        full_ids = [
            tokenizer(p + c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p, c in chunk
        ]
        width = max(map(len, full_ids))
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)  # completion tokens only
        for row, (p_ids, ids) in enumerate(zip(prompt_ids, full_ids, strict=True)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, len(p_ids) : len(ids)] = True
        input_ids = input_ids.to(model.device)
        logits = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long()).logits
        token_logps = logits[:, :-1].float().log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        values.append((token_logps * mask[:, 1:].to(token_logps.device)).sum(1).cpu())
    return torch.cat(values)


def _pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """Every (prompt, chosen) and (prompt, rejected_k) of `rows`, row by row: chosen first, then its rejected."""
    return [(r["prompt"], c) for r in rows for c in [r["chosen"], *r["rejected"]]]


def implicit_reward_accuracy(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rows: list[dict]) -> float:
    """Share of held-out (chosen, rejected) pairs whose implicit reward log π/π_ref ranks the chosen higher.

    A tie counts ½, so a policy equal to its reference (every implicit reward 0) scores the chance level 0.5.
    """
    logratios = (policy_logps - ref_logps).tolist()
    wins, offset = [], 0
    for row in rows:
        chosen, rejected = logratios[offset], logratios[offset + 1 : offset + 1 + len(row["rejected"])]
        wins += [1.0 if chosen > r else 0.5 if chosen == r else 0.0 for r in rejected]
        offset += 1 + len(row["rejected"])
    return sum(wins) / len(wins)


def greedy_reward(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: SortDigitsTask, prompts: list[str]
) -> tuple[float, float]:
    """Mean ground-truth reward of the greedy answers, and their exact-match rate."""
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=task.max_digits + 2)
    rewards = [task.reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    return statistics.mean(rewards), statistics.mean(r == 1.0 for r in rewards)


# ------------------------------------------------------------------------------------------------- stages


def _train_args(config: QuickstartConfig, output_dir: str) -> dict:
    """Training arguments (the SFT stage takes them too): CPU-friendly, no checkpoints, progress bars on, logs off."""
    return cpu_training_args(
        output_dir,
        per_device_train_batch_size=config.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        logging_strategy="no",
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


def dpo_trainer(config: QuickstartConfig, rows: list[dict], tokenizer, output_dir: str):
    """SFT-on-chosen reference initialisation, then one-chosen-many-rejected DPO, as one `DPOTrainer`.

    Building the trainer runs the SFT stage (`ref_init="sft_on_chosen"`): a fresh tiny model is fine-tuned on the
    (prompt, chosen) pairs and saved in `<output_dir>/sft_ref`; DPO's policy starts from it and it is the reference,
    whose log-probs are computed once (`precompute_ref_log_probs`), so no second copy of the model is kept.
    `trainer.train()` then runs DPO.
    """
    from ..config import DPOConfig
    from ..trainer import DPOTrainer

    args = DPOConfig(
        **_train_args(config, output_dir),
        num_train_epochs=config.dpo_epochs,
        learning_rate=config.dpo_learning_rate,
        beta=config.beta,
        rejected_reduction=config.rejected_reduction,
        precompute_ref_log_probs=True,
        max_length=None,
        ref_init="sft_on_chosen",
        ref_init_learning_rate=config.sft_learning_rate,
        ref_init_num_train_epochs=config.sft_epochs,
        ref_init_batch_size=config.batch_size,
    )
    model = tiny_causal_lm(
        len(tokenizer), seed=config.seed, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers
    )
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    _quiet(trainer)
    return trainer


# ------------------------------------------------------------------------------------------------- driver


def run(config: QuickstartConfig | None = None, stream: TextIO | None = None) -> dict[str, dict[str, float]]:
    """Run the quickstart, print the before/after table to `stream` and return its numbers.

    Returns `{"sft": {...}, "dpo": {...}, "data": {...}}`; the stage dicts hold `implicit_reward_accuracy`,
    `greedy_reward` and `greedy_exact_match`, measured on the held-out prompts.
    """
    config = config or QuickstartConfig()
    stream = stream or sys.stdout
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    start = time.perf_counter()

    task = SortDigitsTask()
    train_prompts = task.prompts(config.num_train_prompts, seed=config.seed)
    eval_prompts = task.prompts(config.num_eval_prompts, seed=config.seed + 1, exclude=train_prompts)
    train_rows = task.preference_rows(train_prompts, seed=config.seed, num_candidates=config.num_candidates)
    eval_rows = task.preference_rows(eval_prompts, seed=config.seed + 1, num_candidates=config.num_candidates)
    tokenizer = char_tokenizer(chat_template=None)
    num_pairs = sum(len(r["rejected"]) for r in train_rows)
    print(
        f"Task: sort the digits ('{train_rows[0]['prompt']}' -> '{task.answer(train_rows[0]['prompt'])}'). "
        f"{len(train_rows)} training rows, one chosen and {num_pairs / len(train_rows):.2f} rejected on average; "
        f"{len(eval_prompts)} held-out prompts.",
        file=stream,
    )

    results: dict[str, dict[str, float]] = {
        "data": {
            "train_rows": len(train_rows),
            "mean_rejected": num_pairs / len(train_rows),
            "chosen_reward": statistics.mean(task.reward(r["prompt"], r["chosen"]) for r in train_rows),
            "seed": config.seed,
        }
    }
    eval_pairs = _pairs(eval_rows)
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = config.output_dir or tmp
        print("[1/2] Reference initialisation: SFT on the chosen answers (ref_init='sft_on_chosen')", file=stream)
        trainer = dpo_trainer(config, train_rows, tokenizer, output_dir)
        model = trainer.model  # the SFT reference, where DPO starts
        ref_logps = completion_logps(model, tokenizer, eval_pairs)
        reward, exact = greedy_reward(model, tokenizer, task, eval_prompts)
        accuracy = implicit_reward_accuracy(ref_logps, ref_logps, eval_rows)  # the reference itself: chance, 0.5
        results["sft"] = {"implicit_reward_accuracy": accuracy, "greedy_reward": reward, "greedy_exact_match": exact}

        print("[2/2] DPO: one chosen, several rejected per prompt", file=stream)
        trainer.train()
        model = trainer.model
        if config.output_dir:
            trainer.save_model(config.output_dir)
        accuracy = implicit_reward_accuracy(completion_logps(model, tokenizer, eval_pairs), ref_logps, eval_rows)
        reward, exact = greedy_reward(model, tokenizer, task, eval_prompts)
        results["dpo"] = {"implicit_reward_accuracy": accuracy, "greedy_reward": reward, "greedy_exact_match": exact}

    results["data"]["seconds"] = time.perf_counter() - start
    print(format_table(results), file=stream)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    sft, dpo_ = results["sft"], results["dpo"]
    lines = [
        "",
        "Held-out prompts                                   after SFT   after DPO",
        f"Preference accuracy of the implicit reward         {sft['implicit_reward_accuracy']:9.3f}   "
        f"{dpo_['implicit_reward_accuracy']:9.3f}",
        f"Mean ground-truth reward of greedy answers         {sft['greedy_reward']:9.3f}   {dpo_['greedy_reward']:9.3f}",
        f"Greedy answers exactly right                       {sft['greedy_exact_match']:9.3f}   "
        f"{dpo_['greedy_exact_match']:9.3f}",
        f"(mean reward of the chosen answers in training: {results['data']['chosen_reward']:.3f}; the SFT model is "
        f"DPO's reference, so its implicit reward is 0 and its accuracy the chance level 0.5)",
        # The last digits depend on the torch build (README): say which one made them
        f"Done in {results['data']['seconds']:.0f} s (seed {results['data'].get('seed', 0)}, torch {torch.__version__}).",
    ]
    return "\n".join(lines)


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags for every `QuickstartConfig` field (`--num_train_prompts 500`, ...)."""
    parser = parser or argparse.ArgumentParser(prog="trl-dpo-ext quickstart", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(QuickstartConfig):
        kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[str(f.type)]
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"(default: {f.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # TRL 1.16 calls an attribute that transformers 5 deprecates; the warning says nothing to a quickstart user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    run(QuickstartConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
