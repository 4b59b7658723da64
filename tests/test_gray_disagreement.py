"""``RunConfig.gray_disagreement``: what a gray op follows when its inputs arrive in different dtypes.

"widest" (the default, as torch's type promotion) keeps it in the widest dtype; "low" (as
TensorFlow's AMP) makes it low as soon as one computing input is low.
"""

from __future__ import annotations

import pytest

import precision_policy as pp
from precision_policy.rules import Rule

from conftest import graph, plan

# x -> mm (white, float16)   \
#                              add (gray: its computing inputs disagree) -> out (gray Relu)
# x -> rs (black, float32)   /
NODES = [
    ("x", "Placeholder", []),
    ("w", "Const", []),
    ("mm", "MatMulV2", ["x:0", "w:0"]),
    ("rs", "ReduceSum", ["x:0"]),
    ("add", "Add", ["mm:0", "rs:0"]),
    ("out", "Relu", ["add:0"]),
]


@pytest.mark.parametrize("how,dtype,followed", [("widest", "float32", "rs"), ("low", "float16", "mm")])
def test_planner_gray_op_with_disagreeing_inputs(small_lib, how, dtype, followed):
    p = plan(graph(NODES, ["out:0"]), "allow_mix_precision", small_lib, gray_disagreement=how)
    assert (p["mm"].dtype, p["rs"].dtype) == ("float16", "float32")  # the inputs do disagree
    assert p["add"].dtype == dtype and p["add"].rule is Rule.GRAY_FOLLOWS and p["add"].followed == followed
    assert p["out"].dtype == dtype and p["out"].followed == "add"  # and the choice propagates
    low_casts = {(c.tensor, c.to) for c in p.casts}
    if how == "low":
        assert ("rs:0", "float16") in low_casts
        assert p.config.get("gray_disagreement") == "low"
    else:
        assert ("mm:0", "float32") in low_casts
        assert "gray_disagreement" not in p.config


def test_planner_agreeing_inputs_are_not_affected(small_lib):
    nodes = [n for n in NODES if n[0] != "rs"] + [("rs", "MatMulV2", ["x:0", "w:0"])]
    for how in ("widest", "low"):
        p = plan(graph(nodes, ["out:0"]), "allow_mix_precision", small_lib, gray_disagreement=how)
        assert p["add"].dtype == "float16"


def test_gray_disagreement_is_validated():
    with pytest.raises(pp.errors.ConfigError, match="gray_disagreement"):
        pp.RunConfig(gray_disagreement="lowest")


def test_tf_backend_gray_disagreement(tmp_path):
    """Through the TF backend: the rewritten GraphDef's AddV2 runs in the chosen dtype and still runs."""
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    from precision_policy.backends.tensorflow.convert import rewrite_with_plan

    from tf_helpers import run_graph

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [4, 8], name="x")
        w = tf.constant(np.random.RandomState(0).randn(8, 8).astype("float32") / 3, name="w")
        h = tf.add(tf.matmul(x, w, name="mm"), x, name="add")  # residual: bfloat16 matmul + float32 input
        tf.nn.relu(h, name="out")
    gd = g.as_graph_def()
    feeds = {"x:0": np.random.RandomState(1).randn(4, 8).astype("float32")}
    ref = run_graph(gd, feeds, ["out:0"])[0]
    for how, want in (("widest", tf.float32), ("low", tf.bfloat16)):
        cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False,
                           gray_disagreement=how)
        out, p = rewrite_with_plan(gd, cfg, ["out"])
        assert p["mm"].dtype == "bfloat16" and p["add"].dtype == tf.as_dtype(want).name
        add = next(n for n in out.node if n.name == "add")
        assert add.attr["T"].type == want.as_datatype_enum
        y = run_graph(out, feeds, ["out:0"])[0]
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref, rtol=0.05, atol=0.05)


def test_torch_eager_gray_disagreement():
    """Through torch's eager route: ``linear(x) + x`` is float32 (widest, as autocast) or bfloat16 (low)."""
    torch = pytest.importorskip("torch")
    from precision_policy.torch import precision

    torch.manual_seed(0)

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            assert h.dtype == torch.bfloat16
            return h + x

    model, x = Residual(), torch.randn(4, 8)
    for how, want in (("widest", torch.float32), ("low", torch.bfloat16)):
        cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu",
                           use_env_lists=False, gray_disagreement=how)
        with precision(cfg, model=model):  # the model's inputs count as graph inputs: x votes float32
            assert model(x).dtype == want
