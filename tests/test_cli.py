"""`fusegen build` as a user runs it: exit codes, messages, what lands in generated/."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD = "model Tiny(c=4)\ninput(1, c, 5, 5)\nforward:\n    conv: conv3x3(c, 8) -> bn: bn(8) -> relu\n"
BAD = "model Broken(c=4)\ninput(1, c, 5, 5)\nforward:\n    conv: conv3x3(c, 8) -> pw: conv1x1(8, 8)\n"


def fusegen(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "fusegen", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "tiny.fuse").write_text(GOOD)
    return tmp_path


def test_build_writes_every_spec_then_check_passes(project):
    shutil.copy(ROOT / "specs" / "efficientnet_b1.fuse", project / "specs")
    result = fusegen(project, "build")
    assert result.returncode == 0, result.stderr
    # eval: conv3x3_bn_relu; training: the conv with batch statistics, BatchNorm's statistics, bn -> relu
    assert "specs/tiny.fuse -> generated/tiny.py (4 kernels)" in result.stdout
    assert (project / "generated" / "tiny.py").exists()
    assert (project / "generated" / "efficientnet_b1.py").read_text() == (ROOT / "generated" / "efficientnet_b1.py").read_text()
    check = fusegen(project, "build", "--check")
    assert check.returncode == 0, check.stderr


def test_two_builds_are_byte_identical(project):
    fusegen(project, "build")
    first = (project / "generated" / "tiny.py").read_bytes()
    again = fusegen(project, "build")
    assert "unchanged" in again.stdout
    assert (project / "generated" / "tiny.py").read_bytes() == first


def test_check_fails_on_stale_or_missing_output(project):
    assert fusegen(project, "build", "--check").returncode == 1  # never built
    fusegen(project, "build")
    (project / "specs" / "tiny.fuse").write_text(GOOD.replace("relu", "relu6"))
    result = fusegen(project, "build", "--check")
    assert result.returncode == 1
    assert "generated/tiny.py: stale" in result.stderr


def test_bad_spec_exits_2_with_position_and_writes_nothing(project):
    (project / "specs" / "broken.fuse").write_text(BAD)
    result = fusegen(project, "build")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "specs/broken.fuse:4:32: error: conv1x1 cannot join the kernel of conv3x3" in result.stderr
    assert "    conv: conv3x3(c, 8) -> pw: conv1x1(8, 8)\n" + " " * 35 + "^" in result.stderr
    assert not (project / "generated").exists(), "a failing build must not write the good specs either"


def test_missing_spec_and_no_specs_are_clear_errors(tmp_path):
    result = fusegen(tmp_path, "build", "nope.fuse")
    assert result.returncode == 2 and "nope.fuse: error: cannot read spec" in result.stderr
    assert "Traceback" not in result.stderr
    result = fusegen(tmp_path, "build")
    assert result.returncode == 2 and "no specs given and none found in specs/" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    result = fusegen(tmp_path, "compile")
    assert result.returncode == 2 and "invalid choice" in result.stderr
