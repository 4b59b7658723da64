"""Helpers for the TensorFlow tests: TF's own AMP pass, run through grappler, as the reference."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2  # noqa: E402
from tensorflow.python.grappler import tf_optimizer  # noqa: E402

BF16 = 14  # types_pb2.DT_BFLOAT16


def grappler_bf16_pass(graph_def: tf.compat.v1.GraphDef, fetches: list[str]):
    """A callable running TF's auto_mixed_precision_onednn_bfloat16 pass alone on ``graph_def``.

    The meta graph is prepared here, so timing the callable times only grappler's pass.
    """
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
        mg = tf.compat.v1.train.export_meta_graph(graph=g)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(fetches)
    mg.collection_def["train_op"].CopyFrom(fetch)
    cfg = config_pb2.ConfigProto()
    rw = cfg.graph_options.rewrite_options
    rw.optimizers.extend(["auto_mixed_precision_onednn_bfloat16"])
    rw.min_graph_nodes = -1
    return lambda: tf_optimizer.OptimizeGraph(cfg, mg)


def grappler_bf16(graph_def: tf.compat.v1.GraphDef, fetches: list[str]) -> tf.compat.v1.GraphDef:
    """TF's auto_mixed_precision_onednn_bfloat16 pass alone, on ``graph_def``."""
    return grappler_bf16_pass(graph_def, fetches)()


def converted_by_tf(graph_def: tf.compat.v1.GraphDef, original: set[str]) -> set[str]:
    """Original (non-Cast) nodes whose type attribute TF's pass set to bfloat16."""
    out = set()
    for n in graph_def.node:
        if n.name in original and n.op != "Cast":
            if any(k in n.attr and n.attr[k].type == BF16 for k in ("T", "dtype")):
                out.add(n.name)
    return out


def count_casts(graph_def: tf.compat.v1.GraphDef, original: set[str]) -> int:
    """Cast nodes a pass added (Const conversions excluded, as TF's own log line does)."""
    return sum(1 for n in graph_def.node if n.op == "Cast" and n.name not in original)


_TYPE_ATTRS = ("T", "dtype", "U", "Tparams", "SrcT", "DstT")


def low_nodes(graph_def: tf.compat.v1.GraphDef, low: int = BF16) -> int:
    """Computing nodes (not Const, not Cast) that run with a ``low`` type attribute."""
    count = 0
    for n in graph_def.node:
        if n.op in ("Const", "Cast"):
            continue
        if any(k in n.attr and n.attr[k].type == low for k in ("T", "dtype", "U")) or any(
                low in n.attr[k].list.type for k in n.attr if n.attr[k].HasField("list")):
            count += 1
    return count


def runtime_casts(graph_def: tf.compat.v1.GraphDef) -> int:
    """Cast nodes that run every step: those not fed, through any chain, by constants alone."""
    by_name = {n.name: n for n in graph_def.node}
    memo: dict[str, bool] = {}

    def const_only(name: str) -> bool:
        stack = [name]
        while stack:
            cur = stack[-1]
            if cur in memo:
                stack.pop()
                continue
            node = by_name.get(cur)
            if node is None or node.op in ("Placeholder", "PlaceholderWithDefault", "VariableV2", "VarHandleOp",
                                           "NextIteration", "Merge", "Enter"):
                memo[cur] = node is not None and False
                stack.pop()
                continue
            if node.op == "Const":
                memo[cur] = True
                stack.pop()
                continue
            ins = [r.lstrip("^").split(":")[0] for r in node.input if not r.startswith("^")]
            todo = [i for i in ins if i not in memo]
            if todo:
                stack.extend(todo)
                continue
            memo[cur] = bool(ins) and all(memo[i] for i in ins)
            stack.pop()
        return memo[name]

    return sum(1 for n in graph_def.node if n.op == "Cast" and not const_only(n.name))


def run_graph(graph_def: tf.compat.v1.GraphDef, feeds: dict, fetches: list[str]) -> list:
    """Import ``graph_def`` into a fresh graph and run ``fetches`` (tensor names) on ``feeds``."""
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        return sess.run(fetches, feeds)
