"""Every row of DESIGN.md's mode table, gray chains, graph inputs, fetches and cast placement."""

import pytest

import precision_policy as pp
from precision_policy import modes
from precision_policy.errors import ConfigError, PrecisionError
from precision_policy.rules import Rule, Why

from conftest import EXAMPLES, casts, graph, plan

# x -> mm(MatMulV2, cube, fp16+fp32) -> relu(gray) -> sm(Softmax, white vector) -> rs(ReduceSum, black)
#   -> relu2(gray, follows rs) ; x -> conv(Conv2D, fp16 only)
NODES = [
    ("x", "Placeholder", []),
    ("w", "Const", []),
    ("mm", "MatMulV2", ["x:0", "w:0"]),
    ("relu", "Relu", ["mm:0"]),
    ("sm", "Softmax", ["relu:0"]),
    ("rs", "ReduceSum", ["sm:0"]),
    ("relu2", "Relu", ["rs:0"]),
    ("conv", "Conv2D", ["x:0", "w:0"]),
    ("crelu", "Relu", ["conv:0"]),
    ("e", "Exp32", ["crelu:0"]),
]
OUTS = ["relu2:0", "e:0"]


def dt(p, name):
    return p[name].dtype


def rule(p, name):
    """Which rule decided ``name`` (and the node it followed): what these tests check, not the wording."""
    d = p[name]
    return d.rule if d.followed is None else (d.rule, d.followed)


def test_registry_names_aliases_and_errors():
    expected = {
        "force_fp32": ["cube_fp16in_fp32out"],
        "must_keep_origin_dtype": ["origin"],
        "allow_fp32_to_fp16": [],
        "force_fp16": ["fp16"],
        "allow_mix_precision": ["allow_mix_precision_fp16", "mixed_float16"],
        "allow_fp32_to_bf16": [],
        "allow_mix_precision_bf16": ["mixed_bfloat16"],
        "force_bf16": [],
    }
    for name, aliases in expected.items():
        assert modes.get(name).name == name
        for a in aliases:
            assert modes.get(a).name == name
    assert modes.get("mixed_bfloat16").low == "bfloat16"
    with pytest.raises(ConfigError) as err:
        modes.get("allow_mix_precison")
    assert "Did you mean 'allow_mix_precision'" in str(err.value) and "force_fp16" in str(err.value)


def test_force_fp32(small_lib):
    p = plan(graph(NODES, OUTS), "force_fp32", small_lib)
    assert dt(p, "mm") == "float32" and rule(p, "mm") is Rule.MODE
    assert dt(p, "conv") == "float16" and rule(p, "conv") is Rule.FALLBACK_KERNEL
    # casts around the fp16-only op: inputs down, output back up for its float32 consumer
    assert {("x:0", "float16"), ("w:0", "float16"), ("conv:0", "float32")} <= casts(p)
    assert dt(p, "crelu") == "float32"


def test_must_keep_origin_dtype_names_every_op(small_lib):
    g = graph(NODES + [("c2", "Conv2D", ["x:0", "w:0"]), ("l16", "LogOnly16", ["c2:0"])], OUTS + ["l16:0"])
    with pytest.raises(PrecisionError) as err:
        plan(g, "must_keep_origin_dtype", small_lib)
    names = {(n, op) for n, op, _ in err.value.problems}
    assert names == {("conv", "Conv2D"), ("c2", "Conv2D"), ("l16", "LogOnly16")}
    assert "float16" in str(err.value) and "conv (Conv2D)" in str(err.value)
    ok = plan(graph(NODES[:7], ["relu2:0"]), "must_keep_origin_dtype", small_lib)
    assert all(d.dtype in (None, "float32") for d in ok) and not ok.casts


def test_allow_fp32_to_fp16(small_lib):
    p = plan(graph(NODES, OUTS), "allow_fp32_to_fp16", small_lib)
    assert dt(p, "mm") == "float16" and rule(p, "mm") is Rule.MODE
    assert dt(p, "relu") == "float32" and rule(p, "relu") is Rule.MODE
    assert dt(p, "sm") == "float32"  # white, but a vector op keeps float32 in this mode
    assert dt(p, "conv") == "float16"
    assert modes.get("default").name == "allow_fp32_to_fp16"
    assert pp.RunConfig().mode.name == "allow_fp32_to_fp16"


def test_force_fp16(small_lib):
    p = plan(graph(NODES, OUTS), "force_fp16", small_lib)
    for n in ("mm", "relu", "sm", "rs", "relu2", "conv", "crelu"):
        assert dt(p, n) == "float16", n  # flags are ignored: black ReduceSum too
    assert dt(p, "e") == "float32" and rule(p, "e") is Rule.FALLBACK_KERNEL


def test_allow_mix_precision(small_lib):
    p = plan(graph(NODES, OUTS), "allow_mix_precision", small_lib)
    assert dt(p, "mm") == "float16" and rule(p, "mm") is Rule.WHITE
    assert dt(p, "relu") == "float16" and rule(p, "relu") == (Rule.GRAY_FOLLOWS, "mm")
    assert dt(p, "sm") == "float16" and rule(p, "sm") is Rule.WHITE
    assert dt(p, "rs") == "float32" and rule(p, "rs") is Rule.BLACK
    assert dt(p, "relu2") == "float32" and rule(p, "relu2") == (Rule.GRAY_FOLLOWS, "rs")
    assert dt(p, "conv") == "float16"
    # white op with no float16 kernel keeps its precision, with a warning
    assert dt(p, "e") == "float32" and p["e"].why == Why(Rule.WHITE, inner=Why(Rule.FALLBACK_KERNEL, wanted=("float16",)))
    assert any("Exp32" in w for w in p.warnings)
    assert modes.get("mixed_float16") is modes.get("allow_mix_precision")


def test_allow_mix_black_op_without_origin_kernel_is_an_error(small_lib):
    g = graph([("x", "Placeholder", []), ("l", "LogOnly16", ["x:0"])], ["l:0"])
    with pytest.raises(PrecisionError, match="black-listed op has no float32 kernel"):
        plan(g, "allow_mix_precision", small_lib)


def test_allow_fp32_to_bf16(small_lib):
    p = plan(graph(NODES, OUTS), "allow_fp32_to_bf16", small_lib)
    assert dt(p, "mm") == "float32" and dt(p, "relu") == "float32"
    # Conv2D on a library without float32 or bfloat16 kernels runs in its only float kernel, with a warning
    assert dt(p, "conv") == "float16" and rule(p, "conv") is Rule.FALLBACK_KERNEL
    assert any(w.startswith("conv:") for w in p.warnings)
    p910b = pp.plan(graph(NODES[:3], ["mm:0"]), pp.RunConfig(precision_mode="allow_fp32_to_bf16", op_info="ascend910b"))
    assert dt(p910b, "mm") == "float32"


def test_allow_mix_precision_bf16(small_lib):
    g = graph([("x", "Placeholder", []), ("b", "BF", ["x:0"]), ("r", "Relu", ["b:0"]), ("b2", "BF", ["r:0"])], ["b2:0"])
    p = plan(g, "allow_mix_precision_bf16", small_lib)
    assert dt(p, "b") == "bfloat16" and rule(p, "b") is Rule.WHITE
    # Relu has no bf16 kernel in this library: it cannot follow, keeps float32
    assert dt(p, "r") == "float32" and rule(p, "r") == (Rule.GRAY_FOLLOWS, "b") and p["r"].why.inner.wanted == ("bfloat16",)
    assert modes.get("mixed_bfloat16").name == "allow_mix_precision_bf16"
    p910b = pp.plan(EXAMPLES / "conv2d_bias_relu.json", pp.RunConfig(precision_mode="mixed_bfloat16", op_info="ascend910b"))
    assert [dt(p910b, n) for n in ("myConv", "BiasAdd", "myOutput")] == ["bfloat16"] * 3


def test_force_bf16(small_lib):
    g = graph([("x", "Placeholder", []), ("b", "BF", ["x:0"]), ("r", "Relu", ["b:0"])], ["r:0"])
    p = plan(g, "force_bf16", small_lib)
    assert dt(p, "b") == "bfloat16" and dt(p, "r") == "float32"
    p910b = pp.plan(EXAMPLES / "conv2d_bias_relu.json", pp.RunConfig(precision_mode="force_bf16", op_info="ascend910b"))
    assert dt(p910b, "x") == "bfloat16"  # force: even the Reshape fed by a variable


def test_precision_mode_v2_and_conflicts():
    assert pp.RunConfig(precision_mode_v2="mixed_float16").mode.name == "allow_mix_precision"
    assert pp.RunConfig(precision_mode_v2="origin").mode.name == "must_keep_origin_dtype"
    assert pp.RunConfig(precision_mode_v2="cube_fp16in_fp32out").mode.name == "force_fp32"
    with pytest.raises(ConfigError, match="both set"):
        pp.RunConfig(precision_mode="force_fp16", precision_mode_v2="fp16")
    with pytest.raises(ConfigError, match="unknown precision_mode_v2"):
        pp.RunConfig(precision_mode_v2="mixed_fp16")
    with pytest.raises(ConfigError, match="unknown setting"):
        pp.RunConfig(precision_modes="force_fp16")


# ---------------------------------------------------------------------- gray ops
def test_gray_chain_follows_producers_and_explains(small_lib):
    g = graph([
        ("x", "Placeholder", []), ("w", "Const", []),
        ("mm", "MatMulV2", ["x:0", "w:0"]), ("r1", "Relu", ["mm:0"]), ("a", "Add", ["r1:0", "r1:0"]), ("r2", "Relu", ["a:0"]),
    ], ["r2:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    assert [dt(p, n) for n in ("r1", "a", "r2")] == ["float16"] * 3
    text = p.explain("r2")
    assert "gray chain   : r2 <- a <- r1 <- mm (white-list)" in text


def test_gray_inputs_that_disagree_take_the_widest(small_lib):
    g = graph([
        ("x", "Placeholder", []), ("w", "Const", []),
        ("mm", "MatMulV2", ["x:0", "w:0"]), ("rs", "ReduceSum", ["x:0"]), ("a", "Add", ["mm:0", "rs:0"]),
    ], ["a:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    assert dt(p, "a") == "float32" and p["a"].why == Why(Rule.GRAY_FOLLOWS, followed="rs", detail="widest")
    assert ("mm:0", "float32") in casts(p)


def test_gray_fed_only_by_constants_follows_allow_fp32_to_fp16(small_lib):
    g = graph([("w", "Const", []), ("v", "VariableV2", []), ("a", "Add", ["v:0", "w:0"]), ("mm", "MatMulV2", ["a:0", "w:0"])], ["mm:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    assert dt(p, "a") == "float32" and rule(p, "a") is Rule.GRAY_UNFED


def test_graph_inputs_vote_so_a_residual_stream_keeps_its_precision(small_lib):
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("mm", "MatMulV2", ["x:0", "w:0"]),
               ("res", "Add", ["x:0", "mm:0"]), ("r", "Relu", ["x:0"])], ["res:0", "r:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    assert dt(p, "res") == "float32" and p["res"].why.detail == "widest"
    assert dt(p, "r") == "float32" and p["r"].why == Why(Rule.GRAY_FOLLOWS, followed="x")


def test_gray_op_ignores_constant_inputs_when_following(small_lib):
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("mm", "MatMulV2", ["x:0", "w:0"]), ("a", "Add", ["mm:0", "w:0"])], ["a:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    assert dt(p, "a") == "float16" and p["a"].why == Why(Rule.GRAY_FOLLOWS, followed="mm")
    w_cast = [c for c in p.casts if c.tensor == "w:0"]
    assert len(w_cast) == 1 and set(w_cast[0].consumers) == {"mm", "a"}  # one cast shared by both


# ---------------------------------------------------------------------- casts
def test_fetches_keep_origin_dtype_unless_asked(small_lib):
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("mm", "MatMulV2", ["x:0", "w:0"]), ("r", "Relu", ["mm:0"])], ["r:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    fetch = [c for c in p.casts if c.for_fetch]
    assert [(c.tensor, c.from_dtype, c.to) for c in fetch] == [("r:0", "float16", "float32")]
    p2 = plan(g, "allow_mix_precision", small_lib, keep_output_dtype=False)
    assert not any(c.for_fetch for c in p2.casts)


def test_one_cast_per_tensor_and_dtype_shared_by_consumers(small_lib):
    g = graph([("x", "Placeholder", []), ("w", "Const", []),
               ("m1", "MatMulV2", ["x:0", "w:0"]), ("m2", "MatMulV2", ["x:0", "w:0"]), ("m3", "MatMulV2", ["x:0", "w:0"]),
               ("rs", "ReduceSum", ["x:0"])], ["m1:0", "m2:0", "m3:0", "rs:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    x_casts = [c for c in p.casts if c.tensor == "x:0"]
    assert len(x_casts) == 1 and x_casts[0].consumers == ("m1", "m2", "m3") and x_casts[0].kind == "input"
    assert "1 cast(s) to float16" in p.summary()


def test_consts_are_cast_ahead_of_time_and_not_counted(small_lib):
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("v", "VariableV2", []), ("vr", "Identity", ["v:0"]),
               ("mm", "MatMulV2", ["x:0", "w:0"]), ("m2", "MatMulV2", ["mm:0", "vr:0"])], ["m2:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    kinds = {c.tensor: c.kind for c in p.casts}
    assert kinds["w:0"] == "const" and kinds["vr:0"] == "variable" and kinds["x:0"] == "input"
    assert p.summary().endswith("using 1 cast(s) to float16 (excluding Const and Variable casts)")
    assert p["vr"].why == Why(Rule.READS_SOURCE, followed="v", detail="variable")


def test_existing_casts_absorb_the_casts_around_them(small_lib):
    g = graph([
        ("x", "Placeholder", []), ("w", "Const", []),
        ("mm", "MatMulV2", ["x:0", "w:0"]), ("up", "Cast", ["mm:0"]), ("rs", "ReduceSum", ["up:0"]),  # fp16 -> Cast(fp32) -> black
        ("down", "Cast", ["mm:0"], ["float16"]), ("r", "Relu", ["down:0"], ["float16"]),  # Cast to fp16 after a now-fp16 op
        ("i", "Placeholder", [], ["int32"]), ("ci", "Cast", ["i:0"]), ("m2", "MatMulV2", ["ci:0", "w:0"]),  # int -> fp32 -> white
    ], ["rs:0", "r:0", "m2:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    # no cast is inserted before 'up': it reads float16 and still writes float32 for ReduceSum
    assert p["up"].inputs == ("float16",) and p["up"].outputs == ("float32",)
    assert not any(c.tensor == "mm:0" and c.to == "float32" for c in p.casts)
    # the user's Cast to float16 after an op that now runs in float16 is an identity
    assert p["down"].identity and "identity" in p["down"].reason
    # int -> float32 Cast feeding only float16 consumers writes float16 directly
    assert p["ci"].outputs == ("float16",) and not any(c.tensor == "ci:0" for c in p.casts)
    assert p.to_dict()["nodes"]["down"]["identity"] is True


def test_unknown_op_types_keep_origin_and_are_listed(small_lib):
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("mm", "MatMulV2", ["x:0", "w:0"]), ("u", "MyOp", ["mm:0"]),
               ("u2", "MyOp", ["u:0"])], ["u2:0"])
    p = plan(g, "allow_mix_precision", small_lib)
    assert dt(p, "u") == "float32" and rule(p, "u") is Rule.UNKNOWN_OP
    assert p.unknown == {"MyOp": ["u", "u2"]}
    assert ("mm:0", "float32") in casts(p)


def test_non_float_tensors_are_never_cast(small_lib):
    g = graph([("x", "Placeholder", []), ("i", "Placeholder", [], ["int32"]), ("a", "Add", ["x:0", "i:0"]),
               ("mm", "MatMulV2", ["a:0", "x:0"])], ["mm:0"])
    p = plan(g, "force_fp16", small_lib)
    assert p["a"].inputs == ("float16", "int32")
    assert all(c.from_dtype != "int32" for c in p.casts)


def test_float64_ops_keep_their_precision(small_lib):
    lib_graph = graph([("x", "Placeholder", [], ["float64"]), ("r", "Relu", ["x:0"], ["float64"])], ["r:0"])
    p = plan(lib_graph, "force_fp16", "ascend910")
    # ascend910's Relu has no double kernel: float32 is the closest, and the reason says so
    assert dt(p, "r") == "float32" and p["r"].why == Why(Rule.FALLBACK_KERNEL, wanted=("float64",))
    import json

    lib = small_lib.parent / "f64.json"
    lib.write_text(json.dumps({"Relu": {"input0": {"dtype": "double,float,float16"}, "output0": {"dtype": "double,float,float16"}}}))
    p = plan(lib_graph, "force_fp16", lib)
    assert dt(p, "r") == "float64" and rule(p, "r") is Rule.FLOAT64


def test_gray_op_between_black_and_white_runs_low_when_it_adds_no_cast(small_lib):
    nodes = [("x", "Placeholder", []), ("w", "Const", []), ("rs", "ReduceSum", ["x:0"]), ("r", "Relu", ["rs:0"]),
             ("mm", "MatMulV2", ["r:0", "w:0"])]
    p = plan(graph(nodes, ["mm:0"]), "allow_mix_precision", small_lib)
    assert p["r"].dtype == "float16" and rule(p, "r") is Rule.GRAY_LOOKAHEAD
    assert ("rs:0", "float16") in casts(p) and ("r:0", "float16") not in casts(p)
    # a graph an eager route must reproduce op by op does not look ahead
    g = graph(nodes, ["mm:0"])
    g.lookahead = False
    p = plan(g, "allow_mix_precision", small_lib)
    assert p["r"].dtype == "float32" and p["r"].why == Why(Rule.GRAY_FOLLOWS, followed="rs")
    # two float inputs to cast instead of one output: not worth it
    nodes2 = nodes[:3] + [("rs2", "ReduceSum", ["x:0"]), ("a", "Add", ["rs:0", "rs2:0"]), ("mm", "MatMulV2", ["a:0", "w:0"])]
    p = plan(graph(nodes2, ["mm:0"]), "allow_mix_precision", small_lib)
    assert p["a"].dtype == "float32"


def test_every_decision_names_its_rule():
    g = pp.OpGraph.from_dict({"nodes": [
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
        {"name": "v", "op": "VariableV2", "outputs": ["float32"]},
        {"name": "vr", "op": "Identity", "inputs": ["v:0"], "outputs": ["float32"]},
        {"name": "rs", "op": "ReduceSum", "inputs": ["x:0"], "outputs": ["float32"]},
        {"name": "r", "op": "Relu", "inputs": ["rs:0"], "outputs": ["float32"]},
        {"name": "mm", "op": "MatMulV2", "inputs": ["r:0", "vr:0"], "outputs": ["float32"]},
        {"name": "c", "op": "Cast", "inputs": ["mm:0"], "outputs": ["float32"]},
        {"name": "u", "op": "NoSuchOp", "inputs": ["c:0"], "outputs": ["float32"]},
        {"name": "ids", "op": "Placeholder", "outputs": ["int32"]},
        {"name": "n", "op": "Shape", "inputs": ["ids:0"], "outputs": ["int32"]},
        {"name": "d", "op": "Placeholder", "outputs": ["float64"]},
        {"name": "d2", "op": "Relu", "inputs": ["d:0"], "outputs": ["float64"]}],
        "outputs": ["u:0", "n:0", "d2:0"]})
    p = pp.plan(g, precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    assert {d.name: d.rule for d in p} == {
        "x": Rule.SOURCE, "v": Rule.SOURCE, "vr": Rule.READS_SOURCE, "rs": Rule.BLACK,
        "r": Rule.GRAY_LOOKAHEAD,  # between a black and a white op: runs low, the cast moves before it
        "mm": Rule.WHITE, "c": Rule.EXISTING_CAST, "u": Rule.UNKNOWN_OP, "ids": Rule.SOURCE,
        "n": Rule.NO_FLOAT_TENSORS, "d": Rule.SOURCE, "d2": Rule.GRAY_FOLLOWS,
    }
    assert [(d.name, d.followed) for d in p if d.followed] == [("vr", "v"), ("d2", "d")]  # a read follows its source
    assert p["vr"].dtype == "float16" and p["r"].dtype == "float16"
    p = pp.plan(g, precision_mode="force_fp16", op_info="ascend910", use_env_lists=False)
    # no float64 Relu kernel in ascend910: the float64 rule's fallback
    assert (p["d2"].rule, p["d2"].dtype) == (Rule.FALLBACK_KERNEL, "float32") and p["mm"].rule is Rule.MODE


def test_float64_ops_keep_float64_by_the_float64_rule(small_lib):
    import json

    from conftest import op_entry

    lib = json.loads(small_lib.read_text())
    lib["Relu"] = op_entry("double,float,float16")
    small_lib.write_text(json.dumps(lib))
    g = graph([("d", "Placeholder", []), ("r", "Relu", ["d:0"])], ["r:0"])
    g = pp.OpGraph.from_dict({**g.to_dict(), "nodes": [
        {**n, "outputs": ["float64"]} for n in g.to_dict()["nodes"]]})
    p = plan(g, "force_fp16", small_lib)
    assert (p["r"].rule, p["r"].dtype) == (Rule.FLOAT64, "float64")
