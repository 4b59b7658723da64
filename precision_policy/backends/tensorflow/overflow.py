"""Overflow localization and value-range statistics for TensorFlow graphs.

:func:`find_overflow` runs the float32 graph and its converted graph on the same feeds, fetching
every float output of every node, and names the first node (in topological order: the forward
ops, then the ``gradients/`` ops of a training graph built with ``tf.gradients``) whose output is
non-finite in the converted graph while float32 kept it finite. :func:`range_stats` measures
each node's float32 output range over a list of feeds against the mode's low dtype and suggests
``keep_dtype`` lines (node names).

Example:
    >>> import numpy as np, tensorflow as tf, precision_policy as pp
    >>> from precision_policy.tensorflow import find_overflow
    >>> g = tf.Graph()
    >>> with g.as_default():
    ...     x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
    ...     y = tf.nn.relu(tf.matmul(x, tf.fill([4, 4], 3e4), name="mm"), name="y")
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="tf_amp_fp16")
    >>> report = find_overflow(g.as_graph_def(), {"x": np.ones((2, 4), np.float32)}, cfg, fetches=["y"])
    >>> report.name, report.phase, report.reference.max_abs
    ('mm', 'forward', 120000.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from precision_policy.audit import OverflowReport, RangeResult, RangeRow, TensorStats
from precision_policy.backends.tensorflow.audit import (
    _SOURCES,
    audited,
    computing_node,
    convert,
    feed_dict,
    import_graph,
    load,
    random_feeds,
)
from precision_policy.config import RunConfig
from precision_policy.plan import CastPlan
from precision_policy.rules import Rule


def _low(config: RunConfig | None, plan: CastPlan) -> str:
    if config is not None and config.mode.low in ("float16", "bfloat16"):
        return config.mode.low
    lows = {d.dtype for d in plan if d.dtype in ("float16", "bfloat16")}
    return "bfloat16" if lows == {"bfloat16"} else "float16"


def topo_order(gd: graph_pb2.GraphDef) -> list[str]:
    """Node names in topological order (stable: GraphDef order among ready nodes)."""
    names = [n.name for n in gd.node]
    deps = {n.name: {i.split(":")[0].lstrip("^") for i in n.input} & set(names) for n in gd.node}
    readers: dict[str, list[str]] = {}
    for n, ds in deps.items():
        for d in ds:
            readers.setdefault(d, []).append(n)
    waiting = {n: len(ds) for n, ds in deps.items()}
    ready = [n for n in names if waiting[n] == 0]
    order: list[str] = []
    pos = {n: k for k, n in enumerate(names)}
    while ready:
        n = ready.pop(0)
        order.append(n)
        for r in sorted(readers.get(n, []), key=pos.__getitem__):
            waiting[r] -= 1
            if waiting[r] == 0:
                ready.append(r)
    return order + [n for n in names if n not in set(order)]


def _float_outputs(g: tf.Graph, names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        try:
            op = g.get_operation_by_name(name)
        except KeyError:
            continue
        if op.type in _SOURCES or op.type in ("Enter", "Exit", "NextIteration", "Switch", "Merge"):
            continue
        if op.outputs and op.outputs[0].dtype.is_floating and op.outputs[0].dtype.base_dtype == op.outputs[0].dtype:
            out.append(op.outputs[0].name)
    return out


def _fetch_all(gd: graph_pb2.GraphDef, feeds: Mapping[str, Any], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Every float node output (port 0) of ``names`` as numpy arrays, in one run."""
    g = import_graph(gd)
    tensors = _float_outputs(g, names)
    feeds = feed_dict(feeds)
    tensors = [t for t in tensors if t not in feeds]
    with tf.compat.v1.Session(graph=g) as sess:
        try:
            values = sess.run(tensors, feeds)
        except (tf.errors.OpError, ValueError, TypeError):
            # a tensor that cannot be fetched (inside a while-loop frame, not fetchable): one by one, skipping those
            out = {}
            for t in tensors:
                try:
                    out[t.split(":")[0]] = np.asarray(sess.run(t, feeds))
                except (tf.errors.OpError, ValueError, TypeError):
                    continue
            return out
    return {t.split(":")[0]: np.asarray(v) for t, v in zip(tensors, values)}


def _inputs_max(gd_by_name: Mapping[str, Any], node: str, values: Mapping[str, np.ndarray], feeds: Mapping[str, Any]) -> float | None:
    n = gd_by_name.get(node)
    if n is None:
        return None
    best = None
    fed = {k.split(":")[0]: v for k, v in feeds.items()}
    for ref in n.input:
        if ref.startswith("^"):
            continue
        src = ref.split(":")[0]
        v = values.get(src)
        if v is None:
            v = fed.get(src)
        if v is None:
            src_node = gd_by_name.get(src)
            if src_node is not None and src_node.op == "Const":
                v = tf.make_ndarray(src_node.attr["value"].tensor)
        if v is None:
            continue
        arr = np.asarray(v)
        if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
            continue
        a = np.abs(arr.astype(np.float64))
        a = a[np.isfinite(a)]
        m = float(a.max()) if a.size else 0.0
        best = m if best is None else max(best, m)
    return best


def find_overflow(graph: graph_pb2.GraphDef | str | Path, feeds: Mapping[str, Any] | None = None,
                  config: RunConfig | None = None, *, fetches: Sequence[str] | None = None, plan: CastPlan | None = None,
                  converted: graph_pb2.GraphDef | None = None, seed: int = 0, context: int = 3) -> OverflowReport:
    """The first node, forward then backward, whose output is non-finite in the converted graph but finite in float32.

    ``graph`` is the float32 GraphDef (or a .pb/.pbtxt/SavedModel path); it is converted under
    ``config`` unless ``converted`` and its ``plan`` are given. ``feeds``: placeholder name ->
    value (None: seeded random values). Nodes under a ``gradients`` scope (``tf.gradients``) count
    as the backward (with every node that reads from them) and come after every forward node.
    """
    gd, names, _ = load(graph, fetches)
    if converted is None:
        converted, plan = convert(gd, config, names, plan)
    elif plan is None:
        raise ValueError("converted= needs the plan it was converted with (plan=)")
    assert plan is not None
    if feeds is None:
        feeds = random_feeds(gd, seed=seed)
    dtype = _low(config, plan)
    by_name = {n.name: n for n in converted.node}
    order = topo_order(gd)
    grads = _backward_nodes(gd)
    forward = [n for n in order if n not in grads]
    backward = [n for n in order if n in grads]
    decided = {d.name: d for d in audited(plan)}
    mapped = {n: computing_node(n, plan, by_name) for n in order if n in decided}
    ref = _fetch_all(gd, feeds, order)
    low = _fetch_all(converted, feeds, [m for m in mapped.values() if m] + [n.name for n in converted.node])
    both_bad = []
    seen: list[str] = []
    for phase, names_ in (("forward", forward), ("backward", backward)):
        for k, name in enumerate(names_):
            node = mapped.get(name)
            if node is None or node not in low or name not in ref:
                continue
            value = low.get(f"{node}/Round", low[node])  # emulated float16: the output rounded to float16
            s = TensorStats.of(value, dtype)
            if s.finite:
                seen.append(name)
                continue
            r = TensorStats.of(ref[name], dtype)
            if not r.finite:
                both_bad.append(name)
                seen.append(name)
                continue
            d = decided[name]
            return OverflowReport(True, phase, name, d.op_type, k, d.dtype, dtype, _inputs_max(by_name, node, low, feeds),
                                  s, r, context=seen[-context:] if context else [])
    reason = (f"non-finite values in float32 too (first: {both_bad[0]}): the model itself overflows" if both_bad
              else "every node's output stayed finite in the converted graph")
    return OverflowReport(False, dtype=dtype, reason=reason)


def _is_grad(name: str) -> bool:
    return name.startswith("gradients/") or "/gradients/" in name or name.startswith("gradients_")


def _backward_nodes(gd: graph_pb2.GraphDef) -> set[str]:
    """Nodes of ``tf.gradients`` scopes and every node that reads (transitively) from one: the backward."""
    readers: dict[str, list[str]] = {}
    for n in gd.node:
        for ref in n.input:
            readers.setdefault(ref.split(":")[0].lstrip("^"), []).append(n.name)
    todo = [n.name for n in gd.node if _is_grad(n.name)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += readers.get(name, [])
    return seen


def range_stats(graph: graph_pb2.GraphDef | str | Path, feeds_list: Sequence[Mapping[str, Any]] | None, config: RunConfig, *,
                fetches: Sequence[str] | None = None, seed: int = 0) -> RangeResult:
    """Every planned node's float32 output range over ``feeds_list`` against ``config``'s low dtype.

    ``feeds_list``: one feeds dict per batch (None: one batch of seeded random feeds). Nodes the
    plan lowers whose values leave the low dtype's range get a ``keep_dtype: NODE`` suggestion.
    """
    gd, names, source = load(graph, fetches)
    _, plan = convert(gd, config, names, None)
    dtype = _low(config, plan)
    batches = list(feeds_list) if feeds_list is not None else [random_feeds(gd, seed=seed)]
    if not batches:
        raise ValueError("range_stats needs at least one feeds dict")
    decided = [d for d in audited(plan)]
    by_name = {n.name: n for n in gd.node}
    rows: dict[str, RangeRow] = {}
    for feeds in batches:
        values = _fetch_all(gd, feeds, [d.name for d in decided] + [n.name for n in gd.node])
        for d in decided:
            v = values.get(d.name)
            if v is None:
                continue
            inp = _inputs_max(by_name, d.name, values, feeds)
            row = rows.get(d.name)
            if row is None:
                rows[d.name] = RangeRow(d.name, d.op_type, d.dtype, dtype, TensorStats.of(v, dtype), inp,
                                        d.rule is Rule.GRAY_FOLLOWS)
            else:
                row.stats.add(v)
                if inp is not None:
                    row.input_max_abs = max(row.input_max_abs or 0.0, inp)
    return RangeResult(list(rows.values()), dtype, len(batches), f"tensorflow {tf.__version__}, {source}")


__all__ = ["find_overflow", "range_stats", "topo_order"]
