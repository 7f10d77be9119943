"""The README's tour quotes real files and real output: these tests keep it honest."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]

REPO_ROOT = Path(__file__).resolve().parents[2]

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
THERMOSTAT = REPO_ROOT / "examples" / "device-models" / "thermostat.yaml"


def _is_part_of(excerpt: Any, whole: Any) -> bool:
    """True when every key and value of ``excerpt`` stands in ``whole``."""
    if isinstance(excerpt, dict):
        return isinstance(whole, dict) and all(
            key in whole and _is_part_of(value, whole[key]) for key, value in excerpt.items()
        )
    return bool(excerpt == whole)


def test_readme_model_excerpt_is_part_of_the_thermostat_example() -> None:
    block = re.search(r"```yaml\n(name: thermostat\n.*?)```", README, re.DOTALL)
    assert block is not None
    excerpt = yaml.safe_load(block.group(1))
    assert _is_part_of(excerpt, yaml.safe_load(THERMOSTAT.read_text(encoding="utf-8")))


def test_readme_validation_error_is_what_validate_prints(run_cli: RunCLI, tmp_path: Path) -> None:
    quoted = re.search(r"^(error examples/device-models/thermostat\.yaml:\d+ .*)$", README, re.M)
    assert quoted is not None
    broken = tmp_path / "examples" / "device-models" / "thermostat.yaml"
    broken.parent.mkdir(parents=True)
    shutil.copy(THERMOSTAT, broken)
    text = broken.read_text(encoding="utf-8")
    assert "interval_s: 10" in text
    broken.write_text(text.replace("interval_s: 10", "interval: 10", 1), encoding="utf-8")

    result = run_cli("validate", "examples/device-models/thermostat.yaml", cwd=tmp_path)

    assert result.stderr.splitlines()[0] == quoted.group(1)
