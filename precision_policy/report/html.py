"""The report as one self-contained HTML page: inline CSS, inline JS, the data as inline JSON.

The tables (op types, unknown ops, audit, ranges, warnings) are plain HTML, readable without
JavaScript; the graph is drawn as SVG by the inline script (``assets/report.js``) from the
laid-out data, one view at a time (the overview, or one opened cluster). Nothing is fetched
from the network.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

from precision_policy.report.layout import LayoutResult
from precision_policy.report.model import ReportModel
from precision_policy.report.schema import AuditFile, RangesFile

#: Node and cluster box sizes in the drawing (px).
NODE_SIZE = (160.0, 36.0)
CLUSTER_SIZE = (220.0, 62.0)
#: Fill colour per computed dtype; ``none`` is a node with no float compute dtype.
DTYPE_COLORS = {
    "float32": "#8fb5e0",
    "float16": "#f5a25d",
    "bfloat16": "#7cc87a",
    "float64": "#c39bd3",
    "float8_e4m3fn": "#e377c2",
    "float8_e5m2": "#f7b6d2",
}
OTHER_COLOR = "#c8c8c8"
NONE_COLOR = "#ececec"
#: Table rows shown per section before "N more" (the data for every node is still in the page).
TABLE_LIMIT = 1000

_ORDER = ["float32", "float16", "bfloat16", "float64"]


def _asset(name: str) -> str:
    return resources.files("precision_policy.report").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def dtype_palette(used: Sequence[str | None]) -> tuple[list[str], list[str]]:
    """The dtypes to show (known floats first) and their colours; None is shown as ``none``."""
    names = {d if d is not None else "none" for d in used}
    order = [d for d in _ORDER if d in names] + sorted(names - set(_ORDER) - {"none"}) + (["none"] if "none" in names else [])
    return order, [DTYPE_COLORS.get(d, NONE_COLOR if d == "none" else OTHER_COLOR) for d in order]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def render(
    model: ReportModel,
    overview: LayoutResult,
    templates: Sequence[LayoutResult],
    *,
    engine: str,
    audit: AuditFile | None = None,
    ranges: RangesFile | None = None,
    title: str | None = None,
) -> str:
    """The page's HTML text."""
    plan = model.plan
    n = len(plan)
    dnames, colors = dtype_palette(list(plan.dtype) + list(plan.origin))
    didx = {d: k for k, d in enumerate(dnames)}

    def di(d: str | None) -> int:
        return didx["none" if d is None else d]

    cluster_of = [-1] * n
    for k, c in enumerate(model.clusters):
        for i in c.members:
            cluster_of[i] = k
    index = {name: i for i, name in enumerate(plan.names)}
    warnings = list(plan.warnings)

    audit_rows: list[list[Any]] = []
    if audit is not None:
        for e in audit.nodes:
            i = index.get(e.node, -1)
            audit_rows.append([i, e.node, e.op or (plan.op_types[i] if i >= 0 else ""), e.planned, e.executed, e.kernel, e.mismatch])
    range_rows: list[list[Any]] = []
    if ranges is not None:
        for r in ranges.nodes:
            i = index.get(r.node, -1)
            range_rows.append([i, r.node, r.op or (plan.op_types[i] if i >= 0 else ""), r.dtype, r.frac_below_min_normal,
                               r.frac_above_max, r.suggestion, _fmt(r.max_abs)])

    items = []
    for (kind, ref), (x, y) in zip(model.items, overview.pos):
        items.append([1 if kind == "c" else 0, ref, round(x, 1), round(y, 1)])
    data = {
        "sizes": {"node": NODE_SIZE, "cluster": CLUSTER_SIZE},
        "dtypes": dnames,
        "colors": colors,
        "nodes": {
            "name": plan.names,
            "op": plan.op_types,
            "dt": [di(d) for d in plan.dtype],
            "or": [di(d) for d in plan.origin],
            "rule": [r.value if r is not None else None for r in plan.rules],
            "fol": plan.followed,
            "why": plan.reasons,
            "ins": [list(t) for t in plan.in_dtypes],
            "outs": [list(t) for t in plan.out_dtypes],
            "cl": cluster_of,
        },
        "casts": [[c.src, c.port, c.from_dtype, c.to, c.kind, c.consumers, c.for_fetch] for c in plan._casts],
        "overview": {
            "w": round(overview.width, 1), "h": round(overview.height, 1), "items": items,
            "edges": [[a, b, d, cs] for (a, b), d, cs in zip(model.overview_edges, overview.paths, model.overview_casts)],
        },
        "clusters": [[c.label, c.kind, c.members, c.template] for c in model.clusters],
        "templates": [
            {"w": round(r.width, 1), "h": round(r.height, 1), "n": len(t.clusters),
             "pos": [[round(x, 1), round(y, 1)] for x, y in r.pos], "edges": [[a, b, d] for (a, b), d in zip(t.edges, r.paths)]}
            for t, r in zip(model.templates, templates)
        ],
        "audit": {"rows": audit_rows} if audit is not None else None,
        "ranges": {"rows": range_rows} if ranges is not None else None,
    }
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")

    title = title or f"Precision plan: {plan.mode_name}"
    counts: dict[str, int] = {}
    for d in plan.dtype:
        key = "none" if d is None else d
        counts[key] = counts.get(key, 0) + 1
    drawn = len(model.items)
    edge_note = "" if model.edges_complete else (
        " Edges: only those the plan names (casts, followed producers); give the graph (--graph) for every edge.")
    collapse_note = (f"{n} ops drawn as {drawn} boxes ({len(model.clusters)} clusters, {len(model.templates)} distinct layouts)"
                     if model.clusters else f"{n} ops")
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_esc(title)}</title>",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<style>{_asset('report.css')}</style></head><body>",
        f"<header><h1>{_esc(title)}</h1><div class=\"summary\" id=\"summary\">{_esc(plan.summary())}</div>",
        f"<div class=\"meta\">mode <b>{_esc(plan.mode_name)}</b> · low dtype {_esc(plan.low)} · op-info "
        f"{_esc(plan.library_name or '-')} · {collapse_note} · {len(plan._casts)} cast(s) · layout: {_esc(engine)}"
        f"{_esc(edge_note)}</div></header>",
        "<div class=\"toolbar\"><input type=\"search\" id=\"search\" placeholder=\"Search node name or op type…\" "
        "aria-label=\"search nodes\"><span id=\"hits\"></span><button id=\"back\">◀ Back</button>"
        "<button id=\"fit\">Fit</button><button id=\"zin\">+</button><button id=\"zout\">−</button>"
        "<span id=\"crumb\"></span></div>",
        "<div class=\"legend\" id=\"legend\">",
    ]
    for d, col in zip(dnames, colors):
        parts.append(f"<span class=\"lg\" data-dtype=\"{_esc(d)}\"><span class=\"sw\" style=\"background:{col}\"></span>"
                     f"{_esc(d)} ({counts.get(d, 0)})</span>")
    parts.append("<span><span class=\"cast\"></span>cast on the edge</span>")
    if model.clusters:
        parts.append("<span><span class=\"clu\"></span>cluster (click to open)</span>")
    if audit is not None:
        parts.append("<span><span class=\"mis\"></span>audit mismatch</span>")
    if ranges is not None:
        parts.append("<span style=\"color:#d62728;font-weight:700\">●!</span> values above the low dtype's max "
                     "<span style=\"color:#e0a800;font-weight:700\">●!</span> below its min normal")
    parts.append("</div>")
    parts.append("<div class=\"main\"><div id=\"canvas\"></div><aside id=\"side\"><p class=\"note\">Hover an op for its "
                 "reason; click it for the whole decision. Search by name or op type; Enter jumps to the first match.</p>"
                 "</aside></div>")
    parts.append(_op_table(model))
    parts.append(_unknown(model))
    if audit is not None:
        parts.append(_audit_table(audit, audit_rows))
    if ranges is not None:
        parts.append(_ranges_table(ranges, range_rows))
    for what, rows in (("audit", audit_rows), ("ranges", range_rows)):
        missing = [r[1] for r in rows if r[0] < 0]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            warnings.append(f"the {what} file names {len(missing)} node(s) the plan does not have: "
                            + ", ".join(repr(m) for m in missing[:5]) + more)
    if warnings:
        parts.append("<section id=\"warnings\"><h2>Warnings</h2><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in warnings)
                     + "</ul></section>")
    parts.append(f"<script type=\"application/json\" id=\"pp-data\">{payload}</script>")
    parts.append(f"<script>{_asset('report.js')}</script></body></html>\n")
    return "".join(parts)


def _op_table(model: ReportModel) -> str:
    plan = model.plan
    rows: dict[str, list[int]] = {}
    for op, d, o in zip(plan.op_types, plan.dtype, plan.origin):
        r = rows.setdefault(op, [0, 0, 0])
        r[0] += 1
        r[1] += d == plan.low
        r[2] += d is None or d == o
    out = ["<section id=\"op-types\"><h2>Op types</h2><p class=\"note\"><b>low</b>: ops computing in the plan's low dtype "
           f"({_esc(plan.low)}); <b>origin</b>: ops keeping their origin dtype. Click a row to find its ops.</p>"
           "<table><thead><tr><th>type</th><th>total</th><th>low</th><th>origin</th></tr></thead><tbody>"]
    for op, (total, low, origin) in sorted(rows.items(), key=lambda kv: (-kv[1][0], kv[0])):
        cls = "op-row unknown" if op in plan.unknown else "op-row"
        out.append(f"<tr class=\"{cls}\" data-op=\"{_esc(op)}\"><td>{_esc(op)}</td><td class=\"num\">{total}</td>"
                   f"<td class=\"num\">{low}</td><td class=\"num\">{origin}</td></tr>")
    out.append("</tbody></table></section>")
    return "".join(out)


def _unknown(model: ReportModel) -> str:
    plan = model.plan
    if not plan.unknown:
        return ("<section id=\"unknown-ops\"><h2>Unknown ops</h2><p>Every op type is in the op-info library "
                f"{_esc(plan.library_name)}.</p></section>")
    out = ["<section id=\"unknown-ops\"><h2>Unknown ops</h2><p class=\"note\">Not in the op-info library "
           f"{_esc(plan.library_name)}: they keep their origin dtype. Add them to the library to decide.</p>"
           "<table><thead><tr><th>op type</th><th>nodes</th><th>examples</th></tr></thead><tbody>"]
    for op, nodes in sorted(plan.unknown.items()):
        ex = ", ".join(f"<span data-goto=\"{_esc(x)}\">{_esc(x)}</span>" for x in nodes[:5])
        out.append(f"<tr><td>{_esc(op)}</td><td class=\"num\">{len(nodes)}</td><td>{ex}{' …' if len(nodes) > 5 else ''}</td></tr>")
    out.append("</tbody></table></section>")
    return "".join(out)


def _audit_table(audit: AuditFile, rows: list[list[Any]]) -> str:
    bad = [r for r in rows if r[6]]
    out = [f"<section id=\"audit\"><h2>Runtime audit</h2><p>{len(rows)} op(s) audited"
           + (f" ({_esc(audit.source)})" if audit.source else "")
           + f": <span class=\"{'bad' if bad else ''}\">{len(bad)} ran other than planned</span>, "
           f"{len(rows) - len(bad)} as planned.</p>"]
    shown = (bad + [r for r in rows if not r[6]])[:TABLE_LIMIT]
    out.append("<table><thead><tr><th>node</th><th>op</th><th>planned</th><th>executed</th><th>kernel</th><th>mismatch</th>"
               "</tr></thead><tbody>")
    for _i, name, op, planned, executed, kernel, mismatch in shown:
        out.append(f"<tr class=\"node-row\"><td data-goto=\"{_esc(name)}\">{_esc(name)}</td><td>{_esc(op)}</td>"
                   f"<td>{_esc(planned or '-')}</td><td>{_esc(executed or '-')}</td><td>{_esc(kernel or '')}</td>"
                   f"<td class=\"{'bad' if mismatch else ''}\">{_esc(mismatch or 'as planned')}</td></tr>")
    out.append("</tbody></table>")
    if len(rows) > len(shown):
        out.append(f"<p class=\"note\">… {len(rows) - len(shown)} more rows (as planned) not listed.</p>")
    out.append("</section>")
    return "".join(out)


def _ranges_table(ranges: RangesFile, rows: list[list[Any]]) -> str:
    ordered = sorted(rows, key=lambda r: (-(r[5] > 0), -(r[4] > 0), -float(r[7]), r[1]))
    over = sum(1 for r in rows if r[5] > 0)
    under = sum(1 for r in rows if r[4] > 0)
    out = [f"<section id=\"ranges\"><h2>Value ranges</h2><p>{len(rows)} op(s) over {ranges.batches} batch(es): "
           f"<span class=\"{'bad' if over else ''}\">{over} with values above the low dtype's max</span>, "
           f"{under} with values below its smallest normal.</p>"
           "<table><thead><tr><th>node</th><th>op</th><th>dtype</th><th>max |x|</th><th>below min normal</th>"
           "<th>above max</th><th>suggestion</th></tr></thead><tbody>"]
    for _i, name, op, dtype, below, above, suggestion, max_abs in ordered[:TABLE_LIMIT]:
        out.append(f"<tr class=\"node-row\"><td data-goto=\"{_esc(name)}\">{_esc(name)}</td><td>{_esc(op)}</td>"
                   f"<td>{_esc(dtype)}</td><td class=\"num\">{_esc(max_abs)}</td><td class=\"num\">{below:.3%}</td>"
                   f"<td class=\"num {'bad' if above else ''}\">{above:.3%}</td><td>{_esc(suggestion or '')}</td></tr>")
    out.append("</tbody></table>")
    if len(rows) > TABLE_LIMIT:
        out.append(f"<p class=\"note\">… {len(rows) - TABLE_LIMIT} more rows not listed (in range).</p>")
    out.append("</section>")
    return "".join(out)


__all__ = ["CLUSTER_SIZE", "DTYPE_COLORS", "NODE_SIZE", "dtype_palette", "render"]
