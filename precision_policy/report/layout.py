"""Node positions and edge paths for the report's drawings: Graphviz ``dot``, or a built-in layered layout.

``engine="dot"`` lays every drawing out with Graphviz's ``dot`` (through the ``graphviz``
package), all drawings in one or two ``dot`` processes; without ``dot`` it raises
:class:`~precision_policy.report.errors.LayoutToolMissing` naming the fix.
``engine="simple"`` is a pure-Python layered layout (longest-path ranks, barycentre ordering,
straight edges): rougher, but needs nothing installed. ``engine="auto"`` (the default) uses
``dot`` when it is installed and the simple layout otherwise; :func:`layout_all` says which ran.

Coordinates are SVG pixels, y down; a node's position is its centre.

Example:
    >>> from precision_policy.report.layout import LayoutInput, layout_all
    >>> (g,), engine = layout_all([LayoutInput([(100, 30)] * 3, [(0, 1), (1, 2)])], engine="simple")
    >>> engine, g.pos[0][1] < g.pos[1][1] < g.pos[2][1]
    ('simple', True)
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from precision_policy.report.errors import LayoutToolMissing

FIX = "install Graphviz: `make report-deps` or `apt-get install -y graphviz` (and `pip install graphviz`)"
_GAP_X, _GAP_Y, _MARGIN = 24.0, 46.0, 20.0


@dataclass
class LayoutInput:
    """One drawing: node sizes (width, height in px) and directed edges between node indices."""

    sizes: Sequence[tuple[float, float]]
    edges: Sequence[tuple[int, int]]


@dataclass
class LayoutResult:
    """Centres per node, one SVG path per input edge, and the drawing's size."""

    pos: list[tuple[float, float]]
    paths: list[str]
    width: float
    height: float


def dot_available() -> bool:
    """Whether the ``graphviz`` package imports and Graphviz's ``dot`` is on PATH."""
    try:
        _graphviz()
    except ImportError:
        return False
    return shutil.which("dot") is not None


def layout_all(graphs: Sequence[LayoutInput], engine: str = "auto") -> tuple[list[LayoutResult], str]:
    """Lay out every drawing; returns the results and the engine that ran (``"dot"`` or ``"simple"``)."""
    if engine not in ("auto", "dot", "simple"):
        raise ValueError(f"unknown layout engine {engine!r} (auto, dot or simple)")
    if engine == "auto":
        engine = "dot" if dot_available() else "simple"
    if engine == "simple":
        return [simple_layout(g) for g in graphs], "simple"
    return _dot_all(graphs), "dot"


# ---------------------------------------------------------------------- Graphviz
def _graphviz() -> Any:
    """The ``graphviz`` package (imported by name: it ships no type information)."""
    return importlib.import_module("graphviz")


def _dot_source(g: LayoutInput, name: str) -> str:
    graphviz = _graphviz()
    d = graphviz.Digraph(name, graph_attr={"rankdir": "TB", "nodesep": "0.3", "ranksep": "0.5", "splines": "true",
                                           "mclimit": "0.5", "nslimit": "4", "nslimit1": "4", "searchsize": "30"},
                         node_attr={"shape": "box", "fixedsize": "true", "label": ""})
    for k, (w, h) in enumerate(g.sizes):
        d.node(str(k), width=f"{w / 72:.3f}", height=f"{h / 72:.3f}")
    for a, b in g.edges:
        d.edge(str(a), str(b))
    return d.source


def _dot_batch(graphs: Sequence[LayoutInput], first: int) -> list[LayoutResult]:
    graphviz = _graphviz()

    source = "\n".join(_dot_source(g, f"g{first + k}") for k, g in enumerate(graphs))
    try:
        out = graphviz.pipe("dot", "plain", source.encode("utf-8"))
    except graphviz.ExecutableNotFound:
        raise LayoutToolMissing(f"Graphviz's `dot` program is not installed; {FIX}") from None
    except graphviz.CalledProcessError as exc:  # pragma: no cover - dot crashed
        raise LayoutToolMissing(f"Graphviz's `dot` failed ({exc.returncode}): {exc.stderr!r:.300}") from None
    return _parse_plain(out.decode("utf-8"), graphs)


def _dot_all(graphs: Sequence[LayoutInput]) -> list[LayoutResult]:
    try:
        _graphviz()
    except ImportError:
        raise LayoutToolMissing(f"the `graphviz` Python package is not installed; {FIX}") from None
    if shutil.which("dot") is None:
        raise LayoutToolMissing(f"Graphviz's `dot` program is not on PATH; {FIX}")
    if not graphs:
        return []
    # two dot processes when there is enough work (dot is single-threaded); each gets half the nodes
    total = sum(len(g.sizes) for g in graphs)
    cut = len(graphs)
    if total > 400:
        acc = 0
        for k, g in enumerate(graphs):
            if acc >= total / 2:
                cut = k
                break
            acc += len(g.sizes)
    batches = [(graphs[:cut], 0), (graphs[cut:], cut)] if cut < len(graphs) else [(graphs, 0)]
    if len(batches) == 1:
        return _dot_batch(graphs, 0)
    with ThreadPoolExecutor(len(batches)) as pool:
        parts = list(pool.map(lambda b: _dot_batch(*b), batches))
    return [r for part in parts for r in part]


def _parse_plain(text: str, graphs: Sequence[LayoutInput]) -> list[LayoutResult]:
    results: list[LayoutResult] = []
    k = -1
    height = 0.0
    pos: list[tuple[float, float]] = []
    paths_by_edge: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        head = parts[0]
        if head == "graph":
            k += 1
            scale = float(parts[1])
            width, height = float(parts[2]) * scale * 72, float(parts[3]) * scale * 72
            pos = [(0.0, 0.0)] * len(graphs[k].sizes)
            paths_by_edge = {}
        elif head == "node":
            pos[int(parts[1])] = (float(parts[2]) * 72 + _MARGIN, height - float(parts[3]) * 72 + _MARGIN)
        elif head == "edge":
            a, b, m = int(parts[1]), int(parts[2]), int(parts[3])
            pts = [(float(parts[4 + 2 * j]) * 72 + _MARGIN, height - float(parts[5 + 2 * j]) * 72 + _MARGIN) for j in range(m)]
            d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
            if (m - 1) % 3 == 0:
                for j in range(1, m, 3):
                    d += "C" + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts[j:j + 3])
            else:  # pragma: no cover - polyline splines
                d += "".join(f"L{x:.1f},{y:.1f}" for x, y in pts[1:])
            paths_by_edge[(a, b)] = d
        elif head == "stop":
            g = graphs[k]
            paths = [paths_by_edge.get((a, b)) or _straight(pos, g.sizes, a, b) for a, b in g.edges]
            results.append(LayoutResult(pos, paths, width + 2 * _MARGIN, height + 2 * _MARGIN))
    if len(results) != len(graphs):  # pragma: no cover - dot's output cut short
        raise LayoutToolMissing(f"Graphviz's `dot` returned {len(results)} layout(s) for {len(graphs)} graph(s)")
    return results


def _straight(pos: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], a: int, b: int) -> str:
    (x1, y1), (x2, y2) = pos[a], pos[b]
    down = y2 >= y1
    y1 += sizes[a][1] / 2 if down else -sizes[a][1] / 2
    y2 -= sizes[b][1] / 2 if down else -sizes[b][1] / 2
    return f"M{x1:.1f},{y1:.1f}L{x2:.1f},{y2:.1f}"


# ---------------------------------------------------------------------- built-in layered layout
def simple_layout(g: LayoutInput) -> LayoutResult:
    """Longest-path layers (cycles broken by DFS), two barycentre sweeps, straight edges."""
    n = len(g.sizes)
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b in g.edges:
        if a != b:
            succ[a].append(b)
    # break cycles: drop DFS back edges
    state = [0] * n
    dag: list[list[int]] = [[] for _ in range(n)]
    for root in range(n):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            v, k = stack[-1]
            if k < len(succ[v]):
                stack[-1] = (v, k + 1)
                w = succ[v][k]
                if state[w] == 1:
                    continue  # back edge
                dag[v].append(w)
                if state[w] == 0:
                    state[w] = 1
                    stack.append((w, 0))
            else:
                state[v] = 2
                stack.pop()
    indeg = [0] * n
    for v in range(n):
        for w in dag[v]:
            indeg[w] += 1
    rank = [0] * n
    queue = [v for v in range(n) if indeg[v] == 0]
    while queue:
        v = queue.pop()
        for w in dag[v]:
            rank[w] = max(rank[w], rank[v] + 1)
            indeg[w] -= 1
            if indeg[w] == 0:
                queue.append(w)
    layers: dict[int, list[int]] = {}
    for v in range(n):
        layers.setdefault(rank[v], []).append(v)
    preds: list[list[int]] = [[] for _ in range(n)]
    for v in range(n):
        for w in dag[v]:
            preds[w].append(v)
    order = [0.0] * n
    for r in sorted(layers):
        for k, v in enumerate(layers[r]):
            order[v] = float(k)
    for _ in range(2):
        for r in sorted(layers):
            layer = layers[r]
            if r:
                layer.sort(key=lambda v: (sum(order[p] for p in preds[v]) / len(preds[v])) if preds[v] else order[v])
            for k, v in enumerate(layer):
                order[v] = float(k)
    widths = {r: sum(g.sizes[v][0] for v in layer) + _GAP_X * (len(layer) - 1) for r, layer in layers.items()}
    total_w = max(widths.values(), default=0.0)
    pos = [(0.0, 0.0)] * n
    y: float = _MARGIN
    for r in sorted(layers):
        layer = layers[r]
        h = max(g.sizes[v][1] for v in layer)
        x: float = _MARGIN + (total_w - widths[r]) / 2
        for v in layer:
            width = g.sizes[v][0]
            pos[v] = (x + width / 2, y + h / 2)
            x += width + _GAP_X
        y += h + _GAP_Y
    paths = [_straight(pos, g.sizes, a, b) for a, b in g.edges]
    return LayoutResult(pos, paths, total_w + 2 * _MARGIN, y - _GAP_Y + _MARGIN)


__all__ = ["FIX", "LayoutInput", "LayoutResult", "dot_available", "layout_all", "simple_layout"]
