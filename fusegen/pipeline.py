"""The compiler in one function: parse -> check -> plan -> lower -> emit."""

from __future__ import annotations

from pathlib import Path

from fusegen.check import check
from fusegen.emit import emit
from fusegen.lower import lower
from fusegen.parse import parse_spec
from fusegen.plan import Plan, plan


def compile_plan(source: str, spec_path: str) -> tuple[Plan, str]:
    """Spec text -> its plan and the generated Python module's text. Raises SpecError for a bad spec."""
    spec = parse_spec(source)
    model = check(spec, source)
    kernel_plan = plan(model, Path(spec_path).name)
    lowered = [lower(kernel) for kernel in kernel_plan.kernels]
    return kernel_plan, emit(kernel_plan, lowered, spec_path)


def compile_spec(source: str, spec_path: str) -> str:
    """Spec text -> the generated Python module's text. Raises SpecError for a bad spec."""
    return compile_plan(source, spec_path)[1]
