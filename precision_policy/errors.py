"""Typed errors raised by precision_policy.

Every error a user can cause derives from :class:`PrecisionPolicyError` and says
which file, op or setting is wrong and how to fix it. The CLI maps
:class:`PrecisionError` to exit code 1 and every other error to exit code 2.

Example:
    >>> from precision_policy.errors import OpInfoError
    >>> str(OpInfoError("bad flag", file="lib.json", op="Conv2D", field="precision_reduce.flag"))
    "lib.json: op 'Conv2D': field 'precision_reduce.flag': bad flag"
"""

from __future__ import annotations

from pathlib import Path


class PrecisionPolicyError(Exception):
    """Base class of every error precision_policy raises on purpose."""


def _where(file: str | Path | None, line: int | None = None, column: int | None = None) -> str:
    if file is None:
        return ""
    text = str(file)
    if line is not None:
        text += f":{line}"
        if column is not None:
            text += f":{column}"
    return text + ": "


class ConfigError(PrecisionPolicyError, ValueError):
    """A RunConfig setting is invalid (unknown mode, conflicting options, ...)."""


class DTypeError(PrecisionPolicyError, ValueError):
    """A dtype name is not one precision_policy knows."""


class OpInfoError(PrecisionPolicyError, ValueError):
    """An op-info library file is malformed or inconsistent."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        op: str | None = None,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.op = op
        self.field = field
        self.line = line
        self.column = column
        self.reason = message
        prefix = _where(file, line, column)
        if op is not None:
            prefix += f"op {op!r}: "
        if field is not None:
            prefix += f"field {field!r}: "
        super().__init__(prefix + message)


class OverrideError(PrecisionPolicyError, ValueError):
    """A modify_mixlist, keep_dtype or customize_dtypes file (or env list) is invalid."""

    def __init__(
        self, message: str, *, file: str | Path | None = None, line: int | None = None, column: int | None = None
    ) -> None:
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column
        self.reason = message
        super().__init__(_where(file, line, column) + message)


class GraphError(PrecisionPolicyError, ValueError):
    """A graph (JSON or built in code) is malformed: bad reference, duplicate name, cycle..."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        node: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.node = node
        self.line = line
        self.column = column
        self.reason = message
        prefix = _where(file, line, column)
        if node is not None:
            prefix += f"node {node!r}: "
        super().__init__(prefix + message)


class WriteError(PrecisionPolicyError, OSError):
    """A result file could not be written (missing folder, no permission, disk full). The old file is intact."""

    def __init__(self, message: str, *, file: str | Path | None = None) -> None:
        self.file = None if file is None else str(file)
        self.reason = message
        super().__init__(_where(file) + message)


class PlanFormatError(PrecisionPolicyError, ValueError):
    """A cast-plan JSON document cannot be read back."""


class PrecisionError(PrecisionPolicyError):
    """The requested precision mode cannot be honoured for this graph.

    ``problems`` lists one ``(node_name, op_type, detail)`` per offending op.
    """

    def __init__(self, message: str, problems: list[tuple[str, str, str]] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


class TuneError(PrecisionPolicyError):
    """Accuracy-aware tuning found no model within the tolerance (or was given bad input).

    ``best_trial`` is the trial with the best metric when trials ran (None otherwise), and
    ``result`` the :class:`~precision_policy.tune.TuneResult` of the search so far (its
    ``save()`` writes ``trials.json``, so a later ``tune(..., resume=...)`` can go on).
    """

    def __init__(self, message: str, *, best_trial: object = None, result: object = None) -> None:
        self.best_trial = best_trial
        self.result = result
        super().__init__(message)


__all__ = [
    "ConfigError",
    "DTypeError",
    "GraphError",
    "OpInfoError",
    "OverrideError",
    "PlanFormatError",
    "PrecisionError",
    "PrecisionPolicyError",
    "TuneError",
    "WriteError",
]
