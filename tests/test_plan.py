"""CastPlan: summary in TF's words, explain, diff, and the stable versioned JSON form."""

import json

import pytest

import precision_policy as pp
from precision_policy.errors import PlanFormatError
from precision_policy.plan import CastPlan

from conftest import EXAMPLES, graph, plan

CONV = EXAMPLES / "conv2d_bias_relu.json"
TRANSFORMER = EXAMPLES / "transformer_encoder_block.json"


def test_seed_conv_graph_summary_matches_tf_wording():
    p = pp.plan(CONV, precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    # like TF's log for this graph, no cast is counted: the Reshape of the variable X runs in
    # float16 too (its only reader needs it), so the cast sits after the variable read
    assert p.summary() == "Converted 4/8 nodes to float16 precision using 0 cast(s) to float16 (excluding Const and Variable casts)"
    assert [d.name for d in p.converted()] == ["x", "myConv", "BiasAdd", "myOutput"]


def test_json_has_every_node_and_cast_and_is_byte_stable(tmp_path):
    cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    p1 = pp.plan(TRANSFORMER, cfg)
    p2 = pp.plan(pp.OpGraph.from_json(TRANSFORMER), cfg)
    text = p1.to_json()
    assert text == p2.to_json()
    doc = json.loads(text)
    assert doc["format"] == "precision_policy.cast_plan" and doc["version"] == 1
    g = pp.OpGraph.from_json(TRANSFORMER)
    assert list(doc["nodes"]) == g.node_names
    assert all({"dtype", "reason", "op", "origin", "inputs", "outputs"} <= set(v) for v in doc["nodes"].values())
    assert all({"tensor", "to", "from", "source", "consumers"} <= set(c) for c in doc["casts"])
    out = tmp_path / "plan.json"
    p1.to_json(out)
    assert out.read_text() == text


def test_json_round_trip():
    p = pp.plan(TRANSFORMER, precision_mode="allow_mix_precision", use_env_lists=False)
    back = CastPlan.from_dict(json.loads(p.to_json()))
    assert back.to_json() == p.to_json()
    assert back.summary() == p.summary()
    assert back.diff(p).empty
    assert "why" in back.explain("loss/Mean")


def test_from_dict_rejects_foreign_documents():
    with pytest.raises(PlanFormatError, match="not a cast plan"):
        CastPlan.from_dict({"format": "x"})
    with pytest.raises(PlanFormatError, match="version"):
        CastPlan.from_dict({"format": "precision_policy.cast_plan", "version": 99})
    with pytest.raises(PlanFormatError, match="malformed"):
        CastPlan.from_dict({"format": "precision_policy.cast_plan", "version": 1, "nodes": {"a": {}}, "casts": []})


def test_diff_shows_what_a_pin_changes(small_lib, tmp_path):
    from precision_policy.opinfo.edit import pin

    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("mm", "MatMulV2", ["x:0", "w:0"]), ("r", "Relu", ["mm:0"]),
               ("sm", "Softmax", ["r:0"])], ["sm:0"])
    before = plan(g, "allow_mix_precision", small_lib)
    pin(small_lib, "Relu")
    after = plan(g, "allow_mix_precision", small_lib)
    d = before.diff(after)
    assert [c[0] for c in d.changed] == ["r"]
    assert ("mm:0", "float32") in d.casts_added and ("r:0", "float16") in d.casts_added
    assert "~ r: float16 -> float32" in str(d)
    assert before.diff(before).empty and str(before.diff(before)) == "plans are identical"


def test_explain_names_library_facts_and_casts():
    p = pp.plan(CONV, precision_mode="allow_mix_precision", use_env_lists=False)
    text = p.explain("myConv")
    assert "white-list" in text and "cube op (heavyOp)" in text and "kernels: float16" in text
    assert "W:0 float32 -> float16 (variable read, cast after the read)" in text
    with pytest.raises(pp.GraphError, match="did you mean"):
        p.explain("myconv")


@pytest.mark.parametrize("mode", [m.name for m in pp.modes.all_modes()])
@pytest.mark.parametrize("lib", ["ascend910", "ascend910b"])
def test_every_mode_plans_the_transformer_block(mode, lib):
    p = pp.plan(TRANSFORMER, precision_mode=mode, op_info=lib, use_env_lists=False)
    doc = p.to_dict()
    assert not p.unknown
    for name, node in doc["nodes"].items():
        if node["op"] in ("ApplyAdam", "ReduceMean", "SoftmaxCrossEntropyWithLogits") and mode.startswith("allow_mix"):
            assert node["dtype"] == "float32", name  # black ops keep float32
    if mode == "force_fp32":
        assert doc["summary"].startswith("Converted 0/")
    seen = set()
    for c in doc["casts"]:
        assert c["from"] != c["to"]
        assert (c["tensor"], c["to"]) not in seen
        seen.add((c["tensor"], c["to"]))


def test_plan_accepts_settings_and_overrides_config():
    cfg = pp.RunConfig(precision_mode="force_fp32", use_env_lists=False)
    p = pp.plan(CONV, cfg, precision_mode="force_fp16")
    assert p.mode_name == "force_fp16"
