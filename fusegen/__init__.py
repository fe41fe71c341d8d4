"""fusegen: a DSL that compiles chains of CNN ops into fused Triton kernels and a drop-in ModelNew."""

from fusegen.errors import SpecError
from fusegen.pipeline import compile_spec

__all__ = ["SpecError", "compile_spec"]
