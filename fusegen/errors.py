"""Errors in a spec, reported as `file:line:column: error: ...` with the line and a caret."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """1-based line and column of a spec token."""

    line: int
    column: int


class SpecError(Exception):
    """A problem in a spec file that the user must fix; never a fusegen bug."""

    def __init__(self, pos: Pos | None, message: str):
        super().__init__(message)
        self.pos = pos
        self.message = message

    def render(self, path: str, source: str) -> str:
        if self.pos is None:
            return f"{path}: error: {self.message}"
        lines = source.splitlines()
        text = lines[self.pos.line - 1] if 0 < self.pos.line <= len(lines) else ""
        caret = " " * (self.pos.column - 1) + "^"
        return f"{path}:{self.pos.line}:{self.pos.column}: error: {self.message}\n    {text}\n    {caret}"
