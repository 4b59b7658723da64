"""The precision-mode policy object: one dtype decision for one op.

A mode only answers one question per op — *given what the library says about this op
type, its flag, its origin dtype and (for gray ops) the dtype its producers run in, which
dtype should it compute in, and by which rule?* — in :meth:`PrecisionMode.decide`, which
returns a :class:`Decision`. Applying overrides per node lives in
:mod:`precision_policy.modes.decider`; walking a graph and placing casts in
:mod:`precision_policy.modes.planner`.

Example:
    >>> from precision_policy import modes
    >>> from precision_policy.opinfo.library import load_library
    >>> lib = load_library("ascend910")
    >>> d = modes.get("force_fp32").decide(lib["Conv2D"], "gray", "float32", None)
    >>> d.dtype, d.rule.value, d.why.wanted
    ('float16', 'fallback_kernel', ('float32',))
"""

from __future__ import annotations

from typing import NamedTuple

from precision_policy import dtypes
from precision_policy.opinfo.library import OpInfo
from precision_policy.rules import Rule, Why

F32, F16, BF16, F64 = dtypes.FLOAT32, dtypes.FLOAT16, dtypes.BFLOAT16, dtypes.FLOAT64
_FALLBACK_ORDER = (F32, F16, BF16, F64)


class Decision(NamedTuple):
    """A mode's answer for one op type: compute dtype, why (structured), and a warning to log."""

    dtype: str
    why: Why
    warning: str | None = None

    @property
    def rule(self) -> Rule:
        """The rule that decided (``why.rule``)."""
        return self.why.rule


class NoKernel(Exception):
    """Raised by :meth:`PrecisionMode.decide` when the mode cannot be honoured for an op."""


def choose(info: OpInfo, prefs: tuple[str, ...], first: Why, origin: str) -> Decision:
    """First dtype of ``prefs`` the op has a kernel for (decided by ``first``); falls back to any float kernel it has.

    Example:
        >>> from precision_policy.opinfo.library import load_library
        >>> d = choose(load_library("ascend910")["Conv2D"], ("float32", "float16"), Why(Rule.MODE, detail="keeps_float32"),
        ...            "float32")
        >>> d.dtype, d.rule.name, d.why.wanted
        ('float16', 'FALLBACK_KERNEL', ('float32',))
    """
    prefs = tuple(dict.fromkeys(prefs))
    for k, d in enumerate(prefs):
        if info.supports(d):
            if k == 0:
                return Decision(d, first)
            return Decision(d, Why(Rule.FALLBACK_KERNEL, wanted=prefs[:k]))
    floats = info.float_dtypes
    for d in _FALLBACK_ORDER:
        if d in floats:
            wanted = " or ".join(prefs)
            return Decision(d, Why(Rule.FALLBACK_KERNEL, detail="only_kernel", wanted=prefs),
                            f"{info.op_type}: no {wanted} kernel in the library, runs in {d}")
    return Decision(origin, Why(Rule.NO_FLOAT_KERNEL),
                    f"{info.op_type}: the library declares no float kernel; kept in {origin}")


class PrecisionMode:
    """A precision mode: a name, its aliases, its low dtype, and a per-op decision rule.

    Example:
        >>> from precision_policy import modes
        >>> mode = modes.get("mixed_float16")
        >>> mode.name, mode.low, mode.mixed
        ('allow_mix_precision', 'float16', True)
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    low: str = F16
    mixed: bool = False  # reads white/black/gray flags; accepts modify_mixlist
    description: str = ""

    def decide(self, info: OpInfo, flag: str, origin: str, follow: str | None) -> Decision:
        """Compute dtype for an op of ``origin`` dtype; ``follow`` is its producers' dtype (gray ops)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<precision mode {self.name!r} low={self.low}>"


__all__ = ["BF16", "F16", "F32", "F64", "Decision", "NoKernel", "PrecisionMode", "choose"]
