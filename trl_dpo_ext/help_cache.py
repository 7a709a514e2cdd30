"""`trl-dpo-ext <command> --help`, cached: the text of a parser built from TRL's dataclasses, kept per version.

Building the parser of `dpo` imports `DPOConfig`, hence transformers and torch; the cached text answers at once.
Nothing here imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def help_cache_path(command: str) -> Path:
    """Where `trl-dpo-ext <command> --help` is kept: one file per version of everything its text depends on.

    The key: the versions of the libraries whose dataclasses make the flags, the bytes of this package's sources, the
    Python version and the terminal width (argparse wraps to it). Nothing here imports them.
    """
    from importlib.metadata import PackageNotFoundError, version

    key = hashlib.sha256(f"{command} {sys.version} {shutil.get_terminal_size().columns}".encode())
    for name in ("trl", "transformers", "accelerate", "peft", "datasets", "torch"):
        try:
            key.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            key.update(f"{name}=none".encode())
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        key.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "trl-dpo-ext" / "help" / f"{command}-{key.hexdigest()[:20]}.txt"


def cached_help(command: str, build: Callable[[str], argparse.ArgumentParser]) -> str:
    """The `--help` text of a command, from the cache, else built (importing torch, transformers, TRL) and cached.

    Building the parser of `dpo` means importing `DPOConfig`, hence transformers and torch (4-5 s, more on a busy
    machine); the cached text answers in a fraction of a second.
    """
    path = help_cache_path(command)
    if path.is_file():
        return path.read_text()
    text = build(command).format_help()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: a concurrent reader sees the whole text or none
    except OSError:
        pass  # a read-only cache folder: the help is still printed, only built again next time
    return text
