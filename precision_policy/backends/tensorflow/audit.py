"""Runtime audit for TensorFlow graphs: the dtype every node *actually* executed with, against the plan.

:func:`audit` converts a GraphDef (or a frozen .pb/.pbtxt/SavedModel path) with the config (or
takes an already converted graph with its plan), runs it once in a ``tf.compat.v1.Session``
with ``RunOptions(trace_level=FULL_TRACE)`` and reads each executed node's output dtypes and
kernel from the step stats. Nodes grappler folded, fused or pruned do not run under their own
name: they are listed with no executed dtype. With ``onednn=True`` the graph runs once more in
a subprocess with ``ONEDNN_VERBOSE=1``: the oneDNN primitives that ran (kind, implementation,
data types) are listed, matched to MatMul nodes by shape, and a reference (``ref:``)
implementation is named as a fallback.

Example:
    >>> import numpy as np, tensorflow as tf, precision_policy as pp
    >>> from precision_policy.tensorflow import audit
    >>> g = tf.Graph()
    >>> with g.as_default():
    ...     x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
    ...     y = tf.nn.relu(tf.matmul(x, tf.ones([4, 4]), name="mm"), name="y")
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
    >>> result = audit(g.as_graph_def(), {"x": np.ones((2, 4), np.float32)}, cfg, fetches=["y"])
    >>> result["mm"].planned, result["mm"].executed, result.mismatches()
    ('bfloat16', 'bfloat16', [])
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from precision_policy.audit import EMULATED_NOTE, AuditResult, AuditRow, Kernel
from precision_policy.backends.tensorflow.convert import load_model, rewrite_with_plan
from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, GraphError
from precision_policy.plan import CastPlan
from precision_policy.rules import Rule

log = logging.getLogger(__name__)

_SOURCES = frozenset({"Placeholder", "PlaceholderWithDefault", "Const", "VariableV2", "VarHandleOp", "NoOp"})


# ---------------------------------------------------------------------- loading, feeds
def load(graph: graph_pb2.GraphDef | str | Path, fetches: Sequence[str] | None = None
         ) -> tuple[graph_pb2.GraphDef, list[str], str]:
    """(GraphDef, fetch node names, source) of a GraphDef or a .pb/.pbtxt/SavedModel path."""
    if isinstance(graph, (str, Path)):
        m = load_model(graph, all_signatures=False)
        gd, found, source = m.graph_def, list(m.fetches), str(graph)
        if any(n.op in ("VariableV2", "VarHandleOp") for n in gd.node):
            raise GraphError("the graph holds variables: give a frozen graph (.pb/.pbtxt) or a TF2 SavedModel", file=graph)
    elif isinstance(graph, graph_pb2.GraphDef):
        gd, found, source = graph, [], "GraphDef"
    else:
        raise ConfigError(f"expected a GraphDef or a path to a .pb/.pbtxt/SavedModel, got {type(graph).__name__}")
    names = list(fetches) if fetches else found
    if not names:
        consumed = {i.split(":")[0].lstrip("^") for n in gd.node for i in n.input}
        names = [n.name for n in gd.node if n.name not in consumed and n.op not in _SOURCES]
    return gd, [f.split(":")[0] for f in names], source


def placeholders(gd: graph_pb2.GraphDef) -> list[tuple[str, Any, list[int] | None]]:
    """(name, tf dtype, shape with -1 for unknown dims, or None for unknown rank) of every Placeholder."""
    out = []
    for n in gd.node:
        if n.op != "Placeholder":
            continue
        dtype = tf.dtypes.as_dtype(n.attr["dtype"].type)
        shape = n.attr["shape"].shape if "shape" in n.attr else None
        dims = None if shape is None or shape.unknown_rank else [d.size for d in shape.dim]
        out.append((n.name, dtype, dims))
    return out


def random_feeds(gd: graph_pb2.GraphDef, *, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None,
                 batch: int = 2) -> dict[str, np.ndarray]:
    """Seeded random values for every placeholder (unknown dims: ``batch``; ``shapes`` overrides by name)."""
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    feeds = {}
    known = {name for name, _, _ in placeholders(gd)}
    for name in shapes:
        if name not in known:
            raise ConfigError(f"--feed {name}: no placeholder of that name; placeholders: {', '.join(sorted(known)) or 'none'}")
    for name, dtype, dims in placeholders(gd):
        if name in shapes:
            shape = tuple(int(d) for d in shapes[name])
        elif dims is None:
            raise ConfigError(f"placeholder {name!r} has an unknown rank: give its shape (--feed {name}=2,8)")
        else:
            shape = tuple(batch if d < 0 else d for d in dims)
        if dtype.is_floating:
            value = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_bool:
            value = rng.integers(0, 2, shape).astype(bool)
        elif dtype.is_integer:
            value = rng.integers(0, 8, shape).astype(dtype.as_numpy_dtype)
        else:
            raise ConfigError(f"placeholder {name!r} has dtype {dtype.name}: give its value in feeds")
        feeds[name] = value
    return feeds


def feed_dict(feeds: Mapping[str, Any]) -> dict[str, Any]:
    return {(k if ":" in k else f"{k}:0"): v for k, v in feeds.items()}


def import_graph(gd: graph_pb2.GraphDef) -> tf.Graph:
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(gd, name="")
    return g


def convert(gd: graph_pb2.GraphDef, config: RunConfig | None, fetches: list[str], plan: CastPlan | None
            ) -> tuple[graph_pb2.GraphDef, CastPlan]:
    """The converted graph and its plan (``plan`` given: ``gd`` is already converted with it)."""
    if plan is not None:
        return gd, plan
    if config is None:
        raise ConfigError("give the config to convert the graph with, or an already converted graph with its plan=")
    return rewrite_with_plan(gd, config, fetches)


def computing_node(name: str, plan: CastPlan, by_name: Mapping[str, Any]) -> str | None:
    """The converted graph's node that computes plan node ``name``: itself, or the node a fetched
    output moved to (``out/bfloat16``) when a Cast back to the fetched dtype took its name."""
    node = by_name.get(name)
    if node is None:
        return None
    if node.op == "Cast" and plan[name].op_type != "Cast" and node.input:
        src = node.input[0].split(":")[0]
        if src.startswith(name + "/") and src in by_name:
            return src
    return name


def audited(plan: CastPlan) -> list[Any]:
    """The plan's decisions worth auditing: computing nodes with a float dtype (not sources)."""
    return [d for d in plan if d.dtype is not None and d.rule is not Rule.SOURCE and d.op_type not in _SOURCES]


# ---------------------------------------------------------------------- oneDNN verbose
_DT = re.compile(r"^(src|wei|dst|bia|diff_src|diff_dst|diff_wei)[_:]([a-z0-9]+)")


def parse_onednn(text: str) -> list[Kernel]:
    """The oneDNN primitives executed, from ``ONEDNN_VERBOSE`` output (v1 and v0 line formats)."""
    out = []
    for line in text.splitlines():
        if not line.startswith("onednn_verbose") and not line.startswith("dnnl_verbose"):
            continue
        f = line.split(",")
        if "exec" not in f:
            continue
        i = f.index("exec")
        if len(f) < i + 6 or f[i + 1] != "cpu":
            continue
        kind, impl, mds = f[i + 2], f[i + 3], f[i + 5]
        dts: dict[str, str] = {}
        for md in mds.split():
            m = _DT.match(md)
            if m:
                dts.setdefault(m.group(1), m.group(2))
        shape = f[-2] if len(f) >= 2 else ""
        out.append(Kernel(kind, impl, dts, shape, line))
    return out


_RUNNER = r"""
import sys, numpy as np, tensorflow as tf
gd = tf.compat.v1.GraphDef(); gd.ParseFromString(open(sys.argv[1], "rb").read())
feeds = dict(np.load(sys.argv[2]))
g = tf.Graph()
with g.as_default():
    tf.graph_util.import_graph_def(gd, name="")
with tf.compat.v1.Session(graph=g) as s:
    sys.stdout.flush()
    print("onednn_verbose,precision_policy,start", flush=True)
    s.run(sys.argv[3].split(","), {k.replace("__", "/"): v for k, v in feeds.items()})
    print("onednn_verbose,precision_policy,end", flush=True)
"""


def onednn_kernels(gd: graph_pb2.GraphDef, feeds: Mapping[str, Any], fetches: Sequence[str], *,
                   timeout: float = 300) -> tuple[list[Kernel], str]:
    """Run ``gd`` once in a subprocess with ``ONEDNN_VERBOSE=1``; (kernels, note)."""
    with tempfile.TemporaryDirectory() as tmp:
        pb, npz = Path(tmp) / "g.pb", Path(tmp) / "feeds.npz"
        pb.write_bytes(gd.SerializeToString())
        arrays: dict[str, Any] = {k.replace("/", "__"): np.asarray(v) for k, v in feed_dict(feeds).items()}
        np.savez(npz, **arrays)
        env = dict(os.environ, ONEDNN_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="2")
        try:
            proc = subprocess.run([sys.executable, "-c", _RUNNER, str(pb), str(npz), ",".join(f"{f}:0" for f in fetches)],
                                  env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return [], f"oneDNN verbose run timed out after {timeout:.0f} s"
    text = proc.stdout
    if proc.returncode != 0:
        return [], f"oneDNN verbose run failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
    start, end = text.find("precision_policy,start"), text.find("precision_policy,end")
    if start >= 0 and end > start:
        text = text[start:end]
    kernels = parse_onednn(text)
    if not kernels:
        return [], "no oneDNN primitive ran (TF_ENABLE_ONEDNN_OPTS=0, or no op of this graph uses oneDNN)"
    return kernels, ""


_MATMUL_KINDS = ("matmul", "gemm_api", "inner_product")
_MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "_MklMatMul", "_FusedMatMul",
               "_MklFusedMatMul", "_MklNativeFusedMatMul", "_MklBatchMatMul", "_MklBatchMatMulV2")


def _matmul_out(shape: str) -> tuple[int, ...] | None:
    """'2x8:8x16' -> (2, 16): a matmul problem's output shape."""
    parts = shape.split(":")
    if len(parts) < 2:
        return None
    try:
        a = [int(d) for d in parts[0].split("x")]
        b = [int(d) for d in parts[1].split("x")]
    except ValueError:
        return None
    return (*a[:-1], b[-1])


# ---------------------------------------------------------------------- the audit
def run_traced(g: tf.Graph, feeds: Mapping[str, Any], fetches: Sequence[str]) -> Any:
    """Run ``fetches`` once with FULL_TRACE; the RunMetadata."""
    md = tf.compat.v1.RunMetadata()
    opts = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    with tf.compat.v1.Session(graph=g) as sess:
        sess.run([f"{f}:0" for f in fetches], feed_dict(feeds), options=opts, run_metadata=md)
    return md


def executed_nodes(md: Any) -> dict[str, tuple[tuple[str, ...], tuple[tuple[int, ...], ...], str]]:
    """node name -> (output dtypes, output shapes, kernel op) from a RunMetadata's step stats."""
    out = {}
    for dev in md.step_stats.dev_stats:
        for ns in dev.node_stats:
            outs = sorted(ns.output, key=lambda o: o.slot)
            dts = tuple(tf.dtypes.as_dtype(o.tensor_description.dtype).name for o in outs
                        if o.tensor_description.dtype)
            shapes = tuple(tuple(d.size for d in o.tensor_description.shape.dim) for o in outs)
            label = ns.timeline_label
            kernel = label.split("=", 1)[1].split("(", 1)[0].strip() if "=" in label else ""
            out[ns.node_name] = (dts, shapes, kernel)
    return out


def _canon(dt: str) -> str:
    return {"float": "float32", "half": "float16", "bfloat16": "bfloat16", "double": "float64"}.get(dt, dt)


def audit(graph: graph_pb2.GraphDef | str | Path, feeds: Mapping[str, Any] | None = None, config: RunConfig | None = None,
          *, fetches: Sequence[str] | None = None, plan: CastPlan | None = None, onednn: bool = False,
          seed: int = 0) -> AuditResult:
    """Convert ``graph`` under ``config`` (or take it as converted with ``plan``), run it once, compare.

    ``feeds``: placeholder name -> value (None: seeded random values of the placeholders' shapes
    and dtypes, unknown dims 2). ``fetches``: node names to run (default: the model's outputs).
    Returns an :class:`~precision_policy.audit.AuditResult`: per plan node its planned dtype, the
    dtype its output had when it ran (step stats), the kernel, and the mismatch in words.
    """
    gd, names, source = load(graph, fetches)
    converted, plan = convert(gd, config, names, plan)
    if feeds is None:
        feeds = random_feeds(converted, seed=seed)
    md = run_traced(import_graph(converted), feeds, names)
    ran = executed_nodes(md)
    by_name = {n.name: n for n in converted.node}
    kernels: list[Kernel] = []
    notes: list[str] = []
    if onednn:
        kernels, note = onednn_kernels(converted, feeds, names)
        if note:
            notes.append(note)
    free = [k for k in kernels if k.kind in _MATMUL_KINDS]
    rows = []
    for d in audited(plan):
        node = computing_node(d.name, plan, by_name)
        row = AuditRow(d.name, d.op_type, d.dtype, None)
        hit = ran.get(node) if node is not None else None
        if hit is None:
            row.note = ("not in the converted graph" if node is None
                        else "did not run under its name: grappler folded, fused or pruned it")
            rows.append(row)
            continue
        dts, shapes, kernel = hit
        floats = [_canon(t) for t in dts if _canon(t) in ("float16", "bfloat16", "float32", "float64")]
        row.executed = floats[0] if floats else None
        row.kernel = kernel or None
        if node != d.name:
            row.note = f"runs as {node} (its fetched output is cast back)"
        emulated = d.dtype == "float16" and plan.config.get("float16", "emulated") == "emulated"
        if emulated and row.executed == "float32":
            row.note = EMULATED_NOTE
            rounded = ran.get(f"{node}/Round")
            if rounded is None and f"{node}/Round" in by_name:
                row.note += "; its rounding to float16 did not run under its name"
        elif row.executed is not None and row.executed != d.dtype:
            row.mismatch = f"planned {d.dtype}, ran {row.executed}" + (f" (kernel {kernel})" if kernel else "")
        if free and kernel in _MATMUL_OPS and shapes:
            k = next((k for k in free if _matmul_out(k.shape) == shapes[0]), None)
            if k is not None:
                free.remove(k)
                row.kernel = f"{kernel} / onednn {k.kind}:{k.impl or '-'} " + " ".join(f"{a}_{t}" for a, t in k.dtypes.items())
                if k.reference:
                    row.mismatch = (row.mismatch + "; " if row.mismatch else "") + (
                        "kernel fell back to reference fp32 implementation" if k.compute == "float32"
                        else f"kernel fell back to the reference implementation ({k.impl})")
                elif k.compute and row.mismatch is None and k.compute != d.dtype and d.dtype in ("bfloat16", "float16"):
                    row.mismatch = f"planned {d.dtype}, oneDNN {k.kind} ran {k.compute} ({k.impl or 'gemm'})"
        rows.append(row)
    if any(k.reference for k in kernels):
        notes.append("some oneDNN primitives ran a reference implementation (ref:*): see the kernel list")
    src = f"tensorflow {tf.__version__}, {source}, {plan.config.get('precision_mode', '')}".rstrip(", ")
    return AuditResult(rows, src, kernels=kernels, notes=notes)


__all__ = ["audit", "convert", "load", "onednn_kernels", "parse_onednn", "placeholders", "random_feeds"]
