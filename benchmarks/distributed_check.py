"""Inputs and verdicts of `benchmarks/gpu_distributed.sh`: sharded runs (DeepSpeed ZeRO-2/3, FSDP2, DDP) against one
process, on GPUs, with the runs of `tests/scripts/multiprocess_dpo.py` (what `tests/test_multiprocess.py` checks on CPU).

```bash
python benchmarks/distributed_check.py prepare WORK            # WORK/rows.jsonl and WORK/tiny-model
python benchmarks/distributed_check.py compare WORK one zero3 fsdp2 ...   # each WORK/<run>/ against WORK/one/
```

`compare` prints one line per run and setting (distributed type, largest loss and weight differences) and exits 1 if
any run differs from the one-process run by more than the tolerances, or did not shard as its config says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trl_dpo_ext.quickstart import SortDigitsTask, char_tokenizer, tiny_causal_lm


LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-4  # GPU reductions (NCCL, DeepSpeed's bucketed all-reduce) reorder float32 sums
# run -> the `distributed_type` its accelerate config must give (the run is named after the config)
EXPECTED_TYPE = {"multi_gpu": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}


def prepare(work: Path) -> None:
    """The rows and model of `tests/test_multiprocess.py`: 24 sorting prompts with 1-3 rejected, a 1-layer Llama."""
    work.mkdir(parents=True, exist_ok=True)
    task = SortDigitsTask()
    rows = task.preference_rows(task.prompts(24, seed=0), seed=0)
    (work / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = char_tokenizer(chat_template=None)
    tiny_causal_lm(len(tokenizer), seed=0, hidden_size=32, num_hidden_layers=1).save_pretrained(work / "tiny-model")
    tokenizer.save_pretrained(work / "tiny-model")


def compare(work: Path, base: str, runs: list[str]) -> bool:
    ok = True
    for run in runs:
        for path in sorted((work / run).glob("*.pt")):
            one, other = torch.load(work / base / path.name), torch.load(path)
            loss_diff = (torch.tensor(other["losses"]) - torch.tensor(one["losses"])).abs().max().item()
            weight_diff = max(
                (other["state_dict"][name].float() - weight.float()).abs().max().item()
                for name, weight in one["state_dict"].items()
            )
            right_type = other["distributed_type"] == EXPECTED_TYPE.get(run, other["distributed_type"])
            passed = loss_diff <= LOSS_ATOL and weight_diff <= WEIGHT_ATOL and right_type
            ok &= passed
            print(
                f"{run:>10} {path.stem:<22} {other['distributed_type']:<10} processes {other['world_size']}  "
                f"max |Δloss| {loss_diff:.1e}  max |Δweight| {weight_diff:.1e}  {'PASS' if passed else 'FAIL'}"
            )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["prepare", "compare"])
    parser.add_argument("work", type=Path)
    parser.add_argument("runs", nargs="*", help="compare: the baseline run, then the runs compared with it")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        prepare(args.work)
        return 0
    return 0 if compare(args.work, args.runs[0], args.runs[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
