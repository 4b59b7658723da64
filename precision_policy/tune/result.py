"""What :func:`precision_policy.tune` returns: :class:`TuneResult` and its :class:`Trial` records.

``TuneResult.save(folder)`` writes three files, each atomically (no half-written file):

- ``keep_dtype.txt``: the ops kept in their origin dtype, in the overrides file format, so that
  ``RunConfig(keep_dtype="folder/keep_dtype.txt")`` alone reproduces the winner;
- ``plan.json``: the winner's :class:`~precision_policy.plan.CastPlan` (when the route has one);
- ``trials.json``: every trial, for reading and for ``tune(..., resume="folder/trials.json")``.

Example:
    >>> from precision_policy.tune.result import Trial
    >>> t = Trial(number=1, keep_dtype=("fc2",), metric=0.97, passed=True, seconds=0.5, low=7)
    >>> Trial.from_dict(t.to_dict()) == t
    True
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precision_policy.errors import TuneError
from precision_policy.fileio import atomic_write
from precision_policy.tune.adapter import Candidate, Sensitivity, Skipped

log = logging.getLogger(__name__)

TRIALS_FORMAT = "precision_policy.tune.trials"
TRIALS_VERSION = 1

__all__ = ["TRIALS_FORMAT", "TRIALS_VERSION", "Trial", "TuneResult", "load_trials"]


@dataclass(frozen=True)
class Trial:
    """One evaluated model.

    Attributes:
        number: 1, 2, ... in search order (the baseline is not a trial; see ``TuneResult.baseline``).
        keep_dtype: the candidate ops kept in their origin dtype, sorted.
        metric: what ``eval_fn`` returned (NaN counts as failed).
        passed: whether the metric is within the tolerance of the baseline.
        seconds: how long building and evaluating the model took.
        low: candidate ops left in low precision.
        step: which part of the search made it: ``full``, ``type``, ``bisect``, ``all-origin``, ``put-back``.
        replayed: True when the metric came from a resumed ``trials.json``, not from ``eval_fn``.
    """

    number: int
    keep_dtype: tuple[str, ...]
    metric: float
    passed: bool
    seconds: float
    low: int = 0
    step: str = ""
    replayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "keep_dtype": list(self.keep_dtype), "metric": _num(self.metric),
                "passed": self.passed, "seconds": round(self.seconds, 6), "low": self.low, "step": self.step}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        metric = data["metric"]
        return cls(number=int(data["number"]), keep_dtype=tuple(str(n) for n in data["keep_dtype"]),
                   metric=math.nan if metric is None else float(metric), passed=bool(data["passed"]),
                   seconds=float(data["seconds"]), low=int(data.get("low", 0)), step=str(data.get("step", "")))


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else x


@dataclass
class TuneResult:
    """The outcome of :func:`precision_policy.tune` (see the module docstring).

    Attributes:
        model: the winner, ready to use (torch: the prepared module or the FX rewrite); None when
            no trial passed (a :class:`~precision_policy.errors.TuneError` carries such a result).
        keep_dtype: the candidate op names kept in their origin dtype (sorted).
        plan: the winner's CastPlan (None where the route has no static plan).
        baseline: the origin-dtype model's metric.
        best: the winner's metric (None when no trial passed).
        target: the metric a trial had to reach (``>=`` it when higher is better, else ``<=``).
        trials: the trials, in order.
        candidates: the ops the full conversion puts in low precision.
        skipped: float ops that were never candidates (unknown op types, black ops, ...), and why.
        sensitivity: the calibration figures per candidate (empty without a calibration batch).
    """

    model: Any
    keep_dtype: list[str]
    plan: Any
    baseline: float
    best: float | None
    target: float
    trials: list[Trial]
    candidates: list[Candidate]
    skipped: list[Skipped] = field(default_factory=list)
    sensitivity: dict[str, Sensitivity] = field(default_factory=dict)
    framework: str = ""
    fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    baseline_seconds: float = 0.0
    stopped: str = ""  # why the search ended early ("max_trials", "timeout"), "" when it finished

    @property
    def converted(self) -> int:
        """Candidates left in low precision by the winner."""
        kept = set(self.keep_dtype)
        return sum(1 for c in self.candidates if c.name not in kept)

    @property
    def low(self) -> str:
        return self.candidates[0].low if self.candidates else ""

    def summary(self) -> str:
        """One line: how many candidate ops run in low precision, which are kept, and the metrics.

        Example:
            >>> from precision_policy.tune.adapter import Candidate
            >>> r = TuneResult(None, ["fc2"], None, 0.97, 0.965, 0.9603, [], [Candidate("fc1", "MatMulV2"),
            ...                Candidate("fc2", "MatMulV2")])
            >>> r.summary()
            '1 of 2 ops converted to bfloat16 (kept in origin dtype: fc2); metric 0.965 (baseline 0.97, target 0.9603), 0 trial(s)'
        """
        n = len(self.candidates)
        kept = ", ".join(self.keep_dtype) if self.keep_dtype else "none"
        best = "none passed" if self.best is None else f"metric {self.best:.6g}"
        stop = f"; stopped by {self.stopped}" if self.stopped else ""
        return (f"{self.converted} of {n} ops converted to {self.low or 'low precision'} (kept in origin dtype: {kept}); "
                f"{best} (baseline {self.baseline:.6g}, target {self.target:.6g}), {len(self.trials)} trial(s){stop}")

    def op_type_table(self) -> list[tuple[str, int, int, int]]:
        """(op type, total, low, origin) per op type, over candidates and skipped ops."""
        kept = set(self.keep_dtype)
        rows: dict[str, list[int]] = {}
        for c in self.candidates:
            row = rows.setdefault(c.op_type, [0, 0, 0])
            row[0] += 1
            row[1 if c.name not in kept else 2] += 1
        for s in self.skipped:
            row = rows.setdefault(s.op_type, [0, 0, 0])
            row[0] += 1
            row[2] += 1
        return [(t, *r) for t, r in sorted(rows.items())]  # type: ignore[misc]

    def report(self) -> str:
        """The op-type table and the kept ops with their sensitivity figures, as text."""
        table = self.op_type_table()
        width = max([len("op type")] + [len(t) for t, *_ in table])
        lines = [f"{'op type':<{width}} | total |  low | origin"]
        lines += [f"{t:<{width}} | {total:>5} | {low:>4} | {origin:>6}" for t, total, low, origin in table]
        if self.keep_dtype:
            lines.append("kept in origin dtype (relative error / non-finite values under the full conversion):")
            for name in self.keep_dtype:
                s = self.sensitivity.get(name)
                fig = (f"rel. error {s.rel_error:.3g}, non-finite {s.nonfinite}" if s is not None and s.measured
                       else "not measured")
                op = next((c.op_type for c in self.candidates if c.name == name), "?")
                lines.append(f"  {name} ({op}): {fig}")
        if self.skipped:
            lines.append(f"never candidates ({len(self.skipped)}): "
                         + ", ".join(f"{s.name} ({s.op_type}: {s.why})" for s in self.skipped[:20])
                         + (" ..." if len(self.skipped) > 20 else ""))
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def keep_dtype_text(self) -> str:
        head = (f"# precision_policy.tune: {self.summary()}\n"
                "# ops kept in their origin dtype; use with RunConfig(keep_dtype=<this file>)\n")
        return head + "".join(f"{n}\n" for n in self.keep_dtype)

    def trials_dict(self) -> dict[str, Any]:
        return {
            "format": TRIALS_FORMAT,
            "version": TRIALS_VERSION,
            "framework": self.framework,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "settings": self.settings,
            "candidates": [c.name for c in self.candidates],
            "baseline": {"metric": _num(self.baseline), "seconds": round(self.baseline_seconds, 6)},
            "target": _num(self.target),
            "best": None if self.best is None else _num(self.best),
            "keep_dtype": list(self.keep_dtype),
            "trials": [t.to_dict() for t in self.trials],
        }

    def save(self, path: str | Path) -> Path:
        """Write keep_dtype.txt, plan.json and trials.json into folder ``path`` (created if needed).

        Without a winner only trials.json is written. Each file is replaced atomically.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if self.best is not None:
            atomic_write(folder / "keep_dtype.txt", self.keep_dtype_text())
            if self.plan is not None:
                atomic_write(folder / "plan.json", self.plan.to_json())
            else:
                log.warning("tune: this route has no static plan; %s/plan.json not written", folder)
        atomic_write(folder / "trials.json", json.dumps(self.trials_dict(), indent=1) + "\n")
        return folder

    def __repr__(self) -> str:
        return f"TuneResult({self.summary()})"


def load_trials(path: str | Path) -> dict[str, Any]:
    """Read and check a ``trials.json`` written by :meth:`TuneResult.save`; TuneError names what is wrong."""
    from precision_policy._jsonio import load_json_file

    def err(message: str, file: Any = None, **_: Any) -> TuneError:
        return TuneError(f"{file or path}: {message}")

    data = load_json_file(path, err)
    if not isinstance(data, dict) or data.get("format") != TRIALS_FORMAT:
        raise TuneError(f"{path}: not a tune trials file (expected \"format\": {TRIALS_FORMAT!r})")
    if data.get("version") != TRIALS_VERSION:
        raise TuneError(f"{path}: trials format version {data.get('version')!r}; this version reads {TRIALS_VERSION}")
    trials = data.get("trials")
    if not isinstance(trials, list) or not isinstance(data.get("candidates"), list):
        raise TuneError(f"{path}: \"trials\" and \"candidates\" must be lists")
    try:
        data["trials"] = [Trial.from_dict(t) for t in trials]
    except (KeyError, TypeError, ValueError) as exc:
        raise TuneError(f"{path}: malformed trial record ({exc!r})") from None
    return data


def replay_table(trials: Sequence[Trial]) -> dict[frozenset[str], Trial]:
    """Recorded trials by keep set (the last record of a set wins)."""
    return {frozenset(t.keep_dtype): t for t in trials}
