"""Two CPU processes (gloo) × batch 2 train exactly as one process × batch 4, with no code change: under DDP
(torchrun) and under FSDP2 (accelerate's `fsdp2` config, TRL's packaged one), with a live reference, precomputed
reference log-probs (from files and from an in-memory dataset), the SFT-on-chosen reference, and hard-negative
selection (each process selecting for its own rows)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_dpo_ext.launch import resolve_accelerate_config
from trl_dpo_ext.quickstart import SortDigitsTask, char_tokenizer, tiny_causal_lm


SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "multiprocess_dpo.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Each multi-process run trains the settings it is compared on (see SETTINGS in the script); one process trains all
RUNS = {
    "ddp": ("precompute_ref", "precompute_in_memory", "hardest_selection", "sft_ref_init"),
    "fsdp2": ("live_ref", "precompute_ref", "sft_ref_init"),
}
CASES = [(run, setting) for run, settings in RUNS.items() for setting in settings]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def run_command(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)  # a hang fails
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (1 layer) and its character tokenizer: every run loads its policy and reference from here."""
    path = tmp_path_factory.mktemp("multiprocess") / "tiny-model"
    tokenizer = char_tokenizer(chat_template=None)
    tiny_causal_lm(len(tokenizer), seed=0, hidden_size=32, num_hidden_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model_dir) -> dict[str, dict[str, dict]]:
    """Every setting on 1 process with batch 4; those of `RUNS` on 2 processes with batch 2 each."""
    tmp = model_dir.parent
    task = SortDigitsTask()
    # 1 to 3 rejected per row: the per-example mean over a ragged K must shard exactly too
    rows = task.preference_rows(task.prompts(24, seed=0), seed=0)
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def script(out: str, batch_size: int, settings=None) -> list[str]:
        args = [
            str(SCRIPT),
            str(data),
            str(model_dir),
            str(tmp / out),
            "--per_device_train_batch_size",
            str(batch_size),
        ]
        return args + (["--settings", ",".join(settings)] if settings else [])

    run_command([sys.executable, *script("one", 4)], tmp)
    run_command([*TORCHRUN, *script("ddp", 2, RUNS["ddp"])], tmp)
    fsdp2_config = resolve_accelerate_config(["--accelerate_config", "fsdp2"])  # TRL's packaged fsdp2.yaml
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", *fsdp2_config, "--num_processes", "2"]
    # The packaged config asks for bf16; these CPU runs compare float32 weights
    run_command([*accelerate, "--mixed_precision", "no", *script("fsdp2", 2, RUNS["fsdp2"]), "--fsdp_on_cpu"], tmp)
    return {
        name: {setting: torch.load(tmp / name / f"{setting}.pt") for setting in SETTINGS_OF[name]}
        for name in ("one", *RUNS)
    }


SETTINGS_OF = {"one": sorted({s for settings in RUNS.values() for s in settings}), **RUNS}


@pytest.mark.parametrize("run, setting", CASES)
def test_two_processes_of_batch_2_match_one_process_of_batch_4(runs, model_dir, run, setting):
    one, two = runs["one"][setting], runs[run][setting]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    if run == "fsdp2":  # accelerate's FSDP2 path, not DDP under another name: the model is sharded by fully_shard
        assert two["distributed_type"] == "FSDP" and two["fully_sharded"]
    else:
        assert two["distributed_type"] == "MULTI_CPU" and not two["fully_sharded"]
        # Else the wrapper's reducer frees the destroyed gloo group holding the GIL: a deadlock at exit (`DPOTrainer.end`)
        assert two["ddp_wrapper_freed"] is True, (
            "a reference to the DDP wrapper survives into `end`'s group destruction"
        )
    assert len(one["losses"]) == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-6, rtol=1e-5)
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "grad_weight/mean", "grad_weight_eff/mean"):
        assert len(one[key]) == 3, key
        torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), atol=1e-5, rtol=1e-4, msg=key)
    # At step 1 the policy is the reference: every margin is 0 up to float noise, and `rewards/accuracies` (the share
    # of margins > 0) counts that noise, which differs with the process layout and the torch build. Compare it only
    # once the margins are real.
    assert one["rewards/margins"][0] == pytest.approx(0.0, abs=1e-5)
    assert two["accuracies"][1:] == pytest.approx(one["accuracies"][1:])
    assert one["losses"][-1] < one["losses"][0], "the steps train"
    if setting == "sft_ref_init":  # the SFT stage shards the same way
        assert len(one["sft_losses"]) == 2
        torch.testing.assert_close(
            torch.tensor(two["sft_losses"]), torch.tensor(one["sft_losses"]), atol=1e-6, rtol=1e-5
        )
    initial = load_file(model_dir / "model.safetensors")
    assert one["state_dict"].keys() == two["state_dict"].keys() == initial.keys()
    for name, weight in one["state_dict"].items():
        # SGD: the weights are linear in the summed gradients, so sharding leaves only float32 rounding
        torch.testing.assert_close(two["state_dict"][name], weight, atol=1e-5, rtol=0, msg=name)
        # Every weight moved far beyond that tolerance (the least, attention's q/k, by about 2e-4)
        assert (weight - initial[name]).abs().max() > 1e-4, f"{name} barely moved"


@pytest.mark.parametrize("run, setting", [case for case in CASES if "precompute" in case[1] or "sft" in case[1]])
def test_reference_log_probs_precomputed_on_two_processes_equal_one_process(runs, run, setting):
    """Computed once, on each process's shard, then shared: every row's value equals the one-process pass."""
    one, two = runs["one"][setting], runs[run][setting]
    num_rows = len(one["ref_chosen_logps"])  # the prepared rows (those that fit `max_length`)
    assert num_rows > 16 and one["ref_rejected_logps"].shape == (num_rows, 3)
    assert one["ref_rejected_logps"].isnan().any(), "rows with fewer than 3 rejected are padded"
    torch.testing.assert_close(two["ref_chosen_logps"], one["ref_chosen_logps"], atol=1e-5, rtol=0)
    torch.testing.assert_close(two["ref_rejected_logps"], one["ref_rejected_logps"], atol=1e-5, rtol=0, equal_nan=True)


def test_fully_shard_trains_on_cpu_processes_with_gloo(tmp_path):
    """The ground floor of the FSDP2 runs: torch's `fully_shard` alone, 2 gloo processes, against no sharding."""
    out = tmp_path / "fully_shard.pt"
    run_command([*TORCHRUN, str(SCRIPTS / "fully_shard_gloo.py"), str(out)], tmp_path)
    result = torch.load(out)
    assert result["world_size"] == 2 and result["all_dtensors"]
    assert result["local_shapes"]["0.weight"] == (8, 8), "each process holds half of the (16, 8) weight"
    torch.manual_seed(0)  # the script's `make_model`
    initial = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).state_dict()
    assert result["sharded"].keys() == result["reference"].keys() == initial.keys()
    for name, weight in result["reference"].items():
        torch.testing.assert_close(result["sharded"][name], weight, atol=1e-6, rtol=0, msg=name)
        assert (weight - initial[name]).abs().max() > 1e-3, f"{name} barely moved"
