"""Where TF's ``TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_*`` lists apply (RunConfig.use_env_lists).

The rule: ``use_env_lists=True``/``False`` is obeyed on every route; ``None`` (the default)
applies them where TensorFlow users expect them (TF graphs: the TF backend, the CLI on TF
files, OpGraphs built in Python) and not to torch routes or graph JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import precision_policy as pp
from precision_policy.cli import main as cli_main

P = "TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_"
DENY_MATMUL = {P + "DENYLIST_ADD": "MatMulV2"}
REPO = Path(__file__).resolve().parent.parent
CONV_JSON = REPO / "examples" / "graphs" / "conv2d_bias_relu.json"


def test_config_rule_explicit_values_win_and_none_follows_the_route():
    auto = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b")
    assert auto.use_env_lists is None
    assert auto.env_lists_apply(default=True) and not auto.env_lists_apply(default=False)
    on = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=True)
    off = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False)
    assert on.env_lists_apply(default=False) and not off.env_lists_apply(default=True)
    # only the mixed modes have lists to move ops between
    assert not pp.RunConfig(precision_mode="force_fp16", use_env_lists=True).env_lists_apply()


def test_python_graph_follows_env_by_default_json_file_does_not(monkeypatch):
    monkeypatch.setenv(P + "DENYLIST_ADD", "Conv2D")
    g = pp.OpGraph.from_json(CONV_JSON)
    conv = next(n for n in g.names if g.node(n).op_type == "Conv2D")
    assert not g.env_lists
    assert pp.plan(g, precision_mode="allow_mix_precision", op_info="ascend910b")[conv].dtype == "float16"
    assert pp.plan(CONV_JSON, precision_mode="allow_mix_precision", op_info="ascend910b")[conv].dtype == "float16"
    assert pp.plan(CONV_JSON, precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=True)[conv].dtype == "float32"
    g.env_lists = True  # a graph built in Python (the default) counts as a TF graph
    assert pp.plan(g, precision_mode="allow_mix_precision", op_info="ascend910b")[conv].dtype == "float32"
    assert pp.plan(g, precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False)[conv].dtype == "float16"


def test_cli_on_graph_json_ignores_env_unless_asked(monkeypatch, capsys):
    monkeypatch.setenv(P + "DENYLIST_ADD", "Conv2D")

    def conv_dtype(*extra: str) -> str:
        assert cli_main(["plan", str(CONV_JSON), "--mode", "allow_mix_precision", "--op-info", "ascend910b", "--json", *extra]) == 0
        doc = json.loads(capsys.readouterr().out)
        p = pp.CastPlan.from_dict(doc)
        return next(p[n].dtype for n in p.names if p[n].op_type == "Conv2D")

    assert conv_dtype() == "float16"
    assert conv_dtype("--env-lists", "on") == "float32"
    assert conv_dtype("--env-lists", "off") == "float16"


# ---------------------------------------------------------------------- torch: off by default
torch = pytest.importorskip("torch")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), torch.randn(2, 8)


def _cfg(**kw):
    return pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", **kw)


def test_torch_precision_context_ignores_env_by_default(monkeypatch):
    from precision_policy.torch import precision

    model, x = _mlp()
    monkeypatch.setenv(P + "DENYLIST_ADD", "MatMulV2")
    with precision(_cfg()):
        assert model(x).dtype == torch.bfloat16
    with precision(_cfg(use_env_lists=True)):
        assert model(x).dtype == torch.float32
    with precision(_cfg(use_env_lists=True, env={})):  # an explicit environment without the lists
        assert model(x).dtype == torch.bfloat16


def test_torch_precision_context_env_changes_are_seen_with_use_env_lists_true(monkeypatch):
    """The per-config decision cache keys on the env lists it read: changing them is seen."""
    from precision_policy.torch import precision

    model, x = _mlp()
    cfg = _cfg(use_env_lists=True)
    monkeypatch.delenv(P + "DENYLIST_ADD", raising=False)
    with precision(cfg):
        assert model(x).dtype == torch.bfloat16
    monkeypatch.setenv(P + "DENYLIST_ADD", "MatMulV2")
    with precision(cfg):
        assert model(x).dtype == torch.float32


def test_torch_prepare_ignores_env_by_default(monkeypatch):
    from precision_policy.torch import prepare

    monkeypatch.setenv(P + "DENYLIST_ADD", "MatMulV2")
    model, x = _mlp()
    prepared, _ = prepare(model, None, _cfg(), keep_output_dtype=False)
    assert prepared(x).dtype == torch.bfloat16
    model, x = _mlp()
    prepared, _ = prepare(model, None, _cfg(use_env_lists=True), keep_output_dtype=False)
    assert prepared(x).dtype == torch.float32


def test_torch_trace_and_plan_ignore_env_by_default(monkeypatch):
    from precision_policy.torch import apply, trace

    monkeypatch.setenv(P + "DENYLIST_ADD", "MatMulV2")
    model, x = _mlp()
    g = trace(model, (x,))
    assert not g.env_lists
    p = pp.plan(g, _cfg())
    assert {p[n].dtype for n in p.names if p[n].op_type == "MatMulV2"} == {"bfloat16"}
    assert not any("env " in p[n].reason for n in p.names)
    p_on = pp.plan(g, _cfg(use_env_lists=True))
    assert {p_on[n].dtype for n in p_on.names if p_on[n].op_type == "MatMulV2"} == {"float32"}
    # and the applied graph module runs as planned
    gm = apply(model, p, (x,)).eval()
    ref = model(x)
    assert torch.allclose(gm(x).float(), ref, atol=0.1, rtol=0.05)


def test_torch_convert_for_inference_ignores_env_by_default(monkeypatch):
    from precision_policy.torch import convert_for_inference

    monkeypatch.setenv(P + "DENYLIST_ADD", "MatMulV2")
    model, x = _mlp()
    fast = convert_for_inference(model, _cfg(), (x,))
    fast_on = convert_for_inference(_mlp()[0], _cfg(use_env_lists=True), (x,))
    assert fast.pp_inference_stats.low_ops > fast_on.pp_inference_stats.low_ops


# ---------------------------------------------------------------------- TensorFlow: on by default
def _tf_graph_def():
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 8], name="x")
        w = tf.constant(np.random.RandomState(0).randn(8, 8).astype("float32"), name="w")
        tf.nn.relu(tf.matmul(x, w, name="mm"), name="out")
    return g.as_graph_def()


def test_tf_convert_and_plan_honour_env_by_default(monkeypatch, tmp_path):
    from precision_policy.backends.tensorflow.convert import rewrite_with_plan

    gd = _tf_graph_def()
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
    monkeypatch.delenv(P + "DENYLIST_ADD", raising=False)
    _, p = rewrite_with_plan(gd, cfg, ["out"])
    assert p["mm"].dtype == "bfloat16"
    monkeypatch.setenv(P + "DENYLIST_ADD", "MatMul")
    out, p = rewrite_with_plan(gd, cfg, ["out"])
    assert p["mm"].dtype == "float32" and "DENYLIST_ADD" in p["mm"].reason
    assert all(n.attr["T"].type == 1 for n in out.node if n.name == "mm")  # DT_FLOAT
    _, p = rewrite_with_plan(gd, cfg.model_copy(update={"use_env_lists": False}), ["out"])
    assert p["mm"].dtype == "bfloat16"
    # the CLI on a TF file (.pb) honours them too
    pb = tmp_path / "g.pb"
    pb.write_bytes(gd.SerializeToString())
    g = pp.graph.load_graph(pb)
    assert g.env_lists
    assert pp.plan(g, cfg)["mm"].dtype == "float32"
