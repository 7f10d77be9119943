"""End-to-end fixtures: the ``iotix`` CLI run as a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 60

# Variables that make rich behave as if it wrote to a terminal (colours, a wide
# screen). Without them the CLI sees what a pipe in CI sees: no colour, 80 columns.
_TERMINAL_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")


def _cli_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TERMINAL_VARIABLES}
    env["NO_COLOR"] = "1"
    env["PYTHONUTF8"] = "1"  # the output holds °C and arrows, whatever the locale
    return env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m iotix ARGS`` in ``cwd`` (default: the repository root)."""
    env = _cli_environment()

    def run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "iotix", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=CLI_TIMEOUT_S,
            check=False,
        )

    return run


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write dedented ``text`` to ``tmp_path / name`` (parents created) and return it."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
