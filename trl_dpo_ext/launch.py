"""Several processes from one command, as `trl dpo` starts them: `--accelerate_config NAME|PATH`, `--num_processes N`.

```bash
trl-dpo-ext dpo --config recipe.yaml --accelerate_config zero3               # TRL's packaged zero3.yaml
trl-dpo-ext dpo --config recipe.yaml --accelerate_config my_fsdp.yaml --num_processes 4
trl-dpo-ext dpo --config recipe.yaml --num_processes 2 --use_cpu true        # DDP, 2 CPU processes (gloo)
```

The flags that none of the command's dataclasses declare are `accelerate launch`'s (`--accelerate_config` becomes
`--config_file`), from the command line or from the YAML of `--config`, exactly as with `trl dpo`. With none of them
(or only `--num_processes 1`) the command trains in this process; otherwise it runs
`accelerate launch <those flags> -m trl_dpo_ext <command> <the other flags>`, whose processes train.

Imports nothing heavy at module level: `trl-dpo-ext --help` loads this module.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any


# Set in the environment of the processes this module starts: they train, and leave the launcher flags alone
LAUNCHED_ENV = "TRL_DPO_EXT_LAUNCHED"


def packaged_config_names() -> list[str]:
    """The names `--accelerate_config` takes: TRL's packaged configs (`trl/accelerate_configs/<name>.yaml`)."""
    from ._trl_compat import ACCELERATE_CONFIGS_PACKAGE

    files = resources.files(ACCELERATE_CONFIGS_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|PATH` -> `--config_file PATH`, resolved by TRL's own `trl dpo` resolver."""
    from ._trl_compat import resolve_accelerate_config_argument

    try:
        return resolve_accelerate_config_argument(launch_args)
    except ValueError as error:
        raise ValueError(f"{error} Packaged names: {', '.join(packaged_config_names())}.") from None


def drop_subsequence(items: Sequence[str], subsequence: Sequence[str]) -> list[str]:
    """`items` without the ordered `subsequence` (the launcher's flags, found in order among the command's own)."""
    rest, pending = [], list(subsequence)
    for item in items:
        if pending and item == pending[0]:
            pending.pop(0)
        else:
            rest.append(item)
    return rest


def _runs_in_process(launch_args: list[str]) -> bool:
    return launch_args in ([], ["--num_processes", "1"], ["--num_processes=1"])


def accelerate_launch_args(command: str, launch_args: list[str], command_args: list[str]) -> list[str]:
    """The arguments of `accelerate launch` that run `trl-dpo-ext <command> <command_args>` on several processes.

    Flags that `accelerate launch` does not know either fail here, with both parsers named.
    """
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command_parser

    launch_args = resolve_accelerate_config(launch_args)
    known, unknown = launch_command_parser().parse_known_args([*launch_args, "trl_dpo_ext"])
    if known.training_script != "trl_dpo_ext":  # a stray value was taken for the script (`--bta 0.2`)
        unknown = [*unknown, known.training_script, *known.training_script_args[:-1]]
    if unknown:
        raise ValueError(
            f"Unrecognized arguments: {' '.join(unknown)} (neither a flag of `trl-dpo-ext {command}` nor one of "
            "`accelerate launch`)."
        )
    if known.config_file is None and not os.path.isfile(default_config_file) and (known.num_processes or 1) > 1:
        # Without a config, accelerate starts one process on a machine without GPUs: ask for torchrun's N processes
        launch_args = ["--multi_gpu", *launch_args]
    return [*launch_args, "--module", "trl_dpo_ext", command, *command_args]


def check_sharding_has_a_device(args: list[str]) -> None:
    """FSDP and DeepSpeed need an accelerator: on CPUs accelerate 1.15 runs an FSDP config as plain DDP (MULTI_CPU)."""
    import torch
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    known = launch_command_parser().parse_args(args)
    distributed_type = load_config_from_file(known.config_file).distributed_type.value if known.config_file else ""
    sharded = known.use_fsdp or known.use_deepspeed or distributed_type in ("FSDP", "DEEPSPEED")
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if sharded and not has_device:
        raise ValueError(
            f"The accelerate config {known.config_file or ''} asks for {distributed_type or 'FSDP/DeepSpeed'}, which "
            "needs a GPU: on CPUs accelerate would train an FSDP config as plain DDP, and DeepSpeed does not run. Use "
            "`--accelerate_config multi_gpu` (DDP) or `--num_processes N` alone for several CPU processes."
        )


def run_or_launch(command: str, argv: list[str], parser: Any, run: Callable[[tuple], Any]) -> Any:
    """Parse `argv` with the command's `TrlParser`; train here (returns `run(dataclasses)`), or launch accelerate
    (returns None once its processes are done).

    In a process started by the launcher, the flags left for accelerate (from the YAML too) were the parent's.
    """
    *parsed, config_rest, cli_rest = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launched = bool(os.environ.get(LAUNCHED_ENV))
    if launched and cli_rest:
        parser.error(f"unrecognized arguments: {' '.join(cli_rest)}")
    if launched or _runs_in_process(config_rest + cli_rest):
        return run(tuple(parsed))
    args = accelerate_launch_args(command, config_rest + cli_rest, drop_subsequence(argv, cli_rest))
    check_sharding_has_a_device(args)
    launch(args)
    return None


def launch(args: list[str]) -> None:
    """`accelerate launch <args>`, from this process (as TRL's CLI does), its processes marked as launched."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    print(f"Launching: accelerate launch {shlex.join(args)}", flush=True)
    os.environ[LAUNCHED_ENV] = "1"  # the launched processes inherit this environment
    try:
        launch_command(launch_command_parser().parse_args(args))
    finally:
        del os.environ[LAUNCHED_ENV]
