"""`make demo`, part 3: the seeds' TensorFlow flows under a precision mode.

1. The seed's conv2d -> bias_add -> relu model saved as a TF1 SavedModel, converted to
   bfloat16 with our rewrite (as `gen_bf16_pb.py` does with TF's own pass), loaded and served.
2. A TF1 graph trained with `optimizer.minimize` under `precision_policy.tensorflow.Session`
   and a loss-scale optimizer with Ascend's preset.

Writes the plan reports (HTML) of the conversion and of the TF1 session to demo_out/tf/.
Keras training under precision modes is part 4, examples/demo_keras.py.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.saved_model.signature_def_utils_impl import predict_signature_def  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.tensorflow import LossScaleOptimizer, Session, convert  # noqa: E402

from demo_plots import out_dir, report, show_files  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")


def seed_savedmodel(path: Path) -> np.ndarray:
    g = tf.Graph()
    with g.as_default():
        X = tf.Variable(tf.compat.v1.random_normal([784], seed=1), name="myInput")
        W = tf.Variable(tf.compat.v1.random_normal([5, 5, 1, 32], seed=2))
        B = tf.Variable(tf.compat.v1.random_normal([32], seed=3))
        x = tf.reshape(X, [-1, 28, 28, 1])
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, W, [1, 1, 1, 1], "SAME", name="myConv"), B), name="myOutput")
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            ref = sess.run(y)
            builder = tf.compat.v1.saved_model.builder.SavedModelBuilder(str(path))
            builder.add_meta_graph_and_variables(sess, ["myTag"], signature_def_map={
                "predict": predict_signature_def(inputs={"myInput": X}, outputs={"myOutput": y})})
            builder.save()
    return ref


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    tf.get_logger().setLevel("ERROR")  # TF1 APIs warn that they are TF1 APIs
    folder = out_dir("tf")
    files: list[Path] = []
    print("\n=== TensorFlow: the seeds' SavedModel conversion " + "=" * 36)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model", Path(tmp) / "model_bf16"
        ref = seed_savedmodel(src)
        plan = convert(src, dst, BF16)
        files.append(report(plan, folder / "report_savedmodel_bf16.html", title="seed SavedModel, allow_mix_precision_bf16"))
        print(f"  {plan.summary()}")
        for d in plan.converted():
            print(f"    {d.name:<10} {d.op_type:<8} {d.dtype:<9} {d.reason}")
        with tf.compat.v1.Session(graph=tf.Graph()) as sess:
            mg = tf.compat.v1.saved_model.loader.load(sess, ["myTag"], str(dst))
            out = sess.run(mg.signature_def["predict"].outputs["myOutput"].name)
        print(f"  served: {out.dtype} {out.shape}, max |bf16 - fp32| = {np.abs(out - ref).max():.3f} "
              f"(values up to {np.abs(ref).max():.1f})")

    print("\n=== TensorFlow: a TF1 training graph, one line changed " + "=" * 29)
    rng = np.random.RandomState(0)
    xs = rng.randn(256, 16).astype("float32")
    ys = (xs @ rng.randn(16, 1)).astype("float32")
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.placeholder(tf.float32, [None, 16])
        y = tf.compat.v1.placeholder(tf.float32, [None, 1])
        w1 = tf.compat.v1.get_variable("w1", [16, 64])
        w2 = tf.compat.v1.get_variable("w2", [64, 1])
        loss = tf.reduce_mean(tf.square(tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2) - y))
        opt = LossScaleOptimizer(tf.compat.v1.train.AdamOptimizer(0.01), loss_scale="ascend")
        train = opt.minimize(loss)
        init = tf.compat.v1.global_variables_initializer()
    with Session(BF16, graph=g) as sess:  # was: tf.compat.v1.Session(graph=g)
        sess.run(init)
        for step in range(301):
            value, _ = sess.run([loss, train], {x: xs, y: ys})
            if step % 100 == 0:
                print(f"  step {step:>3}: loss {value:8.4f}   loss scale {sess.run(opt.scale):.4g}")
        print(f"  plan: {sess.plan.summary()}")
        files.append(report(sess.plan, folder / "report_tf1_session.html", title="TF1 training graph under Session"))

    show_files(files)


if __name__ == "__main__":
    main()
