"""Helpers for the TensorFlow tests: TF's own AMP pass, run through grappler, as the reference."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2  # noqa: E402
from tensorflow.python.grappler import tf_optimizer  # noqa: E402

BF16 = 14  # types_pb2.DT_BFLOAT16


def grappler_bf16(graph_def: tf.compat.v1.GraphDef, fetches: list[str]) -> tf.compat.v1.GraphDef:
    """TF's auto_mixed_precision_onednn_bfloat16 pass alone, on ``graph_def``."""
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with g.as_default():
        mg = tf.compat.v1.train.export_meta_graph(graph=g)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(fetches)
    mg.collection_def["train_op"].CopyFrom(fetch)
    cfg = config_pb2.ConfigProto()
    rw = cfg.graph_options.rewrite_options
    rw.optimizers.extend(["auto_mixed_precision_onednn_bfloat16"])
    rw.min_graph_nodes = -1
    return tf_optimizer.OptimizeGraph(cfg, mg)


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
