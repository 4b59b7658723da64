"""A plan report people can look at: one self-contained HTML file.

:func:`write_report` draws a :class:`~precision_policy.plan.CastPlan` as a graph of ops
coloured by computed dtype (casts marked on their edges, each op's rule, followed node and
reason on hover and click, a search box), with the op-type table, the unknown ops and,
when given, a runtime audit (AUDIT.json) and value ranges (RANGES.json; both formats in
:mod:`precision_policy.report.schema`). The page needs no network. Large plans are drawn
as an overview with repeated blocks collapsed (:mod:`precision_policy.report.model`), laid out
by Graphviz ``dot`` or, without it, a built-in layout (:mod:`precision_policy.report.layout`).

CLI: ``precision-policy report PLAN.json [--graph GRAPH.json] [--audit AUDIT.json]
[--ranges RANGES.json] -o report.html``.

Example:
    >>> import tempfile, pathlib
    >>> import precision_policy as pp
    >>> from precision_policy.report import write_report
    >>> plan = pp.plan("examples/graphs/conv2d_bias_relu.json", precision_mode="allow_mix_precision")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "report.html"
    >>> result = write_report(plan, out, layout="simple")
    >>> result.nodes, result.drawn, result.engine, "myConv" in out.read_text()
    (8, 8, 'simple', True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from precision_policy.errors import PlanFormatError
from precision_policy.fileio import atomic_write
from precision_policy.graph import OpGraph, load_graph
from precision_policy.plan import CastPlan
from precision_policy.report.errors import LayoutToolMissing, ReportInputError
from precision_policy.report.html import CLUSTER_SIZE, NODE_SIZE, render
from precision_policy.report.layout import LayoutInput, dot_available, layout_all
from precision_policy.report.model import build_model
from precision_policy.report.schema import AuditFile, RangesFile, json_schemas, load_audit, load_ranges


@dataclass
class ReportResult:
    """What :func:`write_report` wrote: the file, how much it drew, with which layout, and how long it took."""

    path: Path
    nodes: int
    drawn: int
    clusters: int
    layouts: int
    engine: str
    edges_complete: bool
    seconds: float
    layout_seconds: float
    bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "nodes": self.nodes, "drawn": self.drawn, "clusters": self.clusters,
                "layouts": self.layouts, "layout": self.engine, "edges_complete": self.edges_complete,
                "seconds": round(self.seconds, 3), "layout_seconds": round(self.layout_seconds, 3), "bytes": self.bytes,
                "notes": list(self.notes)}


def _load_plan(plan: CastPlan | str | Path) -> CastPlan:
    if isinstance(plan, CastPlan):
        return plan
    try:
        return CastPlan.from_json(plan)
    except PlanFormatError as exc:  # from_dict's errors do not name the file
        if str(exc).startswith(f"{plan}:"):
            raise
        raise PlanFormatError(f"{plan}: {exc}") from None


def render_report(
    plan: CastPlan | str | Path,
    *,
    graph: OpGraph | str | Path | None = None,
    audit: AuditFile | dict | str | Path | None = None,
    ranges: RangesFile | dict | str | Path | None = None,
    layout: str = "auto",
    collapse: bool | None = None,
    title: str | None = None,
) -> tuple[str, ReportResult]:
    """The report's HTML text and what it holds (``path`` is empty); see :func:`write_report`."""
    t0 = time.perf_counter()
    p = _load_plan(plan)
    g = load_graph(graph) if isinstance(graph, (str, Path)) else graph
    a = load_audit(audit) if audit is not None else None
    r = load_ranges(ranges) if ranges is not None else None
    model = build_model(p, g, collapse=collapse)
    notes: list[str] = []
    if layout == "auto" and not dot_available():
        notes.append("Graphviz `dot` not found: used the built-in layered layout (install it: make report-deps)")
    sizes = [CLUSTER_SIZE if kind == "c" else NODE_SIZE for kind, _ in model.items]
    inputs = [LayoutInput(sizes, model.overview_edges)]
    inputs += [LayoutInput([NODE_SIZE] * t.size, t.edges) for t in model.templates]
    t1 = time.perf_counter()
    results, engine = layout_all(inputs, layout)
    t2 = time.perf_counter()
    if not model.edges_complete:
        notes.append("the plan JSON does not record the graph's edges: drawn are the casts' and followed producers' "
                     "edges only (give the graph for all of them)")
    text = render(model, results[0], results[1:], engine=engine, audit=a, ranges=r, title=title)
    result = ReportResult(Path(), len(p), len(model.items), len(model.clusters), len(model.templates), engine,
                          model.edges_complete, time.perf_counter() - t0, t2 - t1, len(text.encode("utf-8")), notes)
    return text, result


def write_report(
    plan: CastPlan | str | Path,
    path: str | Path,
    audit: AuditFile | dict | str | Path | None = None,
    ranges: RangesFile | dict | str | Path | None = None,
    *,
    graph: OpGraph | str | Path | None = None,
    layout: str = "auto",
    collapse: bool | None = None,
    title: str | None = None,
) -> ReportResult:
    """Write ``plan``'s HTML report to ``path`` atomically.

    ``plan`` is a CastPlan or a plan JSON file; ``graph`` (an OpGraph or graph file) gives the
    edges a plan read from JSON lacks (a plan made in this process has its graph).
    ``audit``/``ranges`` are AUDIT.json/RANGES.json files, dicts or parsed models.
    ``layout``: ``"auto"`` (dot if installed, else the built-in layout), ``"dot"`` (raises
    :class:`LayoutToolMissing` without Graphviz) or ``"simple"``. ``collapse``: None collapses
    repeated blocks in plans of more than :data:`~precision_policy.report.model.MAX_FLAT` nodes.
    Bad inputs raise :class:`ReportInputError` / :class:`~precision_policy.errors.PlanFormatError`
    naming the file; a failed write raises :class:`~precision_policy.errors.WriteError`.
    """
    text, result = render_report(plan, graph=graph, audit=audit, ranges=ranges, layout=layout, collapse=collapse, title=title)
    atomic_write(path, text)
    result.path = Path(path)
    return result


__all__ = [
    "AuditFile",
    "LayoutToolMissing",
    "RangesFile",
    "ReportInputError",
    "ReportResult",
    "json_schemas",
    "load_audit",
    "load_ranges",
    "render_report",
    "write_report",
]
