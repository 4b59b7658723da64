"""The typed errors a report raises: bad input files, and no layout tool to draw with.

Both derive from :class:`~precision_policy.errors.PrecisionPolicyError`, so the CLI prints
them as one line and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path

from precision_policy.errors import PrecisionPolicyError


class ReportInputError(PrecisionPolicyError, ValueError):
    """An AUDIT.json or RANGES.json file (or the plan given to the report) cannot be read."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column
        self.reason = message
        where = "" if file is None else str(file) + (f":{line}" if line is not None else "") + (
            f":{column}" if line is not None and column is not None else "") + ": "
        super().__init__(where + message)


class LayoutToolMissing(PrecisionPolicyError, RuntimeError):
    """``layout="dot"`` was asked for, and Graphviz's ``dot`` (or the ``graphviz`` package) is not installed."""


__all__ = ["LayoutToolMissing", "ReportInputError"]
