"""A run killed (SIGKILL) during the SFT-reference stage, then during a checkpoint save, and rerun each time, ends
with the weights of an uninterrupted run; nothing half-written is taken for whole."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_dpo_ext.checkpoints import resolve_resume_checkpoint
from trl_dpo_ext.ref_identity import METADATA_FILE, read_metadata


SCRIPT = Path(__file__).parent / "scripts" / "fault_run.py"


def run(output_dir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("KILL_AT", None)
    if kill_at is not None:
        env["KILL_AT"] = kill_at
    result = subprocess.run([sys.executable, str(SCRIPT), str(output_dir)], env=env, capture_output=True, text=True)
    expected = -signal.SIGKILL if kill_at is not None else 0
    assert result.returncode == expected, result.stderr[-4000:]
    return result


def assert_same_weights(path: Path, expected_path: Path) -> None:
    weights, expected = load_file(path), load_file(expected_path)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), f"{name}: max |diff| {(weights[name] - tensor).abs().max()}"


def test_runs_killed_in_the_sft_stage_and_in_a_checkpoint_save_end_as_an_uninterrupted_run(tmp_path):
    uninterrupted, faulty = tmp_path / "uninterrupted", tmp_path / "faulty"
    uninterrupted.mkdir()
    faulty.mkdir()
    run(uninterrupted)

    # Killed once the SFT weights are written, before the metadata and the rename: no reference is published
    run(faulty, kill_at="sft_saved")
    assert not (faulty / "sft_ref").exists()
    assert (faulty / "sft_ref.incomplete" / "model.safetensors").is_file()
    assert not (faulty / "sft_ref.incomplete" / METADATA_FILE).exists()

    # The rerun trains the reference again (the same one), then is killed while saving checkpoint-4
    run(faulty, kill_at="checkpoint-4")
    assert not (faulty / "sft_ref.incomplete").exists()
    assert_same_weights(faulty / "sft_ref" / "model.safetensors", uninterrupted / "sft_ref" / "model.safetensors")
    assert (faulty / "checkpoint-2" / "trainer_state.json").is_file()
    assert (faulty / "checkpoint-4" / "model.safetensors").is_file()
    assert not (faulty / "checkpoint-4" / "trainer_state.json").exists()
    run_id = read_metadata(str(faulty / "sft_ref"))["run_id"]

    # The next rerun resumes from checkpoint-2, the last complete one, and reuses the reference
    result = run(faulty)
    assert re.search(r"Skipping \S*checkpoint-4: incomplete .* Resuming from \S*checkpoint-2", result.stderr)
    assert read_metadata(str(faulty / "sft_ref"))["run_id"] == run_id, "the reference was made again"
    assert (faulty / "checkpoint-4" / "trainer_state.json").is_file()
    assert_same_weights(faulty / "model.safetensors", uninterrupted / "model.safetensors")
    assert_same_weights(
        faulty / "checkpoint-4" / "model.safetensors", uninterrupted / "checkpoint-4" / "model.safetensors"
    )


def test_resuming_from_an_incomplete_checkpoint_named_explicitly_is_an_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # cut mid-write
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-2")
    message = f"The checkpoint {tmp_path / 'checkpoint-4'} is incomplete"
    with pytest.raises(ValueError, match=re.escape(message) + ".*last complete one in `output_dir` is .*checkpoint-2"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(
        ValueError, match="No complete checkpoint in .*checkpoint-4, .*checkpoint-2 were left incomplete"
    ):
        resolve_resume_checkpoint(True, str(tmp_path))
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
