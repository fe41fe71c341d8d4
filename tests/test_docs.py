"""The specs shown in the docs compile, and the README's is the shipped MobileNetV1 spec in other words."""

import re
from pathlib import Path

from fusegen.check import check
from fusegen.parse import parse_spec
from fusegen.plan import plan

ROOT = Path(__file__).resolve().parent.parent


def spec_blocks(doc: str) -> list[str]:
    """The fenced blocks of a Markdown file that start with a `model` header."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", (ROOT / doc).read_text(encoding="utf-8"), re.M | re.S)
    return [block for block in blocks if block.startswith("model ")]


def launches(text: str, name: str) -> list[tuple[str, str]]:
    """(kernel, module paths) of every launch, eval mode then training mode."""
    kernel_plan = plan(check(parse_spec(text), text), name)
    steps = kernel_plan.steps + (kernel_plan.train_steps or ())
    return [(s.kernel.name, ",".join(map(str, s.args))) for s in steps if hasattr(s, "kernel")]


def test_readme_spec_is_the_shipped_mobilenet_v1():
    (readme,) = spec_blocks("README.md")
    shipped = (ROOT / "specs" / "mobilenet_v1.fuse").read_text(encoding="utf-8")
    assert launches(readme, "mobilenet_v1.fuse") == launches(shipped, "mobilenet_v1.fuse")


def test_dsl_reference_specs_check():
    blocks = spec_blocks("docs/dsl.md")
    assert blocks, "docs/dsl.md shows a whole spec"
    for block in blocks:
        assert launches(block, "example.fuse")
