"""The precision-mode policy object and the planner every mode shares.

A mode only answers one question per op — *given what the library says about
this op type, its flag, its origin dtype and (for gray ops) the dtype its
producers run in, which dtype should it compute in, and why?* — in
:meth:`PrecisionMode.decide`. :meth:`PrecisionMode.plan` walks the graph in
topological order, applies the user's overrides, asks the mode, picks the
kernel variant, and places the casts: one per (tensor, dtype), constants cast
once ahead of time, variables cast after their read, existing Cast ops reused,
fetches kept in their origin dtype.
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Sequence

from precision_policy import dtypes
from precision_policy.errors import PrecisionError
from precision_policy.graph import (
    BACK_EDGE_OPS,
    CONTROL_FLOW_OPS,
    HANDLE_TYPED_PREFIXES,
    PASSTHROUGH_OPS,
    SOURCE_KINDS,
    OpGraph,
)
from precision_policy.opinfo.library import GRAY, Library, OpInfo
from precision_policy.opinfo.overrides import Overrides

if TYPE_CHECKING:
    from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

F32, F16, BF16, F64 = dtypes.FLOAT32, dtypes.FLOAT16, dtypes.BFLOAT16, dtypes.FLOAT64
_FALLBACK_ORDER = (F32, F16, BF16, F64)

Decision = tuple[str, str, "str | None"]  # (dtype, reason, warning or None)

#: Ops whose outputs are their inputs' values rearranged: running them low loses nothing, so
#: a chain of them fed by constants (a reshaped bias) takes its readers' dtype and the cast
#: goes to the constant, ahead of time. Arithmetic on constants (a folded batch-norm scale)
#: stays in its origin dtype and is cast once.
DATA_MOVEMENT_OPS: frozenset[str] = frozenset({
    "Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "Unsqueeze", "Flatten", "Transpose",
    "TransposeD", "StridedSlice", "StridedSliceD", "Slice", "ConcatV2", "ConcatV2D", "Concat", "Pack",
    "Unpack", "Split", "SplitV", "SplitD", "Tile", "TileD", "BroadcastTo", "GatherV2", "Gather", "GatherNd",
    "Pad", "PadV2", "PadD", "MirrorPad", "Reverse", "ReverseV2", "Snapshot", "StopGradient",
})


#: Ops whose result is one of their inputs' values (or a comparison of them): running them low
#: rounds nothing that the cast after them would not round anyway. Only these (and the data
#: movement above) take a low dtype from their readers in the look-ahead pass; arithmetic
#: upstream of a white op (an input's normalisation) stays in its origin dtype, as TensorFlow
#: paints only its "clear" ops, not its "infer" ops, backwards from an allow op.
VALUE_PRESERVING_OPS: frozenset[str] = frozenset({
    "Relu", "Relu6", "MaxPool", "MaxPoolV2", "MaxPool3D", "MaxPoolV3", "Maximum", "Minimum", "ReduceMax",
    "ReduceMin", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "ClipByValue", "Select", "SelectV2",
    "SpaceToBatchND", "BatchToSpaceND", "SpaceToDepth", "DepthToSpace", "ResizeNearestNeighborV2",
    "ReverseSequence", "TopKV2", "OnesLike", "ZerosLike", "Fill", "EnsureShape", "CheckNumerics",
})


class NoKernel(Exception):
    """Raised by :meth:`PrecisionMode.decide` when the mode cannot be honoured for an op."""


def choose(info: OpInfo, prefs: tuple[str, ...], first_reason: str, origin: str) -> Decision:
    """First dtype of ``prefs`` the op has a kernel for; falls back to any float kernel it has."""
    prefs = tuple(dict.fromkeys(prefs))
    for k, d in enumerate(prefs):
        if info.supports(d):
            if k == 0:
                return d, first_reason, None
            missing = " or ".join(prefs[:k])
            return d, f"no {missing} kernel", None
    floats = info.float_dtypes
    for d in _FALLBACK_ORDER:
        if d in floats:
            wanted = " or ".join(prefs)
            return d, f"no {wanted} kernel; {d} is its only float kernel", (
                f"{info.op_type}: no {wanted} kernel in the library, runs in {d}"
            )
    return origin, "library declares no float kernel; keeps its origin dtype", (
        f"{info.op_type}: the library declares no float kernel; kept in {origin}"
    )


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

    # ------------------------------------------------------------------ planning
    def _decide_cached(self, cache: dict, info: OpInfo, flag: str, org: str, follow: str | None) -> Decision:
        """:meth:`decide`, memoised per (op type, flag or followed dtype, origin); NoKernel -> empty reason."""
        key = (info.op_type, follow or flag, org)
        dec = cache.get(key)
        if dec is None:
            try:
                dec = self.decide(info, flag, org, follow)
            except NoKernel as exc:
                dec = (org, "", str(exc))  # an empty reason marks a problem; the planner collects them
            cache[key] = dec
        return dec

    def plan(
        self,
        graph: OpGraph,
        library: Library,
        overrides: Overrides | None = None,
        *,
        keep_output_dtype: bool = True,
        config_summary: dict | None = None,
        gray_disagreement: str = "widest",
    ) -> "CastPlan":
        """Decide every node's dtype and place the casts. See the module docstring."""
        was_enabled = gc.isenabled()
        gc.disable()  # the planner allocates millions of small tuples; generational GC would rescan them all
        try:
            loops = _Loops.of(graph, self.low, gray_disagreement == "low")
            while True:
                plan = self._plan(graph, library, overrides, keep_output_dtype, config_summary, gray_disagreement,
                                  loops)
                if loops is None or not loops.update(plan.out_dtypes, plan.dtype, plan.in_dtypes):
                    return plan
        finally:
            if was_enabled:
                gc.enable()

    def _plan(
        self,
        graph: OpGraph,
        library: Library,
        overrides: Overrides | None,
        keep_output_dtype: bool,
        config_summary: dict | None,
        gray_disagreement: str = "widest",
        loops: "_Loops | None" = None,
    ) -> "CastPlan":
        from precision_policy.plan import Cast, CastPlan

        ov = overrides or Overrides()
        res = graph.resolve()
        names = graph.names
        ops = graph.op_types
        outs = graph.output_dtypes
        data_inputs = res.data_inputs
        n = len(names)
        is_float = dtypes.FLOAT_DTYPES.__contains__
        decider = NodeDecider(self, library, ov, gray_disagreement=gray_disagreement)
        decide = decider.decide_node

        origin: list[str | None] = [None] * n
        dtype: list[str | None] = [None] * n
        out_dt: list[tuple[str, ...]] = list(outs)
        in_dt: list[tuple[str, ...]] = [()] * n
        reason: list[str] = [""] * n
        src: list[str | None] = [None] * n
        identity: set[int] = set()
        cast_nodes: list[int] = []
        casts: dict[tuple[int, int, str], Cast] = {}
        unknown = decider.unknown
        warnings = decider.warnings
        problems = decider.problems

        variables_vote = getattr(graph, "variables_vote", False)
        # 0-dim variables (attrs rank 0) never vote: torch's promotion lets a dimensioned tensor win
        scalar_vars: set[int] = set()
        for i in res.order:
            op = ops[i]
            o = outs[i]
            ins = data_inputs[i]
            kind = SOURCE_KINDS.get(op)
            if kind is not None:
                src[i] = kind
                if variables_vote and kind == "variable" and graph.node(names[i]).attrs.get("rank") == 0:
                    scalar_vars.add(i)
                in_dt[i] = tuple(out_dt[j][p] for j, p in ins)
                reason[i] = f"source ({kind})"
                for d in o:
                    if is_float(d):
                        origin[i] = dtype[i] = d
                        break
                continue
            org = None
            for d in o:
                if is_float(d):
                    org = d
                    break
            if org is None:
                for j, p in ins:
                    d = outs[j][p]
                    if is_float(d):
                        org = d
                        break
            actual_in = tuple([out_dt[j][p] for j, p in ins])
            tied = op.startswith(HANDLE_TYPED_PREFIXES)
            group_dtype = loops.tied_dtype(i) if tied and loops is not None else None
            if org is None:
                in_dt[i] = actual_in
                if group_dtype is not None:  # creates the list (TensorListReserve): its element dtype
                    origin[i], dtype[i] = group_dtype
                    reason[i] = f"list/array elements in {group_dtype[1]}, as the ops sharing its handle"
                else:
                    reason[i] = "no float tensors"
                continue
            origin[i] = org
            if tied or (op in CONTROL_FLOW_OPS and not (op in ENTER_OPS and src[ins[0][0]] is not None)):
                if group_dtype is not None:
                    d = group_dtype[1]
                    why = f"list/array elements in {d}, as its readers and writers need (ops sharing its handle)"
                elif tied:
                    d, why = org, "tied to a list/array handle: keeps its origin dtype, casts go around it"
                else:
                    d, why = _control_flow_dtype(i, op, org, ins, actual_in, ops, names, src, dtype, loops,
                                                 decider.prefer_low)
                dtype[i] = d
                in_dt[i] = tuple([d if is_float(a) else a for a in actual_in])
                out_dt[i] = tuple([d if is_float(x) else x for x in o])
                reason[i] = why
                for m, (j, p) in enumerate(ins):
                    a, w = actual_in[m], in_dt[i][m]
                    if a != w and is_float(a) and ops[j] not in BACK_EDGE_OPS:
                        c = casts.get((j, p, w))
                        if c is None:
                            c = casts[(j, p, w)] = Cast(j, p, a, w, src[j] or "op", [], False)
                        if i not in c.consumers:
                            c.consumers.append(i)
                continue
            if ((op in PASSTHROUGH_OPS or op in ENTER_OPS) and len(ins) == 1 and src[ins[0][0]] is not None
                    and names[i] not in ov.keep_names):  # a kept read is decided (and kept) like any op
                j = ins[0][0]
                src[i] = src[j]
                if j in scalar_vars:
                    scalar_vars.add(i)
                dtype[i] = actual_in[0] if is_float(actual_in[0]) else org
                in_dt[i] = actual_in
                if o and is_float(o[0]):
                    out_dt[i] = (dtype[i],) + o[1:]
                reason[i] = f"reads {src[j]} {names[j]}"
                continue
            name = names[i]
            voters = tuple([True if src[j] is None or src[j] == "input"
                            else (VARIABLE if variables_vote and src[j] == "variable" and j not in scalar_vars
                                  else False) for j, _ in ins])
            d, why, want_in, new_out, is_cast = decide(name, op, org, actual_in, voters, o, ins, names)
            if is_cast:
                cast_nodes.append(i)
            if ins and src[ins[0][0]] == "const" and all(src[j] == "const" for j, _ in ins):
                # computed from constants only (a folded batch-norm scale, say): a constant too,
                # so it does not vote for its readers, and casting it is a constant's cast
                src[i] = "const"
            dtype[i] = d
            out_dt[i] = new_out
            in_dt[i] = want_in
            reason[i] = why
            # ---------------------------------------------------------- casts on this node's inputs
            if want_in != actual_in:
                for m, (j, p) in enumerate(ins):
                    a = actual_in[m]
                    w = want_in[m]
                    if a != w and is_float(a) and is_float(w):
                        key3 = (j, p, w)
                        c = casts.get(key3)
                        if c is None:
                            c = Cast(j, p, a, w, src[j] or "op", [], False)
                            casts[key3] = c
                        if not c.consumers or c.consumers[-1] != i:  # an op reading x twice is one consumer
                            c.consumers.append(i)
        if problems:
            raise PrecisionError(_problem_message(self.name, library, problems), problems)
        fetched = res.is_fetch if keep_output_dtype else set()
        if self.mixed and graph.lookahead:
            _gray_takes_consumer_dtype(self.low, library, res, ops, src, dtype, in_dt, out_dt, reason,
                                       casts, fetched)
        if cast_nodes:
            _absorb_into_casts(cast_nodes, casts, data_inputs, fetched, dtype, out_dt, reason)
        for i in cast_nodes:
            a, w = in_dt[i][0], out_dt[i][0]
            if is_float(a) and a == w:
                identity.add(i)
                reason[i] += f"; now an identity ({a} -> {w}), removable"
        # fetches keep their origin dtype
        if keep_output_dtype:
            for j, p in res.fetches:
                a = out_dt[j][p]
                w = outs[j][p]
                if a != w and is_float(a) and is_float(w):
                    key3 = (j, p, w)
                    c = casts.get(key3)
                    if c is None:
                        c = Cast(j, p, a, w, src[j] or "op", [], True)
                        casts[key3] = c
                    else:
                        c.for_fetch = True
        if warnings:
            log.warning("%s: %d warning(s) while planning %r, e.g. %s (see CastPlan.warnings)",
                        self.name, len(warnings), graph.name, warnings[0])
        return CastPlan(
            graph=graph,
            mode=self,
            library=library,
            origin=origin,
            dtype=dtype,
            in_dtypes=in_dt,
            out_dtypes=out_dt,
            reasons=reason,
            casts=list(casts.values()),
            identity=identity,
            unknown=unknown,
            warnings=warnings,
            keep_output_dtype=keep_output_dtype,
            config=config_summary or {},
        )


ENTER_OPS = frozenset({"Enter", "RefEnter"})
MERGE_OPS = frozenset({"Merge", "RefMerge"})


class _Loops:
    """TF v1 while-loops in a graph: each ``NextIteration`` and the ``Merge`` it feeds back into.

    A loop variable must have one dtype all round the loop (``Enter`` -> ``Merge`` -> ``Switch``
    -> body -> ``NextIteration`` -> ``Merge``). The first plan lets each ``Merge`` follow the
    value entering the loop; when the body then hands ``NextIteration`` a different dtype, the
    ``Merge`` takes the body's dtype and the graph is planned again, so the cast happens once
    where the value enters (or leaves) the loop rather than on every iteration.
    """

    def __init__(self, graph: OpGraph, low: str, prefer_low: bool) -> None:
        ops = graph.op_types
        res = graph.resolve()
        self.low = low
        self.prefer_low = prefer_low
        self.data_inputs = res.data_inputs
        self.merge_of: dict[int, int] = {}  # NextIteration -> Merge
        self.back_inputs: dict[int, tuple[int, int]] = {}  # NextIteration -> its data input
        self.hints: dict[int, str] = {}  # Merge -> dtype of the loop variable
        # ops sharing a list/array handle (through variant edges, frame ops and identities) form a group
        parent = list(range(len(ops)))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        carriers = CONTROL_FLOW_OPS | PASSTHROUGH_OPS
        outs = graph.output_dtypes
        for i, ins in enumerate(res.data_inputs):
            if ops[i] in BACK_EDGE_OPS and ins:
                self.back_inputs[i] = ins[0]
            if ops[i] in MERGE_OPS:
                for j, _ in ins:
                    if ops[j] in BACK_EDGE_OPS:
                        self.merge_of[j] = i
            if ops[i].startswith(HANDLE_TYPED_PREFIXES) or ops[i] in carriers:
                for j, p in ins:
                    if outs[j][p] in ("variant", "resource") and (
                            ops[j].startswith(HANDLE_TYPED_PREFIXES) or ops[j] in carriers):
                        parent[find(i)] = find(j)
        self.groups: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            if op.startswith(HANDLE_TYPED_PREFIXES):
                self.groups.setdefault(find(i), []).append(i)
        self.group_of = {i: root for root, members in self.groups.items() for i in members}
        self.group_hints: dict[int, tuple[str, str]] = {}  # group -> (origin, dtype)

    @classmethod
    def of(cls, graph: OpGraph, low: str = F16, prefer_low: bool = False) -> "_Loops | None":
        ops = graph.op_types
        if not any(op in BACK_EDGE_OPS or op.startswith(HANDLE_TYPED_PREFIXES) for op in ops):
            return None
        return cls(graph, low, prefer_low)

    def tied_dtype(self, i: int) -> tuple[str, str] | None:
        root = self.group_of.get(i)
        return None if root is None else self.group_hints.get(root)

    def update(self, out_dtypes: list, dtype: list, in_dtypes: list) -> bool:
        """Feed one plan's outcome back; True when the graph must be planned again.

        A loop variable that came back from the body in another dtype takes the body's dtype.
        A list/array group whose float readers and writers run ``low`` (any of them under TF's
        gray rule, all of them otherwise) keeps its elements in ``low``.
        """
        changed = False
        for nxt, merge in self.merge_of.items():
            j, p = self.back_inputs.get(nxt, (None, 0))
            if j is None or dtype[merge] is None or merge in self.hints:
                continue
            body = out_dtypes[j][p]
            if dtypes.is_float(body) and body != dtype[merge]:
                self.hints[merge] = body
                changed = True
        if self.groups:
            readers: dict[int, list[tuple[int, int]]] = {}
            for k, ins in enumerate(self.data_inputs):
                for m, (j, p) in enumerate(ins):
                    if j in self.group_of:
                        readers.setdefault(j, []).append((k, m))
            for root, members in self.groups.items():
                if root in self.group_hints:
                    continue
                seen: list[str] = []
                origin = None
                for i in members:
                    for m, (j, p) in enumerate(self.data_inputs[i]):
                        if dtypes.is_float(in_dtypes[i][m]):
                            origin = origin or in_dtypes[i][m]
                            seen.append(out_dtypes[j][p])  # what the writer produces
                    for k, m in readers.get(i, ()):
                        if dtypes.is_float(in_dtypes[k][m]):
                            origin = origin or out_dtypes[i][self.data_inputs[k][m][1]]
                            seen.append(in_dtypes[k][m])  # what the reader takes
                floats = [d for d in seen if dtypes.is_float(d)]
                if not floats or origin == self.low:
                    continue
                low = floats.count(self.low)
                if low and (self.prefer_low or low == len(floats)):
                    self.group_hints[root] = (origin, self.low)
                    changed = True
        return changed


def _control_flow_dtype(i, op, org, ins, actual_in, ops, names, src, dtype, loops, prefer_low) -> tuple[str, str]:
    """Dtype and reason of a control-flow frame op: it carries values, so it follows them."""
    is_float = dtypes.is_float
    if op in BACK_EDGE_OPS and loops is not None and i in loops.merge_of:
        merge = loops.merge_of[i]
        d = dtype[merge] or org
        return d, f"control flow: carries the loop variable back in {names[merge]}'s dtype ({d})"
    if op in MERGE_OPS and loops is not None and i in loops.hints:
        d = loops.hints[i]
        return d, f"control flow: loop variable in {d}, the dtype its loop body produces"
    forward = [(m, j) for m, (j, _) in enumerate(ins) if ops[j] not in BACK_EDGE_OPS and is_float(actual_in[m])]
    voting = [(m, j) for m, j in forward if src[j] is None or src[j] == "input"] or forward
    if not voting:
        return org, "control flow: no float input; keeps its origin dtype"
    m0, j0 = voting[0]
    d = actual_in[m0]
    for m, j in voting[1:]:
        a = actual_in[m]
        if a != d and ((prefer_low and dtypes.rank(a) < dtypes.rank(d)) or
                       (not prefer_low and dtypes.rank(a) > dtypes.rank(d))):
            d, j0 = a, j
    return d, f"control flow: follows {names[j0]}"


class _Marker:
    """Stands in for producer names while a decision is memoised: ``_Marker()[m]`` is ``"\\0m\\0"``."""

    def __getitem__(self, m: int) -> str:
        return f"\0{m}\0"

    def __len__(self) -> int:
        return 1 << 30

    @staticmethod
    def index_in(text: str) -> int:
        start = text.index("\0") + 1
        return int(text[start : text.index("\0", start)])


#: A ``voters`` entry for an input that is a variable (a torch parameter or buffer, or a read of
#: one): it votes for a gray op as torch's type promotion counts it, i.e. only at an input whose
#: kernel takes the low dtype (not at a float32-only slot such as batch-norm statistics).
#: Graphs with ``OpGraph.variables_vote`` (torch traces) pass it; TensorFlow graphs never do.
VARIABLE = "variable"


class NodeDecider:
    """The per-op decision every route shares: the static planner and the eager backends.

    Given an op's name, type, origin dtype and the dtypes its inputs arrive in (and which of
    them come from computing ops, so that gray ops may follow them), it applies the
    overrides, asks the mode, and returns the compute dtype, the reason, the dtype each
    input must be consumed in and each output is produced in. Decisions are memoised, so
    an eager backend can call it on every op of every step.
    """

    def __init__(
        self,
        mode: "PrecisionMode",
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
        self.problems: list[tuple[str, str, str]] = []
        self._fixed: dict[tuple[str, str, str | None], Decision] = {}
        self._follow: dict[tuple[str, str, str | None], Decision] = {}
        self._io: dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._memo: dict[tuple, tuple] = {}
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
        voters: tuple[bool, ...],
        outs: tuple[str, ...],
        producers: Sequence[tuple[int, int]] | Sequence[str] = (),
        names: Sequence[str] | None = None,
    ) -> tuple[str, str, tuple[str, ...], tuple[str, ...], bool]:
        """Return ``(dtype, reason, input dtypes, output dtypes, is_existing_cast)`` for one op.

        ``voters[m]`` is True when input ``m`` comes from a computing op (gray ops follow those),
        :data:`VARIABLE` when it is a variable that votes where torch's type promotion would
        count it (see :attr:`OpGraph.variables_vote <precision_policy.graph.OpGraph>`), else False;
        ``producers[m]`` names that input's producer for the reason (an index into ``names``,
        or a name). Problems and warnings are collected on the decider, not raised.
        """
        if op not in self._known:
            if self._seen is None:
                self.unknown.setdefault(op, []).append(name)
            elif (op, name) not in self._seen:
                self._seen.add((op, name))
                self.unknown.setdefault(op, []).append(name)
        if self._by_name:
            return self._decide(name, op, org, actual_in, voters, outs, producers, names)
        key = (op, org, actual_in, voters, outs)
        hit = self._memo.get(key)
        if hit is None:
            # decide once with a placeholder producer; per-node text is filled in below
            mark = len(self.warnings), len(self.problems)
            result = self._decide("\0", op, org, actual_in, voters, outs, _Marker(), None)
            new_w = [w[3:] for w in self.warnings[mark[0]:]]  # drop the placeholder name and ': '
            new_p = [pr[2] for pr in self.problems[mark[1]:]]
            del self.warnings[mark[0]:], self.problems[mark[1]:]
            why = result[1]
            if "\0" in why:
                m = _Marker.index_in(why)
                head, _, tail = why.partition(f"\0{m}\0")
                hit = (result, new_w, new_p, m, head, tail)
            else:
                hit = (result, new_w, new_p, -1, why, "")
            self._memo[key] = hit
        (d, why, want_in, new_out, is_cast), new_w, new_p, m, head, tail = hit
        if m >= 0:
            prod = producers[m] if m < len(producers) else "?"
            if names is not None and not isinstance(prod, str):
                prod = names[prod[0]]
            why = head + prod + tail
        for w in new_w:
            text = f"{name}: {w}"
            if self._seen is None:
                self.warnings.append(text)
            elif text not in self._seen:
                self._seen.add(text)
                self.warnings.append(text)
        for pr in new_p:
            self.problems.append((name, op, pr))
        return d, why, want_in, new_out, is_cast

    def _decide(
        self,
        name: str,
        op: str,
        org: str,
        actual_in: tuple[str, ...],
        voters: tuple[bool, ...],
        outs: tuple[str, ...],
        producers: Sequence,
        names: Sequence[str] | None,
    ) -> tuple[str, str, tuple[str, ...], tuple[str, ...], bool]:
        is_float = dtypes.FLOAT_DTYPES.__contains__
        ov = self.overrides
        mode = self.mode
        info = self.library.get(op)
        spec = None
        if ov.custom_names or ov.custom_types:
            spec = ov.custom_names.get(name) or ov.custom_types.get(op)
        keep_where = None
        if not self.must_keep and (ov.keep_names or ov.keep_types):
            keep_where = ov.keep_names.get(name) or ov.keep_types.get(op)
        is_cast = False
        if op == "Cast" and actual_in and outs and spec is None:
            # an existing Cast reads whatever its producer now gives (absorbing the cast that
            # would go before it) and keeps its target; see _absorb_into_casts for the other side
            d, warn = org, None
            why = f"Cast: reads its input as produced ({actual_in[0]}), writes {org}"
            if keep_where is not None:
                why += f"; keep_dtype ({keep_where})"
            else:
                is_cast = True
            if warn:
                self.warnings.append(f"{name}: {warn}")
            return d, why, actual_in, tuple(d if is_float(x) else x for x in outs), is_cast
        if info is None:
            d, why, warn = org, "unknown op type: not in the op-info library, keeps its origin dtype", None
        elif keep_where is not None:
            d, why, warn = org, f"keep_dtype ({keep_where})", None
            if not info.supports(org):
                self.problems.append((name, op, f"keep_dtype asks for {org} but the library has no {org} kernel "
                                      f"(supports: {info.describe_dtypes()})"))
        else:
            flag = GRAY
            flag_note = ""
            if mode.mixed:
                if op in ov.flags:
                    flag, flag_note = ov.flags[op]
                    flag_note = f" ({flag_note})"
                else:
                    flag = info.flag
            follow = None
            if mode.mixed and flag == GRAY:
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
                    d, why, warn = mode._decide_cached(self._follow, info, GRAY, org, follow)
                    prod = producers[follow_m] if follow_m < len(producers) else "?"
                    if names is not None and not isinstance(prod, str):
                        prod = names[prod[0]]
                    if why.startswith("gray: follows"):
                        if disagree:
                            which = "lowest" if self.prefer_low else "widest"
                            why = f"gray: inputs disagree, follows the {which} ({prod}, {follow})"
                        else:
                            why = f"gray: follows {prod}"
                        why += flag_note
                    elif why:
                        why = f"gray: follows {prod} ({follow}), but {why}"
            if follow is None:
                d, why, warn = mode._decide_cached(self._fixed, info, flag, org, None)
                if flag_note and why:
                    why += flag_note
            if not why:  # NoKernel
                self.problems.append((name, op, warn or "no kernel"))
                why, warn = "no kernel for the requested precision", None
        if warn:
            self.warnings.append(f"{name}: {warn}")
        ck = (op, d, outs, actual_in)
        io = self._io.get(ck)
        if io is None:
            io = _tensor_dtypes(info, d, outs, actual_in)
            self._io[ck] = io
        want_in, new_out = io
        if spec is not None:
            want_in, new_out, why = _apply_spec(spec, want_in, new_out, name, op, info, self.problems)
            d = next((x for x in new_out if is_float(x)), d)
        return d, why, want_in, new_out, is_cast


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


def _tensor_dtypes(
    info: OpInfo | None, d: str, outs: tuple[str, ...], actual_in: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The dtype each input is consumed in and each output produced in, for compute dtype ``d``.

    Float tensors take ``d`` unless the library's kernel variant for ``d`` fixes another
    float dtype for that tensor (e.g. batch-norm statistics stay float32). The variant is
    the one whose float tensors most often equal ``d``; declared tensors map to the node's
    tensors by position only when the counts match (dynamic inputs don't).
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


def _gray_takes_consumer_dtype(low, library, res, ops, src, dtype, in_dt, out_dt, reason, casts, fetched) -> None:
    """A gray op whose every reader wants ``low`` runs in ``low`` when that adds no cast.

    The "follows its producer" rule can leave a gray op in float32 between a black op and a
    white one (Exp -> Relu -> MatMul): the cast then sits after the gray op. Running the gray
    op in ``low`` instead moves that cast before it — no extra cast, one more op in low
    precision, as TensorFlow's AMP does for clear/infer ops between allow ops. Applied from the
    outputs backwards, so whole gray chains move.
    """
    from precision_policy.plan import Cast

    is_float = dtypes.FLOAT_DTYPES.__contains__
    following = ("gray: follows", "gray: inputs disagree", "reads ")
    cand = {
        i for i, d in enumerate(dtype)
        if d is not None and d != low and ops[i] != "Cast"
        and ((reason[i].startswith(following)
              and (ops[i] in DATA_MOVEMENT_OPS or ops[i] in VALUE_PRESERVING_OPS or reason[i].startswith("reads ")))
             or (reason[i].startswith("gray, fed only") and ops[i] in DATA_MOVEMENT_OPS))
    }
    if not cand:
        return
    readers: dict[tuple[int, int], int] = {}  # distinct reading nodes per tensor
    for ins in res.data_inputs:
        for m, (j, p) in enumerate(ins):
            if j in cand and (m == 0 or (j, p) not in ins[:m]):
                readers[(j, p)] = readers.get((j, p), 0) + 1
    counted = ("op", "input")
    io_cache: dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for i in reversed(res.order):
        if i not in cand:
            continue
        info = library.get(ops[i])
        if info is None or not info.supports(low):
            continue
        outs = out_dt[i]
        removed = []
        ok = True
        for p, d in enumerate(outs):
            if not is_float(d):
                continue
            n_read = readers.get((i, p), 0)
            if (i, p) in fetched:
                ok = False
                break
            c = casts.get((i, p, low))
            if n_read == 0:
                continue
            if c is None or c.for_fetch or len(c.consumers) != n_read:
                ok = False
                break
            removed.append((i, p, low))
        if not ok or not removed:
            continue
        ins = res.data_inputs[i]
        added = 0
        for m, (j, p) in enumerate(ins):
            a = out_dt[j][p]
            if is_float(a) and a != low and (j, p, low) not in casts and (src[j] or "op") in counted:
                added += 1
        if added > len(removed):
            continue
        actual = tuple([out_dt[j][p] for j, p in ins])
        key = (ops[i], outs, actual)
        io = io_cache.get(key)
        if io is None:
            io = io_cache[key] = _tensor_dtypes(info, low, outs, actual)
        new_in, new_out = io
        for m, (j, p) in enumerate(ins):
            old_w, new_w = in_dt[i][m], new_in[m]
            if old_w == new_w:
                continue
            old = casts.get((j, p, old_w))
            if old is not None and i in old.consumers:
                old.consumers.remove(i)
                if not old.consumers and not old.for_fetch:
                    del casts[(j, p, old_w)]
            a = out_dt[j][p]
            if is_float(a) and is_float(new_w) and a != new_w:
                c = casts.get((j, p, new_w))
                if c is None:
                    c = casts[(j, p, new_w)] = Cast(j, p, a, new_w, src[j] or "op", [], False)
                if i not in c.consumers:
                    c.consumers.append(i)
        for key in removed:
            del casts[key]
        dtype[i] = low
        in_dt[i] = new_in
        out_dt[i] = new_out
        if reason[i].startswith("reads "):
            reason[i] += f"; in {low}, as every reader needs (the {src[i]} is cast before the read)"
        else:
            reason[i] = f"gray: runs in {low} because every reader needs {low} (the cast moves before it)"


def _absorb_into_casts(cast_nodes, casts, data_inputs, fetched, dtype, out_dt, reason) -> None:
    """Let an existing Cast write the dtype all its consumers need, instead of adding a cast after it."""
    candidates = set(cast_nodes)
    by_src: dict[int, list[tuple[int, int, str]]] = {}
    for key in casts:
        if key[0] in candidates and key[1] == 0:
            by_src.setdefault(key[0], []).append(key)
    if not by_src:
        return
    readers = dict.fromkeys(by_src, 0)
    for ins in data_inputs:
        for j, p in ins:
            if p == 0 and j in readers:
                readers[j] += 1
    for i, keys in by_src.items():
        if len(keys) != 1 or (i, 0) in fetched:
            continue
        c = casts[keys[0]]
        if len(c.consumers) != readers[i]:
            continue  # some consumer reads the Cast's own output dtype
        del casts[keys[0]]
        out_dt[i] = (c.to,) + out_dt[i][1:]
        dtype[i] = c.to
        reason[i] = reason[i].rsplit(", writes ", 1)[0] + f", writes {c.to} directly (what all its consumers need)"


def _apply_spec(spec, want_in, new_out, name, op, info, problems):
    why = f"customize_dtypes ({spec.where})"
    if spec.inputs is not None:
        if len(spec.inputs) != len(want_in):
            problems.append((name, op, f"customize_dtypes ({spec.where}) gives {len(spec.inputs)} input dtype(s), "
                             f"the node has {len(want_in)} input(s)"))
        else:
            fixed = []
            for m, (w, s) in enumerate(zip(want_in, spec.inputs)):
                if not dtypes.is_float(w) and s != w:
                    problems.append((name, op, f"customize_dtypes ({spec.where}): input {m} is {w}, not a float tensor; "
                                     f"it cannot become {s}"))
                fixed.append(s)
            want_in = tuple(fixed)
    if spec.outputs is not None:
        if len(spec.outputs) != len(new_out):
            problems.append((name, op, f"customize_dtypes ({spec.where}) gives {len(spec.outputs)} output dtype(s), "
                             f"the node has {len(new_out)} output(s)"))
        else:
            for k, (x, s) in enumerate(zip(new_out, spec.outputs)):
                if not dtypes.is_float(x) and s != x:
                    problems.append((name, op, f"customize_dtypes ({spec.where}): output {k} is {x}, not a float tensor"))
            new_out = tuple(spec.outputs)
    if info is not None and info.declares_dtypes:
        for s in (spec.inputs or ()) + (spec.outputs or ()):
            if dtypes.is_float(s) and not info.supports(s):
                problems.append((name, op, f"customize_dtypes ({spec.where}) asks for {s} but the library has no {s} "
                                 f"kernel (supports: {info.describe_dtypes()})"))
                break
    return want_in, new_out, why


def _problem_message(mode: str, library: Library, problems: list[tuple[str, str, str]]) -> str:
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
