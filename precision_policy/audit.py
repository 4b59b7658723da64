"""Runtime audit, overflow localization and range statistics: the results, framework-neutral.

The backends run a model and fill these in (``precision_policy.torch.audit`` /
``find_overflow`` / ``range_stats`` and their ``precision_policy.tensorflow`` twins); this
module only holds, words and writes the results, with numpy. The JSON forms are the report's
AUDIT.json and RANGES.json (:mod:`precision_policy.report.schema`).

Example:
    >>> import numpy as np
    >>> s = TensorStats.of(np.array([1.0, 7e4, 1e-6, 0.0, np.inf], dtype=np.float32), "float16")
    >>> s.max_abs, s.nonfinite, s.frac_above_max, s.frac_below_min_normal
    (70000.0, 1, 0.2, 0.3333333333333333)
    >>> r = RangeRow("fc2", "MatMulV2", "float16", "float16", s)
    >>> r.message
    'MatMulV2 `fc2`: max |x| 70000 > float16 max 65504; 1 non-finite value(s); 33.3% of nonzero values below float16 smallest normal 6.1e-5'
    >>> r.suggestion
    'keep_dtype: fc2'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from precision_policy.fileio import atomic_write

#: (largest finite value, smallest positive normal) per float dtype.
LIMITS: dict[str, tuple[float, float]] = {
    "float16": (65504.0, 2.0**-14),
    "bfloat16": (3.3895313892515355e38, 2.0**-126),
    "float32": (3.4028234663852886e38, 2.0**-126),
    "float64": (1.7976931348623157e308, 2.0**-1022),
}

EMULATED_NOTE = "emulated: float16 storage, float32 compute (expected)"


def _g(x: float) -> str:
    """A short number for messages: 65504, 1.2e5, 6.1e-5."""
    if x == 0 or (1e-3 <= abs(x) < 1e5 and float(x).is_integer()):
        return f"{x:.0f}"
    return f"{x:.2g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


# ---------------------------------------------------------------------- value statistics
@dataclass
class TensorStats:
    """Counts over the values of one or more tensors, against a low dtype's range.

    ``max_abs`` is over the finite values; ``frac_below_min_normal`` counts nonzero finite
    values below the dtype's smallest normal among the nonzero ones; ``frac_above_max`` counts
    finite values above its largest finite value among all values.
    """

    dtype: str
    count: int = 0
    nonzero: int = 0
    below: int = 0
    above: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0

    @classmethod
    def of(cls, values: Any, dtype: str) -> TensorStats:
        s = cls(dtype)
        s.add(values)
        return s

    def add(self, values: Any) -> None:
        """Count ``values`` (a numpy array or anything ``np.asarray`` takes) in."""
        a = np.abs(np.asarray(values, dtype=np.float64).ravel())
        hi, tiny = LIMITS.get(self.dtype, LIMITS["float32"])
        finite = np.isfinite(a)
        self.count += int(a.size)
        self.nonfinite += int(a.size - np.count_nonzero(finite))
        f = a[finite]
        if f.size:
            self.max_abs = max(self.max_abs, float(f.max()))
        self.nonzero += int(np.count_nonzero(f))
        self.below += int(np.count_nonzero((f > 0) & (f < tiny)))
        self.above += int(np.count_nonzero(f > hi))

    def merge(self, other: TensorStats) -> None:
        self.count += other.count
        self.nonzero += other.nonzero
        self.below += other.below
        self.above += other.above
        self.nonfinite += other.nonfinite
        self.max_abs = max(self.max_abs, other.max_abs)

    @property
    def frac_below_min_normal(self) -> float:
        return self.below / self.nonzero if self.nonzero else 0.0

    @property
    def frac_above_max(self) -> float:
        return self.above / self.count if self.count else 0.0

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def describe(self) -> str:
        bad = f", {self.nonfinite} non-finite of {self.count}" if self.nonfinite else ""
        return f"max |x| {_g(self.max_abs)}{bad}"

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "max_abs": self.max_abs, "nonfinite": self.nonfinite,
                "frac_below_min_normal": self.frac_below_min_normal, "frac_above_max": self.frac_above_max}


# ---------------------------------------------------------------------- runtime audit
@dataclass
class AuditRow:
    """One op: the dtype the plan gave it, the dtype it executed with, and what differs, in words."""

    name: str
    op_type: str | None
    planned: str | None
    executed: str | None
    mismatch: str | None = None
    note: str = ""
    kernel: str | None = None
    detail: list[str] = field(default_factory=list)  # the kernels/aten ops that ran, with their dtypes

    def to_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"node": self.name, "op": self.op_type, "planned": self.planned, "executed": self.executed,
                                 "mismatch": self.mismatch}
        if self.kernel:
            entry["kernel"] = self.kernel
        if self.note:
            entry["note"] = self.note
        return entry


@dataclass
class Kernel:
    """One oneDNN primitive execution parsed from ``ONEDNN_VERBOSE`` output."""

    kind: str  # matmul, convolution, inner_product, reorder, ...
    impl: str  # brg:avx512_core_amx, gemm:jit, ref:any, ...
    dtypes: dict[str, str]  # src/wei/dst/bia -> f32, bf16, f16
    shape: str
    line: str

    @property
    def reference(self) -> bool:
        return self.impl.startswith("ref")

    @property
    def compute(self) -> str | None:
        d = self.dtypes.get("src") or self.dtypes.get("dst")
        return {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}.get(d or "", d)


@dataclass
class AuditResult:
    """Plan vs executed dtypes for every op of one run. :meth:`table` for people, :meth:`to_json` for the report."""

    rows: list[AuditRow]
    source: str = ""
    kernels: list[Kernel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def mismatches(self) -> list[AuditRow]:
        return [r for r in self.rows if r.mismatch]

    def __getitem__(self, name: str) -> AuditRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ok(self) -> bool:
        return not self.mismatches()

    def to_dict(self) -> dict[str, Any]:
        """AUDIT.json (:class:`precision_policy.report.schema.AuditFile`)."""
        return {"format": "precision_policy.audit", "version": 1, "source": self.source,
                "nodes": [r.to_entry() for r in self.rows]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The AUDIT.json text; written atomically to ``path`` when given."""
        return _json_text(self.to_dict(), path)

    def kernel_summary(self) -> list[str]:
        """oneDNN kernels by (kind, impl, dtypes), with counts, reference fallbacks marked."""
        counts: dict[tuple[str, str, str], int] = {}
        for k in self.kernels:
            key = (k.kind, k.impl, " ".join(f"{a}_{d}" for a, d in k.dtypes.items()))
            counts[key] = counts.get(key, 0) + 1
        out = []
        for (kind, impl, dts), n in counts.items():
            ref = "  <- kernel fell back to the reference implementation" if impl.startswith("ref") else ""
            out.append(f"{n:4d} x {kind} {impl} {dts}{ref}")
        return out

    def table(self) -> str:
        header = ("op", "type", "planned", "executed", "mismatch / note")
        rows = [(r.name, r.op_type or "-", r.planned or "-", r.executed or "-", r.mismatch or r.note or "")
                for r in self.rows]
        widths = [min(48, max(len(str(x[k])) for x in [header, *rows])) for k in range(4)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header[:4], widths)) + "  " + header[4]]
        for x in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(x[:4], widths)) + "  " + x[4])
        n = len(self.mismatches())
        lines.append(f"{len(self.rows)} op(s), {n} mismatch(es)" + (f" ({self.source})" if self.source else ""))
        if self.kernels:
            lines.append("oneDNN kernels:")
            lines += ["  " + s for s in self.kernel_summary()]
        lines += [f"note: {m}" for m in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------- overflow localization
@dataclass
class OverflowReport:
    """The first op whose output is non-finite under the plan while its float32 counterpart is finite.

    ``found`` is False when there is none (``reason`` says why: no non-finite value at all, or
    the float32 run is non-finite too). ``context`` names the ops that ran just before it.
    """

    found: bool
    phase: str = ""  # "forward" or "backward"
    name: str = ""
    op_type: str | None = None
    index: int = -1  # position in the phase's execution order
    planned: str | None = None  # the op's compute dtype in the plan
    dtype: str = "float16"  # the low dtype whose range is at stake
    input_max_abs: float | None = None
    output: TensorStats | None = None  # under the plan
    reference: TensorStats | None = None  # the float32 run
    grad_fn: str | None = None  # backward: the autograd node / gradient op that produced it
    context: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def dtype_max(self) -> float:
        return LIMITS.get(self.dtype, LIMITS["float32"])[0]

    @property
    def message(self) -> str:
        if not self.found:
            return self.reason or "no op produced a non-finite value under the plan that float32 kept finite"
        what = "gradient" if self.phase == "backward" else "output"
        parts = [f"first overflow ({self.phase}): {self.op_type or 'op'} `{self.name}`"
                 + (f" ({self.grad_fn})" if self.grad_fn else "")
                 + (f" planned {self.planned}" if self.planned else "")]
        if self.output is not None:
            parts.append(f"{what} under the plan: {self.output.describe()}")
        if self.reference is not None:
            ref = self.reference
            cmp = ">" if ref.max_abs > self.dtype_max else "<="
            parts.append(f"float32 {what}: max |x| {_g(ref.max_abs)} {cmp} {self.dtype} max {_g(self.dtype_max)}")
        if self.input_max_abs is not None:
            parts.append(f"input max |x| {_g(self.input_max_abs)}")
        if self.context:
            parts.append("after " + ", ".join(self.context))
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"found": self.found, "phase": self.phase, "node": self.name, "op": self.op_type, "index": self.index,
                "planned": self.planned, "dtype": self.dtype, "dtype_max": self.dtype_max,
                "input_max_abs": self.input_max_abs, "grad_fn": self.grad_fn,
                "output": self.output.to_dict() if self.output else None,
                "reference": self.reference.to_dict() if self.reference else None,
                "context": list(self.context), "message": self.message}


# ---------------------------------------------------------------------- range statistics
@dataclass
class RangeRow:
    """One op's output range over the batches, against the low dtype (``dtype``)."""

    name: str
    op_type: str | None
    planned: str | None
    dtype: str
    stats: TensorStats
    input_max_abs: float | None = None  # max |x| of its float inputs
    follows: bool = False  # a gray op that follows its producer's dtype (keeping the producer keeps it too)
    #: fraction of nonzero values under the smallest normal above which underflow is worded
    underflow_warn: float = 0.1

    @property
    def max_abs(self) -> float:
        return self.stats.max_abs

    @property
    def overflows(self) -> bool:
        return self.stats.above > 0

    @property
    def lowered(self) -> bool:
        """Whether the plan computes this op in a 16-bit dtype (where its range matters)."""
        return self.planned in ("float16", "bfloat16")

    @property
    def message(self) -> str:
        hi, tiny = LIMITS.get(self.dtype, LIMITS["float32"])
        cmp = ">" if self.overflows else "<="
        parts = [f"{self.op_type or 'op'} `{self.name}`: max |x| {_g(self.max_abs)} {cmp} {self.dtype} max {_g(hi)}"]
        if self.stats.nonfinite:
            parts.append(f"{self.stats.nonfinite} non-finite value(s)")
        if self.stats.frac_below_min_normal >= self.underflow_warn:
            parts.append(f"{100 * self.stats.frac_below_min_normal:.1f}% of nonzero values below {self.dtype} "
                         f"smallest normal {_g(tiny)}")
        return "; ".join(parts)

    @property
    def suggestion(self) -> str | None:
        """``keep_dtype: NAME`` for an op that the plan lowers and whose values leave the dtype's range.

        A gray op whose inputs were already out of range gets none: it follows its producer, and
        keeping the producer keeps it.
        """
        if not self.overflows or not (self.lowered or self.planned is None):
            return None
        hi = LIMITS.get(self.dtype, LIMITS["float32"])[0]
        if self.follows and self.input_max_abs is not None and self.input_max_abs > hi:
            return None
        return f"keep_dtype: {self.name}"

    def to_entry(self) -> dict[str, Any]:
        return {"node": self.name, "op": self.op_type, "dtype": self.dtype, "max_abs": _finite(self.max_abs),
                "frac_below_min_normal": self.stats.frac_below_min_normal, "frac_above_max": self.stats.frac_above_max,
                "suggestion": self.suggestion, "nonfinite": self.stats.nonfinite}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


@dataclass
class RangeResult:
    """Per-op value ranges over one or more batches. :meth:`to_json` writes RANGES.json."""

    rows: list[RangeRow]
    dtype: str
    batches: int = 1
    source: str = ""

    def __getitem__(self, name: str) -> RangeRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def flagged(self) -> list[RangeRow]:
        """Rows with a suggestion (ops the plan lowers whose values overflow the low dtype)."""
        return [r for r in self.rows if r.suggestion]

    def keep_dtype_lines(self) -> str:
        """A keep_dtype file (one op name per line) keeping every flagged op in its origin dtype."""
        return "".join(f"{r.name}\n" for r in self.flagged())

    def to_dict(self) -> dict[str, Any]:
        """RANGES.json (:class:`precision_policy.report.schema.RangesFile`)."""
        return {"format": "precision_policy.ranges", "version": 1, "batches": max(1, self.batches),
                "nodes": [r.to_entry() for r in self.rows]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The RANGES.json text; written atomically to ``path`` when given."""
        return _json_text(self.to_dict(), path)

    def table(self) -> str:
        lines = [r.message + (f"  -> {r.suggestion}" if r.suggestion else "") for r in self.rows
                 if r.overflows or r.stats.nonfinite or r.stats.frac_below_min_normal >= r.underflow_warn]
        lines.append(f"{len(self.rows)} op(s) over {self.batches} batch(es) against {self.dtype}; "
                     f"{len(self.flagged())} to keep in their origin dtype")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


__all__ = ["EMULATED_NOTE", "LIMITS", "AuditResult", "AuditRow", "Kernel", "OverflowReport", "RangeResult", "RangeRow",
           "TensorStats"]


def _json_text(doc: dict[str, Any], path: str | Path | None) -> str:
    """``doc`` as indented JSON text, written atomically to ``path`` when given."""
    import json

    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if path is not None:
        atomic_write(path, text)
    return text
