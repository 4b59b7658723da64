"""The planner: decide every node of a graph under a precision mode and place the casts.

:func:`plan` runs six passes over the graph, in this order (``log.debug`` narrates each):

1. **Sources and constants.** Graph inputs, constants and variables are sources; a
   pass-through read of a source (``W/read``) is that source; a computation fed only by
   constants (a folded batch-norm scale) is a constant. Sources never vote for gray ops and
   their casts are constant casts (done once ahead of time) or variable casts (after a read).
2. **Decide, in topological order.** Each node is decided by the shared
   :class:`~precision_policy.modes.decider.NodeDecider` (overrides, then the mode), from the
   dtypes its inputs now arrive in; the casts its inputs need are recorded, one per
   (tensor, dtype), shared by every consumer. Control-flow frame ops carry what they are
   given; list/array ops keep the dtype of their handle.
3. **Look-ahead** (mixed modes, static graphs). A gray op whose every reader needs the low
   dtype runs low when that adds no cast: the cast moves before it (TF paints clear ops
   between allow ops the same way).
4. **Absorb into existing casts.** A ``Cast`` written in the model writes the dtype all its
   consumers need instead of getting a cast after it; a Cast that no longer converts is an
   identity.
5. **Fetch casts.** Fetched tensors keep their origin dtype.
6. **Assemble** the :class:`~precision_policy.plan.CastPlan`.

Graphs with TF v1 loops or list/array handles are planned again until the loop variables'
and handles' dtypes agree (:class:`~precision_policy.modes.loops.Loops`).

Example:
    >>> from precision_policy import modes
    >>> from precision_policy.graph import OpGraph
    >>> from precision_policy.modes.planner import plan
    >>> from precision_policy.opinfo.library import load_library
    >>> g = OpGraph.from_dict({"nodes": [
    ...     {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
    ...     {"name": "w", "op": "Const", "outputs": ["float32"]},
    ...     {"name": "mm", "op": "MatMulV2", "inputs": ["x:0", "w:0"], "outputs": ["float32"]},
    ...     {"name": "relu", "op": "Relu", "inputs": ["mm:0"], "outputs": ["float32"]}], "outputs": ["relu:0"]})
    >>> p = plan(modes.get("allow_mix_precision"), g, load_library("ascend910"))
    >>> [(d.name, d.dtype, d.rule.value, d.followed) for d in p][2:]
    [('mm', 'float16', 'white', None), ('relu', 'float16', 'gray_follows', 'mm')]
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from precision_policy import dtypes
from precision_policy.errors import PrecisionError
from precision_policy.graph import OpGraph
from precision_policy.modes.decider import VARIABLE, NodeDecider, problem_message, tensor_dtypes
from precision_policy.modes.loops import Loops, control_flow_dtype
from precision_policy.opinfo.library import Library
from precision_policy.opinfo.overrides import Overrides
from precision_policy.optypes import (
    BACK_EDGE_OPS,
    CONTROL_FLOW_OPS,
    DATA_MOVEMENT_OPS,
    ENTER_OPS,
    HANDLE_TYPED_PREFIXES,
    PASSTHROUGH_OPS,
    SOURCE_KINDS,
    VALUE_PRESERVING_OPS,
)
from precision_policy.plan import Cast, CastPlan
from precision_policy.rules import Rule, Why

if TYPE_CHECKING:
    from precision_policy.graph import Resolved
    from precision_policy.modes.base import PrecisionMode

log = logging.getLogger(__name__)

_is_float = dtypes.FLOAT_DTYPES.__contains__

#: A cast's key: (producer index, output port, target dtype).
CastKey = tuple[int, int, str]

_NO_FLOAT_WHY = Why(Rule.NO_FLOAT_TENSORS)

# a node's role, found in pass 1: how pass 2 decides it
_COMPUTES, _SOURCE, _NO_FLOAT, _FRAME, _READS_SOURCE = range(5)


def plan(
    mode: PrecisionMode,
    graph: OpGraph,
    library: Library,
    overrides: Overrides | None = None,
    *,
    keep_output_dtype: bool = True,
    config_summary: dict | None = None,
    gray_disagreement: str = "widest",
) -> CastPlan:
    """Decide every node's dtype under ``mode`` and place the casts (see the module docstring)."""
    was_enabled = gc.isenabled()
    gc.disable()  # the planner allocates millions of small tuples; generational GC would rescan them all
    try:
        loops = Loops.of(graph, mode.low, gray_disagreement == "low")
        while True:
            result = _Planning(mode, graph, library, overrides, keep_output_dtype, gray_disagreement, loops).run(
                config_summary)
            if loops is None or not loops.update(result.out_dtypes, result.dtype, result.in_dtypes):
                return result
            log.debug("%s: loop variables or list handles changed dtype; planning again", graph.name)
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class _Planning:
    """One planning of one graph: the per-node columns the passes fill in, and the casts."""

    mode: PrecisionMode
    graph: OpGraph
    library: Library
    overrides: Overrides | None
    keep_output_dtype: bool
    gray_disagreement: str
    loops: Loops | None
    casts: dict[CastKey, Cast] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.graph
        self.ov = self.overrides or Overrides()
        self.res: Resolved = g.resolve()
        self.names, self.ops, self.outs = g.names, g.op_types, g.output_dtypes
        n = len(self.names)
        self.origin: list[str | None] = [None] * n
        self.dtype: list[str | None] = [None] * n
        self.out_dt: list[tuple[str, ...]] = list(self.outs)
        self.in_dt: list[tuple[str, ...]] = [()] * n
        self.why: list[Why] = [_NO_FLOAT_WHY] * n  # why each node computes in its dtype (rule and facts)
        self.src: list[str | None] = [None] * n  # "input" | "const" | "variable" | None (computes)
        self.scalar_vars: set[int] = set()
        self.role: list[int] = [_COMPUTES] * n  # how pass 2 decides each node (pass 1 finds it)
        self.variables_vote: bool = getattr(g, "variables_vote", False)
        self.cast_nodes: list[int] = []
        self.identity: set[int] = set()
        self.decider = NodeDecider(self.mode, self.library, self.ov, gray_disagreement=self.gray_disagreement)
        self.fetched = self.res.is_fetch if self.keep_output_dtype else set()

    # ------------------------------------------------------------------ driver
    def run(self, config_summary: dict | None) -> CastPlan:
        name, mode = self.graph.name, self.mode.name
        log.debug("%s: pass 1, sources and constants (%d nodes)", name, len(self.names))
        self.find_sources()
        log.debug("%s: pass 2, deciding each node in topological order under %s", name, mode)
        self.decide_all()
        if self.decider.problems:
            raise PrecisionError(problem_message(mode, self.library, self.decider.problems), self.decider.problems)
        if self.mode.mixed and self.graph.lookahead:
            log.debug("%s: pass 3, look-ahead: gray ops take their readers' low dtype where no cast is added", name)
            self.look_ahead()
        if self.cast_nodes:
            log.debug("%s: pass 4, %d existing Cast op(s) absorb the casts after them", name, len(self.cast_nodes))
            self.absorb_into_casts()
        if self.keep_output_dtype:
            log.debug("%s: pass 5, fetched tensors keep their origin dtype", name)
            self.fetch_casts()
        log.debug("%s: pass 6, %d cast(s) placed", name, len(self.casts))
        return self.assemble(config_summary)

    # ------------------------------------------------------------------ pass 1
    def origin_of(self, i: int) -> str | None:
        """The node's origin dtype: its first float output, else its first float input."""
        for d in self.outs[i]:
            if _is_float(d):
                return d
        for j, p in self.res.data_inputs[i]:
            d = self.outs[j][p]
            if _is_float(d):
                return d
        return None

    def is_frame_op(self, i: int) -> bool:
        """Control-flow frame ops and list/array ops: they carry values; pass 2 decides them apart."""
        op, ins = self.ops[i], self.res.data_inputs[i]
        return op.startswith(HANDLE_TYPED_PREFIXES) or (
            op in CONTROL_FLOW_OPS and not (op in ENTER_OPS and self.src[ins[0][0]] is not None))

    def reads_source(self, i: int) -> bool:
        """A pass-through (or loop ``Enter``) of a source; a kept read is decided (and kept) like any op."""
        op, ins = self.ops[i], self.res.data_inputs[i]
        return ((op in PASSTHROUGH_OPS or op in ENTER_OPS) and len(ins) == 1 and self.src[ins[0][0]] is not None
                and self.names[i] not in self.ov.keep_names)

    def find_sources(self) -> None:
        src, ops, outs, ins_of = self.src, self.ops, self.outs, self.res.data_inputs
        role, origin = self.role, self.origin
        special = CONTROL_FLOW_OPS | PASSTHROUGH_OPS | ENTER_OPS  # (and list/array ops) may be frame ops or reads
        for i in self.res.order:
            op, ins = ops[i], ins_of[i]
            kind = SOURCE_KINDS.get(op)
            if kind is not None:
                src[i] = kind
                role[i] = _SOURCE
                # 0-dim variables (attrs rank 0) never vote: torch's promotion lets a dimensioned tensor win
                if self.variables_vote and kind == "variable" and self.graph.node(self.names[i]).attrs.get("rank") == 0:
                    self.scalar_vars.add(i)
                continue
            org = next((d for d in outs[i] if _is_float(d)), None)
            if org is None:
                org = self.origin_of(i)  # no float output: its first float input
            origin[i] = org
            if org is None:
                role[i] = _NO_FLOAT
            elif (op in special or op.startswith(HANDLE_TYPED_PREFIXES)) and self.is_frame_op(i):
                role[i] = _FRAME
            elif op in special and self.reads_source(i):
                role[i] = _READS_SOURCE
                j = ins[0][0]
                src[i] = src[j]
                if j in self.scalar_vars:
                    self.scalar_vars.add(i)
            elif ins and src[ins[0][0]] == "const" and all(src[j] == "const" for j, _ in ins):
                # computed from constants only (a folded batch-norm scale, say): a constant too,
                # so it does not vote for its readers, and casting it is a constant's cast
                src[i] = "const"

    # ------------------------------------------------------------------ pass 2
    def decide_all(self) -> None:
        """Decide each node from the dtypes its inputs now arrive in; record the casts its inputs need."""
        names, ops, outs, ins_of, role, src = self.names, self.ops, self.outs, self.res.data_inputs, self.role, self.src
        origin, dtype, in_dt, out_dt = self.origin, self.dtype, self.in_dt, self.out_dt
        whys, casts = self.why, self.casts
        decide = self.decider.decide_node
        variables_vote, scalar_vars = self.variables_vote, self.scalar_vars
        for i in self.res.order:
            ins = ins_of[i]
            actual_in = tuple([out_dt[j][p] for j, p in ins])
            if role[i] != _COMPUTES:
                self.decide_carrier(i, actual_in)
                continue
            # computing producers and graph inputs vote for a gray op; constants and variables are cast
            voters = tuple([True if src[j] is None or src[j] == "input"
                            else (VARIABLE if variables_vote and src[j] == "variable" and j not in scalar_vars
                                  else False) for j, _ in ins])
            org = origin[i]
            assert org is not None  # role _COMPUTES: the node has float tensors, so an origin
            d, why, want_in, new_out = decide(names[i], ops[i], org, actual_in, voters, outs[i], ins, names)
            if why.rule is Rule.EXISTING_CAST:
                self.cast_nodes.append(i)
            dtype[i], in_dt[i], out_dt[i], whys[i] = d, want_in, new_out, why
            if want_in != actual_in:
                for m, (j, p) in enumerate(ins):
                    a, w = actual_in[m], want_in[m]
                    if a != w and _is_float(a) and _is_float(w):
                        c = casts.get((j, p, w))
                        if c is None:
                            c = casts[(j, p, w)] = Cast(j, p, a, w, src[j] or "op", [], False)
                        if not c.consumers or c.consumers[-1] != i:  # an op reading x twice is one consumer
                            c.consumers.append(i)

    def decide_carrier(self, i: int, actual_in: tuple[str, ...]) -> None:
        """Nodes that carry values rather than compute: sources, reads of them, frame ops, no-float ops."""
        r = self.role[i]
        if r == _SOURCE:
            self.in_dt[i] = actual_in
            self.why[i] = Why(Rule.SOURCE, detail=self.src[i] or "")
            for d in self.outs[i]:
                if _is_float(d):
                    self.origin[i] = self.dtype[i] = d
                    break
        elif r == _NO_FLOAT:
            self.decide_no_float(i, actual_in)
        elif r == _FRAME:
            self.decide_frame_op(i, actual_in)
        else:  # _READS_SOURCE: the source's dtype, as it arrives
            j = self.res.data_inputs[i][0][0]
            read = actual_in[0] if _is_float(actual_in[0]) else self.origin[i]
            assert read is not None  # role _READS_SOURCE is given to nodes with a float origin only
            self.dtype[i], self.in_dt[i] = read, actual_in
            o = self.outs[i]
            if o and _is_float(o[0]):
                self.out_dt[i] = (read,) + o[1:]
            self.why[i] = Why(Rule.READS_SOURCE, followed=self.names[j], detail=self.src[j] or "")

    def decide_no_float(self, i: int, actual_in: tuple[str, ...]) -> None:
        self.in_dt[i] = actual_in
        tied = self.ops[i].startswith(HANDLE_TYPED_PREFIXES)
        group_dtype = self.loops.tied_dtype(i) if tied and self.loops is not None else None
        if group_dtype is not None:  # creates the list (TensorListReserve): its element dtype
            self.origin[i], self.dtype[i] = group_dtype
            self.why[i] = Why(Rule.HANDLE_TIED, detail="created")
        else:
            self.why[i] = _NO_FLOAT_WHY

    def decide_frame_op(self, i: int, actual_in: tuple[str, ...]) -> None:
        op, org, ins = self.ops[i], self.origin[i], self.res.data_inputs[i]
        assert org is not None
        tied = op.startswith(HANDLE_TYPED_PREFIXES)
        group_dtype = self.loops.tied_dtype(i) if tied and self.loops is not None else None
        if group_dtype is not None:
            d, why = group_dtype[1], Why(Rule.HANDLE_TIED, detail="readers")
        elif tied:
            d, why = org, Why(Rule.HANDLE_TIED, detail="around")
        else:
            d, why = control_flow_dtype(i, op, org, ins, actual_in, self.ops, self.names, self.src,
                                        self.dtype, self.loops, self.decider.prefer_low)
        self.dtype[i] = d
        self.in_dt[i] = tuple([d if _is_float(a) else a for a in actual_in])
        self.out_dt[i] = tuple([d if _is_float(x) else x for x in self.outs[i]])
        self.why[i] = why
        for m, (j, p) in enumerate(ins):
            a, w = actual_in[m], self.in_dt[i][m]
            if a != w and _is_float(a) and self.ops[j] not in BACK_EDGE_OPS:
                self.add_cast(j, p, a, w, i)

    def add_cast(self, j: int, p: int, a: str, w: str, consumer: int) -> None:
        """Node ``consumer`` reads tensor ``j:p`` (produced in ``a``) in ``w``: one cast per (tensor, dtype)."""
        c = self.casts.get((j, p, w))
        if c is None:
            c = self.casts[(j, p, w)] = Cast(j, p, a, w, self.src[j] or "op", [], False)
        if not c.consumers or c.consumers[-1] != consumer:  # an op reading x twice is one consumer
            c.consumers.append(consumer)

    # ------------------------------------------------------------------ pass 3
    def look_ahead(self) -> None:
        """A gray op whose every reader wants ``low`` runs in ``low`` when that adds no cast.

        The "follows its producer" rule can leave a gray op in float32 between a black op and a
        white one (Exp -> Relu -> MatMul): the cast then sits after the gray op. Running the gray
        op in ``low`` instead moves that cast before it — no extra cast, one more op in low
        precision, as TensorFlow's AMP does for clear/infer ops between allow ops. Applied from the
        outputs backwards, so whole gray chains move. Only ops that rearrange or select values
        (:data:`~precision_policy.optypes.DATA_MOVEMENT_OPS`, ``VALUE_PRESERVING_OPS``) and
        reads of sources move: arithmetic keeps the precision its rule gave it.
        """
        low, ops, whys, dtype = self.mode.low, self.ops, self.why, self.dtype
        src, casts, out_dt, in_dt, res = self.src, self.casts, self.out_dt, self.in_dt, self.res
        cand = {
            i for i, d in enumerate(dtype)
            if d is not None and d != low and ops[i] != "Cast"
            and ((whys[i].rule is Rule.GRAY_FOLLOWS and (ops[i] in DATA_MOVEMENT_OPS or ops[i] in VALUE_PRESERVING_OPS))
                 or whys[i].rule is Rule.READS_SOURCE
                 or (whys[i].rule is Rule.GRAY_UNFED and ops[i] in DATA_MOVEMENT_OPS))
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
        moved = 0
        for i in reversed(res.order):
            if i not in cand:
                continue
            info = self.library.get(ops[i])
            if info is None or not info.supports(low):
                continue
            outs = out_dt[i]
            removed = []
            ok = True
            for p, d in enumerate(outs):
                if not _is_float(d):
                    continue
                n_read = readers.get((i, p), 0)
                if (i, p) in self.fetched:
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
            for j, p in ins:
                a = out_dt[j][p]
                if _is_float(a) and a != low and (j, p, low) not in casts and (src[j] or "op") in counted:
                    added += 1
            if added > len(removed):
                continue
            actual = tuple([out_dt[j][p] for j, p in ins])
            key = (ops[i], outs, actual)
            io = io_cache.get(key)
            if io is None:
                io = io_cache[key] = tensor_dtypes(info, low, outs, actual)
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
                if _is_float(a) and _is_float(new_w) and a != new_w:
                    c = casts.get((j, p, new_w))
                    if c is None:
                        c = casts[(j, p, new_w)] = Cast(j, p, a, new_w, src[j] or "op", [], False)
                    if i not in c.consumers:
                        c.consumers.append(i)
            for key3 in removed:
                del casts[key3]
            dtype[i] = low
            in_dt[i] = new_in
            out_dt[i] = new_out
            moved += 1
            if whys[i].rule is Rule.READS_SOURCE:  # still a read of its source, now in low: the rule stays
                whys[i] = whys[i]._replace(wanted=(low,))
            else:
                whys[i] = Why(Rule.GRAY_LOOKAHEAD, where=whys[i].where)
        log.debug("%s: look-ahead moved %d of %d candidate op(s) to %s", self.graph.name, moved, len(cand), low)

    # ------------------------------------------------------------------ pass 4
    def absorb_into_casts(self) -> None:
        """Let an existing Cast write the dtype all its consumers need, instead of adding a cast after it."""
        casts, out_dt, dtype = self.casts, self.out_dt, self.dtype
        candidates = set(self.cast_nodes)
        by_src: dict[int, list[CastKey]] = {}
        for key in casts:
            if key[0] in candidates and key[1] == 0:
                by_src.setdefault(key[0], []).append(key)
        if by_src:
            readers = dict.fromkeys(by_src, 0)
            for ins in self.res.data_inputs:
                for j, p in ins:
                    if p == 0 and j in readers:
                        readers[j] += 1
            for i, keys in by_src.items():
                if len(keys) != 1 or (i, 0) in self.fetched:
                    continue
                c = casts[keys[0]]
                if len(c.consumers) != readers[i]:
                    continue  # some consumer reads the Cast's own output dtype
                del casts[keys[0]]
                out_dt[i] = (c.to,) + out_dt[i][1:]
                dtype[i] = c.to
                self.why[i] = Why(Rule.EXISTING_CAST, detail="absorbed")
        for i in self.cast_nodes:
            a, w = self.in_dt[i][0], out_dt[i][0]
            if _is_float(a) and a == w:
                self.identity.add(i)  # (the plan says so in its reason)

    # ------------------------------------------------------------------ pass 5
    def fetch_casts(self) -> None:
        for j, p in self.res.fetches:
            a, w = self.out_dt[j][p], self.outs[j][p]
            if a != w and _is_float(a) and _is_float(w):
                c = self.casts.get((j, p, w))
                if c is None:
                    self.casts[(j, p, w)] = Cast(j, p, a, w, self.src[j] or "op", [], True)
                else:
                    c.for_fetch = True

    # ------------------------------------------------------------------ pass 6
    def assemble(self, config_summary: dict | None) -> CastPlan:
        warnings = self.decider.warnings
        if warnings:
            log.warning("%s: %d warning(s) while planning %r, e.g. %s (see CastPlan.warnings)",
                        self.mode.name, len(warnings), self.graph.name, warnings[0])
        return CastPlan(
            graph=self.graph,
            mode=self.mode,
            library=self.library,
            origin=self.origin,
            dtype=self.dtype,
            in_dtypes=self.in_dt,
            out_dtypes=self.out_dt,
            whys=self.why,
            casts=list(self.casts.values()),
            identity=self.identity,
            unknown=self.decider.unknown,
            warnings=warnings,
            keep_output_dtype=self.keep_output_dtype,
            config=config_summary or {},
        )


__all__ = ["plan"]
