"""TensorFlow v1 while-loops and list/array handles: the planner's fixed point.

A loop variable must keep one dtype all round its loop, and every op sharing a list/array
handle must agree on the element dtype. :class:`Loops` finds both in a graph; the planner
plans, feeds the outcome back with :meth:`Loops.update`, and plans again until nothing moves.

Example:
    >>> from precision_policy.graph import OpGraph
    >>> g = OpGraph.from_dict({"nodes": [{"name": "x", "op": "Placeholder", "outputs": ["float32"]}],
    ...                        "outputs": ["x:0"]})
    >>> Loops.of(g) is None  # no loop, no list: planned once
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from precision_policy import dtypes
from precision_policy.graph import OpGraph
from precision_policy.optypes import (
    BACK_EDGE_OPS,
    CONTROL_FLOW_OPS,
    HANDLE_TYPED_PREFIXES,
    MERGE_OPS,
    PASSTHROUGH_OPS,
)
from precision_policy.rules import Rule, Why

F16 = dtypes.FLOAT16


class Loops:
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
    def of(cls, graph: OpGraph, low: str = F16, prefer_low: bool = False) -> Loops | None:
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
                for m, (j, _p) in enumerate(ins):
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
                if not floats or origin is None or origin == self.low:
                    continue
                low = floats.count(self.low)
                if low and (self.prefer_low or low == len(floats)):
                    self.group_hints[root] = (origin, self.low)
                    changed = True
        return changed


def control_flow_dtype(
    i: int,
    op: str,
    org: str,
    ins: Sequence[tuple[int, int]],
    actual_in: tuple[str, ...],
    ops: Sequence[str],
    names: Sequence[str],
    src: Sequence[str | None],
    dtype: Sequence[str | None],
    loops: Loops | None,
    prefer_low: bool,
) -> tuple[str, Why]:
    """Dtype and why of a control-flow frame op: it carries values, so it follows them."""
    is_float = dtypes.is_float
    if op in BACK_EDGE_OPS and loops is not None and i in loops.merge_of:
        merge = loops.merge_of[i]
        d = dtype[merge] or org
        return d, Why(Rule.CONTROL_FLOW, followed=names[merge], detail="loop_back")
    if op in MERGE_OPS and loops is not None and i in loops.hints:
        d = loops.hints[i]
        return d, Why(Rule.CONTROL_FLOW, detail="loop_merge")
    forward = [(m, j) for m, (j, _) in enumerate(ins) if ops[j] not in BACK_EDGE_OPS and is_float(actual_in[m])]
    voting = [(m, j) for m, j in forward if src[j] is None or src[j] == "input"] or forward
    if not voting:
        return org, Why(Rule.CONTROL_FLOW, detail="no_float_input")
    m0, j0 = voting[0]
    d = actual_in[m0]
    for m, j in voting[1:]:
        a = actual_in[m]
        if a != d and ((prefer_low and dtypes.rank(a) < dtypes.rank(d)) or
                       (not prefer_low and dtypes.rank(a) > dtypes.rank(d))):
            d, j0 = a, j
    return d, Why(Rule.CONTROL_FLOW, followed=names[j0])


__all__ = ["Loops", "control_flow_dtype"]
