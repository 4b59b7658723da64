"""Property tests: random and mutated op-info files, graphs and override files.

The one property every test checks: the only exceptions that escape the library are its own
typed errors (subclasses of :class:`precision_policy.errors.PrecisionPolicyError`). Any other
exception propagates out of the test and fails it. For valid random DAGs the plan's invariants
are checked too.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import json
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import precision_policy as pp
from precision_policy import dtypes, modes
from precision_policy.errors import PrecisionPolicyError
from precision_policy.opinfo import edit

from conftest import json_entry_span

REPO = Path(__file__).resolve().parent.parent
SHIPPED_910 = REPO / "opinfo_db" / "ascend910" / "aic-ascend910-ops-info.json"
SHIPPED = json.loads(SHIPPED_910.read_text(encoding="utf-8"))
SHIPPED_OPS = sorted(SHIPPED)
CONV = pp.load_graph(REPO / "examples" / "graphs" / "conv2d_bias_relu.json")
TRANSFORMER = pp.load_graph(REPO / "examples" / "graphs" / "transformer_encoder_block.json")

MODE_NAMES = modes.names()
V2_NAMES = sorted(modes.V2_NAMES)
LIBRARIES = ["ascend910", "ascend910b"]
ENV_VARS = [f"TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_{lst}_{act}"
            for lst in ("ALLOWLIST", "DENYLIST", "INFERLIST", "CLEARLIST") for act in ("ADD", "REMOVE")]

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_counter = itertools.count()
_workdir = Path(tempfile.mkdtemp(prefix="pp-fuzz-"))
atexit.register(shutil.rmtree, _workdir, ignore_errors=True)


def fresh(suffix: str = ".json") -> Path:
    """A new file name for every example: the library cache keys on (path, mtime, size)."""
    return _workdir / f"f{next(_counter)}{suffix}"


def typed_only(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a PrecisionPolicyError gives None, any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except PrecisionPolicyError as exc:
        assert str(exc), f"{type(exc).__name__} with an empty message"
        return None


# ---------------------------------------------------------------------- strategies: JSON and op-info
json_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)

DTYPE_WORDS = ["float16", "float", "float32", "bfloat16", "double", "float64", "int32", "int8", "int64", "bool",
               "uint8", "fp16", "bf16", "half", "float8_e4m3fn", "complex64", "string", " float16", "FLOAT16",
               "flaot", "", "float16 ", "DT_HALF", "torch.float16", "uint1"]
dtype_lists = st.one_of(
    st.lists(st.sampled_from(DTYPE_WORDS), min_size=0, max_size=5).map(",".join),
    st.text(alphabet=string.ascii_letters + string.digits + ", _", max_size=20),
    json_values,
)
FLAG_VALUES = ["true", "false", True, False, "yes", "TRUE", "", None, 1, 0, "1", [], {}]
flag_fields = st.one_of(
    st.sampled_from(FLAG_VALUES).map(lambda v: {"flag": v}),
    st.fixed_dictionaries({"flag": st.sampled_from(["true", "false"])}, optional={"extra": json_values}),
    json_values,
)
TENSOR_KEYS = ["input0", "input1", "input2", "output0", "output1", "input9", "output12", "input", "inputs0",
               "input0x", "Input0", "input00", "input٣"]


def _tensor_keys(entry: dict) -> list[str]:
    return [k for k in entry if k.startswith(("input", "output"))]


@st.composite
def mutated_entry(draw: st.DrawFn, op: str) -> Any:
    """A real shipped entry with 0-3 mutations."""
    entry: Any = copy.deepcopy(SHIPPED[op])
    for _ in range(draw(st.integers(0, 3))):
        if not isinstance(entry, dict):
            break
        kind = draw(st.sampled_from(["delete", "dtype", "dtype_len", "format", "flag", "heavy", "tensor_value",
                                     "tensor_field", "new_key", "not_a_dict"]))
        keys = sorted(entry)
        tkeys = [k for k in _tensor_keys(entry) if isinstance(entry[k], dict)]
        if kind == "delete" and keys:
            del entry[draw(st.sampled_from(keys))]
        elif kind == "dtype" and tkeys:
            entry[draw(st.sampled_from(tkeys))]["dtype"] = draw(dtype_lists)
        elif kind == "dtype_len" and tkeys:
            t = entry[draw(st.sampled_from(tkeys))]
            words = str(t.get("dtype", "float16")).split(",")
            if draw(st.booleans()) and len(words) > 1:
                del words[draw(st.integers(0, len(words) - 1))]
            else:
                words.insert(draw(st.integers(0, len(words))), draw(st.sampled_from(DTYPE_WORDS[:12])))
            t["dtype"] = ",".join(words)
            if draw(st.booleans()):  # keep format parallel, or not
                t["format"] = ",".join(["ND"] * len(words))
        elif kind == "format" and tkeys:
            t = entry[draw(st.sampled_from(tkeys))]
            t["format"] = draw(st.one_of(st.integers(0, 6).map(lambda n: ",".join(["ND"] * n)), json_values))
        elif kind == "flag":
            entry["precision_reduce"] = draw(flag_fields)
        elif kind == "heavy":
            entry["heavyOp"] = draw(flag_fields)
        elif kind == "tensor_value":
            entry[draw(st.sampled_from(TENSOR_KEYS + tkeys))] = draw(json_values)
        elif kind == "tensor_field" and tkeys:
            t = entry[draw(st.sampled_from(tkeys))]
            t[draw(st.sampled_from(["name", "dtype", "format", "paramType", "shape"]))] = draw(json_values)
        elif kind == "new_key":
            entry[draw(st.text(max_size=10))] = draw(json_values)
        elif kind == "not_a_dict":
            entry = draw(json_values)
    return entry


@st.composite
def library_docs(draw: st.DrawFn) -> Any:
    """A JSON document: mostly real entries (mutated), sometimes extra random ops, rarely random JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    ops = draw(st.lists(st.sampled_from(SHIPPED_OPS), min_size=1, max_size=5, unique=True))
    doc: dict[str, Any] = {}
    for op in ops:
        doc[op] = draw(mutated_entry(op)) if draw(st.booleans()) else copy.deepcopy(SHIPPED[op])
    for _ in range(draw(st.integers(0, 2))):
        doc[draw(st.text(max_size=10))] = draw(json_values)
    return doc


@st.composite
def library_texts(draw: st.DrawFn) -> str:
    """The text of an op-info file: a serialised document, sometimes damaged at the text level."""
    doc = draw(library_docs())
    text = json.dumps(doc, indent=draw(st.sampled_from([None, 1, 4])), ensure_ascii=draw(st.booleans()),
                      sort_keys=draw(st.booleans()))
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "insert", "delete", "bom", "crlf"]))
    if damage == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "insert":
        k = draw(st.integers(0, len(text)))
        text = text[:k] + draw(st.sampled_from(list(',:{}[]"\\ x0\n\t') + ["\x00", "\ud7ff", "//", "NaN"])) + text[k:]
    elif damage == "delete" and text:
        k = draw(st.integers(0, len(text) - 1))
        text = text[:k] + text[k + 1:]
    elif damage == "bom":
        text = "\ufeff" + text
    elif damage == "crlf":
        text = text.replace("\n", "\r\n")
    return text


# ---------------------------------------------------------------------- strategies: graphs
SOURCE_OPS = ["Placeholder", "Const", "VariableV2"]
COMPUTE_OPS = ["Conv2D", "MatMulV2", "BatchMatMulV2", "BiasAdd", "Relu", "Add", "Mul", "Cast", "Softmax", "ReduceSum",
               "ReduceMean", "Log", "Exp", "LayerNorm", "Gelu", "Sqrt", "Reshape", "Identity", "FusedBatchNormV3",
               "ApplyAdam", "Transpose", "AddN", "Sub", "RealDiv", "Tanh", "Sigmoid", "SoftmaxGrad", "LogSoftmax",
               "Pow", "MaxPool", "Conv3D", "MyCustomOp", "StopGradient"]
OUT_DTYPES = ["float32"] * 6 + ["float16", "bfloat16", "float64", "int32", "bool"]
NAME_PREFIXES = ["n", "layer/conv_", "x y", "ü", "a:b"]  # ':' in a name is legal: refs split at the last ':'


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """A valid graph dict: a DAG (nodes sometimes out of order), with fetches."""
    n = draw(st.integers(1, 14))
    prefix = draw(st.sampled_from(NAME_PREFIXES))
    nodes: list[dict[str, Any]] = []
    tensors: list[str] = []
    tensor_dtype: dict[str, str] = {}
    for i in range(n):
        name = f"{prefix}{i}"
        if not tensors or draw(st.integers(0, 4)) == 0:
            op = draw(st.sampled_from(SOURCE_OPS))
        else:
            op = draw(st.sampled_from(COMPUTE_OPS + SOURCE_OPS[:1]))
        inputs: list[str] = []
        if op not in SOURCE_OPS and tensors:
            inputs = draw(st.lists(st.sampled_from(tensors), min_size=1, max_size=3))
            if draw(st.integers(0, 5)) == 0:
                inputs.append("^" + draw(st.sampled_from(tensors)).rpartition(":")[0])
        n_out = draw(st.integers(1, 2)) if draw(st.integers(0, 5)) else draw(st.integers(0, 3))
        outputs = [draw(st.sampled_from(OUT_DTYPES)) for _ in range(n_out)]
        if op in pp.graph.PASSTHROUGH_OPS and inputs:
            # a pass-through forwards its one input unchanged (see test_passthrough_keeps_declared_outputs)
            inputs = inputs[:1]
            outputs = [tensor_dtype[inputs[0]]]
            n_out = 1
        nodes.append({"name": name, "op": op, "inputs": inputs, "outputs": outputs})
        for p, d in enumerate(outputs):
            tensor_dtype[f"{name}:{p}"] = d
        tensors += [f"{name}:{p}" for p in range(n_out)]
    if draw(st.booleans()):
        nodes = draw(st.permutations(nodes))
    fetches = draw(st.lists(st.sampled_from(tensors), max_size=3, unique=True)) if tensors else []
    return {"format": "precision_policy.graph", "version": 1, "name": "fuzz", "nodes": nodes, "outputs": fetches}


PORTS = ["0", "1", "2", "7", "-1", "", "x", "00", "1e3", " 0", "99999999999999999999", "0x1", "²", "①", "٣", "０"]


@st.composite
def graph_dicts(draw: st.DrawFn) -> Any:
    """A valid DAG with 0-3 mutations, or random JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    g = draw(dags())
    names = [nd["name"] for nd in g["nodes"]]
    refs = st.one_of(
        st.tuples(st.sampled_from(names), st.sampled_from(PORTS)).map(lambda t: f"{t[0]}:{t[1]}"),
        st.sampled_from(names).map(lambda s: "^" + s),
        st.sampled_from(names),
        st.text(max_size=10),
    )
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["top_delete", "top_value", "node_delete_key", "node_value", "dup_name", "op",
                                     "inputs", "outputs", "cycle", "fetches", "node_not_dict", "attrs"]))
        nodes = g.get("nodes") if isinstance(g, dict) else None
        if not isinstance(nodes, list) or not nodes:
            break
        k = draw(st.integers(0, len(nodes) - 1))
        node = nodes[k]
        if not isinstance(node, dict):
            continue
        if kind == "top_delete":
            g.pop(draw(st.sampled_from(["format", "version", "name", "nodes", "outputs"])), None)
        elif kind == "top_value":
            g[draw(st.sampled_from(["format", "version", "name", "nodes", "outputs"]))] = draw(json_values)
        elif kind == "node_delete_key":
            node.pop(draw(st.sampled_from(["name", "op", "inputs", "outputs"])), None)
        elif kind == "node_value":
            node[draw(st.sampled_from(["name", "op", "inputs", "outputs", "attrs"]))] = draw(json_values)
        elif kind == "dup_name":
            node["name"] = draw(st.sampled_from(names))
        elif kind == "op":
            node["op"] = draw(st.sampled_from(COMPUTE_OPS + SOURCE_OPS) | st.text(max_size=8))
        elif kind == "inputs":
            node["inputs"] = draw(st.lists(refs, max_size=4))
        elif kind == "outputs":
            node["outputs"] = draw(st.lists(st.sampled_from(DTYPE_WORDS) | st.text(max_size=6), max_size=3))
        elif kind == "cycle":
            node["inputs"] = list(node.get("inputs") or []) + [f"{draw(st.sampled_from(names))}:0"]
        elif kind == "fetches":
            g["outputs"] = draw(st.lists(refs, max_size=3))
        elif kind == "node_not_dict":
            nodes[k] = draw(json_values)
        elif kind == "attrs":
            node["attrs"] = draw(json_values)
    return g


@st.composite
def run_configs(draw: st.DrawFn) -> dict[str, Any]:
    settings_: dict[str, Any] = {"op_info": draw(st.sampled_from(LIBRARIES)), "use_env_lists": False,
                                 "keep_output_dtype": draw(st.booleans())}
    if draw(st.integers(0, 3)) == 0:
        settings_["precision_mode_v2"] = draw(st.sampled_from(V2_NAMES))
    else:
        settings_["precision_mode"] = draw(st.sampled_from(MODE_NAMES))
    return settings_


# ---------------------------------------------------------------------- op-info files
@FUZZ
@given(doc=json_values)
def test_random_json_as_op_info_file(doc: Any) -> None:
    path = fresh()
    path.write_text(json.dumps(doc), encoding="utf-8")
    lib = typed_only(pp.load_library, path)
    if lib is not None:  # only an object of objects can load
        assert isinstance(doc, dict) and len(lib) == len(doc)


@FUZZ
@given(text=library_texts(), mode=st.sampled_from(MODE_NAMES))
def test_mutated_op_info_files_load_or_raise_typed_errors(text: str, mode: str) -> None:
    path = fresh()
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    lib = typed_only(pp.load_library, path)
    if lib is None:
        return
    doc = json.loads(text.lstrip("\ufeff"))
    assert set(lib) == set(doc)
    for info in lib.values():
        assert info.flag in ("white", "black", "gray")
        assert all(dtypes.is_known(d) for t in info.inputs + info.outputs for d in t.dtypes)
        assert len({len(t.dtypes) for t in info.inputs + info.outputs if t.dtypes}) <= 1  # parallel lists
    # plan a chain through every op the mutated library defines
    g = pp.OpGraph("chain")
    g.add_node("x", "Placeholder", outputs=["float32"])
    prev = "x:0"
    for k, op in enumerate(sorted(lib)):
        if not op or op in pp.graph.SOURCE_KINDS:
            continue
        g.add_node(f"n{k}", op, inputs=[prev, "x:0"][: 1 + k % 2], outputs=["float32"])
        prev = f"n{k}:0"
    g.set_outputs([prev])
    plan = typed_only(pp.plan, g, pp.RunConfig(precision_mode=mode, op_info=path, use_env_lists=False))
    if plan is not None:
        assert set(plan.to_dict()["nodes"]) == set(g.node_names)
        for name in g.node_names:
            assert plan.explain(name)


@settings(FUZZ, max_examples=100)
@given(text=library_texts(), data=st.data())
def test_editing_mutated_files_is_safe(text: str, data: st.DataObject) -> None:
    """set_flag either refuses (typed error, file untouched) or changes just the one flag."""
    path = fresh()
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    before = path.read_bytes()
    try:
        original = json.loads(text)
    except ValueError:
        original = None
    keys = sorted(original) if isinstance(original, dict) else []
    op = data.draw(st.sampled_from(keys) if keys and data.draw(st.booleans())
                   else st.sampled_from(SHIPPED_OPS + ["NewOp"]) | st.text(max_size=8))
    flag = data.draw(st.sampled_from(["true", "false", None]))
    result = typed_only(edit.set_flag, path, op, flag)
    leftovers = sorted(p.name for p in _workdir.iterdir() if p.name.startswith(f".{path.name}."))
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    if result is None:
        assert path.read_bytes() == before
        return
    assert isinstance(original, dict)
    if not result.changed:  # nothing to do: the file is not rewritten (and not re-validated)
        assert path.read_bytes() == before
        return
    after_text = path.read_bytes().decode("utf-8")
    after = json.loads(after_text)
    if op in original:  # every byte outside the op's entry is unchanged
        s0, e0 = json_entry_span(text, op)
        s1, e1 = json_entry_span(after_text, op)
        assert (after_text[:s1], after_text[e1:]) == (text[:s0], text[e0:])
    assert result.new_flag == flag
    if flag is None:
        assert "precision_reduce" not in after[op]
    else:
        assert after[op]["precision_reduce"]["flag"] == flag
    assert [k for k in after if k != op or op in original] == list(original)  # order kept; a new op is inserted
    for k in original:
        if k != op:
            assert after[k] == original[k]
    if op in original:
        strip = lambda e: {k: v for k, v in e.items() if k != "precision_reduce"}  # noqa: E731
        assert strip(after[op]) == strip(original[op])
        if isinstance(original[op].get("precision_reduce"), dict) and flag is not None:
            rest = {k: v for k, v in original[op]["precision_reduce"].items() if k != "flag"}
            assert {k: v for k, v in after[op]["precision_reduce"].items() if k != "flag"} == rest
    else:
        assert after[op] == {"precision_reduce": {"flag": flag}}
    assert pp.load_library(path)[op].flag == {"true": "white", "false": "black", None: "gray"}[flag]
    if flag is None:
        return
    # undoing a pin/set-flag on an op that had no field restores the bytes exactly
    if op in original and "precision_reduce" not in original[op]:
        edit.unpin(path, op)
        assert path.read_bytes() == before


# ---------------------------------------------------------------------- graphs
@FUZZ
@given(doc=graph_dicts(), config=run_configs())
def test_random_graph_dicts_build_and_plan_or_raise_typed_errors(doc: Any, config: dict) -> None:
    graph = typed_only(pp.OpGraph.from_dict, doc)
    if graph is None:
        return
    plan = typed_only(pp.plan, graph, pp.RunConfig(**config))
    if plan is not None:
        assert set(plan.to_dict()["nodes"]) == set(graph.node_names)


def _check_invariants(graph: pp.OpGraph, plan: pp.CastPlan, keep_output_dtype: bool) -> None:
    doc = plan.to_dict()
    nodes = doc["nodes"]
    assert list(nodes) == graph.node_names
    for name, entry in nodes.items():
        assert "dtype" in entry and isinstance(entry["reason"], str) and entry["reason"], name
        declared = graph.node(name).outputs
        assert len(entry["outputs"]) == len(declared), (name, entry["outputs"], declared)
        for k, d in enumerate(declared):
            if not dtypes.is_float(d):  # precision modes never touch non-float tensors
                assert entry["outputs"][k] == d, (name, k, entry["outputs"], declared)
    casts = doc["casts"]
    for c in casts:
        assert c["from"] != c["to"], c
        assert dtypes.is_float(c["from"]) and dtypes.is_float(c["to"]), c
        src, _, port = c["tensor"].rpartition(":")
        assert nodes[src]["outputs"][int(port)] == c["from"], c  # casts start from what the producer makes
        assert dtypes.is_float(graph.node(src).outputs[int(port)]), c  # only float tensors are ever cast
        assert c["consumers"] or c["fetch"], c
    pairs = [(c["tensor"], c["to"]) for c in casts]
    assert len(pairs) == len(set(pairs)), "two casts share (tensor, to)"
    # a cast's source kind: consts are cast once ahead of time, variables after each read
    res = graph.resolve()
    kinds: dict[int, str] = {}
    for i in res.order:
        op = graph.op_types[i]
        ins = res.data_inputs[i]
        if op in pp.graph.SOURCE_KINDS:
            kinds[i] = pp.graph.SOURCE_KINDS[op]
        elif op in pp.graph.PASSTHROUGH_OPS and len(ins) == 1 and kinds[ins[0][0]] != "op":
            kinds[i] = kinds[ins[0][0]]
        elif ins and all(kinds[j] == "const" for j, _ in ins) and (
            any(dtypes.is_float(d) for d in graph.output_dtypes[i])
            or any(dtypes.is_float(graph.output_dtypes[j][p]) for j, p in ins)
        ):
            kinds[i] = "const"  # computed from constants only: a constant too
        else:
            kinds[i] = "op"
    for c in casts:
        assert c["source"] == kinds[graph.index(c["tensor"].rpartition(":")[0])], c
    counted = sum(1 for c in casts if c["to"] == plan.low and c["source"] not in ("const", "variable"))
    assert f"using {counted} cast(s) to {plan.low}" in doc["summary"], (doc["summary"], counted)
    if plan.mode_name == "must_keep_origin_dtype":
        # (an existing Cast may be retargeted to write what its consumers need: not checked here)
        assert all(e["dtype"] == e["origin"] for e in nodes.values() if e["op"] != "Cast")
    by_pair = {(c["tensor"], c["to"]): c for c in casts}
    # every float input consumed in another dtype than produced goes through a cast listing the consumer
    for i, name in enumerate(graph.node_names):
        want = nodes[name]["inputs"]
        assert len(want) == len(res.data_inputs[i]), name
        for m, (j, p) in enumerate(res.data_inputs[i]):
            have = nodes[graph.node_names[j]]["outputs"][p]
            if have != want[m] and dtypes.is_float(have) and dtypes.is_float(want[m]):
                c = by_pair.get((f"{graph.node_names[j]}:{p}", want[m]))
                assert c is not None and name in c["consumers"], (name, m, have, want[m])
    # fetches keep their origin dtype
    if keep_output_dtype:
        for ref in graph.outputs:
            src, _, port = ref.rpartition(":")
            origin = graph.node(src).outputs[int(port)]
            now = nodes[src]["outputs"][int(port)]
            if now != origin and dtypes.is_float(now) and dtypes.is_float(origin):
                c = by_pair.get((ref, origin))
                assert c is not None and c["fetch"], f"fetch {ref} computed in {now} has no cast back to {origin}"
    else:
        assert not any(c["fetch"] for c in casts)
    # the summary counts what the plan says
    assert doc["summary"].startswith(f"Converted {sum(1 for d in plan.converted() if d.dtype == plan.low)}/{len(graph)} nodes")


@FUZZ
@given(doc=dags(), config=run_configs())
def test_valid_random_dags_plan_with_invariants(doc: dict, config: dict) -> None:
    graph = pp.OpGraph.from_dict(doc)  # valid by construction: must not raise at all
    cfg = pp.RunConfig(**config)
    plan = typed_only(pp.plan, graph, cfg)
    if plan is None:
        return
    _check_invariants(graph, plan, config["keep_output_dtype"])
    text = plan.to_json()
    assert plan.to_json() == text
    again = pp.plan(pp.OpGraph.from_dict(json.loads(json.dumps(doc))), cfg)
    assert again.to_json() == text, "planning the same graph twice gave different JSON"
    back = pp.CastPlan.from_dict(json.loads(text))
    assert back.to_json() == text, "plan JSON does not read back to the same JSON"
    assert plan.diff(again).empty
    for name in graph.node_names[:4]:
        assert plan.explain(name).startswith(f"{name} (")


# ---------------------------------------------------------------------- override files
mixlist_ops = st.sampled_from(SHIPPED_OPS[:60] + ["Conv2D", "BiasAdd", "Relu", "MatMulV2"]) | st.text(max_size=8)
mixlist_docs = st.one_of(
    st.dictionaries(
        st.sampled_from(["black-list", "white-list", "gray-list"]) | st.text(max_size=10),
        st.one_of(
            st.dictionaries(st.sampled_from(["to-add", "to-remove"]) | st.text(max_size=6),
                            st.lists(mixlist_ops, max_size=3) | json_values, max_size=2),
            json_values,
        ),
        max_size=3,
    ),
    json_values,
)
CONV_NAMES = CONV.node_names + TRANSFORMER.node_names[:10]
keep_lines = st.one_of(
    st.sampled_from(CONV_NAMES),
    st.sampled_from(SHIPPED_OPS + ["MyOp", ""]).map(lambda op: f"OpType::{op}"),
    st.sampled_from(["# comment", "", "   ", "a::b", "OpType::", "OpType:: Relu  # why"]),
    st.text(max_size=12),
)
spec_tokens = st.lists(
    st.one_of(st.sampled_from(["InputDtype:", "OutputDtype:"]).flatmap(lambda h: st.sampled_from(DTYPE_WORDS).map(lambda d: h + d)),
              st.sampled_from(DTYPE_WORDS), st.text(alphabet=string.ascii_letters + ":", max_size=8)),
    min_size=0, max_size=5,
).map(",".join)
custom_lines = st.one_of(
    st.tuples(st.sampled_from(CONV_NAMES), spec_tokens).map(lambda t: f"{t[0]}::{t[1]}"),
    st.tuples(st.sampled_from(["Conv2D", "BiasAdd", "Relu", "MatMulV2", "MyOp", ""]), spec_tokens).map(lambda t: f"OpType::{t[0]}:{t[1]}"),
    st.sampled_from(["myConv::InputDtype:float16,float16,OutputDtype:float16",
                     "OpType::Relu:InputDtype:float32,OutputDtype:float32",
                     "BiasAdd::OutputDtype:bfloat16", "myOutput::InputDtype:int32", "::", "x::", "OpType::Relu"]),
    st.text(max_size=16),
)
file_contents = lambda lines: st.one_of(  # noqa: E731
    st.lists(lines, max_size=5).map("\n".join).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=20),
)


@FUZZ
@given(
    mixlist=st.none() | st.one_of(mixlist_docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=12)),
    keep=st.none() | file_contents(keep_lines),
    custom=st.none() | file_contents(custom_lines),
    env=st.dictionaries(st.sampled_from(ENV_VARS),
                        st.lists(st.sampled_from(["Conv2D", "BiasAdd", "Relu", "MatMul", "Softmax", "Foo", " ", ""])
                                 | st.text(max_size=6), max_size=3).map(",".join), max_size=3),
    mode=st.sampled_from(MODE_NAMES),
    graph=st.sampled_from([CONV, TRANSFORMER]),
    missing=st.sampled_from([None, "modify_mixlist", "keep_dtype", "customize_dtypes"]),
)
def test_random_override_files_and_env_lists(mixlist, keep, custom, env, mode, graph, missing) -> None:
    settings_: dict[str, Any] = {"precision_mode": mode, "op_info": "ascend910", "use_env_lists": bool(env), "env": env}
    for key, content in (("modify_mixlist", mixlist), ("keep_dtype", keep), ("customize_dtypes", custom)):
        if content is not None:
            path = fresh(".json" if key == "modify_mixlist" else ".txt")
            if key != missing:
                path.write_bytes(content)
            settings_[key] = path
    cfg = typed_only(pp.RunConfig, **settings_)
    if cfg is None:
        return
    plan = typed_only(pp.plan, graph, cfg)
    if plan is not None:
        doc = plan.to_dict()
        assert set(doc["nodes"]) == set(graph.node_names)
        pairs = [(c["tensor"], c["to"]) for c in doc["casts"]]
        assert len(pairs) == len(set(pairs))


# ---------------------------------------------------------------------- bugs found by these tests
def test_cast_consumers_are_distinct_nodes() -> None:
    g = pp.OpGraph.from_dict({"nodes": [
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
        {"name": "m", "op": "MatMulV2", "inputs": ["x:0", "x:0"], "outputs": ["float32"]},
    ], "outputs": ["m:0"]})
    plan = pp.plan(g, pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False))
    (cast,) = [c for c in plan.casts if c.tensor == "x:0"]
    assert cast.consumers == ("m",)
    assert "shared with" not in plan.explain("m")


@pytest.mark.parametrize("outs", [[], ["int32"]])
def test_passthrough_keeps_declared_outputs(outs: list) -> None:
    g = pp.OpGraph.from_dict({"nodes": [
        {"name": "w", "op": "Const", "outputs": ["float32"]},
        {"name": "r", "op": "Identity", "inputs": ["w:0"], "outputs": outs},
        {"name": "m", "op": "MatMulV2", "inputs": ["r:0", "r:0"] if outs else ["w:0", "w:0"], "outputs": ["float32"]},
    ], "outputs": ["m:0"]})
    plan = pp.plan(g, pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False))
    assert list(plan["r"].outputs) == outs
    assert all(c.source != "r" for c in plan.casts)  # r:0, if any, is not a float tensor


UNICODE_DIGITS = ["²", "³", "¹", "①", "⁴"]  # str.isdigit() is True, int() refuses them (fixed in 7ba781a)


@pytest.mark.parametrize("mode", ["allow_mix_precision", "force_fp32"])
def test_cast_node_without_outputs_plans(mode: str) -> None:
    g = pp.OpGraph.from_dict({"nodes": [
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
        {"name": "c", "op": "Cast", "inputs": ["x:0"], "outputs": []},
    ], "outputs": []})
    plan = typed_only(pp.plan, g, pp.RunConfig(precision_mode=mode, op_info="ascend910", use_env_lists=False))
    assert plan is not None and plan["c"].dtype == "float32"


@pytest.mark.parametrize("digit", UNICODE_DIGITS)
def test_input_port_with_a_unicode_digit_is_a_graph_error(digit: str) -> None:
    doc = {"nodes": [{"name": "a", "op": "Placeholder", "outputs": ["float32"]},
                     {"name": "b", "op": "Relu", "inputs": [f"a:{digit}"], "outputs": ["float32"]}],
           "outputs": ["b:0"]}
    with pytest.raises(pp.GraphError):
        pp.OpGraph.from_dict(doc)


@pytest.mark.parametrize("digit", UNICODE_DIGITS)
def test_fetch_with_a_unicode_digit_is_a_graph_error(digit: str) -> None:
    doc = {"nodes": [{"name": "a", "op": "Placeholder", "outputs": ["float32"]}], "outputs": [f"a:{digit}"]}
    with pytest.raises(pp.GraphError):
        pp.OpGraph.from_dict(doc)


@pytest.mark.parametrize("what", ["graph", "keep_dtype", "modify_mixlist"])
def test_path_with_nul_byte_is_a_typed_error(what: str) -> None:
    with pytest.raises(PrecisionPolicyError):
        if what == "graph":
            pp.load_graph("graph\0.json")
        else:
            mode = "allow_mix_precision"
            pp.plan(CONV, pp.RunConfig(precision_mode=mode, op_info="ascend910", use_env_lists=False, **{what: "f\0.txt"}))
