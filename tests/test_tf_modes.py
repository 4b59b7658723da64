"""Every row of the mode table through the TensorFlow backend: convert a frozen Keras model,
import the result into TF, run it, compare with float32, and check the node dtypes the mode promises.

Column 1 of the table (an fp32 op that supports low) on ``ascend910b`` (float32, float16 and
bfloat16 kernels); column 2 (an op with no fp32 kernel) on ``ascend910``, whose Conv2D is float16 only.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import precision_policy as pp  # noqa: E402
from precision_policy import modes  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402
from precision_policy.opinfo import load_library  # noqa: E402
from precision_policy.opinfo.overrides import tensorflow_aliases  # noqa: E402

from tf_helpers import run_graph  # noqa: E402
from tf_models import freeze  # noqa: E402

ALL_MODES = [m.name for m in modes.all_modes()]
#: relative L2 error allowed against float32, by the mode's low dtype in use
TOL = {"float32": 0.0, "float16": 5e-3, "bfloat16": 3e-2}  # measured: <=6.6e-4, <=3.6e-3
#: the computing op types of the model, as plans name them (TF names mapped through aliases/tensorflow.json)
COMPUTE = {"Conv2D", "BiasAdd", "Relu", "MaxPool", "MatMul", "LogSoftmaxV2", "AddV2", "Mul", "Sub", "Rsqrt",
           "Reshape", "Squeeze"}


def build_small_cnn():
    """A frozen Keras CNN, its feeds, and its float32 output."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(x)  # cube op (white, heavy)
    h = keras.layers.BatchNormalization()(h)  # gray arithmetic (Mul/Sub/AddV2/Rsqrt)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)  # white vector op
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu")(h)  # cube op MatMul + gray BiasAdd/Relu
    h = keras.layers.Dense(5)(h)
    y = keras.layers.Activation("log_softmax")(h)  # black-listed LogSoftmax
    fr = freeze("small_cnn", keras.Model(x, y), tf.TensorSpec([2, 8, 8, 3], tf.float32))
    feeds = {fr.inputs[0]: fr.example}
    ref = run_graph(fr.graph_def, feeds, fr.outputs)[0]
    return fr, feeds, ref


@pytest.fixture(scope="module")
def frozen():
    return build_small_cnn()


def _rel(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _convert_and_run(frozen, mode, lib, native_fp16):
    fr, feeds, ref = frozen
    cfg = pp.RunConfig(precision_mode=mode, op_info=lib, use_env_lists=False, native_fp16=native_fp16)
    out, plan = rewrite_with_plan(fr.graph_def, cfg, fr.fetch_nodes)
    y = run_graph(out, feeds, fr.outputs)[0]
    assert y.dtype == np.float32  # the fetch keeps its origin dtype
    assert np.isfinite(y).all()
    return out, plan, y


def _computing(plan):
    """name -> (op type, planned dtype) of the computing nodes whose dtype the mode chooses."""
    return {n: (plan[n].op_type, plan[n].dtype) for n in plan.names if plan[n].op_type in COMPUTE}


def _info(lib, op):
    return lib[tensorflow_aliases().get(op, op)]


def _check_graph_dtypes(out, plan, native_fp16):
    """The rewritten GraphDef runs every computing node in the plan's dtype (float16 emulated:
    float32 kernel, float16 values, as the backend documents)."""
    by_name = {n.name: n for n in out.node}
    for name, (op, dtype) in _computing(plan).items():
        node = by_name[name]
        assert tensorflow_aliases().get(node.op, node.op) == op
        have = tf.as_dtype(node.attr["T"].type).name
        # emulated float16: a float32 kernel (data-movement ops such as Reshape move float16 natively)
        expect = {dtype, "float32"} if dtype == "float16" and not native_fp16 else {dtype}
        assert have in expect, (name, op, have, dtype)
        if dtype == "float16" and not native_fp16 and op in ("Conv2D", "MatMul"):
            assert have == "float32"


# ---------------------------------------------------------------------- column 1: every op has an fp32 kernel
@pytest.mark.parametrize("native_fp16", [False, True], ids=["emulated", "native"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_mode_row_through_tf_backend(frozen, mode, native_fp16):
    lib = load_library("ascend910b")
    m = modes.get(mode)
    out, plan, y = _convert_and_run(frozen, mode, "ascend910b", native_fp16)
    _check_graph_dtypes(out, plan, native_fp16)
    nodes = _computing(plan)
    lowered = {n for n, (_, d) in nodes.items() if d != "float32"}
    assert {d for n, (_, d) in nodes.items() if n in lowered} <= {m.low}
    cube = {n for n, (op, _) in nodes.items() if _info(lib, op).heavy}
    assert {op for n, (op, _) in nodes.items() if n in cube} == {"Conv2D", "MatMul"}
    if mode in ("force_fp32", "must_keep_origin_dtype", "allow_fp32_to_bf16"):
        assert not lowered  # every op has a float32 kernel: nothing lowered, bit-identical results
        assert not any(n.op == "Cast" for n in out.node)
        np.testing.assert_array_equal(y, frozen[2])
        return
    if mode == "allow_fp32_to_fp16":
        assert lowered == cube  # cube ops to fp16, vector ops stay fp32
    elif mode in ("force_fp16", "force_bf16"):
        # every float op with a kernel in the low dtype is lowered (here: all of them)
        assert lowered == {n for n, (op, _) in nodes.items() if _info(lib, op).supports(m.low)} == set(nodes)
    else:  # mixed: white low, black origin, gray follows its producers
        for n, (op, d) in nodes.items():
            flag = _info(lib, op).flag
            if flag == "white":
                assert d == m.low, n
            elif flag == "black":
                assert d == "float32", n
            else:
                assert plan[n].rule is not None and plan[n].rule.value.startswith("gray"), n
        assert any(op == "LogSoftmaxV2" for op, _ in nodes.values())  # a black op was checked
    assert lowered, mode
    err = _rel(y, frozen[2])
    assert 0 < err < TOL[m.low], (mode, err)


# ---------------------------------------------------------------------- column 2: Conv2D has no fp32 kernel
@pytest.mark.parametrize("mode", ALL_MODES)
def test_op_without_fp32_kernel_through_tf_backend(frozen, mode):
    fr = frozen[0]
    conv = next(n.name for n in fr.graph_def.node if n.op == "Conv2D")
    if mode == "must_keep_origin_dtype":
        with pytest.raises(pp.errors.PrecisionError, match="Conv2D") as err:
            rewrite_with_plan(fr.graph_def, pp.RunConfig(precision_mode=mode, op_info="ascend910",
                                                         use_env_lists=False), fr.fetch_nodes)
        assert conv in str(err.value)  # the error names the op
        return
    out, plan, y = _convert_and_run(frozen, mode, "ascend910", False)
    _check_graph_dtypes(out, plan, False)
    # ascend910 has no bfloat16 kernels: a bf16 mode runs Conv2D in the float16 kernel it has, and says so
    assert plan[conv].dtype == "float16"
    if modes.get(mode).low == "bfloat16":
        assert any(conv in w or "Conv2D" in w for w in plan.warnings)
    # float16 with casts around it (emulated: a float32 kernel whose output is rounded to float16)
    assert any(n.op == "Cast" and n.input[0] == conv and n.attr["DstT"].type == tf.float16.as_datatype_enum
               for n in out.node)
    if mode == "force_fp32":
        assert {n for n, (_, d) in _computing(plan).items() if d != "float32"} == {conv}
    assert _rel(y, frozen[2]) < TOL["float16"]
