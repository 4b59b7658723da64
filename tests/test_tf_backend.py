"""TensorFlow backend, compared node by node with TF's own auto_mixed_precision_onednn_bfloat16 pass."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow import Session, rewrite  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402

from tf_helpers import converted_by_tf, count_casts, grappler_bf16  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo_tf import seed_savedmodel  # noqa: E402

CFG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)


def build(fn):
    g = tf.Graph()
    with g.as_default():
        fn()
    return g.as_graph_def()


def compare(gd, fetches):
    original = {n.name for n in gd.node}
    theirs = grappler_bf16(gd, fetches)
    ours, plan = rewrite_with_plan(gd, CFG, fetches)
    mine = {d.name for d in plan.converted()}
    return mine, converted_by_tf(theirs, original), plan, ours, theirs, original


def run(gd, fetch, feeds=None):
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as s:
        return s.run(fetch, feeds or {})


def test_chain_through_allow_infer_clear_and_deny():
    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [8, 16], name="x")
        w = tf.constant(np.random.RandomState(0).randn(16, 16).astype("float32"))
        a = tf.matmul(x, w, name="mm")  # allow
        b = tf.nn.relu(a, name="relu")  # clear
        c = tf.add(b, 1.0, name="add")  # infer
        d = tf.exp(c, name="exp")  # deny
        e = tf.nn.relu(d, name="relu2")  # clear, after deny
        tf.identity(tf.reduce_sum(e, name="sum"), name="out")

    gd = build(fn)
    mine, theirs, plan, ours, theirs_gd, original = compare(gd, ["out"])
    # Where we differ: TF keeps the infer op "add" in float32 because its reader is a deny op;
    # we run it in bfloat16 because it follows "relu" (the cast to float32 moves after it):
    # one more op in low precision, and no more casts than TF.
    assert mine == theirs | {"add"}
    assert count_casts(ours, original) <= count_casts(theirs_gd, original)
    assert plan["exp"].dtype == "float32" and plan["relu2"].dtype == "float32"  # deny propagates forward
    x = np.random.RandomState(1).randn(8, 16).astype("float32") * 0.1
    ref = run(gd, "out:0", {"x:0": x})
    got = run(ours, "out:0", {"x:0": x})
    assert got.dtype == np.float32 and np.allclose(got, ref, rtol=3e-2)


def test_infer_op_after_allow_op_and_fetch_preserved():
    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [4, 8], name="x")
        w = tf.constant(np.ones((8, 8), "float32"))
        a = tf.matmul(x, w, name="mm")
        tf.nn.bias_add(a, tf.constant(np.ones(8, "float32")), name="biased")

    gd = build(fn)
    mine, theirs, plan, ours, _, _ = compare(gd, ["biased"])
    # TF preserves a fetched node by not converting it; we convert it and keep the fetch's
    # name and dtype with a Cast (one more node converted, same number of casts at the fetch)
    assert theirs <= mine and "biased" in mine
    node = {n.name: n for n in ours.node}["biased"]
    assert node.op == "Cast" and node.attr["DstT"].type == 1
    out = run(ours, "biased:0", {"x:0": np.ones((4, 8), "float32")})
    assert out.dtype == np.float32 and np.allclose(out, 9.0)


def test_allow_after_deny_converts_the_gray_op_between():
    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [8, 16], name="x")
        w = tf.constant(1.0, shape=[16, 16])
        a = tf.matmul(x, w, name="mm")
        c = tf.exp(tf.nn.relu(a, name="relu"), name="exp")
        d = tf.nn.relu(c, name="relu2")
        tf.identity(tf.matmul(d, w, name="mm2"), name="out")

    gd = build(fn)
    mine, theirs, plan, ours, theirs_gd, original = compare(gd, ["out"])
    assert theirs <= mine, theirs - mine
    assert count_casts(ours, original) <= count_casts(theirs_gd, original)


def test_existing_cast_is_reused():
    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [4, 8], name="x")
        w = tf.constant(np.ones((8, 8), "float32"))
        a = tf.matmul(x, w, name="mm")
        up = tf.cast(a, tf.float32, name="same")  # no-op cast written by the user
        h = tf.cast(tf.nn.relu(up, name="r"), tf.float16, name="to_half")
        tf.cast(h, tf.float32, name="out")

    gd = build(fn)
    mine, theirs, plan, ours, theirs_gd, original = compare(gd, ["out"])
    assert theirs <= mine, theirs - mine
    assert count_casts(ours, original) <= count_casts(theirs_gd, original)
    assert plan["to_half"].inputs == ("bfloat16",)  # reads what its producer now gives: no cast before it
    assert not any(c.tensor in ("r:0",) for c in plan.casts)
    out = run(ours, "out:0", {"x:0": np.ones((4, 8), "float32")})
    assert np.allclose(out, 8.0)


def test_fused_batch_norm_becomes_v3_with_float_statistics():
    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [2, 8, 8, 3], name="x")
        w = tf.constant(np.random.RandomState(0).randn(3, 3, 3, 4).astype("float32"))
        c = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(c, tf.ones([4]), tf.zeros([4]), is_training=True, name="bn")
        tf.nn.relu(y, name="out")

    gd = build(fn)
    mine, theirs, plan, ours, _, _ = compare(gd, ["out"])
    assert theirs <= mine
    bn = next(n for n in ours.node if n.op.startswith("FusedBatchNorm"))
    assert bn.op == "FusedBatchNormV3" and bn.attr["T"].type == 14 and bn.attr["U"].type == 1
    x = np.random.RandomState(2).randn(2, 8, 8, 3).astype("float32")
    assert np.allclose(run(ours, "out:0", {"x:0": x}), run(gd, "out:0", {"x:0": x}), atol=0.1)


def test_tf1_training_graph_trains_under_a_session_drop_in():
    rng = np.random.RandomState(0)
    xs = rng.randn(64, 8).astype("float32")
    ys = (xs @ rng.randn(8, 1)).astype("float32")
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.placeholder(tf.float32, [None, 8])
        y = tf.compat.v1.placeholder(tf.float32, [None, 1])
        w1 = tf.compat.v1.get_variable("w1", [8, 16])
        b1 = tf.compat.v1.get_variable("b1", [16], initializer=tf.compat.v1.zeros_initializer())
        w2 = tf.compat.v1.get_variable("w2", [16, 1])
        h = tf.nn.relu(tf.nn.bias_add(tf.matmul(x, w1), b1))
        pred = tf.matmul(h, w2)
        loss = tf.reduce_mean(tf.square(pred - y))
        train = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss)
        init = tf.compat.v1.global_variables_initializer()
    with Session(CFG, graph=g) as sess:
        sess.run(init)
        first = sess.run(loss, {x: xs, y: ys})
        for _ in range(200):
            sess.run(train, {x: xs, y: ys})
        last = sess.run(loss, {x: xs, y: ys})
        plan = sess.plan
    assert last < first * 0.2
    ops = {d.op_type: d.dtype for d in plan.converted()}
    assert ops.get("MatMul") == "bfloat16"
    grads = [d for d in plan.converted() if d.name.startswith("gradients/")]
    assert grads, "gradient ops are planned too"
    applies = [d for d in plan if d.op_type.startswith(("ApplyAdam", "ResourceApplyAdam"))]
    assert applies and all(d.dtype in (None, "float32") for d in applies)


def test_cli_convert_savedmodel_serves(tmp_path, cli_main):
    import subprocess
    import sys

    src = tmp_path / "model"
    ref = seed_savedmodel(src)  # the seeds' conv2d model, as `make demo` builds it
    dst = tmp_path / "model_bf16"
    r = subprocess.run([sys.executable, "-m", "precision_policy", "convert", str(src), str(dst),
                        "--mode", "allow_mix_precision_bf16", "--op-info", "tf_amp_bf16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Converted 4/" in r.stdout and "using 0 cast(s)" in r.stdout  # as TF logs for this model: 0 casts
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        mg = tf.compat.v1.saved_model.loader.load(sess, ["myTag"], str(dst))
        out = sess.run(mg.signature_def["predict"].outputs["myOutput"].name)
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=0.25, rtol=0.02)
    r = cli_main("convert", src, dst, "--mode", "allow_mix_precision_bf16", "--op-info", "tf_amp_bf16")  # in this process
    assert r.returncode == 2 and "already exists" in r.stderr


def test_float16_is_emulated_by_default_and_native_on_request():
    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [2, 8, 8, 3], name="x")
        w = tf.constant(np.random.RandomState(0).randn(3, 3, 3, 4).astype("float32"))
        c = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
        tf.nn.relu(c, name="out")

    gd = build(fn)
    cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    emulated, plan = rewrite_with_plan(gd, cfg, ["out"])
    assert plan.to_dict()["config"]["float16"] == "emulated"
    conv = {n.name: n for n in emulated.node}["conv"]
    assert conv.attr["T"].type == 1  # float32 kernel between float16 tensors
    assert any(n.name.startswith("conv/Round") for n in emulated.node)
    native = rewrite(gd, cfg.model_copy(update={"native_fp16": True}), ["out"])
    assert {n.name: n for n in native.node}["conv"].attr["T"].type == 19  # DT_HALF
    x = np.random.RandomState(1).randn(2, 8, 8, 3).astype("float32")
    ref = run(gd, "out:0", {"x:0": x})
    got = run(emulated, "out:0", {"x:0": x})
    assert got.dtype == np.float32 and np.allclose(got, ref, atol=2e-2, rtol=1e-2)


def test_cli_plans_and_explains_a_frozen_pb(tmp_path, cli_main):
    """In this process: test_cli_convert_savedmodel_serves runs ``convert`` as a real process, test_cli the others."""

    def fn():
        x = tf.compat.v1.placeholder(tf.float32, [4, 8], name="x")
        w = tf.constant(np.ones((8, 8), "float32"))
        tf.nn.relu(tf.matmul(x, w, name="mm"), name="out")

    pb = tmp_path / "frozen.pb"
    pb.write_bytes(build(fn).SerializeToString())
    r = cli_main("plan", pb, "--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Converted 2/4 nodes to bfloat16")
    r = cli_main("explain", pb, "mm", "--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16")
    assert r.returncode == 0 and "white-list" in r.stdout
    out = tmp_path / "bf16.pbtxt"
    r = cli_main("convert", pb, out, "--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16")
    assert r.returncode == 0 and 'op: "Cast"' in out.read_text()
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"\x00not a graph")
    r = cli_main("plan", bad)
    assert r.returncode == 2 and "bad.pb" in r.stderr and "Traceback" not in r.stderr
