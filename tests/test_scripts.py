"""The maintainer scripts in scripts/ load and answer --help without a GPU (their sweeps need one)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_python_script_has_a_docstring_and_help(script):
    source = script.read_text(encoding="utf-8")
    assert source.startswith('"""'), f"{script.name} starts with a module docstring"
    result = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script.name}")


def test_gpu_check_help():
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "parts:" in result.stdout
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part: nope" in bad.stderr
