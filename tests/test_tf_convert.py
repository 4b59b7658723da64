"""Model files converted file to file (``precision_policy.tensorflow.convert``), then loaded and run by TensorFlow.

Every test builds a real model on disk (TF2 ``tf.Module`` SavedModels, a Keras 3 ``model.export``,
TF1 ``VariableV2`` SavedModels, frozen GraphDefs with v2 control flow or XLA-compiled calls),
converts it, loads what was written with TensorFlow's own loader and compares the numbers with
the float32 original within bfloat16 tolerance. A graph that would not load is never written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow import (  # noqa: E402
    convert,
    convert_model,
    inline_functions,
    load_model,
    verify_graph_def,
)
from precision_policy.backends.tensorflow.convert import function_calls  # noqa: E402
from precision_policy.errors import GraphError, WriteError  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)
BF16_TYPE = types_pb2.DT_BFLOAT16


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def listing(folder: Path) -> set[str]:
    """Every path under ``folder``, hidden temporary files included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_graph(gd: graph_pb2.GraphDef, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        return sess.run(fetches, feeds)


def read_pb(path: Path) -> graph_pb2.GraphDef:
    gd = graph_pb2.GraphDef()
    gd.ParseFromString(path.read_bytes())
    return gd


def bf16_nodes_in_functions(saved_model_dir: Path) -> list[str]:
    """Nodes of the SavedModel's function library that compute in bfloat16 (what actually serves)."""
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    out = []
    for fdef in sm.meta_graphs[0].graph_def.library.function:
        for n in fdef.node_def:
            if n.op != "Cast" and any(k in n.attr and n.attr[k].type == BF16_TYPE for k in ("T", "dtype")):
                out.append(f"{fdef.signature.name}/{n.name}:{n.op}")
    return out


# ---------------------------------------------------------------------- models
class LoopModule(tf.Module):
    """Two signatures; the default one has a tf.while_loop and a tf.cond and returns an int32 count too."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.RandomState(0)
        self.w = tf.Variable(rng.randn(8, 8).astype("float32") * 0.5)
        self.v = tf.Variable(rng.randn(8, 4).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
    def serve(self, x):
        y = tf.matmul(x, self.w)

        def body(i, y):
            return i + 1, tf.nn.relu(tf.matmul(y, self.w)) + 0.1

        _, y = tf.while_loop(lambda i, y: i < 3, body, [tf.constant(0), y])
        y = tf.cond(tf.reduce_sum(y) > 0.0, lambda: tf.nn.softmax(tf.matmul(y, self.v)),
                    lambda: tf.nn.tanh(tf.matmul(y, self.v)))
        return {"probs": y, "count": tf.shape(y)[0]}

    @tf.function(input_signature=[tf.TensorSpec([2, 8], tf.float32, name="zeta"),
                                  tf.TensorSpec([2, 8], tf.float32, name="alpha")])
    def pair(self, zeta, alpha):
        return {"sum": tf.matmul(zeta - alpha, self.w), "gram": tf.matmul(alpha, alpha, transpose_b=True)}


def save_loop_module(path: Path) -> LoopModule:
    m = LoopModule()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve, "pair": m.pair})
    return m


class JitModule(tf.Module):
    """A jit_compile=True function called from the served one: TensorFlow refuses to inline it (_noinline)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(np.random.RandomState(0).randn(8, 8).astype("float32"))

    @tf.function(jit_compile=True)
    def inner(self, x):
        return tf.matmul(x, self.w) * 0.5

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.nn.relu(tf.matmul(self.inner(x), self.w))}


def frozen_pb(fn, path: Path, lower_control_flow: bool = True) -> tuple[graph_pb2.GraphDef, str, str]:
    """Freeze a concrete function to ``path``; (graph, input tensor, its first float32 output tensor)."""
    frozen = convert_variables_to_constants_v2(fn, lower_control_flow=lower_control_flow)
    gd = frozen.graph.as_graph_def()
    path.write_bytes(gd.SerializeToString())
    out = next(t for t in frozen.outputs if t.dtype == tf.float32)
    return gd, frozen.inputs[0].name, out.name


# ---------------------------------------------------------------------- TF2 SavedModel -> SavedModel
def test_tf2_module_savedmodel_serves_every_signature_with_its_names_and_dtypes(tmp_path: Path):
    src, dst = tmp_path / "loop", tmp_path / "loop_bf16"
    m = save_loop_module(src)
    result = convert_model(src, dst, BF16)

    assert result.per_signature and list(result.plans) == ["serving_default", "pair"]
    assert result.plan is result.plans["serving_default"]
    serve_plan = result.plans["serving_default"]
    # the loop body and both cond branches were inlined, lowered and planned like the rest
    body = [d for d in serve_plan.converted() if d.op_type == "MatMul" and "while" in d.name]
    assert body and all(d.dtype == "bfloat16" for d in body)
    pair = result.plans["pair"]  # each signature planned on its own graph
    assert {d.op_type for d in pair.converted() if d.dtype == "bfloat16"} >= {"MatMul"}
    assert not any("while" in name for name in pair.names)
    assert result.warnings == []

    loaded = tf.saved_model.load(str(dst))
    assert set(loaded.signatures) == {"serving_default", "pair"}
    original = tf.saved_model.load(str(src))
    for name in ("serving_default", "pair"):
        new, old = loaded.signatures[name], original.signatures[name]
        assert new.structured_input_signature == old.structured_input_signature
        assert {k: s.dtype for k, s in new.structured_outputs.items()} == \
               {k: s.dtype for k, s in old.structured_outputs.items()}
    assert loaded.signatures["serving_default"].structured_outputs["count"].dtype == tf.int32

    rng = np.random.RandomState(1)
    x = rng.randn(5, 8).astype("float32")
    got = loaded.signatures["serving_default"](x=tf.constant(x))
    ref = m.serve(tf.constant(x))
    assert got["probs"].dtype == tf.float32 and got["count"].dtype == tf.int32
    assert int(got["count"]) == 5
    assert rel_error(got["probs"].numpy(), ref["probs"].numpy()) < 0.03
    z, a = rng.randn(2, 8).astype("float32"), rng.randn(2, 8).astype("float32")
    got = loaded.signatures["pair"](zeta=tf.constant(z), alpha=tf.constant(a))
    ref = m.pair(tf.constant(z), tf.constant(a))
    for key in ("sum", "gram"):
        assert got[key].dtype == tf.float32
        assert rel_error(got[key].numpy(), ref[key].numpy()) < 0.03, key
    # what serves is the rewritten graph, not the original
    assert any(n.endswith(":MatMul") for n in bf16_nodes_in_functions(dst))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left"


def test_keras3_export_converts_and_serves_both_endpoints(tmp_path: Path):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,), name="feat")
    h = keras.layers.Dense(32, activation="relu")(inp)
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(h))
    src, dst = tmp_path / "keras", tmp_path / "keras_bf16"
    model.export(str(src), verbose=False)

    result = convert_model(src, dst, BF16)
    assert set(result.plans) == {"serve", "serving_default"}
    assert result.plans["serve"] is result.plans["serving_default"], "one function, frozen and planned once"
    assert any(d.op_type == "MatMul" and d.dtype == "bfloat16" for d in result.plan.converted())
    loaded = tf.saved_model.load(str(dst))
    x = np.random.RandomState(2).randn(6, 16).astype("float32")
    ref = model(x).numpy()
    for name in ("serve", "serving_default"):
        fn = loaded.signatures[name]
        assert list(fn.structured_input_signature[1]) == ["feat"]
        assert fn.structured_input_signature[1]["feat"].shape.as_list() == [None, 16]
        (key, y), = fn(feat=tf.constant(x)).items()
        assert key == "output_0" and y.dtype == tf.float32
        assert rel_error(y.numpy(), ref) < 0.03


def test_tf2_savedmodel_to_pb_writes_the_default_signature_and_says_which(tmp_path: Path, caplog):
    src = tmp_path / "loop"
    m = save_loop_module(src)
    out = tmp_path / "loop.pb"
    with caplog.at_level(logging.WARNING, logger="precision_policy"):
        result = convert_model(src, out, BF16)
    assert list(result.plans) == ["serving_default"]
    assert any("'pair'" in w and "not written" in w for w in result.warnings)
    assert any("'pair'" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    gd = read_pb(out)
    assert not function_calls(gd)
    model = load_model(src)
    sg = model.signatures["serving_default"]
    x = np.random.RandomState(3).randn(4, 8).astype("float32")
    feeds = {sg.inputs[0][1]: x}
    probs = sg.fetches[sg.output_keys.index("probs")]
    got = run_graph(gd, [probs], feeds)[0]
    assert got.dtype == np.float32
    assert rel_error(got, m.serve(tf.constant(x))["probs"].numpy()) < 0.03


def test_graphdef_cannot_become_a_savedmodel_folder(tmp_path: Path):
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 4], name="x")
        tf.nn.relu(tf.matmul(x, tf.ones([4, 4])), name="out")
    pb = tmp_path / "plain.pb"
    pb.write_bytes(g.as_graph_def().SerializeToString())
    before = listing(tmp_path)
    with pytest.raises(GraphError, match=r"\.pb or \.pbtxt"):
        convert(pb, tmp_path / "as_folder", BF16)
    assert listing(tmp_path) == before


def test_existing_savedmodel_folder_is_not_overwritten(tmp_path: Path):
    src, dst = tmp_path / "loop", tmp_path / "taken"
    save_loop_module(src)
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(WriteError, match="already exists"):
        convert(src, dst, BF16)
    assert listing(dst) == {"keep.txt"}


# ---------------------------------------------------------------------- function calls and v2 control flow
def test_graphdef_with_unlowered_while_and_cond_is_inlined_then_planned(tmp_path: Path):
    m = LoopModule()
    pb = tmp_path / "loop_v2cf.pb"
    gd, x_name, y_name = frozen_pb(m.serve.get_concrete_function(), pb, lower_control_flow=False)
    ops = {n.op for n in gd.node}
    assert "While" in ops and ops & {"If", "StatelessIf"}, "the fixture must keep v2 control flow"
    assert gd.library.function

    model = load_model(pb)
    assert not function_calls(model.graph_def) and not model.graph_def.library.function
    assert {"Enter", "Exit", "Switch", "Merge"} <= {n.op for n in model.graph_def.node}
    assert model.warnings == []
    inlined = inline_functions(gd, [y_name])
    assert not function_calls(inlined)

    out = tmp_path / "loop_bf16.pb"
    plan = convert(pb, out, BF16)
    body = [d for d in plan.converted() if d.op_type == "MatMul" and "while" in d.name]
    assert body and all(d.dtype == "bfloat16" for d in body)
    new = read_pb(out)
    assert any(n.op == "MatMul" and n.attr["T"].type == BF16_TYPE and "while" in n.name for n in new.node)
    x = np.random.RandomState(4).randn(3, 8).astype("float32")
    ref = run_graph(gd, [y_name], {x_name: x})[0]
    got = run_graph(new, [y_name], {x_name: x})[0]
    assert got.dtype == ref.dtype == np.float32
    assert rel_error(got, ref) < 0.03


def test_fetched_control_flow_node_keeps_its_name_through_lowering():
    m = LoopModule()
    frozen = convert_variables_to_constants_v2(m.serve.get_concrete_function(), lower_control_flow=False)
    gd = frozen.graph.as_graph_def()
    while_node = next(n for n in gd.node if n.op == "While")
    out = inline_functions(gd, [f"{while_node.name}:1"])
    assert not function_calls(out)
    kept = {n.name: n for n in out.node}[while_node.name]
    assert kept.op == "IdentityN"
    x = np.random.RandomState(5).randn(2, 8).astype("float32")
    ref = run_graph(gd, [f"{while_node.name}:1"], {frozen.inputs[0].name: x})[0]
    got = run_graph(out, [f"{while_node.name}:1"], {frozen.inputs[0].name: x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_call_tensorflow_will_not_inline_is_reported_and_still_runs(tmp_path: Path, caplog):
    m = JitModule()
    pb = tmp_path / "jit.pb"
    gd, x_name, y_name = frozen_pb(m.serve.get_concrete_function(), pb)
    calls = function_calls(gd)
    assert [n.op for n in calls] == ["StatefulPartitionedCall"], "the fixture must keep an XLA call"
    out = tmp_path / "jit_bf16.pb"
    with caplog.at_level(logging.WARNING, logger="precision_policy"):
        result = convert_model(pb, out, BF16)
    (warning,) = result.warnings
    assert calls[0].name in warning and "_noinline" in warning and "jit_compile" in warning
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]
    assert "StatefulPartitionedCall" in result.plan.unknown
    x = np.random.RandomState(6).randn(3, 8).astype("float32")
    got = run_graph(read_pb(out), [y_name], {x_name: x})[0]
    assert got.dtype == np.float32
    assert rel_error(got, m.serve(tf.constant(x))["y"].numpy()) < 0.03


def test_tf2_savedmodel_with_an_xla_call_converts_serves_and_warns(tmp_path: Path):
    m = JitModule()
    src, dst = tmp_path / "jit", tmp_path / "jit_bf16"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.serve})
    result = convert_model(src, dst, BF16)
    (warning,) = result.warnings
    assert "signature 'serving_default'" in warning and "StatefulPartitionedCall" in warning
    loaded = tf.saved_model.load(str(dst))
    x = np.random.RandomState(7).randn(4, 8).astype("float32")
    y = loaded.signatures["serving_default"](x=tf.constant(x))["y"]
    assert y.dtype == tf.float32
    assert rel_error(y.numpy(), m.serve(tf.constant(x))["y"].numpy()) < 0.03


@pytest.mark.slow
def test_convnext_tiny_frozen_graph_keeps_its_xla_depthwise_convolutions_as_calls(tmp_path: Path):
    """Keras 3 runs ConvNeXt's depthwise (grouped) convolutions as jit_compile=True functions: TF's CPU
    Conv2D kernel has no grouped convolution, so they stay XLA calls, in float32, and are named."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec([1, 64, 64, 3]))
    pb = tmp_path / "convnext.pb"
    gd, x_name, y_name = frozen_pb(fn, pb)
    calls = function_calls(gd)
    assert len(calls) == 18 and all("depthwise_conv" in n.name for n in calls)
    out = tmp_path / "convnext_bf16.pb"
    result = convert_model(pb, out, BF16.model_copy(update={"gray_disagreement": "low"}))
    (warning,) = result.warnings
    assert "18 function call(s)" in warning and "_noinline" in warning and calls[0].name in warning
    x = (np.random.RandomState(8).rand(1, 64, 64, 3) * 255).astype("float32")
    ref = run_graph(gd, [y_name], {x_name: x})[0]
    got = run_graph(read_pb(out), [y_name], {x_name: x})[0]
    assert got.dtype == np.float32 and rel_error(got, ref) < 0.05
    assert sum(1 for d in result.plan.converted() if d.dtype == "bfloat16") > 300


# ---------------------------------------------------------------------- TF1 SavedModel with VariableV2
def test_tf1_variablev2_savedmodel_converts_and_serves_with_the_tf1_loader(tmp_path: Path):
    rng = np.random.RandomState(9)
    xs = rng.randn(3, 8).astype("float32")
    src, dst = tmp_path / "tf1", tmp_path / "tf1_bf16"
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        w1 = tf.compat.v1.Variable(rng.randn(8, 16).astype("float32"), name="w1", use_resource=False)
        b1 = tf.compat.v1.Variable(np.zeros(16, "float32"), name="b1", use_resource=False)
        w2 = tf.compat.v1.Variable(rng.randn(16, 4).astype("float32"), name="w2", use_resource=False)
        y = tf.nn.softmax(tf.matmul(tf.nn.relu(tf.nn.bias_add(tf.matmul(x, w1), b1)), w2), name="y")
        assert "VariableV2" in {n.op for n in g.as_graph_def().node}
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            ref = sess.run(y, {x: xs})
            builder = tf.compat.v1.saved_model.builder.SavedModelBuilder(str(src))
            sig = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={"predict": sig})
            builder.save()

    plan = convert(src, dst, BF16)
    assert {d.op_type for d in plan.converted() if d.dtype == "bfloat16"} >= {"MatMul"}
    assert (dst / "variables").is_dir()
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        mg = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(dst))
        nodes = {n.name: n for n in sess.graph.as_graph_def().node}
        sig = mg.signature_def["predict"]
        got = sess.run(sig.outputs["y"].name, {sig.inputs["x"].name: xs})
    assert nodes["w1"].op == "VariableV2" and nodes["w1"].attr["dtype"].type == types_pb2.DT_FLOAT
    assert any(n.op == "MatMul" and n.attr["T"].type == BF16_TYPE for n in nodes.values())
    assert got.dtype == np.float32
    assert rel_error(got, ref) < 0.03


def test_tf1_savedmodel_with_v2_control_flow_around_a_variablev2_is_inlined_and_serves(tmp_path: Path):
    rng = np.random.RandomState(10)
    xs = rng.randn(3, 8).astype("float32")
    src, dst = tmp_path / "tf1_loop", tmp_path / "tf1_loop_bf16"
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        w = tf.compat.v1.Variable(rng.randn(8, 8).astype("float32") * 0.5, name="w", use_resource=False)
        _, h = tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, tf.nn.relu(tf.matmul(h, w)) + 0.1),
                             [tf.constant(0), x])
        y = tf.identity(tf.cond(tf.reduce_sum(h) > 0.0, lambda: tf.nn.softmax(h), lambda: tf.nn.tanh(h)), name="y")
        ops = {n.op for n in g.as_graph_def().node}
        assert "VariableV2" in ops and ops & {"While", "StatelessWhile"}, "the fixture must use v2 control flow"
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            ref = sess.run(y, {x: xs})
            tf.compat.v1.saved_model.simple_save(sess, str(src), {"x": x}, {"y": y})

    model = load_model(src)
    assert not function_calls(model.graph_def) and model.warnings == []
    plan = convert(src, dst, BF16)
    assert any(d.op_type == "MatMul" and d.dtype == "bfloat16" and "while" in d.name for d in plan.converted())
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        mg = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(dst))
        sig = mg.signature_def["serving_default"]
        got = sess.run(sig.outputs["y"].name, {sig.inputs["x"].name: xs})
    assert got.dtype == np.float32 and rel_error(got, ref) < 0.03


# ---------------------------------------------------------------------- never write what does not load
def broken_graph_def() -> graph_pb2.GraphDef:
    """x (float32) -> relu whose kernel type says bfloat16, with no Cast between: TF refuses to import it."""
    gd = graph_pb2.GraphDef()
    x = gd.node.add(name="x", op="Placeholder")
    x.attr["dtype"].type = types_pb2.DT_FLOAT
    relu = node_def_pb2.NodeDef(name="relu", op="Relu", input=["x"])
    relu.attr["T"].type = BF16_TYPE
    gd.node.append(relu)
    return gd


def test_verify_graph_def_names_the_node_tensorflow_rejects():
    gd = broken_graph_def()
    with pytest.raises(GraphError) as info:
        verify_graph_def(gd, ["relu"], file="model.pb")
    err = info.value
    assert err.node == "relu" and err.file == "model.pb"
    assert "does not load" in str(err) and "keep_dtype" in str(err)
    gd.node[1].attr["T"].type = types_pb2.DT_FLOAT
    verify_graph_def(gd, ["relu"])  # the repaired graph passes
    with pytest.raises(GraphError) as info:
        verify_graph_def(gd, ["missing:0"])
    assert info.value.node == "missing"


#: An op-info library claiming a bfloat16 kernel TensorFlow's MatrixInverse does not have.
WRONG_LIB = {"MatrixInverse": {
    "input0": {"name": "x", "dtype": "bfloat16,float", "format": "ND,ND", "paramType": "required"},
    "output0": {"name": "y", "dtype": "bfloat16,float", "format": "ND,ND", "paramType": "required"},
    "precision_reduce": {"flag": "true"},
}}


def inverse_models(folder: Path) -> dict[str, Path]:
    """The same x -> MatrixInverse -> out graph as a .pb, a TF1 SavedModel and a TF2 SavedModel."""
    paths = {"pb": folder / "inv.pb", "tf1": folder / "inv_tf1", "tf2": folder / "inv_tf2"}
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [3, 3], name="x")
        y = tf.identity(tf.linalg.inv(x, name="inv"), name="out")
        paths["pb"].write_bytes(g.as_graph_def().SerializeToString())
        with tf.compat.v1.Session(graph=g) as sess:
            tf.compat.v1.saved_model.simple_save(sess, str(paths["tf1"]), {"x": x}, {"out": y})

    class Inv(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([3, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"out": tf.linalg.inv(x, name="inv")}

    module = Inv()
    tf.saved_model.save(module, str(paths["tf2"]), signatures={"serving_default": module.serve})
    return paths


def test_convert_writes_nothing_when_the_result_would_not_load(tmp_path: Path):
    lib = tmp_path / "aic-wrong-ops-info.json"
    lib.write_text(json.dumps(WRONG_LIB))
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info=lib, use_env_lists=False)
    models = tmp_path / "models"
    models.mkdir()
    paths = inverse_models(models)
    out = tmp_path / "out"
    out.mkdir()
    for kind, dst in (("pb", out / "inv_bf16.pb"), ("pb", out / "inv_bf16.pbtxt"), ("tf1", out / "inv_tf1_bf16"),
                      ("tf2", out / "inv_tf2_bf16"), ("tf2", out / "inv_tf2_bf16.pb")):
        with pytest.raises(GraphError) as info:
            convert(paths[kind], dst, cfg)
        err = info.value
        assert err.node is not None and err.node.endswith("inv"), (kind, str(err))
        assert "not in the list of allowed values" in str(err) and "nothing was written" in str(err)
        assert listing(out) == set(), (kind, listing(out))
    # the same models convert when the library is right (here: MatrixInverse is not in it, so it stays float32)
    ok_lib = tmp_path / "aic-ok-ops-info.json"
    ok_lib.write_text("{}")
    plan = convert(paths["tf2"], out / "ok", cfg.model_copy(update={"op_info": ok_lib}))
    assert "MatrixInverse" in plan.unknown
    a = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0]], "float32")
    got = tf.saved_model.load(str(out / "ok")).signatures["serving_default"](x=tf.constant(a))["out"].numpy()
    np.testing.assert_allclose(got, np.linalg.inv(a), rtol=1e-5)
