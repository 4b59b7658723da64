"""A decision's reason in words: the one place plan prose is written.

The planner and the eager backends record each decision as a structured
:class:`~precision_policy.rules.Why` (a rule plus its facts). :func:`render` turns one into
the sentence a :class:`~precision_policy.plan.CastPlan` shows in ``explain``, its JSON and
its report, and that an eager run's op record shows. Nothing reads these sentences back.

Example:
    >>> from precision_policy.reasons import render
    >>> from precision_policy.rules import Rule, Why
    >>> render(Why(Rule.GRAY_FOLLOWS, followed="conv"), "float16")
    'gray: follows conv'
    >>> render(Why(Rule.WHITE, inner=Why(Rule.FALLBACK_KERNEL, wanted=("float16",))), "float32")
    'white-list, but no float16 kernel'
    >>> render(Why(Rule.BLACK, where="modify_mixlist mix.json: added to black-list"), "float32")
    'black-list (modify_mixlist mix.json: added to black-list)'
"""

from __future__ import annotations

from collections.abc import Sequence

from precision_policy.rules import Rule, Why

#: Words for a mode's own rule (:attr:`Rule.MODE`), by :attr:`Why.detail`; a detail not listed is
#: a precision mode's name (``force_fp32``), shown as it is.
_MODE_WORDS = {
    "cube_op": "cube op",
    "keeps_float32": "keeps float32",
    "vector_op": "keeps float32 (vector op)",
    "keeps_origin": "keeps its origin dtype",
}

_FIXED = {
    Rule.NO_FLOAT_TENSORS: "no float tensors",
    Rule.UNKNOWN_OP: "unknown op type: not in the op-info library, keeps its origin dtype",
    Rule.NO_KERNEL: "no kernel for the requested precision",
    Rule.FLOAT64: "float64 op: precision modes act on float32 and 16-bit ops",
    Rule.NO_FLOAT_KERNEL: "library declares no float kernel; keeps its origin dtype",
    Rule.BLACK: "black-list",
}


def render(
    why: Why,
    dtype: str | None,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    *,
    identity: bool = False,
) -> str:
    """The sentence for decision ``why`` of a node computing in ``dtype`` (its per-tensor dtypes
    ``inputs``/``outputs``; ``identity``: a model Cast that no longer converts)."""
    text = _render(why, dtype or "?", inputs, outputs)
    if identity and inputs and outputs:
        text += f"; now an identity ({inputs[0]} -> {outputs[0]}), removable"
    return text


def _render(why: Why, d: str, inputs: Sequence[str], outputs: Sequence[str]) -> str:
    rule, where, inner = why.rule, why.where, why.inner
    if rule is Rule.KEEP_DTYPE:
        if inner is not None:  # a model Cast the user keeps
            return f"{_render(inner, d, inputs, outputs)}; keep_dtype ({where})"
        return f"keep_dtype ({where})"
    if rule is Rule.CUSTOMIZE_DTYPES:
        return f"customize_dtypes ({where})"
    text = _core(why, d, inputs, outputs)
    if where:  # a modify_mixlist / environment-list entry changed the op's flag
        text += f" ({where})"
    return text


def _core(why: Why, d: str, inputs: Sequence[str], outputs: Sequence[str]) -> str:
    rule, detail, inner = why.rule, why.detail, why.inner
    fixed = _FIXED.get(rule)
    if fixed is not None:
        return fixed
    if rule is Rule.SOURCE:
        return f"source ({detail})"
    if rule is Rule.READS_SOURCE:
        text = f"reads {detail} {why.followed}"
        if why.wanted:
            text += f"; in {why.wanted[0]}, as every reader needs (the {detail} is cast before the read)"
        return text
    if rule is Rule.MODE:
        return _MODE_WORDS.get(detail, detail)
    if rule is Rule.FALLBACK_KERNEL:
        text = f"no {' or '.join(why.wanted)} kernel"
        if detail == "only_kernel":
            text += f"; {d} is its only float kernel"
        if inner is not None:
            text += (", " if inner.rule is Rule.MODE else "; ") + _core(inner, d, inputs, outputs)
        return text
    if rule is Rule.WHITE:
        return "white-list" + (f", but {_core(inner, d, inputs, outputs)}" if inner is not None else "")
    if rule is Rule.GRAY_FOLLOWS:
        if inner is not None:
            return f"gray: follows {why.followed} ({why.wanted[0] if why.wanted else '?'}), but {_core(inner, d, inputs, outputs)}"
        if detail in ("widest", "lowest"):
            return f"gray: inputs disagree, follows the {detail} ({why.followed}, {d})"
        return f"gray: follows {why.followed}"
    if rule is Rule.GRAY_UNFED:
        return "gray, fed only by constants/variables: " + (_core(inner, d, inputs, outputs) if inner is not None else d)
    if rule is Rule.GRAY_LOOKAHEAD:
        return f"gray: runs in {d} because every reader needs {d} (the cast moves before it)"
    if rule is Rule.EXISTING_CAST:
        read = inputs[0] if inputs else "?"
        wrote = outputs[0] if outputs else d
        if detail == "absorbed":
            return f"Cast: reads its input as produced ({read}), writes {wrote} directly (what all its consumers need)"
        return f"Cast: reads its input as produced ({read}), writes {wrote}"
    if rule is Rule.CONTROL_FLOW:
        if detail == "loop_back":
            return f"control flow: carries the loop variable back in {why.followed}'s dtype ({d})"
        if detail == "loop_merge":
            return f"control flow: loop variable in {d}, the dtype its loop body produces"
        if detail == "no_float_input":
            return "control flow: no float input; keeps its origin dtype"
        return f"control flow: follows {why.followed}"
    if rule is Rule.HANDLE_TIED:
        if detail == "around":
            return "tied to a list/array handle: keeps its origin dtype, casts go around it"
        if detail == "readers":
            return f"list/array elements in {d}, as its readers and writers need (ops sharing its handle)"
        return f"list/array elements in {d}, as the ops sharing its handle"
    return f"rule {rule.value}"  # a rule added without words: still readable (tests/test_reasons.py catches it)


__all__ = ["render"]
