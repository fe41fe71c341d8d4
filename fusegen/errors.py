"""Errors in a spec, reported as `file:line:column: error: ...` with the line and a caret."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """1-based line and column of a spec token."""

    line: int
    column: int


def source_lines(source: str) -> list[str]:
    """A spec's lines as the parser counts them: split at newlines only (str.splitlines also splits at a
    form feed, U+0085, U+2028, ..., which would put positions on the wrong line)."""
    return [line.removesuffix("\r") for line in source.removesuffix("\n").split("\n")]


class SpecError(Exception):
    """A problem in a spec file that the user must fix; never a fusegen bug."""

    def __init__(self, pos: Pos | None, message: str):
        super().__init__(message)
        self.pos = pos
        self.message = message

    def render(self, path: str, source: str) -> str:
        if self.pos is None:
            return f"{path}: error: {self.message}"
        lines = source_lines(source)
        text = lines[self.pos.line - 1] if 0 < self.pos.line <= len(lines) else ""
        caret = " " * (self.pos.column - 1) + "^"
        return f"{path}:{self.pos.line}:{self.pos.column}: error: {self.message}\n    {text}\n    {caret}"
