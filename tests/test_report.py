"""The HTML plan report: real plans, real files, rendered in headless Chromium, and the CLI as a subprocess.

Chromium and Graphviz come from Debian (`make report-deps`); the browser tests skip without Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import precision_policy as pp
from precision_policy.errors import PlanFormatError, WriteError
from precision_policy.report import LayoutToolMissing, ReportInputError, json_schemas, render_report, write_report
from precision_policy.report.html import DTYPE_COLORS
from precision_policy.report.layout import dot_available
from precision_policy.report.model import build_model

from conftest import EXAMPLES, REPO, graph

sys.path.insert(0, str(REPO / "benchmarks"))
from report_render import chromium, encoder_graph  # noqa: E402  (the benchmark's graph and browser call)

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make report-deps installs Debian's chromium)")
needs_dot = pytest.mark.skipif(not dot_available(), reason="Graphviz dot is not installed (make report-deps)")


def cli(*args: str | Path, path: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m precision_policy ARGS`` (``path``: the PATH it sees) and return the completed process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "precision_policy", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def dump_dom(html: Path, tmp: Path, fragment: str = "") -> str:
    r = chromium(CHROMIUM, "--dump-dom", html.resolve().as_uri() + fragment, profile=tmp / "chromium-profile")
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'data-ready="1"' in r.stdout, "the report's script did not finish"
    return r.stdout


def screenshot(html: Path, png: Path, tmp: Path, fragment: str = "") -> None:
    r = chromium(CHROMIUM, f"--screenshot={png}", "--window-size=1400,900", html.resolve().as_uri() + fragment,
                 profile=tmp / "chromium-profile")
    assert r.returncode == 0, r.stderr[-2000:]


def png_colours(png: Path) -> set[str]:
    """The colours of a PNG's pixels as #rrggbb (checks the PNG is a real, non-blank picture)."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image = pytest.importorskip("PIL.Image")
    with Image.open(png) as im:
        assert im.size == (1400, 900)
        return {"#{:02x}{:02x}{:02x}".format(*rgb) for _, rgb in im.convert("RGB").getcolors(maxcolors=1 << 24)}


def drawn_nodes(dom: str) -> dict[str, str]:
    """Node name -> the fill colour of its box, for every op box in the rendered DOM."""
    out = {}
    box = r'<g class="nd[^"]*" data-node="\d+" data-name="([^"]*)"[^>]*><title>[^<]*</title><rect class="box"[^>]*fill="([^"]+)"'
    for m in re.finditer(box, dom):
        out[m.group(1).replace("&amp;", "&").replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")] = m.group(2)
    return out


# ---------------------------------------------------------------------- example graphs, in the browser
@needs_chromium
@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_example_plan_report_renders_every_node_in_its_dtype_colour(path: Path, tmp_path: Path):
    plan = pp.plan(path, pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    out = tmp_path / "report.html"
    result = write_report(plan, out)
    assert result.nodes == len(plan) and result.clusters == 0 and result.edges_complete
    html = out.read_text(encoding="utf-8")
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # nothing fetched
    dom = dump_dom(out, tmp_path)
    nodes = drawn_nodes(dom)
    assert set(nodes) == set(plan.names)
    for d in plan:
        assert nodes[d.name] == DTYPE_COLORS.get(d.dtype or "", nodes[d.name])
    assert nodes[plan.converted()[0].name] == DTYPE_COLORS["float16"]
    assert 'class="e cast"' in dom or not any(c.consumers for c in plan.casts)
    assert 'id="op-types"' in dom and 'id="unknown-ops"' in dom
    png = tmp_path / "shot.png"
    screenshot(out, png, tmp_path)
    colours = png_colours(png)
    assert len(colours) > 50 and png.stat().st_size > 10_000
    assert DTYPE_COLORS["float16"] in colours and DTYPE_COLORS["float32"] in colours


@needs_chromium
def test_node_reason_rule_and_followed_show_on_click(tmp_path: Path):
    plan = pp.plan(EXAMPLES / "conv2d_bias_relu.json", pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    out = tmp_path / "r.html"
    write_report(plan, out)
    gray = next(d for d in plan if d.followed)
    dom = dump_dom(out, tmp_path, f"#node={gray.name}")
    side = dom[dom.index('id="side"'):]
    assert gray.op_type in side and gray.rule is not None and gray.rule.value in side and f'data-goto="{gray.followed}"' in side
    assert gray.reason.replace("'", "&#39;") in side
    assert f'data-name="{gray.name}" data-dtype="{gray.dtype}"' in dom and 'class="nd sel"' in dom
    # the hover text carries the reason too
    assert re.search(r'data-name="' + re.escape(gray.name) + r'"[^>]*><title>[^<]*' + re.escape(gray.reason.replace("'", "&#39;")), dom)


@needs_chromium
def test_search_finds_nodes_by_op_type_and_name(tmp_path: Path):
    plan = pp.plan(EXAMPLES / "transformer_encoder_block.json", pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    out = tmp_path / "r.html"
    write_report(plan, out)
    n_softmax = sum(1 for d in plan if "softmax" in d.op_type.lower() or "softmax" in d.name.lower())
    dom = dump_dom(out, tmp_path, "#q=softmax")
    assert f"{n_softmax} matches" in dom
    hits = re.findall(r'<g class="nd hit"', dom)
    assert len(hits) == n_softmax and 'class="nd dim"' in dom


# ---------------------------------------------------------------------- 5,000 nodes
@pytest.mark.slow
@needs_chromium
@needs_dot
def test_5000_node_report_collapses_blocks_and_renders(tmp_path: Path):
    """(How fast it generates and renders: benchmarks/report_render.py.)"""
    g = encoder_graph(5000)
    plan = pp.plan(g, pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16"))
    assert len(plan) == 5000 and plan.unknown
    out = tmp_path / "big.html"
    result = write_report(plan, out, layout="dot")
    assert result.engine == "dot" and result.clusters >= 100 and result.layouts <= 5 and result.drawn < 400
    dom = dump_dom(out, tmp_path)
    assert len(re.findall(r'<g class="cl[^"]*" data-cluster="', dom)) == result.clusters
    assert "×" in dom and "identical" in dom
    png = tmp_path / "big.png"
    screenshot(out, png, tmp_path)
    colours = png_colours(png)
    assert DTYPE_COLORS["bfloat16"] in colours and DTYPE_COLORS["float32"] in colours
    # a node inside a collapsed block: the link opens its cluster and shows it in its dtype's colour
    name = "encoder.layer.7.attn.q.matmul"
    dom = dump_dom(out, tmp_path, f"#node={name}")
    nodes = drawn_nodes(dom)
    assert nodes[name] == DTYPE_COLORS[plan[name].dtype or ""] == DTYPE_COLORS["bfloat16"]
    assert len(nodes) == sum(1 for n in plan.names if n.startswith("encoder.layer.7."))
    assert "Overview › encoder.layer.7." in dom
    unknown = dom[dom.index('id="unknown-ops"'):]
    assert "MyFusedDropout" in unknown[:3000]


def test_5000_nodes_with_flat_names_are_cut_into_runs():
    g = pp.OpGraph("flat")
    g.add_node("n0", "Placeholder")
    for i in range(1, 5000):
        g.add_node(f"n{i}", "Relu" if i % 3 else "MatMulV2", [f"n{i - 1}:0"] + ([f"n{i - 2}:0"] if i % 3 == 0 else []))
    g.set_outputs(["n4999:0"])
    plan = pp.plan(g, pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    model = build_model(plan)
    assert model.clusters and all(c.kind == "run" and len(c.members) <= 250 for c in model.clusters)
    assert len(model.items) <= 300
    assert sorted(i for c in model.clusters for i in c.members) == list(range(5000))
    text, result = render_report(plan, layout="simple")
    assert result.drawn == len(model.items) and "n4999" in text


def test_scopes_are_grouped_and_only_identical_blocks_share_a_layout():
    nodes: list[tuple] = [("x", "Placeholder", [])]
    prev = "x:0"
    for k in range(4):  # blocks 0..3 identical; block 4 has one op more
        nodes += [(f"blocks.{k}.mm", "MatMulV2", [prev, "x:0"]), (f"blocks.{k}.act", "Relu", [f"blocks.{k}.mm:0"])]
        prev = f"blocks.{k}.act:0"
    nodes += [("blocks.4.mm", "MatMulV2", [prev, "x:0"]), ("blocks.4.act", "Relu", ["blocks.4.mm:0"]),
              ("blocks.4.extra", "Relu", ["blocks.4.act:0"])]
    prev = "blocks.4.extra:0"
    for k in range(400):
        nodes.append((f"gradients/g{k}", "Relu", [prev]))
        prev = f"gradients/g{k}:0"
    plan = pp.plan(graph(nodes, [prev]), pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    model = build_model(plan)
    blocks = [c for c in model.clusters if c.kind == "block"]
    assert [c.label for c in blocks] == [f"blocks.{k}." for k in range(4)]
    assert len({c.template for c in blocks}) == 1 and model.templates[blocks[0].template].clusters == [0, 1, 2, 3]
    assert not any(c.label == "blocks.4." for c in model.clusters)  # not repeated: its nodes stay single
    assert any(c.label.startswith("gradients/") for c in model.clusters)


# ---------------------------------------------------------------------- audit and ranges
def audit_and_ranges(plan: pp.CastPlan, tmp: Path) -> tuple[Path, Path, str]:
    low = next(d for d in plan if d.dtype == "float16" and d.op_type == "MatMulV2")
    audit = {"format": "precision_policy.audit", "version": 1, "source": "planted",
             "nodes": [{"node": low.name, "planned": "float16", "executed": "float32", "kernel": "gemm:ref:f32",
                        "mismatch": "kernel fell back to reference fp32 implementation"}]
             + [{"node": d.name, "planned": d.dtype, "executed": d.dtype} for d in plan if d.name != low.name][:20]
             + [{"node": "no/such/node", "planned": "float16", "executed": "float16"}]}
    ranges = {"format": "precision_policy.ranges", "version": 1, "batches": 2,
              "nodes": [{"node": low.name, "op": low.op_type, "dtype": "float16", "max_abs": 1.2e5, "frac_below_min_normal": 0.001,
                         "frac_above_max": 0.0004, "suggestion": f"keep_dtype: {low.name}"}]}
    a, r = tmp / "AUDIT.json", tmp / "RANGES.json"
    a.write_text(json.dumps(audit))
    r.write_text(json.dumps(ranges))
    return a, r, low.name


@needs_chromium
def test_audit_and_ranges_are_shown_on_the_graph_and_in_tables(tmp_path: Path):
    plan = pp.plan(EXAMPLES / "transformer_encoder_block.json", pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    a, r, bad = audit_and_ranges(plan, tmp_path)
    out = tmp_path / "r.html"
    write_report(plan, out, audit=a, ranges=r)
    dom = dump_dom(out, tmp_path, f"#node={bad}")
    audit = dom[dom.index('id="audit"'):dom.index('id="ranges"')]
    assert "1 ran other than planned" in audit and "kernel fell back to reference fp32 implementation" in audit
    assert "1.2e+05" in dom[dom.index('id="ranges"'):] and f"keep_dtype: {bad}" in dom
    assert re.search(r'<g class="nd mis[^"]*" data-node="\d+" data-name="' + re.escape(bad), dom)
    assert "no/such/node" in dom[dom.index('id="warnings"'):]
    side = dom[dom.index('id="side"'):]
    assert "executed float32" in side and "max |x| 1.2e+05" in side


def test_audit_and_ranges_schemas_are_strict_and_documented(tmp_path: Path):
    schemas = json_schemas()
    assert set(schemas["audit"]["$defs"]["AuditEntry"]["properties"]) == {"node", "op", "planned", "executed", "kernel", "mismatch",
                                                                          "note"}
    range_fields = set(schemas["ranges"]["$defs"]["RangeEntry"]["properties"])
    assert {"max_abs", "frac_below_min_normal", "frac_above_max", "suggestion", "nonfinite"} <= range_fields
    plan = pp.plan(EXAMPLES / "conv2d_bias_relu.json", pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    bad = tmp_path / "ranges.json"
    bad.write_text(json.dumps({"format": "precision_policy.ranges", "version": 1,
                               "nodes": [{"node": "myConv", "dtype": "float16", "max_abs": 1, "frac_below_min_normal": 2,
                                          "frac_above_max": 0}]}))
    with pytest.raises(ReportInputError, match=r"ranges.json: not a valid ranges file: nodes.0.frac_below_min_normal"):
        write_report(plan, tmp_path / "r.html", ranges=bad)
    bad.write_text('{"format": "precision_policy.audit", "version": 1, "nodes": [], "extra": 1}')
    with pytest.raises(ReportInputError, match="extra"):
        write_report(plan, tmp_path / "r.html", audit=bad)
    bad.write_text("{not json")
    with pytest.raises(ReportInputError, match=r"ranges.json:1:2"):
        write_report(plan, tmp_path / "r.html", ranges=bad)
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------- layout engine, inputs, writes
def test_without_dot_auto_falls_back_and_dot_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plan = pp.plan(EXAMPLES / "conv2d_bias_relu.json", pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on it
    with pytest.raises(LayoutToolMissing, match=r"make report-deps.*apt-get install -y graphviz"):
        write_report(plan, tmp_path / "r.html", layout="dot")
    result = write_report(plan, tmp_path / "r.html")
    assert result.engine == "simple" and "make report-deps" in result.notes[0]
    assert "myConv" in (tmp_path / "r.html").read_text()


def test_plan_json_without_graph_draws_the_edges_it_names(tmp_path: Path):
    plan = pp.plan(EXAMPLES / "transformer_encoder_block.json", pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    path = tmp_path / "plan.json"
    plan.to_json(path)
    full = build_model(pp.CastPlan.from_json(path), pp.load_graph(EXAMPLES / "transformer_encoder_block.json"))
    recorded = build_model(pp.CastPlan.from_json(path))  # plan JSON v3 records each node's inputs ("from")
    assert recorded.edges_complete and full.edges_complete and recorded.edges == full.edges == build_model(plan).edges
    doc = json.loads(path.read_text())
    for node in doc["nodes"].values():  # a plan written before the inputs were recorded
        del node["from"]
    alone = build_model(pp.CastPlan.from_dict(doc))
    assert not alone.edges_complete and set(alone.edges) < set(full.edges)


def test_bad_inputs_and_writes_raise_typed_errors(tmp_path: Path):
    with pytest.raises(PlanFormatError, match=r"missing.json: file not found"):
        write_report(tmp_path / "missing.json", tmp_path / "r.html")
    graph_file = EXAMPLES / "conv2d_bias_relu.json"
    with pytest.raises(PlanFormatError, match=re.escape(str(graph_file)) + ": not a cast plan"):
        write_report(graph_file, tmp_path / "r.html")
    plan = pp.plan(graph_file, pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    with pytest.raises(WriteError, match="does not exist"):
        write_report(plan, tmp_path / "no" / "r.html")
    out = tmp_path / "r.html"
    out.write_text("old")
    write_report(plan, out)
    assert out.read_text().startswith("<!DOCTYPE html>") and sorted(os.listdir(tmp_path)) == ["r.html"]


# ---------------------------------------------------------------------- the command
def test_cli_report_from_plan_json_with_graph_audit_and_ranges(tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    r = cli("plan", EXAMPLES / "transformer_encoder_block.json", "--mode", "allow_mix_precision", "-o", plan_file)
    assert r.returncode == 0, r.stderr
    a, rg, bad = audit_and_ranges(pp.CastPlan.from_json(plan_file), tmp_path)
    out = tmp_path / "report.html"
    r = cli("report", plan_file, "--graph", EXAMPLES / "transformer_encoder_block.json", "--audit", a, "--ranges", rg, "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: 195 ops, layout " in r.stdout
    html = out.read_text(encoding="utf-8")
    assert 'id="audit"' in html and 'id="ranges"' in html and bad in html
    r = cli("report", plan_file, "-o", out, "--json")  # the plan JSON alone: it records every node's inputs
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["nodes"] == 195 and doc["edges_complete"] is True and doc["path"] == str(out)
    old = json.loads(plan_file.read_text())
    for node in old["nodes"].values():  # a plan JSON without them (written before version 3 recorded them)
        node.pop("from")
    plan_file.write_text(json.dumps(old))
    doc = json.loads(cli("report", plan_file, "-o", out, "--json").stdout)
    assert doc["edges_complete"] is False and any("does not record the graph's edges" in n for n in doc["notes"])


def test_cli_report_bad_input_exits_2_naming_the_file(tmp_path: Path):
    missing = tmp_path / "nope.json"
    r = cli("report", missing, "-o", tmp_path / "r.html")
    assert r.returncode == 2 and f"{missing}: file not found" in r.stderr and "Traceback" not in r.stderr
    graph_file = EXAMPLES / "conv2d_bias_relu.json"
    r = cli("report", graph_file, "-o", tmp_path / "r.html")
    assert r.returncode == 2 and f"{graph_file}: not a cast plan" in r.stderr
    plan_file = tmp_path / "plan.json"
    assert cli("plan", graph_file, "--mode", "allow_mix_precision", "-o", plan_file).returncode == 0
    audit = tmp_path / "AUDIT.json"
    audit.write_text('{"format": "precision_policy.audit", "version": 1, "nodes": [{"node": "myConv"}]}')
    r = cli("report", plan_file, "--audit", audit, "-o", tmp_path / "r.html")
    assert r.returncode == 2 and f"{audit}: not a valid audit file: nodes.0.planned" in r.stderr
    assert not (tmp_path / "r.html").exists()


def test_cli_report_layout_dot_without_graphviz_exits_2_with_the_fix(tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    assert cli("plan", EXAMPLES / "conv2d_bias_relu.json", "-o", plan_file).returncode == 0
    r = cli("report", plan_file, "--layout", "dot", "-o", tmp_path / "r.html", path=str(tmp_path))
    assert r.returncode == 2 and "make report-deps" in r.stderr and "Traceback" not in r.stderr
