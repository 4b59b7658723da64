"""modify_mixlist (Ascend's rules), keep_dtype, customize_dtypes and TF's environment lists."""

import json

import pytest

import precision_policy as pp
from precision_policy.errors import ConfigError, OverrideError, PrecisionError
from precision_policy.rules import Rule

from conftest import casts, graph, plan

G = [
    ("x", "Placeholder", []), ("w", "Const", []),
    ("mm", "MatMulV2", ["x:0", "w:0"]), ("r", "Relu", ["mm:0"]), ("sm", "Softmax", ["r:0"]), ("rs", "ReduceSum", ["sm:0"]),
]

#: the rules a gray op can be decided by
GRAY = (Rule.GRAY_FOLLOWS, Rule.GRAY_UNFED, Rule.GRAY_LOOKAHEAD)


def follows(p, name):
    """The node a gray op followed (None if it was decided by another rule)."""
    return p[name].followed if p[name].rule is Rule.GRAY_FOLLOWS else None


def mixlist(tmp_path, data, name="mix.json"):
    f = tmp_path / name
    f.write_text(json.dumps(data))
    return f


def mix_plan(tmp_path, small_lib, data, mode="allow_mix_precision"):
    return plan(graph(G, ["rs:0"]), mode, small_lib, modify_mixlist=mixlist(tmp_path, data))


# ---------------------------------------------------------------------- modify_mixlist
def test_mixlist_moves_ops_between_lists(tmp_path, small_lib):
    p = mix_plan(tmp_path, small_lib, {"black-list": {"to-add": ["Softmax"]}, "white-list": {"to-add": ["ReduceSum"]}})
    assert p["sm"].dtype == "float32" and p["sm"].rule is Rule.BLACK
    assert "modify_mixlist mix.json: added to black-list" in p["sm"].reason  # the override, rendered
    assert p["rs"].dtype == "float16" and p["rs"].rule is Rule.WHITE


def test_mixlist_to_remove_makes_op_gray(tmp_path, small_lib):
    p = mix_plan(tmp_path, small_lib, {"black-list": {"to-remove": ["ReduceSum"]}, "white-list": {"to-remove": ["MatMulV2"]}})
    assert p["rs"].dtype == "float16" and follows(p, "rs") == "sm"
    # gray now, MatMulV2 follows x (float32). Its reader needs float16, but a matmul is arithmetic:
    # running it low would round more than the cast after it, so the look-ahead leaves it (TF's rule for infer ops)
    assert p["mm"].dtype == "float32" and follows(p, "mm") == "x"
    p2 = mix_plan(tmp_path, small_lib, {"white-list": {"to-add": ["Relu"]}, "gray-list": {"to-remove": ["Relu"]}})
    assert p2["r"].rule is Rule.WHITE


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"black-list": {"to-remove": ["Softmax"]}}, "not on the black-list"),
        ({"white-list": {"to-add": ["Relu"]}, "black-list": {"to-add": ["Relu"]}}, "to-add of both"),
        ({"white-list": {"to-add": ["Softmax"], "to-remove": ["Softmax"]}}, "both to-add and to-remove of white-list"),
        ({"gray-list": {"to-remove": ["Relu"]}}, "needs a destination"),
        ({"black-list": {"to-add": ["Matmul"]}}, "Did you mean 'MatMulV2'"),
        ({"blacklist": {"to-add": ["Relu"]}}, "unknown key 'blacklist'"),
        ({"black-list": {"add": ["Relu"]}}, "unknown key 'add'"),
        ({"black-list": {"to-add": "Relu"}}, "must be a list"),
        (["Relu"], "must be a JSON object"),
    ],
)
def test_mixlist_rules(tmp_path, small_lib, data, needle):
    with pytest.raises(OverrideError) as err:
        mix_plan(tmp_path, small_lib, data)
    assert needle in str(err.value) and "mix.json" in str(err.value)


def test_mixlist_only_with_mixed_modes(tmp_path, small_lib):
    f = mixlist(tmp_path, {"black-list": {"to-add": ["Softmax"]}})
    with pytest.raises(ConfigError, match="only applies to the mixed modes"):
        pp.RunConfig(precision_mode="force_fp16", op_info=small_lib, modify_mixlist=f)
    pp.RunConfig(precision_mode_v2="mixed_bfloat16", op_info=small_lib, modify_mixlist=f)


def test_mixlist_bad_json_names_line(tmp_path, small_lib):
    f = tmp_path / "mix.json"
    f.write_text('{"black-list": {\n "to-add": ["Relu",]\n}}')
    with pytest.raises(OverrideError, match=r"mix\.json:2"):
        plan(graph(G, ["rs:0"]), "allow_mix_precision", small_lib, modify_mixlist=f)


# ---------------------------------------------------------------------- keep_dtype
def test_keep_dtype_by_name_and_by_op_type(tmp_path, small_lib):
    f = tmp_path / "keep.txt"
    f.write_text("# keep these in their origin dtype\nmm\n\nOpType::Softmax  # all softmaxes\n")
    p = plan(graph(G, ["rs:0"]), "force_fp16", small_lib, keep_dtype=f)
    assert p["mm"].dtype == "float32" and p["mm"].rule is Rule.KEEP_DTYPE and "keep.txt:2" in p["mm"].reason
    assert p["sm"].dtype == "float32" and p["sm"].rule is Rule.KEEP_DTYPE and "keep.txt:4" in p["sm"].reason
    assert p["r"].dtype == "float16"


def test_keep_dtype_has_no_effect_under_must_keep_origin(tmp_path, small_lib):
    f = tmp_path / "keep.txt"
    f.write_text("mm\n")
    p = plan(graph(G, ["rs:0"]), "must_keep_origin_dtype", small_lib, keep_dtype=f)
    assert p["mm"].rule is Rule.MODE and p["mm"].reason == "must_keep_origin_dtype"


def test_keep_dtype_on_op_without_origin_kernel_is_an_error(tmp_path, small_lib):
    f = tmp_path / "keep.txt"
    f.write_text("OpType::Conv2D\n")
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("c", "Conv2D", ["x:0", "w:0"])], ["c:0"])
    with pytest.raises(PrecisionError, match="keep_dtype asks for float32"):
        plan(g, "allow_mix_precision", small_lib, keep_dtype=f)


def test_keep_dtype_bad_line(tmp_path, small_lib):
    f = tmp_path / "keep.txt"
    f.write_text("mm\nType::Relu\n")
    with pytest.raises(OverrideError, match=r"keep\.txt:2"):
        plan(graph(G, ["rs:0"]), "force_fp16", small_lib, keep_dtype=f)


def test_keep_dtype_and_customize_dtypes_names_that_match_no_node_are_errors(tmp_path, small_lib):
    f = tmp_path / "keep.txt"
    f.write_text("mm\n# a comment\nm_m\n")
    with pytest.raises(OverrideError, match=r"keep\.txt:3.*'m_m' matches no node.*did you mean 'mm'"):
        plan(graph(G, ["rs:0"]), "force_fp16", small_lib, keep_dtype=f)
    c = tmp_path / "custom.txt"
    c.write_text("nosuch::InputDtype:float32,float32,OutputDtype:float32\n")
    with pytest.raises(OverrideError, match=r"custom\.txt:1.*'nosuch' matches no node"):
        plan(graph(G, ["rs:0"]), "force_fp16", small_lib, customize_dtypes=c)


# ---------------------------------------------------------------------- customize_dtypes
def test_customize_dtypes_by_name_and_type(tmp_path, small_lib):
    f = tmp_path / "custom.txt"
    f.write_text("mm::InputDtype:float32,float32,OutputDtype:float32\nOpType::Relu:InputDtype:float16,OutputDtype:float32\n")
    p = plan(graph(G, ["rs:0"]), "force_fp16", small_lib, customize_dtypes=f)
    assert p["mm"].inputs == ("float32", "float32") and p["mm"].dtype == "float32"
    assert p["mm"].rule is Rule.CUSTOMIZE_DTYPES and "custom.txt:1" in p["mm"].reason
    assert p["r"].inputs == ("float16",) and p["r"].outputs == ("float32",)
    assert ("mm:0", "float16") in casts(p)  # Relu reads float16 from a float32 MatMul


def test_customize_dtypes_beats_keep_dtype(tmp_path, small_lib):
    keep = tmp_path / "keep.txt"
    keep.write_text("mm\n")
    custom = tmp_path / "custom.txt"
    custom.write_text("mm::InputDtype:float16,float16,OutputDtype:float16\n")
    p = plan(graph(G, ["rs:0"]), "force_fp32", small_lib, keep_dtype=keep, customize_dtypes=custom)
    assert p["mm"].dtype == "float16" and p["mm"].rule is Rule.CUSTOMIZE_DTYPES


@pytest.mark.parametrize(
    "line,error,needle",
    [
        ("mm::InputDtype:float16,OutputDtype:float16", PrecisionError, "gives 1 input dtype(s), the node has 2"),
        ("OpType::Conv2D:InputDtype:float32,float32", PrecisionError, "no float32 kernel"),
        ("mm::InputDtype:flaot16,float16", OverrideError, "unknown dtype 'flaot16'"),
        ("mm:InputDtype:float16", OverrideError, "expected 'OpName::"),
        ("mm::float16,float16", OverrideError, "expected 'InputDtype"),
        ("OpType::Relu", OverrideError, "expected 'OpType::<type>:InputDtype"),
    ],
)
def test_customize_dtypes_errors(tmp_path, small_lib, line, error, needle):
    f = tmp_path / "custom.txt"
    f.write_text(line + "\n")
    g = graph(G + [("c", "Conv2D", ["x:0", "w:0"])], ["rs:0", "c:0"])
    with pytest.raises(error) as err:
        plan(g, "allow_mix_precision", small_lib, customize_dtypes=f)
    assert needle in str(err.value)


# ---------------------------------------------------------------------- TF environment lists
def env_plan(small_lib, env, mode="allow_mix_precision"):
    return pp.plan(graph(G, ["rs:0"]), pp.RunConfig(precision_mode=mode, op_info=small_lib, env=env))


P = "TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_"


def test_env_lists_add_and_remove(small_lib):
    p = env_plan(small_lib, {P + "DENYLIST_ADD": "Softmax", P + "ALLOWLIST_ADD": "ReduceSum"})
    assert p["sm"].dtype == "float32" and p["sm"].rule is Rule.BLACK
    assert "env TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_DENYLIST_ADD" in p["sm"].reason
    assert p["rs"].dtype == "float16"
    p = env_plan(small_lib, {P + "ALLOWLIST_REMOVE": "MatMulV2,Softmax"})
    assert follows(p, "sm") == "r"
    p = env_plan(small_lib, {P + "CLEARLIST_ADD": "ReduceSum"})
    assert p["rs"].dtype == "float16" and p["rs"].rule in GRAY


def test_env_lists_use_tf_op_names_and_warn_on_unknown(small_lib):
    p = env_plan(small_lib, {P + "DENYLIST_ADD": "NotAnOp"})
    assert any("NotAnOp" in w for w in p.warnings)


def test_env_lists_conflict_is_an_error(small_lib):
    with pytest.raises(OverrideError, match="two lists"):
        env_plan(small_lib, {P + "DENYLIST_ADD": "Relu", P + "ALLOWLIST_ADD": "Relu"})


def test_env_lists_apply_after_mixlist(tmp_path, small_lib):
    f = mixlist(tmp_path, {"black-list": {"to-add": ["Relu"]}})
    cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info=small_lib, modify_mixlist=f,
                       env={P + "DENYLIST_REMOVE": "Relu"})
    p = pp.plan(graph(G, ["rs:0"]), cfg)
    assert p["r"].rule in GRAY  # the env list had the last word


def test_env_lists_read_from_os_environ(small_lib, monkeypatch):
    monkeypatch.setenv(P + "DENYLIST_ADD", "Softmax")
    p = pp.plan(graph(G, ["rs:0"]), pp.RunConfig(precision_mode="allow_mix_precision", op_info=small_lib))
    assert p["sm"].dtype == "float32"
    p = pp.plan(graph(G, ["rs:0"]), pp.RunConfig(precision_mode="allow_mix_precision", op_info=small_lib, use_env_lists=False))
    assert p["sm"].dtype == "float16"


def test_tf_alias_in_env_lists(small_lib):
    from precision_policy.opinfo.overrides import tensorflow_aliases

    aliases = tensorflow_aliases()
    if "Sum" not in aliases:
        pytest.skip("no tensorflow alias table")
    p = env_plan(small_lib, {P + "DENYLIST_REMOVE": "Sum"})
    assert p["rs"].rule in GRAY


def test_customize_dtypes_wins_over_an_impossible_keep_dtype_without_error(tmp_path, small_lib):
    # Conv2D has no float32 kernel: keep_dtype alone cannot be honoured (an error), but customize_dtypes
    # names the same op and has priority, so keep_dtype's impossible request is not raised
    g = graph([("x", "Placeholder", []), ("w", "Const", []), ("conv", "Conv2D", ["x:0", "w:0"])], ["conv:0"])
    keep = tmp_path / "keep.txt"
    keep.write_text("conv\n")
    with pytest.raises(PrecisionError, match=r"conv \(Conv2D\): keep_dtype asks for float32"):
        plan(g, "allow_mix_precision", small_lib, keep_dtype=keep)
    custom = tmp_path / "custom.txt"
    custom.write_text("conv::InputDtype:float16,float16,OutputDtype:float16\n")
    p = plan(g, "allow_mix_precision", small_lib, keep_dtype=keep, customize_dtypes=custom)
    assert p["conv"].dtype == "float16" and p["conv"].rule is Rule.CUSTOMIZE_DTYPES and "custom.txt:1" in p["conv"].reason
