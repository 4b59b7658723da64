"""The per-node decision every route shares: the static planner and the eager backends.

:class:`NodeDecider` applies the user's overrides (keep_dtype, customize_dtypes, mixlist
flags) to one node, asks the precision mode (:meth:`PrecisionMode.decide
<precision_policy.modes.base.PrecisionMode.decide>`) for its compute dtype, picks the
kernel variant's per-tensor dtypes, and returns a :class:`NodeChoice`: dtype, rule, the
node it followed, the dtype each input is consumed in and each output produced in.
Decisions are memoised, so an eager backend can call it on every op of every step.

Example:
    >>> from precision_policy import modes
    >>> from precision_policy.modes.decider import NodeDecider
    >>> from precision_policy.opinfo.library import load_library
    >>> decider = NodeDecider(modes.get("allow_mix_precision"), load_library("ascend910"))
    >>> c = decider.decide_node("relu", "Relu", "float32", ("float16",), (True,), ("float32",), ("conv",))
    >>> c.dtype, c.rule.value, c.followed, c.outputs
    ('float16', 'gray_follows', 'conv', ('float16',))
    >>> c.reason
    'gray: follows conv'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from precision_policy import dtypes
from precision_policy.modes.base import Decision, NoKernel
from precision_policy.opinfo.library import GRAY, Library, OpInfo
from precision_policy.opinfo.overrides import DtypeSpec, Overrides
from precision_policy.reasons import render
from precision_policy.rules import Rule, Why

if TYPE_CHECKING:
    from precision_policy.modes.base import PrecisionMode

log = logging.getLogger(__name__)

#: A ``voters`` entry for an input that is a variable (a torch parameter or buffer, or a read of
#: one): it votes for a gray op as torch's type promotion counts it, i.e. only at an input whose
#: kernel takes the low dtype (not at a float32-only slot such as batch-norm statistics).
#: Graphs with ``OpGraph.variables_vote`` (torch traces) pass it; TensorFlow graphs never do.
VARIABLE = "variable"

#: A problem: (node name, op type, what cannot be honoured). Planning raises them all at once.
Problem = tuple[str, str, str]


class NodeChoice(NamedTuple):
    """What :meth:`NodeDecider.decide_node` decided for one node."""

    dtype: str
    """The compute dtype."""
    why: Why
    """Why: the rule and its facts (code reads these; :attr:`reason` renders them for people)."""
    inputs: tuple[str, ...]
    """The dtype each input is consumed in."""
    outputs: tuple[str, ...]
    """The dtype each output is produced in."""

    @property
    def rule(self) -> Rule:
        """Which rule decided."""
        return self.why.rule

    @property
    def followed(self) -> str | None:
        """The producer a gray op followed (:attr:`Rule.GRAY_FOLLOWS`), else None."""
        return self.why.followed

    @property
    def reason(self) -> str:
        """The decision in words (rendered on demand; never parsed)."""
        return render(self.why, self.dtype, self.inputs, self.outputs)

    @property
    def is_existing_cast(self) -> bool:
        """A ``Cast`` of the model that the planner may retarget (absorbing the cast after it)."""
        return self.why.rule is Rule.EXISTING_CAST


_new_tuple = tuple.__new__  # builds a NamedTuple without its keyword-checking __new__ (decide_node runs per node)


class _Draft(NamedTuple):
    """A decision before the node's name is known (memoised per op type and input dtypes).

    When ``follow_input >= 0`` the producer of that input goes into ``why.followed``.
    """

    dtype: str
    why: Why
    follow_input: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    warning: str | None
    problems: tuple[str, ...]
    choice: NodeChoice | None = None  # the finished choice, when it does not depend on the node


class NodeDecider:
    """The per-op decision every route shares: the static planner and the eager backends.

    Given an op's name, type, origin dtype and the dtypes its inputs arrive in (and which of
    them come from computing ops, so that gray ops may follow them), it applies the
    overrides, asks the mode, and returns a :class:`NodeChoice`. Decisions are memoised, so
    an eager backend can call it on every op of every step.
    """

    def __init__(
        self,
        mode: PrecisionMode,
        library: Library,
        overrides: Overrides | None = None,
        *,
        dedupe: bool = False,
        gray_disagreement: str = "widest",
    ) -> None:
        """``dedupe=True`` (eager backends, which decide the same op every step) records each
        unknown op name and warning once instead of once per call. ``gray_disagreement`` is what
        a gray op follows when its inputs arrive in different dtypes: ``"widest"`` (torch's type
        promotion; the safe default) or ``"low"`` (TensorFlow's AMP: any low input makes it low)."""
        if gray_disagreement not in ("widest", "low"):
            raise ValueError(f"gray_disagreement must be 'widest' or 'low', got {gray_disagreement!r}")
        self.prefer_low = gray_disagreement == "low"
        self.mode = mode
        self._seen: set | None = set() if dedupe else None
        self.library = library
        self.overrides = overrides or Overrides()
        self.must_keep = mode.name == "must_keep_origin_dtype"
        self.unknown: dict[str, list[str]] = {}
        self.warnings: list[str] = list(self.overrides.warnings)
        self.problems: list[Problem] = []
        self._fixed: dict[tuple[str, str, str], Decision] = {}
        self._follow: dict[tuple[str, str, str], Decision] = {}
        self._io: dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._memo: dict[tuple, _Draft] = {}
        self._known = set(library)
        # overrides keyed by node name make decisions per node; otherwise they are per (op, dtypes)
        self._by_name = bool(self.overrides.keep_names or self.overrides.custom_names)

    @property
    def by_name(self) -> bool:
        """Whether keep_dtype/customize_dtypes name single ops (decisions then depend on node names)."""
        return self._by_name

    def decide_node(
        self,
        name: str,
        op: str,
        org: str,
        actual_in: tuple[str, ...],
        voters: tuple[bool | str, ...],
        outs: tuple[str, ...],
        producers: Sequence[tuple[int, int]] | Sequence[str] = (),
        names: Sequence[str] | None = None,
    ) -> NodeChoice:
        """Decide one op: its compute dtype, rule, followed producer, input and output dtypes.

        ``voters[m]`` is True when input ``m`` comes from a computing op (gray ops follow those),
        :data:`VARIABLE` when it is a variable that votes where torch's type promotion would
        count it (see :attr:`OpGraph.variables_vote <precision_policy.graph.OpGraph>`), else False;
        ``producers[m]`` names that input's producer (an index pair into ``names``, or a name).
        Problems and warnings are collected on the decider, not raised.
        """
        if op not in self._known:
            if self._seen is None:
                self.unknown.setdefault(op, []).append(name)
            elif (op, name) not in self._seen:
                self._seen.add((op, name))
                self.unknown.setdefault(op, []).append(name)
        if self._by_name:
            draft = self._decide(name, op, org, actual_in, voters, outs)
        else:
            key = (op, org, actual_in, voters, outs)
            draft = self._memo.get(key)  # type: ignore[assignment]
            if draft is None:
                draft = self._memo[key] = self._decide(None, op, org, actual_in, voters, outs)
            if draft.choice is not None:  # the same for every node: nothing to name, warn or report
                return draft.choice
        why = draft.why
        if draft.follow_input >= 0:
            m = draft.follow_input
            prod = producers[m] if m < len(producers) else "?"
            if names is not None and not isinstance(prod, str):
                prod = names[prod[0]]
            why = why._replace(followed=str(prod))
        if draft.warning:
            text = f"{name}: {draft.warning}"
            if self._seen is None:
                self.warnings.append(text)
            elif text not in self._seen:
                self._seen.add(text)
                self.warnings.append(text)
        for detail in draft.problems:
            self.problems.append((name, op, detail))
        return _new_tuple(NodeChoice, (draft.dtype, why, draft.inputs, draft.outputs))

    # ------------------------------------------------------------------ one decision
    def _mode_decision(self, cache: dict, info: OpInfo, flag: str, org: str, follow: str | None) -> Decision:
        """The mode's :meth:`decide`, memoised per (op type, flag or followed dtype, origin)."""
        key = (info.op_type, follow or flag, org)
        dec = cache.get(key)
        if dec is None:
            try:
                dec = self.mode.decide(info, flag, org, follow)
            except NoKernel as exc:
                dec = Decision(org, Why(Rule.NO_KERNEL), str(exc))  # the planner collects it as a problem
            cache[key] = dec
        return dec

    def _decide(
        self,
        name: str | None,
        op: str,
        org: str,
        actual_in: tuple[str, ...],
        voters: tuple[bool | str, ...],
        outs: tuple[str, ...],
    ) -> _Draft:
        """Decide for node ``name`` (None: for any node of this op type and these dtypes)."""
        is_float = dtypes.FLOAT_DTYPES.__contains__
        ov = self.overrides
        info = self.library.get(op)
        problems: list[str] = []
        spec = None
        if ov.custom_names or ov.custom_types:
            spec = (ov.custom_names.get(name) if name is not None else None) or ov.custom_types.get(op)
        keep_where = None
        if not self.must_keep and spec is None and (ov.keep_names or ov.keep_types):
            # customize_dtypes has priority: where both name the op, keep_dtype does not apply
            keep_where = (ov.keep_names.get(name) if name is not None else None) or ov.keep_types.get(op)
        if op == "Cast" and actual_in and outs and spec is None:
            # an existing Cast reads whatever its producer now gives (absorbing the cast that
            # would go before it) and keeps its target; the planner's pass 4 does the other side
            why = Why(Rule.EXISTING_CAST)
            if keep_where is not None:
                why = Why(Rule.KEEP_DTYPE, where=keep_where, inner=why)
            return _draft(org, why, -1, actual_in, tuple(org if is_float(x) else x for x in outs), None, ())
        follow_m = -1
        warn: str | None = None
        if info is None:
            d, why = org, Why(Rule.UNKNOWN_OP)
        elif keep_where is not None:
            d, why = org, Why(Rule.KEEP_DTYPE, where=keep_where)
            if not info.supports(org):
                problems.append(f"keep_dtype asks for {org} but the library has no {org} kernel "
                                f"(supports: {info.describe_dtypes()})")
        else:
            d, why, warn, follow_m = self._mode_rule(info, op, org, actual_in, voters)
            if why.rule is Rule.NO_KERNEL:
                problems.append(warn or "no kernel")
                warn = None
        ck = (op, d, outs, actual_in)
        io = self._io.get(ck)
        if io is None:
            io = self._io[ck] = tensor_dtypes(info, d, outs, actual_in)
        want_in, new_out = io
        if spec is not None:
            want_in, new_out = _apply_spec(spec, want_in, new_out, info, problems)
            d = next((x for x in new_out if is_float(x)), d)
            why, follow_m = Why(Rule.CUSTOMIZE_DTYPES, where=spec.where), -1
        return _draft(d, why, follow_m, want_in, new_out, warn, tuple(problems))

    def _mode_rule(
        self, info: OpInfo, op: str, org: str, actual_in: tuple[str, ...], voters: tuple[bool | str, ...]
    ) -> tuple[str, Why, str | None, int]:
        """The mode's decision for an op the library knows: ``(dtype, why, warning, followed input or -1)``.
        Gray ops of mixed modes follow their voters; the followed producer is filled in per node."""
        is_float = dtypes.FLOAT_DTYPES.__contains__
        mode = self.mode
        flag = GRAY
        where = ""
        if mode.mixed:
            if op in self.overrides.flags:
                flag, where = self.overrides.flags[op]
            else:
                flag = info.flag
        if mode.mixed and flag == GRAY:
            follow = None
            follow_m = -1
            disagree = False
            for m, a in enumerate(actual_in):
                if not voters[m] or not is_float(a):
                    continue
                if voters[m] == VARIABLE and not _promotes(info, m, len(actual_in), mode.low):
                    continue
                if follow is None:
                    follow, follow_m = a, m
                elif a != follow:
                    disagree = True
                    if self.prefer_low:
                        if a == mode.low:
                            follow, follow_m = a, m
                    elif dtypes.rank(a) > dtypes.rank(follow):
                        follow, follow_m = a, m
            if follow is not None:
                d, why, warn = self._mode_decision(self._follow, info, GRAY, org, follow)
                if why.rule is Rule.NO_KERNEL:
                    return d, why, warn, -1
                if why.rule is Rule.GRAY_FOLLOWS:
                    detail = ("lowest" if self.prefer_low else "widest") if disagree else ""
                    return d, Why(Rule.GRAY_FOLLOWS, detail=detail, where=where), warn, follow_m
                # no kernel in the followed dtype: what the op runs in instead
                return d, Why(Rule.GRAY_FOLLOWS, wanted=(follow,), inner=why, where=where), warn, follow_m
        d, why, warn = self._mode_decision(self._fixed, info, flag, org, None)
        if where and why.rule is not Rule.NO_KERNEL:
            why = why._replace(where=where)
        return d, why, warn, -1


def _draft(
    dtype: str, why: Why, follow_input: int, inputs: tuple[str, ...], outputs: tuple[str, ...],
    warning: str | None, problems: tuple[str, ...],
) -> _Draft:
    choice = None
    if follow_input < 0 and not warning and not problems:
        choice = NodeChoice(dtype, why, inputs, outputs)
    return _Draft(dtype, why, follow_input, inputs, outputs, warning, problems, choice)


def _promotes(info: OpInfo, m: int, count: int, low: str) -> bool:
    """Whether input ``m`` (of ``count``) takes part in the op's type promotion: some kernel
    variant takes ``low`` there. A slot the library pins to another dtype in every variant
    (batch-norm statistics and affine parameters) does not; dynamic inputs (declared count differs) do.

    Example:
        >>> from precision_policy.opinfo.library import load_library
        >>> lib = load_library("torch_autocast_cpu")
        >>> _promotes(lib["BatchNorm"], 1, 5, "bfloat16"), _promotes(lib["Add"], 1, 2, "bfloat16")
        (False, True)
    """
    if not info.declares_dtypes or len(info.inputs) != count:
        return True
    decl = info.inputs[m].dtypes
    return not decl or low in decl or not any(dtypes.is_float(d) for d in decl)


def tensor_dtypes(
    info: OpInfo | None, d: str, outs: tuple[str, ...], actual_in: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The dtype each input is consumed in and each output produced in, for compute dtype ``d``.

    Float tensors take ``d`` unless the library's kernel variant for ``d`` fixes another
    float dtype for that tensor (e.g. batch-norm statistics stay float32). The variant is
    the one whose float tensors most often equal ``d``; declared tensors map to the node's
    tensors by position only when the counts match (dynamic inputs don't).

    Example:
        >>> tensor_dtypes(None, "float16", ("float32", "int32"), ("float32",))
        (('float16',), ('float16', 'int32'))
    """
    is_float = dtypes.is_float
    pin: tuple[str | None, ...] = ()
    pout: tuple[str | None, ...] = ()
    if info is not None and info.declares_dtypes:
        tensors = info.inputs + info.outputs
        k_best, best = -1, 0
        for k in range(info.variants):
            score = sum(1 for t in tensors if t.dtypes and t.dtypes[k] == d)
            if score > best:
                k_best, best = k, score
        if k_best >= 0:

            def side(decl: tuple, count: int) -> tuple[str | None, ...]:
                if len(decl) != count:
                    return ()
                return tuple(t.dtypes[k_best] if t.dtypes and is_float(t.dtypes[k_best]) else None for t in decl)

            pin = side(info.inputs, len(actual_in))
            pout = side(info.outputs, len(outs))
    want_in = tuple(
        ((pin[m] or d) if pin else d) if is_float(a) else a for m, a in enumerate(actual_in)
    )
    new_out = tuple(((pout[k] or d) if pout else d) if is_float(x) else x for k, x in enumerate(outs))
    return want_in, new_out


def _apply_spec(
    spec: DtypeSpec, want_in: tuple[str, ...], new_out: tuple[str, ...], info: OpInfo | None, problems: list[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """customize_dtypes' input/output dtypes for a node; what cannot be honoured goes to ``problems``."""
    if spec.inputs is not None:
        if len(spec.inputs) != len(want_in):
            problems.append(f"customize_dtypes ({spec.where}) gives {len(spec.inputs)} input dtype(s), "
                            f"the node has {len(want_in)} input(s)")
        else:
            fixed = []
            for m, (w, s) in enumerate(zip(want_in, spec.inputs)):
                if not dtypes.is_float(w) and s != w:
                    problems.append(f"customize_dtypes ({spec.where}): input {m} is {w}, not a float tensor; "
                                    f"it cannot become {s}")
                fixed.append(s)
            want_in = tuple(fixed)
    if spec.outputs is not None:
        if len(spec.outputs) != len(new_out):
            problems.append(f"customize_dtypes ({spec.where}) gives {len(spec.outputs)} output dtype(s), "
                            f"the node has {len(new_out)} output(s)")
        else:
            for k, (x, s) in enumerate(zip(new_out, spec.outputs)):
                if not dtypes.is_float(x) and s != x:
                    problems.append(f"customize_dtypes ({spec.where}): output {k} is {x}, not a float tensor")
            new_out = tuple(spec.outputs)
    if info is not None and info.declares_dtypes:
        for s in (spec.inputs or ()) + (spec.outputs or ()):
            if dtypes.is_float(s) and not info.supports(s):
                problems.append(f"customize_dtypes ({spec.where}) asks for {s} but the library has no {s} "
                                f"kernel (supports: {info.describe_dtypes()})")
                break
    return want_in, new_out


def problem_message(mode: str, library: Library, problems: Sequence[Problem]) -> str:
    """The PrecisionError text for ops a mode cannot honour: one line each (50 at most) and the fix.

    Example:
        >>> from precision_policy.opinfo.library import load_library
        >>> print(problem_message("force_fp16", load_library("ascend910"), [("mm", "MatMulV2", "no kernel")]))
        precision mode 'force_fp16' cannot be honoured for 1 op(s) with library 'ascend910':
          mm (MatMulV2): no kernel
        Fix: change the override, or the op's kernels/flag in the op-info library.
    """
    lines = [f"precision mode {mode!r} cannot be honoured for {len(problems)} op(s) with library {library.name!r}:"]
    for name, op, detail in problems[:50]:
        lines.append(f"  {name} ({op}): {detail}")
    if len(problems) > 50:
        lines.append(f"  ... and {len(problems) - 50} more")
    if mode == "must_keep_origin_dtype":
        lines.append("Fix: choose allow_fp32_to_fp16 (the default) or allow_mix_precision, or add a float32 kernel "
                     "to these ops in the op-info library.")
    else:
        lines.append("Fix: change the override, or the op's kernels/flag in the op-info library.")
    return "\n".join(lines)


__all__ = ["VARIABLE", "NodeChoice", "NodeDecider", "Problem", "problem_message", "tensor_dtypes"]
