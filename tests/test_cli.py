"""The `trl-dpo-ext` command: `dpo` on local JSON lines of real text, YAML configs, dispatch, and TRL's own script."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl
from conftest import SHARED_DATA
from transformers import AutoModelForCausalLM

import trl_dpo_ext
from trl_dpo_ext import cli
from trl_dpo_ext.convert import rated_to_multi_rejected
from trl_dpo_ext.help_cache import help_cache_path
from trl_dpo_ext.quickstart import char_tokenizer, tiny_causal_lm


needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data (the real preference data these tests read) is absent"
)

# Flags every `dpo` run here shares: a couple of CPU steps, nothing saved but the final model
COMMON_FLAGS = [
    "--per_device_train_batch_size", "2",
    "--learning_rate", "1e-2",
    "--report_to", "none",
    "--bf16", "false",
    "--activation_checkpointing", "false",
    "--use_cpu", "true",
    "--save_strategy", "no",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
    "--max_length", "160",
]  # fmt: skip


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Llama and its character tokenizer, saved as a model folder (what `--model_name_or_path` names)."""
    path = tmp_path / "tiny-model"
    tokenizer = char_tokenizer(chat_template=None)
    tiny_causal_lm(len(tokenizer), hidden_size=32, num_hidden_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pairwise_folder(tmp_path) -> Path:
    """The 6 shortest of the first 200 HH-RLHF pairs (implicit prompt), as a folder with `train.jsonl`."""
    with gzip.open(SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(200), f, strict=False)]
    rows = sorted(rows, key=lambda r: len(r["chosen"]) + len(r["rejected"]))[:6]
    write_jsonl(tmp_path / "hh" / "train.jsonl", rows)
    return tmp_path / "hh"


@pytest.fixture
def multi_rejected_folder(tmp_path) -> Path:
    """AlpacaEval instructions with their best-rated response and the 3 lowest-rated, cut short, in `train.jsonl`."""
    with gzip.open(SHARED_DATA / "alpacaeval-rated.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(6), f, strict=False)]
    rows = rated_to_multi_rejected(rows, num_rejected=3, min_rejected=3)
    rows = [
        {"prompt": r["prompt"][:60], "chosen": r["chosen"][:40], "rejected": [x[:40] for x in r["rejected"]]}
        for r in rows
    ]
    assert len(rows) >= 4
    write_jsonl(tmp_path / "alpaca" / "train.jsonl", rows)
    return tmp_path / "alpaca"


def changed_parameters(before: Path, after: Path) -> list[str]:
    old = AutoModelForCausalLM.from_pretrained(before).state_dict()
    new = AutoModelForCausalLM.from_pretrained(after).state_dict()
    return [name for name in old if not torch.equal(old[name], new[name])]


@needs_shared
def test_dpo_command_trains_on_a_local_folder_of_real_pairwise_text(model_dir, pairwise_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(pairwise_folder)]
    assert cli.main([*argv, "--output_dir", str(out), "--max_steps", "2", *COMMON_FLAGS]) == 0
    changed = changed_parameters(model_dir, out)
    # Every weight the data reaches moves; only the norm weights of a 1-layer model may stay within float32 reach
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed, changed


@needs_shared
def test_dpo_command_reads_a_yaml_config_and_trains_on_lists_of_rejected(model_dir, multi_rejected_folder, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\n"
        f"dataset_name: {multi_rejected_folder}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "rejected_reduction: softmax\n"
        "beta: 0.2\n"
        "max_steps: 2\n"
    )
    parser = cli.make_dpo_parser()
    # Flags given on the command line win over the file's values, as with `trl dpo --config`
    parsed = parser.parse_args_and_config(["--config", str(config), "--beta", "0.3", *COMMON_FLAGS])
    trainer = cli.dpo(*parsed)
    assert trainer.args.rejected_reduction == "softmax" and trainer.args.beta == 0.3 and trainer.args.max_steps == 2
    logs = [log for log in trainer.state.log_history if "num_rejected" in log]
    assert [log["num_rejected"] for log in logs] == [3.0, 3.0]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_every_dpo_config_field_is_a_flag_of_the_dpo_command():
    from trl_dpo_ext import DPOConfig

    help_text = cli.make_dpo_parser().format_help()
    for name in (
        "rejected_reduction",
        "ref_init",
        "ref_init_learning_rate",
        "beta",
        "loss_type",
        "model_name_or_path",
    ):
        assert f"--{name} " in help_text, name
    parsed = cli.make_dpo_parser().parse_args_and_config(
        ["--output_dir", "x", "--rejected_reduction", "min", *COMMON_FLAGS]
    )
    assert isinstance(parsed[1], DPOConfig) and parsed[1].rejected_reduction == "min"


def test_dpo_command_without_a_dataset_says_what_to_give(model_dir, tmp_path):
    with pytest.raises(ValueError, match="Give a dataset: `--dataset_name`"):
        cli.main(["dpo", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path), *COMMON_FLAGS])


@pytest.mark.parametrize(
    "command, module, function",
    [("sft-ref", "trl_dpo_ext.cli", "sft_ref_main"), ("report", "trl_dpo_ext.report", "main")],
)
def test_sft_ref_and_report_get_the_rest_of_the_command_line(monkeypatch, command, module, function):
    import importlib

    calls = []
    # `sft_ref_main` returns the reference's folder: the command still exits with status 0, not with that string
    monkeypatch.setattr(importlib.import_module(module), function, lambda argv: calls.append(argv) or "some/folder")
    assert cli.main([command, "--model_name_or_path", "m", "--x"]) == 0
    assert calls == [["--model_name_or_path", "m", "--x"]]


def test_unknown_command_fails_and_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train"])
    assert "invalid choice: 'train'" in capsys.readouterr().err
    assert cli.main([]) == 0
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in ("quickstart", "dpo", "sft-ref", "report"))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )


def test_importing_the_cli_and_building_its_parser_imports_no_torch():
    code = (
        "import sys; from trl_dpo_ext import cli; cli.make_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'accelerate') if m in sys.modules))"
    )
    assert run_python(code).stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["dpo", "report"])  # a TrlParser of dataclasses, an argparse parser
def test_command_help_is_the_parsers_own_and_is_cached(command, tmp_path, monkeypatch):
    """The first `--help` builds the parser and keeps its text; the next prints it without importing torch."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal: the same width here and in the subprocess
    code = (
        f"import sys; from trl_dpo_ext import cli; cli.main([{command!r}, '--help']); "
        "print('torch imported:', 'torch' in sys.modules)"
    )
    cache = {"XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "100"}
    first, second = run_python(code, **cache).stdout, run_python(code, **cache).stdout
    expected = cli._parser_of(command).format_help()
    assert first == expected + "torch imported: True\n"
    assert second == expected + "torch imported: False\n"
    assert [path.name for path in (tmp_path / "trl-dpo-ext" / "help").iterdir()] == [help_cache_path(command).name]


def test_help_cache_key_changes_with_the_versions_and_the_width(monkeypatch):
    import importlib.metadata

    path = help_cache_path("dpo")
    monkeypatch.setenv("COLUMNS", "57")
    wider = help_cache_path("dpo")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0" if name == "trl" else real_version(name))
    assert len({path, wider, help_cache_path("dpo")}) == 3


def test_env_prints_every_version(capsys):
    from importlib.metadata import version

    assert cli.main(["env"]) == 0
    lines = dict(line[2:].split(": ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("- "))
    assert lines["Python version"] == ".".join(map(str, sys.version_info[:3]))
    assert lines["trl-dpo-ext version"].startswith(f"{trl_dpo_ext.__version__} (")
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        assert lines[f"{name} version"] == version(name), name
    assert lines["CUDA (torch built with)"] == (torch.version.cuda or "none (CPU build)")
    assert lines["GPUs"] == (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    )


def test_console_script_is_installed():
    result = subprocess.run(["trl-dpo-ext", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("trl-dpo-ext ")


# --------------------------------------------------------------------------------- TRL's own script, one import swapped


def swap_trl_imports(source: str) -> tuple[str, int]:
    """`from trl import ..., DPOTrainer/DPOConfig, ...` -> the same names from `trl_dpo_ext`; returns the lines changed."""
    out, changed = [], 0
    for line in source.splitlines(keepends=True):
        match = re.match(r"^(\s*)from trl import (.+)$", line.rstrip("\n"))
        names = [n.strip() for n in match.group(2).split(",")] if match else []
        ours = [n for n in names if n in ("DPOTrainer", "DPOConfig")]
        if not ours:
            out.append(line)
            continue
        indent, rest = match.group(1), [n for n in names if n not in ours]
        if rest:
            out.append(f"{indent}from trl import {', '.join(rest)}\n")
        out.append(f"{indent}from trl_dpo_ext import {', '.join(ours)}\n")
        changed += 1
    return "".join(out), changed


@needs_shared
@pytest.mark.parametrize("shape", ["pairwise", "list_of_rejected"])
def test_trls_own_dpo_script_runs_with_its_imports_swapped(
    shape, model_dir, tmp_path, pairwise_folder, multi_rejected_folder
):
    source = (Path(trl.__file__).parent / "scripts" / "dpo.py").read_text()
    swapped, changed = swap_trl_imports(source)
    assert changed == 2, "TRL's script imports DPOTrainer in main() and DPOConfig in make_parser()"
    script = tmp_path / "dpo_ext.py"
    script.write_text(swapped)
    folder, num_rejected = (pairwise_folder, 1) if shape == "pairwise" else (multi_rejected_folder, 3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable, str(script),
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(folder),
        "--output_dir", str(tmp_path / "out"),
        "--max_steps", "1",
        *COMMON_FLAGS,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training completed." in result.stdout
    # Only trl_dpo_ext's trainer logs `num_rejected`: the swapped import is the one that trained
    assert f"'num_rejected': '{num_rejected}'" in result.stdout, result.stdout[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- the documented commands on a CPU

# COMMON_FLAGS without the two a CPU user had to add: `--bf16 false` and `--use_cpu true`
CPU_DEFAULT_FLAGS = [
    flag
    for pair in zip(COMMON_FLAGS[::2], COMMON_FLAGS[1::2], strict=True)
    if pair[0] not in ("--bf16", "--use_cpu")
    for flag in pair
]
ARITHMETIC_ROWS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": [str(a + b + 1), "x"]}
    for a in range(3)
    for b in range(3)
]


@pytest.fixture
def no_bf16_gpu(monkeypatch):
    """A machine without a bf16-capable GPU, as CI's: a no-op there, simulated on a machine with one."""
    import transformers.training_args

    import trl_dpo_ext.config

    monkeypatch.setattr(trl_dpo_ext.config, "is_torch_bf16_gpu_available", lambda: False, raising=False)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: False)


def test_dpo_command_trains_on_a_cpu_without_precision_or_device_flags(no_bf16_gpu, model_dir, tmp_path, caplog):
    assert "--bf16" not in CPU_DEFAULT_FLAGS and "--use_cpu" not in CPU_DEFAULT_FLAGS
    data = write_jsonl(tmp_path / "data" / "train.jsonl", ARITHMETIC_ROWS)
    argv = ["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data.parent)]
    with caplog.at_level("WARNING", logger="trl_dpo_ext.config"):
        assert cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", *CPU_DEFAULT_FLAGS]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "trl_dpo_ext.config"]
    assert len(lines) == 1 and lines[0].startswith("No bf16-capable accelerator found, so `bf16` (not set) is False")
    assert "lm_head.weight" in changed_parameters(model_dir, tmp_path / "out")


def test_bf16_on_a_cpu_is_off_unless_asked_for(no_bf16_gpu, tmp_path):
    parser = cli.make_dpo_parser()
    flags = ["--output_dir", str(tmp_path), "--report_to", "none"]
    assert parser.parse_args_and_config(flags)[1].bf16 is False
    # TRL's own behaviour where bf16 is asked for: on the CPU with `--use_cpu true` (autocast), else its error
    assert parser.parse_args_and_config([*flags, "--use_cpu", "true"])[1].bf16 is True
    with pytest.raises(ValueError, match=re.escape("Your setup doesn't support bf16/gpu")):
        parser.parse_args_and_config([*flags, "--bf16", "true"])


def test_torchrun_on_a_cpu_without_use_cpu_fails_before_any_work_saying_what_to_add(model_dir, tmp_path):
    """Without `--use_cpu true` the Trainer does not treat the processes as one run: each would train alone, and
    with `ref_init` they raced on `sft_ref` (`OSError: Directory not empty`)."""
    data = write_jsonl(tmp_path / "data" / "train.jsonl", ARITHMETIC_ROWS)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trl_dpo_ext",
        "dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data.parent), "--output_dir", str(out),
        "--ref_init", "sft_on_chosen", "--ref_init_max_steps", "1", "--max_steps", "1", *CPU_DEFAULT_FLAGS,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode != 0
    message = (
        "This process is one of WORLD_SIZE=2 started by a launcher (torchrun, accelerate launch), but the Trainer"
    )
    assert result.stderr.count(message) >= 2, result.stderr[-3000:]  # each rank says it
    assert "add `--use_cpu true`" in result.stderr
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------------------------------- input and messages


def test_dpo_command_without_a_model_says_to_give_one(tmp_path):
    data = write_jsonl(tmp_path / "data" / "train.jsonl", ARITHMETIC_ROWS)
    argv = ["dpo", "--dataset_name", str(data.parent), "--output_dir", str(tmp_path / "out"), *COMMON_FLAGS]
    with pytest.raises(ValueError, match=re.escape("`--model_name_or_path` is required: the model to train")):
        cli.main(argv)


RATED_ROWS = [
    {"instruction": "2+2?", "completions": [{"output": "4", "score": 0.9}, {"output": "5", "score": 0.2}]},
    {"instruction": "3+3?", "completions": [{"output": "6", "score": 0.8}]},  # one response: dropped
    {"instruction": "1+1?", "completions": [{"output": "2", "score": 1}, {"output": "3", "score": 0}]},
]


def test_convert_rated_writes_k_rejected_rows_and_counts_the_dropped_ones(tmp_path, capsys, caplog):
    source, output = write_jsonl(tmp_path / "rated.jsonl", RATED_ROWS), tmp_path / "rows.jsonl"
    with caplog.at_level("WARNING", logger="trl_dpo_ext.convert"):
        assert cli.main(["convert", "rated", str(source), str(output), "--num_rejected", "1"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows == rated_to_multi_rejected(RATED_ROWS, num_rejected=1)
    assert [row["rejected"] for row in rows] == [["5"], ["3"]]
    assert "Wrote 2 rows of 3" in capsys.readouterr().out
    assert "rated_to_multi_rejected dropped 1 of 3 rows:\n  1 with a single response (rows 1)" in caplog.text


def test_convert_pairwise_groups_rows_sharing_prompt_and_chosen(tmp_path):
    pairs = [{"prompt": "2+2=", "chosen": " 4", "rejected": r} for r in (" 5", " 22")]
    source, output = write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "rows.jsonl"
    assert cli.main(["convert", "pairwise", str(source), str(output)]) == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == [
        {"prompt": "2+2=", "chosen": " 4", "rejected": [" 5", " 22"]}
    ]


def test_dpo_on_a_rated_file_points_to_convert(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rated" / "train.jsonl", RATED_ROWS)
    argv = ["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data.parent)]
    with pytest.raises(ValueError, match=re.escape("`trl-dpo-ext convert rated IN OUT --num_rejected K`")):
        cli.main([*argv, "--output_dir", str(tmp_path / "out"), *COMMON_FLAGS])


def test_top_level_help_says_report_reads_a_record(capsys):
    assert cli.main([]) == 0
    assert "report" in (out := capsys.readouterr().out) and "grad_weights.jsonl" in out


def test_a_dpo_run_with_trls_defaults_on_a_cpu_prints_no_deprecation_nor_pin_memory_warning(
    no_bf16_gpu, model_dir, tmp_path, capsys
):
    import warnings

    data = write_jsonl(tmp_path / "data" / "train.jsonl", ARITHMETIC_ROWS[:4])
    flags = ["--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no", "--max_steps", "1"]
    argv = ["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data.parent), *flags]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]) == 0
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "checkpointing" in m or "pin_memory" in m], messages
    assert "(trained in one process)" in capsys.readouterr().out
