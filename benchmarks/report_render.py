"""How fast a plan report is made and drawn: a 5,000-node transformer-like plan, side by side with a blank page.

Builds a synthetic plan of repeated ``encoder.layer.K.`` blocks (plus a flat-named head), writes its
HTML report with Graphviz's ``dot`` (``precision_policy.report.write_report``), then opens it in
headless Chromium three ways: the DOM after the report's script ran, a 1400x900 screenshot, and a
link into a collapsed block (``#node=...``). Each browser time is printed beside the time Chromium
takes for a blank page in the same run, so the ratio says what the report itself costs on this
machine. Goal: every report render under 10 s on 2 cores (and generation well under that).

    python benchmarks/report_render.py [--nodes 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import precision_policy as pp
from precision_policy.report import write_report


def chromium(binary: str | None, *args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with its own profile folder (the tests call it the same way)."""
    assert binary is not None
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def encoder_graph(n: int = 5000) -> pp.OpGraph:
    """A transformer-like graph of ``n`` nodes: repeated ``encoder.layer.K.`` blocks, then a flat-named head."""
    g = pp.OpGraph("synthetic_encoder")
    g.add_node("input_ids", "Placeholder", outputs=["float32"])
    prev = "input_ids:0"
    layer = 0
    while len(g) + 35 <= n - 20:
        p = f"encoder.layer.{layer}."

        def add(name: str, op: str, ins: list[str], outs: tuple[str, ...] = ("float32",), p: str = p) -> str:
            g.add_node(p + name, op, ins, list(outs))
            return f"{p}{name}:0"

        def dense(name: str, x: str) -> str:
            y = add(f"{name}.matmul", "MatMul", [x, add(f"{name}.weight", "Const", [])])
            return add(f"{name}.bias_add", "BiasAdd", [y, add(f"{name}.bias", "Const", [])])

        q, k, v = dense("attn.q", prev), dense("attn.k", prev), dense("attn.v", prev)
        s = add("attn.scores", "BatchMatMulV2", [q, k])
        s = add("attn.softmax", "Softmax", [add("attn.scale", "Mul", [s, add("attn.scale.y", "Const", [])])])
        o = dense("attn.out", add("attn.context", "BatchMatMulV2", [s, v]))
        h = add("attn.norm", "LayerNorm", [add("attn.residual", "AddV2", [o, prev]), add("attn.norm.gamma", "Const", []),
                                           add("attn.norm.beta", "Const", [])])
        f = dense("ffn.fc2", add("ffn.custom_dropout", "MyFusedDropout", [add("ffn.gelu", "Gelu", [dense("ffn.fc1", h)])]))
        prev = add("ffn.norm", "LayerNorm", [add("ffn.residual", "AddV2", [f, h]), add("ffn.norm.gamma", "Const", []),
                                             add("ffn.norm.beta", "Const", [])])
        layer += 1
    k = 0
    while len(g) < n - 1:
        g.add_node(f"head_w{k}", "Const", [], ["float32"])
        g.add_node(f"head_mm{k}", "MatMul", [prev, f"head_w{k}:0"], ["float32"])
        prev = f"head_mm{k}:0"
        k += 1
    while len(g) < n:
        g.add_node("loss", "ReduceMean", [prev], ["float32"])
        prev = "loss:0"
    g.set_outputs([prev])
    return g


def _timed(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if binary is None:
        raise SystemExit("Chromium is not installed: make report-deps")
    plan = pp.plan(encoder_graph(args.nodes), pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16"))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out, blank = tmp / "report.html", tmp / "blank.html"
        blank.write_text("<!doctype html><title>blank</title>")
        result = write_report(plan, out, layout="dot")
        generate = _timed(lambda: write_report(plan, out, layout="dot"), args.repeat)
        uri = out.resolve().as_uri()

        def run(*a: str) -> None:
            r = chromium(binary, *a, profile=tmp / "profile")
            assert r.returncode == 0, r.stderr[-2000:]

        base = _timed(lambda: run("--dump-dom", blank.resolve().as_uri()), args.repeat)
        rows = [
            ("DOM after the script ran", _timed(lambda: run("--dump-dom", uri), args.repeat)),
            ("screenshot 1400x900", _timed(lambda: run(f"--screenshot={tmp / 's.png'}", "--window-size=1400,900", uri),
                                           args.repeat)),
            ("open a collapsed block", _timed(lambda: run("--dump-dom", uri + "#node=encoder.layer.7.attn.q.matmul"),
                                              args.repeat)),
        ]
    print(f"{len(plan):,}-node plan: {result.drawn} items drawn, {result.clusters} clusters in {result.layouts} "
          f"layout(s), {result.bytes:,} bytes of HTML")
    print(f"generate (write_report, dot): {generate:.2f} s (dot itself {result.layout_seconds:.2f} s)")
    print(f"Chromium, blank page: {base:.2f} s")
    for what, seconds in rows:
        verdict = "ok" if seconds < 10 else "OVER the 10 s goal"
        print(f"Chromium, {what:<26} {seconds:5.2f} s = {seconds / base:4.2f}x a blank page  [{verdict}]")


if __name__ == "__main__":
    main()
