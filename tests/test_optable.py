"""The op table in docs/dsl.md is the op registry's, `fusegen ops` prints it, `fusegen --version` the package's."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusegen import ops, optable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "dsl.md"
DOCS = [ROOT / "README.md", DOC]


def fusegen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusegen", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_committed_op_table_is_the_registrys(doc):
    committed = optable.committed_table(doc.read_text(encoding="utf-8"))
    assert committed is not None, f"{doc.relative_to(ROOT)} lost its op table markers: {optable.MARKERS}"
    assert committed == optable.render_markdown(), (
        f"{doc.relative_to(ROOT)}'s op table differs from fusegen/ops.py; regenerate it with"
        f" `python -m fusegen ops --write {doc.relative_to(ROOT)}` and commit the result"
    )


def test_every_spellable_op_has_a_row_with_its_arguments():
    table = {row.name: row for row in optable.rows()}

    def names(row):
        return [a.split("=")[0] for a in row.arguments.split(", ") if a]

    for name in ops.FIXED_OPS:
        assert table[name].role == ops.lookup(name).role.value
        assert names(table[name]) == list(ops.lookup(name).args)
    # a sized family's row stands for every K: padding defaults to K // 2
    for family, member in (("convKxK", "conv5x5"), ("dwconvKxK", "dwconv7x7")):
        assert names(table[family]) == list(ops.lookup(member).args)
        assert "padding=K//2" in table[family].arguments


def test_write_restores_an_edited_table(tmp_path):
    doc = tmp_path / "dsl.md"
    shutil.copy(DOC, doc)
    text = doc.read_text(encoding="utf-8")
    doc.write_text(text.replace("| `relu` |", "| `relu_edited` |"), encoding="utf-8")
    assert optable.write(doc) is True
    assert doc.read_text(encoding="utf-8") == text
    assert optable.write(doc) is False


def test_ops_command_and_version():
    listed = fusegen("ops")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^conv1x1\(in_channels, out_channels, stride=1\) +anchor +1x1 convolution", listed.stdout, re.M)
    assert fusegen("ops", "--markdown").stdout == optable.render_markdown()
    version = fusegen("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"fusegen {importlib.metadata.version('fusegen')}"


def test_changelog_has_the_pyproject_version():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert re.search(
        rf"^## {re.escape(version)}\b", (ROOT / "CHANGELOG.md").read_text(), re.M
    ), f"CHANGELOG.md has no `## {version}` section for pyproject.toml's version"
