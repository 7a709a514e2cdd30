"""A few K-rejected DPO steps on a tiny model, per setting; the main process saves the losses and final weights.

The same script on one process or on several, with no code change (`tests/test_multiprocess.py` runs all three):

```bash
python tests/scripts/multiprocess_dpo.py rows.jsonl tiny-model out_1x4 --per_device_train_batch_size 4
torchrun --standalone --nproc_per_node 2 tests/scripts/multiprocess_dpo.py rows.jsonl tiny-model out_ddp \
    --per_device_train_batch_size 2
accelerate launch --config_file <trl>/accelerate_configs/fsdp2.yaml --num_processes 2 --mixed_precision no \
    tests/scripts/multiprocess_dpo.py rows.jsonl tiny-model out_fsdp --per_device_train_batch_size 2 --fsdp_on_cpu
```

Each setting of `SETTINGS` trains a fresh model (loaded from the model folder) in `<out>/<setting>/` and saves
`<out>/<setting>.pt`. The rows are read from a JSON-lines file, as `trl-dpo-ext dpo` reads them, except in the
`*_in_memory` settings, which build the dataset in memory (`Dataset.from_list`): its precomputed reference log-probs
must reach every process without a cache folder they share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import weakref

import torch
from datasets import Dataset, load_dataset

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.quickstart import cpu_training_args


# name -> DPOConfig fields of the setting (the K-rejected "mean" loss in all of them)
SETTINGS = {
    "live_ref": {},
    "precompute_ref": {"precompute_ref_log_probs": True},
    "precompute_in_memory": {"precompute_ref_log_probs": True},
    # Each process selects for its own rows; the hardest of a row does not depend on the other rows
    "hardest_selection": {"rejected_selection": "hardest", "num_selected": 1},
    "sft_ref_init": {
        "precompute_ref_log_probs": True,
        "ref_init": "sft_on_chosen",
        "ref_init_max_steps": 2,
        "ref_init_learning_rate": 1e-2,
    },
}


# Logged values that do not depend on float noise when they are all equal, compared step by step
DEFINED_METRICS = ("rewards/margins", "rewards/chosen", "rewards/rejected", "grad_weight/mean", "grad_weight_eff/mean")


def enable_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin run on CPU processes (gloo), as it runs on GPUs.

    accelerate 1.15 turns `distributed_type` into FSDP only for accelerator types (`MULTI_GPU`, ...): on CPUs it keeps
    `MULTI_CPU` and wraps the model in DDP. torch's `fully_shard` itself runs on CPU with gloo
    (`tests/scripts/fully_shard_gloo.py`), so this lifts that one condition, after `AcceleratorState` has set
    everything else up from the launcher's FSDP config; the rest (`fsdp2_prepare_model`, the full-state-dict
    gather) is accelerate's and transformers' own code.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # read back by later instances

    AcceleratorState.__init__ = init_with_fsdp_on_cpu


def load_rows(data: str, out: str, in_memory: bool) -> Dataset:
    if in_memory:
        with open(data) as f:
            return Dataset.from_list([json.loads(line) for line in f])
    return load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(out, "hf_cache"))


def train(
    data: str, model_dir: str, out: str, setting: str, batch_size: int, max_steps: int, lr: float, use_cpu: bool
) -> None:
    config = DPOConfig(
        **cpu_training_args(
            os.path.join(out, setting),  # shared by the processes: the SFT reference is saved there
            per_device_train_batch_size=batch_size,
            max_steps=max_steps,
            optim="sgd",  # the final weights are then linear in the summed gradients: sharding changes only rounding
            learning_rate=lr,  # large, so that a few steps move the weights far beyond float32 noise
            lr_scheduler_type="constant",
            beta=0.1,
            logging_steps=1,
            use_cpu=use_cpu,
            **SETTINGS[setting],
        )
    )
    # The model and its reference are loaded from the folder (under FSDP TRL loads the reference from the same path)
    dataset = load_rows(data, out, in_memory=setting.endswith("_in_memory"))
    trainer = DPOTrainer(model=model_dir, args=config, train_dataset=dataset)
    trainer.train()
    logs = trainer.state.log_history
    # Every process takes part in the gather of a sharded model; the main process gets the full weights
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    # `trainer.end()`, its group destruction replaced by a check that no reference to the DDP wrapper is left then
    # (the script's processes destroy the group once, after the last setting)
    wrapped = trainer.model_wrapped
    is_ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    wrapper = weakref.ref(wrapped)
    del wrapped
    freed_at_end = []
    trainer.accelerator.end_training = lambda: freed_at_end.append(wrapper() is None)
    trainer.end()
    if trainer.accelerator.is_main_process:
        from torch.distributed.fsdp import FSDPModule

        result = {
            "losses": [log["loss"] for log in logs if "loss" in log],
            "accuracies": [log["rewards/accuracies"] for log in logs if "rewards/accuracies" in log],
            # What is defined at every step, step 1 included (where the policy is the reference and every margin is
            # 0 up to float noise, so that the count of `margin > 0` in `accuracies` is a count of noise)
            **{key: [log[key] for log in logs if key in log] for key in DEFINED_METRICS},
            "sft_losses": [log["sft_ref/loss"] for log in _sft_logs(config) if "sft_ref/loss" in log],
            "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "fully_sharded": isinstance(trainer.model, FSDPModule),
            "ddp_wrapper_freed": freed_at_end == [True] if is_ddp else None,
        }
        if config.precompute_ref_log_probs:
            # In the rows' order, padded with NaN to the largest number of rejected
            result["ref_chosen_logps"] = torch.tensor(trainer.train_dataset["ref_chosen_logps"])
            result["ref_rejected_logps"] = torch.tensor(trainer.train_dataset["ref_rejected_logps"])
        torch.save(result, os.path.join(out, f"{setting}.pt"))
    trainer.accelerator.wait_for_everyone()


def _sft_logs(config: DPOConfig) -> list[dict]:
    """The SFT stage's logs, from the metadata saved with the reference (none without `ref_init`)."""
    if config.ref_init is None:
        return []
    from trl_dpo_ext.ref_identity import read_metadata, sft_reference_dir

    return (read_metadata(sft_reference_dir(config)) or {}).get("log_history", [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", help="JSON lines of {'prompt', 'chosen', 'rejected': [...]}")
    parser.add_argument("model", help="folder of the tiny model and its tokenizer")
    parser.add_argument("out", help="folder for the runs and the saved results")
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1.0)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    parser.add_argument("--fsdp_on_cpu", action="store_true", help="run accelerate's FSDP config on CPU processes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: benchmarks/gpu_distributed.sh")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.fsdp_on_cpu:
        enable_fsdp_on_cpu()
    for setting in args.settings.split(","):
        train(
            args.data,
            args.model,
            args.out,
            setting,
            args.per_device_train_batch_size,
            args.max_steps,
            args.learning_rate,
            use_cpu=args.device == "cpu",
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if args.fsdp_on_cpu:
        # Every result is saved. After `fully_shard` on gloo, a thread torch leaves joinable aborts the interpreter's
        # exit now and then ("terminate called without an active exception"): skip the C++ teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
