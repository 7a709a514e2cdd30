"""SFT-on-chosen reference initialisation (issue 4): the SFT stage, its reuse, resume, PEFT and two processes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import loss_and_grads, make_args, sequence_logps
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trl_dpo_ext import DPOTrainer, ref_init
from trl_dpo_ext.cli import sft_ref_main as main
from trl_dpo_ext.data import extract_prompt_multi, tokenize_row
from trl_dpo_ext.quickstart import tiny_causal_lm
from trl_dpo_ext.ref_identity import METADATA_FILE, read_metadata
from trl_dpo_ext.ref_init import train_sft_reference


SCRIPT = Path(__file__).parent / "scripts" / "ref_init_two_process.py"
SFT = {"ref_init": "sft_on_chosen", "ref_init_max_steps": 4, "ref_init_learning_rate": 3e-3, "ref_init_batch_size": 8}


def arithmetic_row(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": [str(a + b + 1), str(a * b + 3)]}


# A generated task: the chosen answer is the sum; rows with (a + 2b) % 5 == 0 are held out
TRAIN_ROWS = [arithmetic_row(a, b) for a in range(10) for b in range(10) if (a + 2 * b) % 5]
HELD_OUT_ROWS = [arithmetic_row(a, b) for a in range(10) for b in range(10) if (a + 2 * b) % 5 == 0]


def fresh_model(tokenizer, seed: int = 0):
    return tiny_causal_lm(len(tokenizer), seed=seed)


@pytest.fixture
def sft_calls(monkeypatch):
    """The number of times the SFT stage trained, counted at `SFTTrainer.train` of the SFT stage."""
    calls = []
    original = ref_init._SFTReferenceTrainer.train

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ref_init._SFTReferenceTrainer, "train", counted)
    return calls


def saved_weights(sft_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(sft_dir, "model.safetensors"))


def assert_weights_equal(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state_dict.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state_dict[name].cpu(), tensor), f"Parameter {name} differs from the saved SFT reference."


def dpo_trainer(tokenizer, tmp_path, model=None, rows=TRAIN_ROWS, peft_config=None, **config):
    return DPOTrainer(
        model=model if model is not None else fresh_model(tokenizer),
        args=make_args(tmp_path, **{**SFT, **config}),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def test_sft_reference_raises_the_held_out_chosen_log_likelihood(tokenizer, tmp_path):
    args = make_args(tmp_path, **{**SFT, "ref_init_max_steps": 30})
    sft_dir = train_sft_reference(fresh_model(tokenizer), Dataset.from_list(TRAIN_ROWS), tokenizer, args)
    assert sft_dir == str(tmp_path / "sft_ref")

    def mean_log_likelihood(model) -> float:
        with torch.no_grad():
            return sum(
                sequence_logps(
                    model,
                    tokenizer(r["prompt"])["input_ids"],
                    tokenizer(r["chosen"] + tokenizer.eos_token)["input_ids"],
                ).item()
                for r in HELD_OUT_ROWS
            ) / len(HELD_OUT_ROWS)

    initial = mean_log_likelihood(fresh_model(tokenizer))
    reference = mean_log_likelihood(AutoModelForCausalLM.from_pretrained(sft_dir))
    # Measured: about -11.3 nats per held-out answer before, -4.3 after 30 steps
    assert reference > initial + 3.0, (initial, reference)
    # The loss is logged under the stage's own prefix, in the saved metadata
    history = read_metadata(sft_dir)["log_history"]
    assert any("sft_ref/loss" in entry for entry in history)
    assert not any("loss" in entry for entry in history)


FORMATS = {
    "standard": [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "ab", "chosen": "cd", "rejected": "x"},
    ],
    "standard_k_rejected": TRAIN_ROWS[:3],
    "implicit_prompt": [
        {"chosen": "2+2=4", "rejected": ["2+2=5", "2+2=22"]},
        {"chosen": "ab: cd", "rejected": ["ab: x"]},
    ],
    "conversational": [
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "22"}]],
        }
    ],
    "conversational_implicit_prompt": [
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}],
        }
    ],
    "pre_tokenized": [
        {"prompt_ids": [10, 11, 12], "chosen_ids": [13, 14, 1], "rejected_ids": [[15, 1], [16, 17, 1]]},
        {"prompt_ids": [20], "chosen_ids": [21, 1], "rejected_ids": [[22, 1]]},
    ],
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_sft_stage_trains_on_exactly_the_chosen_tokens_dpo_uses(tokenizer, tmp_path, sft_calls, name):
    """Whatever the format, the SFT rows are prompt + chosen with the loss on the chosen tokens, the very tokens the
    DPO trainer scores as the chosen completion."""
    rows = FORMATS[name]
    args = make_args(tmp_path, **{**SFT, "ref_init_max_steps": 1})
    train_sft_reference(fresh_model(tokenizer), Dataset.from_list(rows), tokenizer, args)
    (trainer,) = sft_calls
    prepared = trainer.train_dataset
    assert len(prepared) == len(rows)
    for i, row in enumerate(rows):
        if "prompt_ids" not in row:
            row = row if "prompt" in row else {**row, **extract_prompt_multi(row, i)}
            eos = None if isinstance(row["chosen"], list) else tokenizer.eos_token
            row = tokenize_row(row, i, tokenizer, eos)
        expected_labels = [-100] * len(row["prompt_ids"]) + row["chosen_ids"]
        assert prepared[i]["input_ids"] == row["prompt_ids"] + row["chosen_ids"]
        assert prepared[i]["labels"] == expected_labels


@pytest.mark.parametrize("model_as", ["object", "path"])
def test_dpo_reference_and_starting_policy_are_the_saved_sft_weights(tokenizer, tmp_path, model_as):
    model = fresh_model(tokenizer)
    initial = {n: t.clone() for n, t in model.state_dict().items()}
    if model_as == "path":
        model.save_pretrained(tmp_path / "base")
        model = str(tmp_path / "base")
    trainer = dpo_trainer(tokenizer, tmp_path / "run", model=model)
    saved = saved_weights(str(tmp_path / "run" / "sft_ref"))
    assert any(not torch.equal(saved[n], initial[n]) for n in saved), "the SFT stage did not change the weights"
    # Fresh objects loaded from the folder, not the model given to the SFT stage
    assert trainer.model is not model and trainer.ref_model is not trainer.model
    assert_weights_equal(trainer.ref_model.state_dict(), saved)
    assert_weights_equal(trainer.model.state_dict(), saved)
    loss, _ = loss_and_grads(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # The DPO run logs nothing of the SFT stage
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert not any(key.startswith("sft_ref/") for entry in trainer.state.log_history for key in entry)


def test_precomputed_reference_log_probs_come_from_the_sft_reference(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path, rows=TRAIN_ROWS[:4], precompute_ref_log_probs=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_ref")
    initial = fresh_model(tokenizer)
    for row in trainer.train_dataset:
        with torch.no_grad():
            expected = sequence_logps(reference, row["prompt_ids"], row["chosen_ids"]).item()
            before_sft = sequence_logps(initial, row["prompt_ids"], row["chosen_ids"]).item()
        assert row["ref_chosen_logps"] == pytest.approx(expected, abs=1e-4)
        assert row["ref_chosen_logps"] != pytest.approx(before_sft, abs=1e-2)


def test_second_run_with_the_same_settings_reuses_the_saved_reference(tokenizer, tmp_path, sft_calls, caplog):
    caplog.set_level(logging.INFO, logger="trl_dpo_ext.ref_init")
    dpo_trainer(tokenizer, tmp_path)
    assert len(sft_calls) == 1
    sft_dir = tmp_path / "sft_ref"
    run_id = read_metadata(str(sft_dir))["run_id"]
    modified = os.path.getmtime(sft_dir / "model.safetensors")
    caplog.clear()

    trainer = dpo_trainer(tokenizer, tmp_path)
    assert len(sft_calls) == 1, "the SFT stage ran again"
    assert "Reusing the SFT reference" in caplog.text and "Training the SFT reference" not in caplog.text
    assert read_metadata(str(sft_dir))["run_id"] == run_id
    assert os.path.getmtime(sft_dir / "model.safetensors") == modified
    assert_weights_equal(trainer.ref_model.state_dict(), saved_weights(str(sft_dir)))
    assert not (tmp_path / "sft_ref.incomplete").exists()


def test_changed_setting_data_or_base_model_fails_clearly(tokenizer, tmp_path, sft_calls):
    dpo_trainer(tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"is not reused:\n  settings\.learning_rate: saved 0\.003, now 0\.001"):
        dpo_trainer(tokenizer, tmp_path, ref_init_learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"is not reused:\n  data\.num_rows: saved 80, now 79\n  data\.sha256"):
        dpo_trainer(tokenizer, tmp_path, rows=TRAIN_ROWS[1:])
    with pytest.raises(ValueError, match=r"is not reused:\n  base_model\.weights_sample_sha256"):
        dpo_trainer(tokenizer, tmp_path, model=fresh_model(tokenizer, seed=1))
    assert len(sft_calls) == 1
    # A changed output folder makes a new reference
    dpo_trainer(tokenizer, tmp_path, ref_init_learning_rate=1e-3, ref_init_output_dir=str(tmp_path / "other"))
    assert len(sft_calls) == 2 and read_metadata(str(tmp_path / "other")) is not None


def test_existing_folder_not_made_by_ref_init_is_an_error(tokenizer, tmp_path):
    (tmp_path / "sft_ref").mkdir()
    with pytest.raises(ValueError, match=f"exists but has no {METADATA_FILE}"):
        dpo_trainer(tokenizer, tmp_path)


def test_resume_from_a_dpo_checkpoint_keeps_the_sft_reference(tokenizer, tmp_path, sft_calls):
    config = {"save_strategy": "steps", "save_steps": 1, "max_steps": 2}
    dpo_trainer(tokenizer, tmp_path, **config).train()
    assert len(sft_calls) == 1
    saved = saved_weights(str(tmp_path / "sft_ref"))

    resumed = dpo_trainer(tokenizer, tmp_path, **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert len(sft_calls) == 1, "resuming ran the SFT stage again"
    assert resumed.state.global_step == 2
    # The reference is still the SFT model, not the policy of the checkpoint, which has moved away from it
    assert_weights_equal(resumed.ref_model.state_dict(), saved)
    assert any(not torch.equal(p.detach(), saved[n]) for n, p in resumed.model.named_parameters())

    # Without its reference, a checkpointed run is not resumed against a new one
    for path in (tmp_path / "sft_ref").iterdir():
        path.unlink()
    (tmp_path / "sft_ref").rmdir()
    with pytest.raises(ValueError, match="has a checkpoint .* but its SFT reference is missing"):
        dpo_trainer(tokenizer, tmp_path, **config)
    assert len(sft_calls) == 1


def test_peft_sft_adapter_is_merged_and_the_dpo_reference_is_the_merged_base(tokenizer, tmp_path):
    def lora():
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    initial = fresh_model(tokenizer).state_dict()
    trainer = dpo_trainer(tokenizer, tmp_path, peft_config=lora(), ref_init_learning_rate=1e-2)
    sft_dir = str(tmp_path / "sft_ref")
    saved = saved_weights(sft_dir)
    assert not os.path.exists(os.path.join(sft_dir, "adapter_config.json")), "the adapter must be merged"
    assert read_metadata(sft_dir)["peft"] == "merged"
    assert read_metadata(sft_dir)["identity"]["settings"]["peft_config"]["r"] == 8
    changed = {n for n in saved if not torch.equal(saved[n], initial[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed), changed

    # DPO trains a new adapter over the merged base; disabling it gives the reference: the saved weights
    assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None
    base = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for n, p in trainer.model.state_dict().items()
        if "lora_" not in n
    }
    assert_weights_equal(base, saved)
    loss, grads = loss_and_grads(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert grads and all("lora_" in n for n in grads)


def test_sft_ref_command_makes_a_reference_that_dpo_reuses(tokenizer, tmp_path, sft_calls, capsys):
    fresh_model(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TRAIN_ROWS))
    # fmt: off
    argv = [
        "--model_name_or_path", str(tmp_path / "base"), "--dataset_name", str(data), "--output_dir", str(tmp_path),
        "--ref_init_max_steps", "4", "--ref_init_learning_rate", "3e-3", "--ref_init_batch_size", "8",
        "--per_device_train_batch_size", "4", "--seed", "0", "--bf16", "False", "--report_to", "none",
    ]
    # fmt: on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft_dir = main(argv)
    # The command's `ref_init_*` flags are its settings, not flags "set but unused" as they would be in a `dpo` run
    assert not [w for w in caught if "are set but `ref_init=None`" in str(w.message)]
    assert capsys.readouterr().out.strip().endswith(sft_dir)
    assert sft_dir == str(tmp_path / "sft_ref") and len(sft_calls) == 1

    dataset = Dataset.from_json(str(data))
    trainer = DPOTrainer(model=str(tmp_path / "base"), args=make_args(tmp_path, **SFT), train_dataset=dataset)
    assert len(sft_calls) == 1, "the DPO run did not reuse the reference made by the command"
    assert_weights_equal(trainer.model.state_dict(), saved_weights(sft_dir))


def test_two_processes_make_one_reference_and_both_load_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    expected = saved_weights(str(tmp_path / "sft_ref"))
    digest = hashlib.sha256()
    for name in sorted(expected):
        digest.update(name.encode())
        digest.update(expected[name].contiguous().numpy().tobytes())
    for rank in ranks:
        # One SFT run, across both ranks: each trained on its half of the 16 rows (2 batches of 4), then loaded
        # exactly the saved weights as reference and policy; the second trainer reused the folder
        assert rank["first"]["sft_train_calls"] == 1 and rank["first"]["sft_batches_on_this_rank"] == [2]
        assert rank["second"]["sft_train_calls"] == 0
        for run in ("first", "second"):
            assert rank[run]["ref_hash"] == rank[run]["policy_hash"] == digest.hexdigest()
    metadata = read_metadata(str(tmp_path / "sft_ref"))
    assert metadata["num_processes"] == 2
    assert metadata["log_history"][-1]["step"] == 2  # 16 rows / (4 per rank × 2 ranks); one process takes 4 steps
    assert not (tmp_path / "sft_ref.incomplete").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"ref_init": "sft"}, "`ref_init` must be None or 'sft_on_chosen', got 'sft'."),
        ({"ref_init_max_steps": 0}, "`ref_init_max_steps` must be a positive number of steps, or -1 to use"),
        ({"ref_init_learning_rate": -1.0}, "`ref_init_learning_rate` must be positive, got -1.0."),
        ({"ref_init_batch_size": 0}, "`ref_init_batch_size` must be None or at least 1, got 0."),
    ],
)
def test_invalid_ref_init_settings_raise(tmp_path, config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_args(tmp_path, **{"ref_init": "sft_on_chosen", **config})


def test_ref_init_settings_without_ref_init_warn_as_unused(tmp_path):
    with pytest.warns(UserWarning, match=re.escape("['ref_init_max_steps'] are set but `ref_init=None`")):
        make_args(tmp_path, ref_init_max_steps=3)


def test_a_given_ref_model_takes_precedence_over_ref_init(tokenizer, tmp_path, sft_calls, caplog):
    caplog.set_level(logging.WARNING, logger="trl_dpo_ext.ref_init")
    reference = fresh_model(tokenizer, seed=1)
    trainer = DPOTrainer(
        model=fresh_model(tokenizer),
        ref_model=reference,
        args=make_args(tmp_path, **SFT),
        train_dataset=Dataset.from_list(TRAIN_ROWS),
        processing_class=tokenizer,
    )
    assert not sft_calls and not (tmp_path / "sft_ref").exists()
    assert trainer.ref_model is reference
    assert "`ref_init='sft_on_chosen'` is ignored because a `ref_model` was passed" in caplog.text


def test_metadata_holds_the_sha256_of_each_weight_file(tokenizer, tmp_path):
    dpo_trainer(tokenizer, tmp_path)
    sft_dir = tmp_path / "sft_ref"
    checksums = read_metadata(str(sft_dir))["weight_sha256"]
    assert "model.safetensors" in checksums
    for name, digest in checksums.items():
        assert hashlib.sha256((sft_dir / name).read_bytes()).hexdigest() == digest, name


def overwrite_middle(path: Path) -> None:
    """Flip the bytes in the middle of a file, keeping its size (a weight tensor's data, past the header)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [overwrite_middle, truncate])
def test_a_damaged_saved_reference_is_an_error_saying_to_remove_it(tokenizer, tmp_path, sft_calls, damage):
    dpo_trainer(tokenizer, tmp_path)
    weights = tmp_path / "sft_ref" / "model.safetensors"
    size = weights.stat().st_size
    damage(weights)
    assert (weights.stat().st_size == size) == (damage is overwrite_middle)
    with pytest.raises(
        ValueError, match=re.escape(f"Remove the folder ({tmp_path / 'sft_ref'}) to make the reference")
    ):
        dpo_trainer(tokenizer, tmp_path)
    assert len(sft_calls) == 1, "the SFT stage ran again"


def test_a_truncated_reference_saved_without_checksums_gets_the_same_advice(tokenizer, tmp_path, sft_calls):
    dpo_trainer(tokenizer, tmp_path)
    sft_dir = tmp_path / "sft_ref"
    metadata = read_metadata(str(sft_dir))
    del metadata["weight_sha256"]  # as written by version 1
    (sft_dir / METADATA_FILE).write_text(json.dumps(metadata))
    truncate(sft_dir / "model.safetensors")
    message = f"The SFT reference's weight file model.safetensors in {sft_dir} is damaged"
    with pytest.raises(ValueError, match=re.escape(message) + ".*Remove the folder"):
        dpo_trainer(tokenizer, tmp_path)
    assert len(sft_calls) == 1
