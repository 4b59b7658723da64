"""Regression tests for graphs the first TensorFlow route wrote but TensorFlow would not import.

Each test converts a real graph, imports the output into a fresh ``tf.Graph``, runs it and
compares the numbers with float32.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402

from tf_helpers import run_graph  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
V1 = tf.compat.v1


def graph(fn):
    g = tf.Graph()
    with g.as_default():
        fn()
    return g


def attr_type(gd, name, attr="T"):
    node = next(n for n in gd.node if n.name == name)
    return tf.as_dtype(node.attr[attr].type).name


def close(a, b, tol=0.05):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) < tol


def test_ref_variable_reads_and_pass_throughs_of_sources_get_their_planned_dtype():
    """Bug 1: ``W/read`` of a VariableV2, Snapshot/StopGradient/PreventGradient of a Const or Placeholder."""

    def build():
        x = V1.placeholder(tf.float32, [4, 8], name="x")
        w = V1.Variable(np.random.RandomState(0).randn(8, 8).astype("float32"), use_resource=False, name="W")
        c = tf.constant(np.random.RandomState(1).randn(8, 8).astype("float32"), name="c")
        from tensorflow.python.ops import array_ops, gen_array_ops

        h = tf.matmul(tf.stop_gradient(x, name="sg"), w, name="mm1")
        h = tf.matmul(h, gen_array_ops.snapshot(c, name="snap"), name="mm2")
        h = tf.matmul(h, array_ops.prevent_gradient(c, name="pg"), name="mm3")
        tf.nn.relu(h, name="out")
        V1.global_variables_initializer()

    g = graph(build)
    assert any(n.op == "VariableV2" for n in g.as_graph_def().node)
    feeds = {"x:0": np.random.RandomState(2).randn(4, 8).astype("float32")}
    with V1.Session(graph=g) as sess:
        sess.run("init")
        gd = V1.graph_util.convert_variables_to_constants(sess, g.as_graph_def(), ["out"])
        ref = sess.run("out:0", feeds)
    # the frozen graph keeps W/read as an Identity over the (now constant) W
    assert any(n.name == "W/read" and n.op == "Identity" for n in gd.node)
    out, plan = rewrite_with_plan(gd, BF16, ["out"])
    assert plan["W/read"].dtype == "bfloat16" and attr_type(out, "W/read") == "bfloat16"
    for name in ("snap", "pg"):
        assert plan[name].dtype == "bfloat16" and attr_type(out, name) == "bfloat16"
    y = run_graph(out, feeds, ["out:0"])[0]
    assert y.dtype == np.float32 and close(y, ref)


def test_ref_variables_train_under_session_and_keep_dtype_on_a_read_works(tmp_path):
    def build():
        x = V1.placeholder(tf.float32, [16, 4], name="x")
        w = V1.Variable(np.ones((4, 1), "float32") * 0.1, use_resource=False, name="W")
        loss = tf.reduce_mean(tf.square(tf.matmul(x, w) - tf.reduce_sum(x, 1, keepdims=True)), name="loss")
        V1.train.GradientDescentOptimizer(0.1).minimize(loss, name="train")
        V1.global_variables_initializer()

    g = graph(build)
    x = np.random.RandomState(0).randn(16, 4).astype("float32")
    from precision_policy.tensorflow import Session

    with Session(BF16, graph=g) as sess:
        sess.run("init")
        first = sess.run("loss:0", {"x:0": x})
        for _ in range(100):
            sess.run("train", {"x:0": x})
        last = sess.run("loss:0", {"x:0": x})
    assert sess.plan["W/read"].dtype == "bfloat16"
    assert last < first / 10
    (tmp_path / "keep.txt").write_text("W/read\n")
    keep = BF16.model_copy(update={"keep_dtype": str(tmp_path / "keep.txt")})
    with Session(keep, graph=g) as sess:
        sess.run("init")
        assert np.isfinite(sess.run("loss:0", {"x:0": x}))
    assert sess.plan["W/read"].dtype == "float32"


def test_list_typed_attrs_identity_n_are_rewritten():
    """Bug 2: ``IdentityN`` (Keras swish's custom gradient) has ``T: list(type)``."""

    def build():
        x = V1.placeholder(tf.float32, [4, 8], name="x")
        w = tf.constant(np.random.RandomState(0).randn(8, 8).astype("float32"))
        h = tf.matmul(x, w, name="mm")
        a, b = tf.identity_n([h, tf.sigmoid(h)], name="idn")
        tf.matmul(a * b, w, name="out")

    gd = graph(build).as_graph_def()
    feeds = {"x:0": np.random.RandomState(1).randn(4, 8).astype("float32")}
    ref = run_graph(gd, feeds, ["out:0"])[0]
    out, plan = rewrite_with_plan(gd, BF16, ["out"])
    node = next(n for n in out.node if n.name == "idn")
    assert [tf.as_dtype(t).name for t in node.attr["T"].list.type] == ["bfloat16", "bfloat16"]
    assert close(run_graph(out, feeds, ["out:0"])[0], ref)


@pytest.mark.parametrize("mode,low", [("force_fp32", "float16"), ("allow_fp32_to_bf16", "float16"),
                                      ("must_keep_origin_dtype", None)])
def test_ops_with_no_float32_kernel_are_converted_from_the_plan_not_its_wording(mode, low):
    """Bug 3: ascend910's Conv2D has no float32 kernel; the plan moves it to float16/bfloat16."""

    def build():
        x = V1.placeholder(tf.float32, [1, 8, 8, 3], name="x")
        k = tf.constant(np.random.RandomState(0).randn(3, 3, 3, 4).astype("float32"))
        tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME", name="conv"), name="out")

    gd = graph(build).as_graph_def()
    cfg = pp.RunConfig(precision_mode=mode, op_info="ascend910", use_env_lists=False)
    if low is None:
        with pytest.raises(pp.errors.PrecisionError, match="conv"):
            rewrite_with_plan(gd, cfg, ["out"])
        return
    feeds = {"x:0": np.random.RandomState(1).rand(1, 8, 8, 3).astype("float32")}
    ref = run_graph(gd, feeds, ["out:0"])[0]
    out, plan = rewrite_with_plan(gd, cfg, ["out"])
    assert plan["conv"].dtype == low
    assert attr_type(out, "conv") == "float32"  # float16 is emulated: float16 values, a float32 kernel
    assert any(n.op == "Cast" and n.input[0] == "conv" and n.attr["DstT"].type == 19 for n in out.node)
    y = run_graph(out, feeds, ["out:0"])[0]
    assert y.dtype == np.float32 and close(y, ref)


def test_tf1_while_loop_and_cond_are_planned_across_the_loop():
    """Bug 4: v1 control flow (Enter/Merge/Switch/NextIteration/Exit) is a loop, not a refused cycle."""
    from tensorflow.python.ops import control_flow_util

    saved = control_flow_util.ENABLE_CONTROL_FLOW_V2
    control_flow_util.ENABLE_CONTROL_FLOW_V2 = False
    try:
        def build():
            x = V1.placeholder(tf.float32, [4, 16], name="x")
            w = tf.constant(np.random.RandomState(0).randn(16, 16).astype("float32") * 0.25, name="w")

            def body(i, h):
                return i + 1, tf.tanh(tf.matmul(h, w, name="step"))

            _, h = tf.while_loop(lambda i, h: i < 5, body, [tf.constant(0), x])
            h = tf.cond(tf.reduce_sum(h) > 0, lambda: h * 2.0, lambda: h - 1.0)
            tf.identity(tf.matmul(h, w), name="out")

        gd = graph(build).as_graph_def()
    finally:
        control_flow_util.ENABLE_CONTROL_FLOW_V2 = saved
    ops = {n.op for n in gd.node}
    assert {"Enter", "Merge", "Switch", "NextIteration", "Exit"} <= ops
    feeds = {"x:0": np.random.RandomState(1).randn(4, 16).astype("float32")}
    ref = run_graph(gd, feeds, ["out:0"])[0]
    out, plan = rewrite_with_plan(gd, BF16.model_copy(update={"gray_disagreement": "low"}), ["out"])
    step = next(n for n in plan.names if n.endswith("/step"))
    assert plan[step].dtype == "bfloat16"
    merge = next(n for n in plan.names if plan[n].op_type == "Merge" and "while" in n and n.endswith("Merge_1"))
    # the loop variable is carried in the dtype its body produces: no cast on every iteration
    assert plan[merge].dtype == "bfloat16", plan[merge].reason
    y = run_graph(out, feeds, ["out:0"])[0]
    assert y.dtype == np.float32 and close(y, ref)


def test_frozen_tf2_while_loop_lowered_to_frame_ops_converts_and_runs():
    w = tf.constant(np.random.RandomState(0).randn(8, 8).astype("float32") * 0.3)

    @tf.function(input_signature=[tf.TensorSpec([2, 8], tf.float32)])
    def f(x):
        return tf.while_loop(lambda i, h: i < 4, lambda i, h: (i + 1, tf.nn.relu(tf.matmul(h, w)) + h),
                             [tf.constant(0), x])[1]

    frozen = convert_variables_to_constants_v2(f.get_concrete_function())
    gd = frozen.graph.as_graph_def()
    assert any(n.op == "NextIteration" for n in gd.node)
    fetch = frozen.outputs[0].name
    feeds = {frozen.inputs[0].name: np.random.RandomState(1).randn(2, 8).astype("float32")}
    ref = run_graph(gd, feeds, [fetch])[0]
    out, plan = rewrite_with_plan(gd, BF16, [fetch.split(":")[0]])
    assert any(plan[n].op_type == "MatMul" and plan[n].dtype == "bfloat16" for n in plan.names)
    assert close(run_graph(out, feeds, [fetch])[0], ref)


def test_a_cycle_that_is_not_a_loop_is_still_refused():
    g = pp.OpGraph("cyc") if hasattr(pp, "OpGraph") else None
    if g is None:
        from precision_policy.graph import OpGraph

        g = OpGraph("cyc")
    g.add_node("a", "Relu", ["b:0"], ["float32"])
    g.add_node("b", "Relu", ["a:0"], ["float32"])
    with pytest.raises(pp.errors.GraphError, match="cycle"):
        g.resolve()
