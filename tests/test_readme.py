"""Keep the README's commands and the CI script from drifting apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", quickstart, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "examples/divergence.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"


def test_ci_script_is_strict_and_executable():
    ci = ROOT / ".ci" / "run"
    text = ci.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"


def test_readme_cites_the_paper_and_embeds_the_figure():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "1808.02941" in text
    assert "docs/divergence.png" in text
    assert (ROOT / "docs" / "divergence.png").is_file()


def test_the_adapter_example_runs():
    """The README's "Writing an adapter for a new optimizer" example, run as written (it asserts its own result)."""
    import warnings

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Writing an adapter for a new optimizer", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert "register_adapter(LeakyAdagrad" in code and "ConditionTracker(opt)" in code
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "no adapter" warning, no disabled group)
        namespace: dict = {"__name__": "readme_example"}
        exec(compile(code, "README.md (adapter example)", "exec"), namespace)
    assert namespace["result"]["steps"] == 50.0
