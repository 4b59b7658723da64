"""CastPlan: summary in TF's words, explain, diff, and the stable versioned JSON form."""

import json

import pytest

import precision_policy as pp
from precision_policy.errors import PlanFormatError
from precision_policy.plan import CastPlan
from precision_policy.rules import Rule, Why

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
    assert doc["format"] == "precision_policy.cast_plan" and doc["version"] == 3
    g = pp.OpGraph.from_json(TRANSFORMER)
    assert list(doc["nodes"]) == g.node_names
    assert all({"dtype", "reason", "rule", "op", "origin", "inputs", "outputs"} <= set(v) for v in doc["nodes"].values())
    assert {Rule(v["rule"]) for v in doc["nodes"].values()} >= {Rule.SOURCE, Rule.WHITE, Rule.BLACK, Rule.GRAY_FOLLOWS}
    assert all(("followed" in v) == (v["rule"] == "gray_follows") for v in doc["nodes"].values()
               if v["rule"] not in ("control_flow", "reads_source"))  # (those name the value they carry or read)
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
    assert [(d.rule, d.followed) for d in back] == [(d.rule, d.followed) for d in p]


def _as_version_1(doc: dict) -> dict:
    """A plan JSON as version 1 wrote it: no rule, no followed."""
    doc = json.loads(json.dumps(doc))
    doc["version"] = 1
    for node in doc["nodes"].values():
        node.pop("rule", None)
        node.pop("followed", None)
    return doc


def test_version_1_plans_still_load():
    p = pp.plan(TRANSFORMER, precision_mode="allow_mix_precision", use_env_lists=False)
    old = CastPlan.from_dict(_as_version_1(p.to_dict()))
    assert old.summary() == p.summary() and old.diff(p).empty
    assert [d.converted for d in old] == [d.converted for d in p]
    assert all(d.rule is None and d.followed is None for d in old)  # not recorded; the prose is not parsed back
    assert [d.reason for d in old] == [d.reason for d in p]
    assert "why" in old.explain("loss/Mean")
    again = json.loads(old.to_json())
    assert again["version"] == 3 and all("rule" not in v for v in again["nodes"].values())


def test_version_2_plans_load_with_their_rules_and_stored_reasons():
    p = pp.plan(TRANSFORMER, precision_mode="allow_mix_precision", use_env_lists=False)
    doc = json.loads(p.to_json())
    doc["version"] = 2
    for node in doc["nodes"].values():  # version 2 stored the rule, followed node and reason text only
        for key in ("detail", "where", "wanted", "inner"):
            node.pop(key, None)
        node["reason"] = "as v2 wrote it: " + node["reason"]
    old = CastPlan.from_dict(doc)
    assert [(d.rule, d.followed) for d in old] == [(d.rule, d.followed) for d in p]
    assert all(d.reason.startswith("as v2 wrote it: ") for d in old)  # the stored text, not re-rendered
    assert old.diff(p).empty


def test_structured_reasons_round_trip_and_render_the_same_prose():
    cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    p = pp.plan(TRANSFORMER, cfg)
    back = CastPlan.from_dict(json.loads(p.to_json()))
    assert back.whys == p.whys and back.reasons == p.reasons
    mm = next(d for d in p if d.rule is Rule.WHITE)
    assert mm.why == Why(Rule.WHITE) and p.why(mm.name) == mm.why
    relu = next(d for d in p if d.rule is Rule.GRAY_FOLLOWS)
    assert relu.why.followed == relu.followed and relu.reason == f"gray: follows {relu.followed}"


def test_version_1_plan_file_written_by_the_old_code_loads(tmp_path):
    text = json.dumps({
        "format": "precision_policy.cast_plan", "version": 1, "mode": "allow_mix_precision", "low_dtype": "float16",
        "op_info": "ascend910", "config": {}, "keep_output_dtype": True,
        "summary": "Converted 2/3 nodes to float16 precision using 1 cast(s) to float16 (excluding Const and Variable casts)",
        "outputs": ["relu:0"],
        "nodes": {
            "x": {"op": "Placeholder", "origin": "float32", "dtype": "float32", "inputs": [], "outputs": ["float32"],
                  "reason": "source (input)"},
            "mm": {"op": "MatMulV2", "origin": "float32", "dtype": "float16", "inputs": ["float16", "float16"],
                   "outputs": ["float16"], "reason": "white-list"},
            "relu": {"op": "Relu", "origin": "float32", "dtype": "float16", "inputs": ["float16"],
                     "outputs": ["float16"], "reason": "gray: follows mm"}},
        "casts": [{"tensor": "x:0", "from": "float32", "to": "float16", "source": "input", "consumers": ["mm"],
                   "fetch": False},
                  {"tensor": "relu:0", "from": "float16", "to": "float32", "source": "op", "consumers": [],
                   "fetch": True}],
        "unknown_ops": {}, "warnings": []})
    path = tmp_path / "old.json"
    path.write_text(text)
    old = CastPlan.from_json(path)
    assert old["relu"].dtype == "float16" and old["relu"].rule is None and old["relu"].reason == "gray: follows mm"
    assert old.summary() == json.loads(text)["summary"]
    assert "gray chain" not in old.explain("relu")  # v1 recorded no followed node


def test_unknown_rule_is_a_plan_format_error():
    doc = pp.plan(CONV, precision_mode="allow_mix_precision", use_env_lists=False).to_dict()
    next(iter(doc["nodes"].values()))["rule"] = "vibes"
    with pytest.raises(PlanFormatError, match="unknown rule 'vibes'"):
        CastPlan.from_dict(doc)


def test_explain_chain_follows_names_with_spaces():
    g = graph([("in put", "Placeholder", []), ("w", "Const", []), ("mat mul", "MatMulV2", ["in put:0", "w:0"]),
               ("re lu", "Relu", ["mat mul:0"]), ("soft, max", "Relu", ["re lu:0"])], ["soft, max:0"])
    p = pp.plan(g, precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    assert (p["soft, max"].rule, p["soft, max"].followed) == (Rule.GRAY_FOLLOWS, "re lu")
    assert (p["re lu"].rule, p["re lu"].followed) == (Rule.GRAY_FOLLOWS, "mat mul")
    assert p["mat mul"].rule is Rule.WHITE
    assert "gray chain   : soft, max <- re lu <- mat mul (white-list)" in p.explain("soft, max")


def test_from_dict_rejects_foreign_documents():
    with pytest.raises(PlanFormatError, match="not a cast plan"):
        CastPlan.from_dict({"format": "x"})
    with pytest.raises(PlanFormatError, match="version"):
        CastPlan.from_dict({"format": "precision_policy.cast_plan", "version": 99})
    with pytest.raises(PlanFormatError, match="malformed"):
        CastPlan.from_dict({"format": "precision_policy.cast_plan", "version": 1, "nodes": {"a": {}}, "casts": []})
    with pytest.raises(PlanFormatError, match="malformed"):
        CastPlan.from_dict({"format": "precision_policy.cast_plan", "version": 2, "nodes": {"a": {}}, "casts": []})


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
