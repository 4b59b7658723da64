"""Our GraphDef rewrite against TensorFlow's own bf16 AMP pass, side by side, on real models.

Each graph of ``tests/tf_models.ZOO`` (keras.applications CNNs with random weights, a
transformer encoder, an LSTM+GRU text model; frozen as users freeze them) is converted by
TF's ``auto_mixed_precision_onednn_bfloat16`` grappler pass and by ours
(``allow_mix_precision_bf16`` with the ``tf_amp_bf16`` library, i.e. TF's lists, with TF's
gray rule). Every output is imported and run. Printed per graph, as ratios measured in the
same run: bf16 nodes and runtime casts (ours / TF), rewrite time (ours / TF's C++ pass),
inference time of our converted graph / grappler's converted graph (same input, runs
interleaved, medians), fp32 inference time / ours, and the relative output error of each.
Then rewrite time against graph size (chains of 1k/2k/4k nodes, bf16 and emulated fp16):
it should grow linearly.

Goals: bf16 nodes >= TF, casts <= TF, rewrite time <= 1.0x TF's on the largest graph,
converted-graph inference <= 1.0x grappler's.

    python benchmarks/tf_vs_grappler.py [--models ResNet50,lstm_gru] [--runs 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402

from tf_helpers import BF16, grappler_bf16_pass, low_nodes, runtime_casts  # noqa: E402
from tf_models import ZOO, build  # noqa: E402

CONFIG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False,
                      gray_disagreement="low")


def best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def session(gd):
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(gd, name="")
    cfg = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    return tf.compat.v1.Session(graph=g, config=cfg)


def interleaved(graphs: dict, feeds: dict, fetches: list[str], runs: int) -> tuple[dict, dict]:
    """Median run time and output of each graph, runs interleaved so machine noise hits all alike."""
    sessions = {k: session(gd) for k, gd in graphs.items()}
    outs = {k: s.run(fetches, feeds)[0] for k, s in sessions.items()}  # warm-up (and the outputs)
    for s in sessions.values():
        s.run(fetches, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(fetches, feeds)
            times[k].append(time.perf_counter() - t0)
    for s in sessions.values():
        s.close()
    return {k: statistics.median(v) for k, v in times.items()}, outs


def rel(y, ref) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def chain_graph(n: int) -> tuple[tf.compat.v1.GraphDef, list[str]]:
    """A residual MLP of about ``n`` nodes (MatMul, BiasAdd, Relu, AddV2 blocks)."""
    g = tf.Graph()
    rng = np.random.RandomState(0)
    with g.as_default():
        h = tf.compat.v1.placeholder(tf.float32, [4, 16], name="x")
        for _ in range(max(1, n // 8)):
            w = tf.constant(rng.randn(16, 16).astype("float32") * 0.1)
            b = tf.constant(rng.randn(16).astype("float32") * 0.1)
            h = h + tf.nn.relu(tf.nn.bias_add(tf.matmul(h, w), b)) * 0.5
        tf.identity(h, name="out")
    return g.as_graph_def(), ["out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ResNet50,MobileNetV2,EfficientNetB0,DenseNet121,transformer,lstm_gru",
                        help=f"comma-separated, from: {', '.join(ZOO)}")
    parser.add_argument("--repeat", type=int, default=3, help="rewrites per pass; the best time counts")
    parser.add_argument("--runs", type=int, default=30, help="timed inference runs per graph")
    args = parser.parse_args()
    print(f"{'graph':<17}{'nodes':>6}{'bf16 ours/TF':>14}{'casts ours/TF':>15}{'rewrite/TF':>12}"
          f"{'infer ours/TF':>15}{'fp32/ours':>11}{'err ours':>10}{'err TF':>9}")
    largest = None
    for name in args.models.split(","):
        frozen = build(name)
        gd, fetches = frozen.graph_def, frozen.fetch_nodes
        t_tf, theirs = best_time(grappler_bf16_pass(gd, fetches), args.repeat)
        t_us, (ours, _plan) = best_time(lambda: rewrite_with_plan(gd, CONFIG, fetches), args.repeat)
        feeds = {frozen.inputs[0]: frozen.example}
        times, outs = interleaved({"fp32": gd, "tf": theirs, "ours": ours}, feeds, frozen.outputs, args.runs)
        ref = outs["fp32"].astype(np.float64)
        row = (f"{name:<17}{len(gd.node):>6}{low_nodes(ours, BF16):>7}/{low_nodes(theirs, BF16):<6}"
               f"{runtime_casts(ours):>8}/{runtime_casts(theirs):<6}{t_us / t_tf:>11.2f}x"
               f"{times['ours'] / times['tf']:>14.2f}x{times['fp32'] / times['ours']:>10.2f}x"
               f"{rel(outs['ours'], ref):>10.2e}{rel(outs['tf'], ref):>9.2e}")
        print(row, flush=True)
        if largest is None or len(gd.node) > largest[0]:
            largest = (len(gd.node), name, t_us / t_tf)
    if largest:
        print(f"\nlargest graph: {largest[1]} ({largest[0]} nodes): rewrite time {largest[2]:.2f}x TF's C++ pass")
    print("TF's time: grappler's OptimizeGraph with only its bf16 AMP pass (meta-graph export excluded);")
    print("ours: GraphDef -> OpGraph -> plan -> GraphDef, all in Python. Errors: ||y - fp32|| / ||fp32||.")
    print("\nrewrite time against graph size (should grow linearly):")
    fp16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False)
    base: dict[str, float] = {}
    for n in (1000, 2000, 4000):
        gd, fetches = chain_graph(n)
        cells = []
        for label, cfg in (("bf16", CONFIG), ("fp16 emulated", fp16)):
            t, _ = best_time(lambda: rewrite_with_plan(gd, cfg, fetches), args.repeat)
            base.setdefault(label, t / len(gd.node))
            cells.append(f"{label} {t * 1e3:7.1f} ms ({t / len(gd.node) / base[label]:.2f}x per node vs 1k)")
        print(f"  {len(gd.node):>5} nodes: " + "; ".join(cells))


if __name__ == "__main__":
    main()
