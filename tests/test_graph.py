import json

import pytest

import precision_policy as pp
from precision_policy.errors import GraphError

from conftest import EXAMPLES


def test_example_graphs_load():
    g = pp.OpGraph.from_json(EXAMPLES / "conv2d_bias_relu.json")
    assert len(g) == 8 and g.outputs == ["myOutput:0"]
    assert g.node("myConv").op_type == "Conv2D"
    assert g.node("myOutput").is_output
    t = pp.OpGraph.from_json(EXAMPLES / "transformer_encoder_block.json")
    ops = {n.op_type for n in t}
    assert {"SoftmaxGrad", "GeluGrad", "LayerNormGrad", "ApplyAdam", "BatchMatMulV2"} <= ops


def test_json_round_trip(tmp_path):
    g = pp.OpGraph.from_json(EXAMPLES / "conv2d_bias_relu.json")
    out = tmp_path / "g.json"
    g.to_json(out)
    assert pp.OpGraph.from_json(out).to_dict() == g.to_dict()


def test_out_of_order_nodes_are_sorted_topologically():
    g = pp.OpGraph.from_dict({"nodes": [
        {"name": "r", "op": "Relu", "inputs": ["c:0"], "outputs": ["float32"]},
        {"name": "c", "op": "Conv2D", "inputs": ["x:0", "^x"], "outputs": ["float32"]},
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
    ], "outputs": ["r:0"]})
    order = [g.names[i] for i in g.resolve().order]
    assert order == ["x", "c", "r"]


@pytest.mark.parametrize(
    "nodes,outputs,needle",
    [
        ([{"name": "a", "op": "Relu", "inputs": ["zz:0"], "outputs": ["float32"]}], [], "'zz:0' names a node"),
        ([{"name": "a", "op": "Placeholder", "outputs": ["float32"]},
          {"name": "b", "op": "Relu", "inputs": ["a:3"], "outputs": ["float32"]}], [], "port 3 does not exist"),
        ([{"name": "a", "op": "Placeholder", "outputs": ["float32"]},
          {"name": "a", "op": "Relu", "outputs": ["float32"]}], [], "duplicate node name"),
        ([{"name": "a", "op": "Placeholder", "outputs": ["flaot32"]}], [], "unknown dtype 'flaot32'"),
        ([{"name": "a", "op": "Placeholder", "outputs": ["float32"]}], ["b:0"], "graph output 'b:0'"),
        ([{"name": "a", "op": "Relu", "inputs": ["b:0"], "outputs": ["float32"]},
          {"name": "b", "op": "Relu", "inputs": ["a:0"], "outputs": ["float32"]}], [], "cycle"),
        ([{"name": "a", "op": 3, "outputs": ["float32"]}], [], "'op' must be"),
        ([{"name": "a", "op": "Relu", "inputs": "x:0", "outputs": ["float32"]}], [], "'inputs' must be"),
        ([{"name": "a", "op": "Relu", "inputs": ["x:zero"]}], [], "integer port"),
    ],
)
def test_bad_graphs_raise_graph_error(nodes, outputs, needle):
    with pytest.raises(GraphError) as err:
        pp.OpGraph.from_dict({"nodes": nodes, "outputs": outputs})
    assert needle in str(err.value)


def test_bad_graph_file_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [\n  {"name": "a",, }\n]}')
    with pytest.raises(GraphError) as err:
        pp.OpGraph.from_json(bad)
    assert f"{bad}:2:" in str(err.value)
    with pytest.raises(GraphError, match="file not found"):
        pp.OpGraph.from_json(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something.else", "nodes": []}))
    with pytest.raises(GraphError, match="format"):
        pp.OpGraph.from_json(wrong)


def test_unknown_node_lookup_suggests_names():
    g = pp.OpGraph.from_json(EXAMPLES / "conv2d_bias_relu.json")
    with pytest.raises(GraphError, match="did you mean 'myConv'"):
        g.node("myconv")


CORE = ["graph.py", "plan.py", "rules.py", "optypes.py", "dtypes.py", "api.py", "config.py", "modes", "opinfo"]


def test_the_core_imports_no_backend():
    import ast
    from pathlib import Path

    root = Path(pp.__file__).parent
    files = [f for c in CORE for f in ((root / c).rglob("*.py") if (root / c).is_dir() else [root / c])]
    assert len(files) > 10
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("precision_policy.backends", "tensorflow", "torch", "keras")), (f, name)


def test_load_graph_reads_formats_the_backends_register(tmp_path):
    from precision_policy.graph import GRAPH_FORMATS, GRAPH_LOADERS, register_graph_format

    assert "tensorflow" in GRAPH_FORMATS  # registered by precision_policy.backends, without importing TensorFlow
    register_graph_format("test", lambda p: p.suffix == ".tst", "json", "nothing")
    GRAPH_LOADERS["test"] = lambda p: pp.OpGraph.from_json(EXAMPLES / "conv2d_bias_relu.json")
    try:
        assert len(pp.load_graph(tmp_path / "m.tst")) == 8
    finally:
        del GRAPH_FORMATS["test"], GRAPH_LOADERS["test"]
    register_graph_format("test", lambda p: p.suffix == ".tst", "precision_policy.no_such_backend", "a backend")
    try:
        with pytest.raises(GraphError, match="reading test files needs a backend"):
            pp.load_graph(tmp_path / "m.tst")
    finally:
        del GRAPH_FORMATS["test"]
