import json

import pytest

from precision_policy.errors import OpInfoError
from precision_policy.opinfo import load_library, resolve_library_path, shipped_libraries

from conftest import op_entry


def write(path, data):
    path.write_text(json.dumps(data, indent=4))
    return path


def test_small_library_fields(small_lib):
    lib = load_library(small_lib)
    assert lib["Conv2D"].flag == "white" and lib["Conv2D"].heavy
    assert lib["Conv2D"].float_dtypes == {"float16"}
    assert lib["ReduceSum"].flag == "black"
    assert lib["Relu"].flag == "gray" and lib["Relu"].supports("float32")
    assert not lib["Conv2D"].supports("float32")
    assert lib["Conv2D"].variants == 2


def test_unknown_fields_are_preserved(tmp_path):
    entry = op_entry("float16,float", "true")
    entry["dynamicShapeSupport"] = {"flag": "true"}
    entry["attr"] = {"list": "a,b"}
    lib = load_library(write(tmp_path / "a.json", {"Foo": entry}))
    assert lib["Foo"].raw["dynamicShapeSupport"] == {"flag": "true"}
    assert lib["Foo"].raw["attr"] == {"list": "a,b"}


def test_folder_merges_in_name_order_and_rejects_duplicates(tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    write(d / "b.json", {"Relu": op_entry("float16,float")})
    write(d / "a.json", {"Conv2D": op_entry("float16", "true", heavy=True)})
    lib = load_library(d)
    assert set(lib) == {"Relu", "Conv2D"}
    assert [p.name for p in lib.sources] == ["a.json", "b.json"]
    write(d / "c.json", {"Relu": op_entry("float16")})
    with pytest.raises(OpInfoError) as err:
        load_library(d)
    assert "'Relu'" in str(err.value) and "b.json" in str(err.value) and "c.json" in str(err.value)


def test_malformed_json_names_file_line_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "Relu": {\n    "precision_reduce": {"flag": "true"}\n  },,\n}')
    with pytest.raises(OpInfoError) as err:
        load_library(bad)
    assert err.value.file == str(bad) and err.value.line == 4 and err.value.column is not None
    assert f"{bad}:4:" in str(err.value)


@pytest.mark.parametrize(
    "entry,field,needle",
    [
        ({"precision_reduce": {"flag": "yes"}}, "precision_reduce.flag", 'must be "true" or "false"'),
        ({"precision_reduce": "true"}, "precision_reduce", "must be an object"),
        ({"input0": {"dtype": "float16,flaot"}}, "input0.dtype", "unknown dtype 'flaot'"),
        ({"input0": {"dtype": "float16,float"}, "output0": {"dtype": "float16"}}, "dtype", "parallel"),
        ({"input0": {"dtype": "float16,float", "format": "ND"}}, "input0.format", "1 formats but 2 dtypes"),
        ({"input0": "float16"}, "input0", "must be an object"),
        ({"input0": {"dtype": "float16,,float"}}, "input0.dtype", "empty entry"),
    ],
)
def test_wrong_fields_name_file_op_and_field(tmp_path, entry, field, needle):
    f = write(tmp_path / "lib.json", {"Relu": op_entry("float16"), "Broken": entry})
    with pytest.raises(OpInfoError) as err:
        load_library(f)
    assert err.value.op == "Broken" and err.value.field == field
    assert needle in str(err.value) and str(f) in str(err.value)


def test_top_level_must_be_object(tmp_path):
    with pytest.raises(OpInfoError, match="top level must be a JSON object"):
        load_library(write(tmp_path / "l.json", ["Relu"]))
    with pytest.raises(OpInfoError, match="must be a JSON object"):
        load_library(write(tmp_path / "l2.json", {"Relu": 3}))


def test_boolean_flags_are_accepted(tmp_path):
    lib = load_library(write(tmp_path / "l.json", {"A": {"precision_reduce": {"flag": True}}, "B": {"precision_reduce": {"flag": False}}}))
    assert lib["A"].flag == "white" and lib["B"].flag == "black"
    assert lib["A"].supports("float16") and not lib["A"].declares_dtypes


def test_unknown_library_name_lists_shipped_ones():
    with pytest.raises(OpInfoError) as err:
        load_library("ascend91")
    assert "ascend910" in str(err.value) and "Shipped libraries" in str(err.value)


def test_library_cache_sees_file_changes(tmp_path):
    f = write(tmp_path / "l.json", {"A": op_entry("float16,float", "true")})
    assert load_library(f)["A"].flag == "white"
    import os

    write(f, {"A": op_entry("float16,float", "false")})
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert load_library(f)["A"].flag == "black"


# ---------------------------------------------------------------------- shipped libraries
def test_shipped_libraries_present():
    names = set(shipped_libraries())
    assert {"ascend910", "ascend910b", "tf_amp_bf16", "tf_amp_fp16", "torch_autocast_cpu"} <= names
    assert resolve_library_path("opinfo_db/ascend910").name == "ascend910"


@pytest.mark.parametrize("name", ["ascend910", "ascend910b", "tf_amp_bf16", "tf_amp_fp16", "torch_autocast_cpu"])
def test_shipped_library_loads(name):
    lib = load_library(name)
    assert len(lib) > 20
    assert all(f.suffix == ".json" for f in lib.sources)


def test_ascend910_content_follows_cann():
    lib = load_library("ascend910")
    assert len(lib) >= 150
    for op in ("Conv2D", "DepthwiseConv2D", "Conv3D"):
        assert lib[op].float_dtypes == {"float16"}, op
        assert lib[op].heavy
    for op in ("MatMul", "MatMulV2", "BatchMatMul", "BatchMatMulV2"):
        assert lib[op].float_dtypes == {"float16", "float32"}, op
    assert not any("bfloat16" in info.float_dtypes for info in lib.values())
    white = ["Conv2D", "MatMulV2", "MaxPool", "AvgPool", "DynamicRNN", "FlashAttentionScore"]
    black = ["Log", "Log1p", "Pow", "ReduceSum", "ReduceMean", "ReduceProd", "LogSoftmaxV2", "SoftmaxGrad", "ApplyAdam",
             "ApplyGradientDescent", "ApplyMomentum", "SoftmaxCrossEntropyWithLogits"]
    gray = ["Relu", "Add", "Mul", "Cast", "Softmax", "LayerNorm", "Sqrt", "Gelu", "Reshape", "Transpose"]
    assert all(lib[o].flag == "white" for o in white)
    assert all(lib[o].flag == "black" for o in black)
    assert all(lib[o].flag == "gray" for o in gray), [o for o in gray if lib[o].flag != "gray"]
    grads = [o for o in lib if o.endswith("Grad") or "Backprop" in o]
    assert len(grads) >= 20


def test_ascend910b_adds_bfloat16():
    a, b = load_library("ascend910"), load_library("ascend910b")
    assert set(a) == set(b)
    assert {"float16", "bfloat16", "float32"} <= b["Conv2D"].float_dtypes
    assert "bfloat16" in b["MatMulV2"].float_dtypes
    assert all(a[o].flag == b[o].flag for o in a)


def test_torch_aliases_map_to_known_types():
    from precision_policy.opinfo import shipped_root

    aliases = json.loads((shipped_root() / "aliases" / "torch.json").read_text())
    targets = {t for section in ("modules", "functions", "methods", "aten") for t in aliases[section].values()}
    assert aliases["modules"]["torch.nn.Conv2d"] == "Conv2D"
    # every op type a torch model can be traced to is known to the Ascend libraries and to autocast's lists
    for name in ("ascend910", "ascend910b", "torch_autocast_cpu"):
        lib = load_library(name)
        assert sorted(t for t in targets if t not in lib) == [], name


def test_tensorflow_aliases_map_to_known_types():
    from precision_policy.opinfo import shipped_root

    aliases = json.loads((shipped_root() / "aliases" / "tensorflow.json").read_text())["ops"]
    assert aliases["Sum"] == "ReduceSum" and aliases["DepthwiseConv2dNative"] == "DepthwiseConv2D"
    lib = load_library("ascend910")
    assert sorted(t for t in aliases.values() if t not in lib) == []
