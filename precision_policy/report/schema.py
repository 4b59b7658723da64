"""The two result files a report can show beside a plan: AUDIT.json and RANGES.json.

Both are small JSON objects checked with pydantic; unknown keys are errors (a misspelt key
would otherwise vanish from the report without a word). Node names are the plan's node names;
an entry naming a node the plan does not have is listed in the report, not dropped.

AUDIT.json -- what each op actually ran in, against the plan::

    {"format": "precision_policy.audit", "version": 1,
     "source": "torch 2.13 CPU, model.pt",             (optional: what ran)
     "nodes": [
       {"node": "encoder.3.fc2", "op": "MatMulV2",       (op: optional)
        "planned": "bfloat16", "executed": "float32",    (compute dtypes; null: none / did not run)
        "kernel": "gemm:jit:f32",                        (optional: the kernel that ran)
        "mismatch": "fast path ran in float32",          (null or absent when the op ran as planned)
        "note": null}]}                                  (optional: e.g. "float16 emulated, as planned")

RANGES.json -- value ranges seen per op over one or more batches, against a low dtype::

    {"format": "precision_policy.ranges", "version": 1,
     "batches": 4,                                       (optional, default 1)
     "nodes": [
       {"node": "encoder.3.fc2", "op": "MatMulV2",       (op: optional)
        "dtype": "float16",                              (the low dtype the fractions are against)
        "max_abs": 120000.0,                             (max |x| of the op's output)
        "frac_below_min_normal": 0.0012,                 (fraction of nonzero values below its smallest normal)
        "frac_above_max": 0.0001,                        (fraction above its largest finite value)
        "suggestion": "keep_dtype: encoder.3.fc2",       (optional: the fix, e.g. a keep_dtype line)
        "nonfinite": 0}]}                                (optional: inf/NaN values in the output)

Example:
    >>> from precision_policy.report.schema import AuditFile
    >>> a = AuditFile.model_validate({"format": "precision_policy.audit", "version": 1,
    ...     "nodes": [{"node": "mm", "planned": "float16", "executed": "float32", "mismatch": "ran in float32"}]})
    >>> a.nodes[0].executed, a.mismatches()[0].node
    ('float32', 'mm')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from precision_policy._jsonio import load_json_file
from precision_policy.report.errors import ReportInputError

AUDIT_FORMAT = "precision_policy.audit"
RANGES_FORMAT = "precision_policy.ranges"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditEntry(_Strict):
    """One op: the dtype the plan gave it and the dtype it executed with."""

    node: str = Field(min_length=1, description="plan node name")
    op: str | None = Field(None, description="op type (optional)")
    planned: str | None = Field(description="compute dtype in the plan (null: the op computes no float)")
    executed: str | None = Field(description="compute dtype it ran with (null: it did not run)")
    kernel: str | None = Field(None, description="kernel that ran (optional)")
    mismatch: str | None = Field(None, description="what differs from the plan, in words; null when it ran as planned")
    note: str | None = Field(None, description="what is expected although it looks different (emulated float16)")


class AuditFile(_Strict):
    """AUDIT.json (see the module docstring)."""

    format: Literal["precision_policy.audit"]
    version: Literal[1]
    source: str = Field("", description="what ran (framework, model)")
    nodes: list[AuditEntry]

    def mismatches(self) -> list[AuditEntry]:
        return [e for e in self.nodes if e.mismatch]


class RangeEntry(_Strict):
    """One op's output range, against a low dtype."""

    node: str = Field(min_length=1, description="plan node name")
    op: str | None = Field(None, description="op type (optional)")
    dtype: str = Field(description="the low dtype the fractions are measured against")
    max_abs: float = Field(ge=0, description="max |x| of the op's output")
    frac_below_min_normal: float = Field(ge=0, le=1, description="fraction of nonzero values below the dtype's smallest normal")
    frac_above_max: float = Field(ge=0, le=1, description="fraction of values above the dtype's largest finite value")
    suggestion: str | None = Field(None, description="suggested fix, e.g. a keep_dtype line")
    nonfinite: int = Field(0, ge=0, description="inf/NaN values in the op's output")

    @property
    def overflows(self) -> bool:
        return self.frac_above_max > 0


class RangesFile(_Strict):
    """RANGES.json (see the module docstring)."""

    format: Literal["precision_policy.ranges"]
    version: Literal[1]
    batches: int = Field(1, ge=1)
    nodes: list[RangeEntry]


def _load(model: type[_Strict], data: Any, file: str | Path | None) -> Any:
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise ReportInputError(f"not a valid {model.__name__[:-4].lower()} file: {where}: {first['msg']}{more}",
                               file=file) from None


def load_audit(source: AuditFile | dict | str | Path) -> AuditFile:
    """An AuditFile from a path, a parsed dict or an AuditFile; a bad file raises ReportInputError naming it."""
    if isinstance(source, (str, Path)):
        return _load(AuditFile, load_json_file(source, ReportInputError), source)
    return _load(AuditFile, source, None)


def load_ranges(source: RangesFile | dict | str | Path) -> RangesFile:
    """A RangesFile from a path, a parsed dict or a RangesFile; a bad file raises ReportInputError naming it."""
    if isinstance(source, (str, Path)):
        return _load(RangesFile, load_json_file(source, ReportInputError), source)
    return _load(RangesFile, source, None)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas of both files, for the engineers who write them."""
    return {"audit": AuditFile.model_json_schema(), "ranges": RangesFile.model_json_schema()}


__all__ = ["AuditEntry", "AuditFile", "RangeEntry", "RangesFile", "json_schemas", "load_audit", "load_ranges"]
