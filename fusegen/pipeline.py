"""The compiler in one function: parse -> check -> plan -> lower -> emit."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from fusegen.check import check
from fusegen.emit import emit
from fusegen.lower import lower
from fusegen.parse import parse_spec
from fusegen.plan import Plan, plan


def spec_name(spec_path: str) -> str:
    """The spec as generated code names it (header, docstring, a comment per launch): the file's base
    name with each character but letters, digits and ` _.-~+,=@()[]` percent-encoded (`"` -> %22, a
    newline -> %0A, `\\` -> %5C), so that no file name can end a comment or a docstring or make an escape."""
    return urllib.parse.quote(Path(spec_path).name, safe=" +,=@()[]", errors="surrogateescape")


def compile_plan(source: str, spec_path: str) -> tuple[Plan, str]:
    """Spec text -> its plan and the generated Python module's text. Raises SpecError for a bad spec."""
    spec = parse_spec(source)
    model = check(spec, source)
    name = spec_name(spec_path)
    kernel_plan = plan(model, name)
    lowered = [lower(kernel) for kernel in kernel_plan.kernels]
    return kernel_plan, emit(kernel_plan, lowered, name)


def compile_spec(source: str, spec_path: str) -> str:
    """Spec text -> the generated Python module's text. Raises SpecError for a bad spec."""
    return compile_plan(source, spec_path)[1]
