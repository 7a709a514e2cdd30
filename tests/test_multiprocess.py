"""Two CPU processes (torchrun, gloo) × batch 2 train exactly as one process × batch 4, with no code change."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_dpo_ext.quickstart import SortDigitsTask, char_tokenizer, tiny_causal_lm


SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_dpo.py"
SETTINGS = ("precompute_ref", "sft_ref_init")  # see SETTINGS in the script


def launch(prefix: list[str], data: Path, out: Path, batch_size: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [*prefix, str(SCRIPT), str(data), str(out), "--per_device_train_batch_size", str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out.parent)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Each setting trained twice: on 1 process with batch 4, and on 2 processes with batch 2 each."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    task = SortDigitsTask()
    # 1 to 3 rejected per row: the per-example mean over a ragged K must shard exactly too
    rows = task.preference_rows(task.prompts(24, seed=0), seed=0)
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    launch([sys.executable], data, tmp / "one", batch_size=4)
    launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], data, tmp / "two", 2
    )
    return {
        setting: {name: torch.load(tmp / name / f"{setting}.pt") for name in ("one", "two")} for setting in SETTINGS
    }


@pytest.mark.parametrize("setting", SETTINGS)
def test_two_processes_of_batch_2_match_one_process_of_batch_4(runs, setting):
    one, two = runs[setting]["one"], runs[setting]["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-6, rtol=1e-5)
    assert two["accuracies"] == pytest.approx(one["accuracies"])
    assert one["losses"][-1] < one["losses"][0], "the steps train"
    if setting == "sft_ref_init":  # the SFT stage shards the same way
        assert len(one["sft_losses"]) == 2
        torch.testing.assert_close(
            torch.tensor(two["sft_losses"]), torch.tensor(one["sft_losses"]), atol=1e-6, rtol=1e-5
        )
    initial = initial_weights()
    for name, weight in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], weight, atol=1e-5, rtol=1e-4, msg=name)
        # The weights moved far beyond the tolerance, so matching them means something
        assert (weight - initial[name]).abs().max() > 1e-3, f"{name} barely moved"


def initial_weights() -> dict[str, torch.Tensor]:
    """The script's starting model (`tiny_model` in tests/scripts/multiprocess_dpo.py), built the same way."""
    return tiny_causal_lm(
        len(char_tokenizer(chat_template=None)), seed=0, hidden_size=32, num_hidden_layers=1
    ).state_dict()


@pytest.mark.parametrize(
    "name, distributed_type, num_processes, num_machines",
    [
        ("multi_gpu", "MULTI_GPU", 8, 1),
        ("deepspeed_zero2", "DEEPSPEED", 8, 1),
        ("deepspeed_zero3", "DEEPSPEED", 8, 1),
        ("fsdp2", "FSDP", 8, 1),
        ("two_nodes", "MULTI_GPU", 16, 2),
    ],
)
def test_example_accelerate_configs_load(name, distributed_type, num_processes, num_machines):
    """The shipped configs parse with accelerate's own loader (what they do on GPUs is not exercised on CPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).parents[1] / "examples" / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        distributed_type,
        num_processes,
        num_machines,
    )
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
