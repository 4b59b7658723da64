"""Our GraphDef rewrite against TensorFlow's own bf16 AMP pass, side by side.

On frozen inference graphs of Keras ResNet50 and MobileNetV2 (weights=None) and of a
transformer encoder block, runs TF's auto_mixed_precision_onednn_bfloat16 grappler pass
and our rewrite (allow_mix_precision_bf16 with the tf_amp_bf16 library, i.e. TF's own
lists) with its default gray rule (inputs that disagree -> the widest dtype) and with
``gray_disagreement="low"`` (TF's rule), and prints nodes converted, casts inserted (Const conversions excluded, as TF's log
line does) and rewrite time, with ratios. Targets: at least as many nodes converted, no
more casts, rewrite time within 2x of TF's C++ pass on the largest graph.

    python benchmarks/tf_vs_grappler.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402
from tf_helpers import converted_by_tf, grappler_bf16  # noqa: E402

CONFIG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
TF_STYLE = CONFIG.model_copy(update={"gray_disagreement": "low"})


def frozen(model: keras.Model, shape: list[int]) -> tuple[tf.compat.v1.GraphDef, list[str]]:
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    f = convert_variables_to_constants_v2(fn)
    return f.graph.as_graph_def(), [t.name.split(":")[0] for t in f.outputs]


def transformer_block(d: int = 256, heads: int = 4, seq: int = 128) -> keras.Model:
    x = keras.Input((seq, d))
    a = keras.layers.MultiHeadAttention(heads, d // heads)(x, x)
    h = keras.layers.LayerNormalization()(x + a)
    f = keras.layers.Dense(4 * d, activation="gelu")(h)
    f = keras.layers.Dense(d)(f)
    return keras.Model(x, keras.layers.LayerNormalization()(h + f))


def new_casts(gd: tf.compat.v1.GraphDef, original: set[str]) -> int:
    consts = {n.name for n in gd.node if n.op == "Const"}
    return sum(1 for n in gd.node if n.op == "Cast" and n.name not in original
               and n.input[0].split(":")[0] not in consts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="rewrites per pass; the best time counts")
    args = parser.parse_args()
    graphs = {
        "ResNet50": frozen(keras.applications.ResNet50(weights=None), [1, 224, 224, 3]),
        "MobileNetV2": frozen(keras.applications.MobileNetV2(weights=None), [1, 224, 224, 3]),
        "transformer": frozen(transformer_block(), [1, 128, 256]),
    }
    print(f"{'graph':<12}{'nodes':>6}  {'who':<22}{'converted':>10}{'casts':>7}{'rewrite ms':>12}"
          f"{'conv/TF':>9}{'casts/TF':>9}{'time/TF':>9}")
    for name, (gd, fetches) in graphs.items():
        original = {n.name for n in gd.node}
        rows = {}
        for who, fn in (("TF grappler (C++)", None), ("ours, default", CONFIG),
                        ("ours, TF-style gray", TF_STYLE)):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                if fn is None:
                    out = grappler_bf16(gd, fetches)
                    conv = len(converted_by_tf(out, original))
                else:
                    out, plan = rewrite_with_plan(gd, fn, fetches)
                    conv = len(plan.converted())
                best = min(best, time.perf_counter() - t0)
            rows[who] = (conv, new_casts(out, original), best)
        tf_conv, tf_casts, tf_time = rows["TF grappler (C++)"]
        for k, (who, (conv, casts, t)) in enumerate(rows.items()):
            label = f"{name:<12}{len(gd.node):>6}" if k == 0 else " " * 18
            ratios = "" if who.startswith("TF") else (
                f"{conv / max(tf_conv, 1):>9.2f}{casts / max(tf_casts, 1):>9.2f}{t / tf_time:>8.2f}x")
            print(f"{label}  {who:<22}{conv:>10}{casts:>7}{t * 1e3:>12.1f}{ratios}")
    print("\nTF's time is grappler's OptimizeGraph with only its bf16 AMP pass enabled (meta-graph export excluded);")
    print("ours is GraphDef -> OpGraph -> plan -> GraphDef, all in Python.")


if __name__ == "__main__":
    main()
