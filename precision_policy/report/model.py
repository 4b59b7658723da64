"""What a report draws: the plan's nodes and edges, with repeated blocks collapsed into clusters.

A plan of a few hundred nodes is drawn whole. A larger one is drawn as an *overview* in which

- **repeated blocks** -- nodes sharing a numbered name prefix (``encoder.layer.3.``,
  ``encoder/layer_3/``, ``blocks.3.``) whose op sequence and wiring are identical to another
  instance's -- are each one cluster; identical instances share one layout;
- what is left, if still too many, is grouped by name scope (``gradients/``, ``Adam/``), and a
  scope (or a flat run of names) that is still too large is cut into runs of graph order.

Each cluster opens (a click in the report) into its own drawing of its nodes. Every layout
drawn then has at most a few hundred nodes, which is what keeps a 5,000-node report fast.

Edges are the graph's data edges when the graph is known (a plan made in this process, or
``graph=`` / ``--graph``). A plan read from JSON alone does not record its edges: the report then
draws the edges the plan itself names (each cast's producer to its consumers, each gray op's
followed producer) and says the drawing is partial.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from precision_policy.graph import OpGraph
from precision_policy.plan import CastPlan

#: Plans up to this many nodes are drawn whole.
MAX_FLAT = 300
#: A scope group larger than this is split (by the next scope level, then by runs of graph order).
MAX_GROUP = 250

_SEP = re.compile(r"[./]")
_DIGIT = re.compile(r"\d")


@dataclass
class Cluster:
    """Nodes drawn as one box in the overview; ``template`` indexes the shared internal layout."""

    label: str
    kind: str  # "block" (a repeated block), "scope" or "run"
    members: list[int]
    template: int = -1


@dataclass
class Template:
    """The internal graph of one or more identical clusters: local node indices and edges."""

    size: int
    edges: list[tuple[int, int]]
    clusters: list[int] = field(default_factory=list)


@dataclass
class ReportModel:
    """The plan as a report draws it (see the module docstring)."""

    plan: CastPlan
    edges: list[tuple[int, int]]
    edges_complete: bool
    cast_edges: dict[tuple[int, int], list[int]]
    clusters: list[Cluster]
    templates: list[Template]
    #: overview items: ("n", node) or ("c", cluster)
    items: list[tuple[str, int]]
    #: node -> its overview item
    item_of: list[int]
    #: overview edges between items, with the casts on the edges they stand for
    overview_edges: list[tuple[int, int]]
    overview_casts: list[list[int]]


def _recorded_edges(plan: CastPlan) -> list[tuple[int, int]] | None:
    """The edges of the node inputs a plan JSON recorded (``from``; plans since version 3)."""
    refs = plan.input_refs()
    if refs is None:
        return None
    index = {n: i for i, n in enumerate(plan.names)}
    edges: set[tuple[int, int]] = set()
    for dst, ins in enumerate(refs):
        for ref in ins:
            src = index.get(ref.rpartition(":")[0] or ref)
            if src is not None and src != dst:
                edges.add((src, dst))
    return sorted(edges)


def _graph_edges(plan: CastPlan, graph: OpGraph | None) -> list[tuple[int, int]] | None:
    if graph is None:
        return _recorded_edges(plan)
    index = {n: i for i, n in enumerate(plan.names)}
    res = graph.resolve()
    gnames = graph.names
    same = gnames is plan.names or gnames == plan.names
    edges: set[tuple[int, int]] = set()
    for i, ins in enumerate(res.data_inputs):
        dst = i if same else index.get(gnames[i])
        if dst is None:
            continue
        for j, _port in ins:
            src = j if same else index.get(gnames[j])
            if src is not None and src != dst:
                edges.add((src, dst))
    return sorted(edges)


def _plan_edges(plan: CastPlan) -> list[tuple[int, int]]:
    """The edges a plan names without its graph: casts' producers to consumers, gray ops' followed producers."""
    index = {n: i for i, n in enumerate(plan.names)}
    edges: set[tuple[int, int]] = set()
    for c in plan._casts:
        for k in c.consumers:
            if k != c.src:
                edges.add((c.src, k))
    for i, f in enumerate(plan.followed):
        j = index.get(f) if f is not None else None
        if j is not None and j != i:
            edges.add((j, i))
    return sorted(edges)


def _block_prefix(name: str) -> str | None:
    """The name up to its first numbered scope (``encoder.layer.3.``), or None."""
    for m in _SEP.finditer(name):
        start = name.rfind(".", 0, m.start()) + 1
        start = max(start, name.rfind("/", 0, m.start()) + 1)
        if _DIGIT.search(name, start, m.start()):
            return name[: m.end()]
    return None


def _scope_prefix(name: str, depth: int) -> str | None:
    """The first ``depth + 1`` scope components of ``name`` with their separator, or None for a leaf."""
    pos = 0
    for _ in range(depth + 1):
        m = _SEP.search(name, pos)
        if m is None:
            return None
        pos = m.end()
    return name[:pos]


def _group(ids: list[int], names: Sequence[str], depth: int, label: str, out: list[Cluster], single: list[int]) -> None:
    buckets: dict[str, list[int]] = {}
    leaves: list[int] = []
    for i in ids:
        p = _scope_prefix(names[i], depth)
        if p is None:
            leaves.append(i)
        else:
            buckets.setdefault(p, []).append(i)
    for p, members in buckets.items():
        if len(members) > MAX_GROUP:
            _group(members, names, depth + 1, p, out, single)
        elif len(members) >= 2:
            out.append(Cluster(p, "scope", members))
        else:
            single.extend(members)
    if len(leaves) > MAX_GROUP // 5:
        for k in range(0, len(leaves), MAX_GROUP):
            run = leaves[k:k + MAX_GROUP]
            out.append(Cluster(f"{label}{names[run[0]][len(label):]} … {names[run[-1]][len(label):]}", "run", run))
    else:
        single.extend(leaves)


def build_model(plan: CastPlan, graph: OpGraph | None = None, *, collapse: bool | None = None) -> ReportModel:
    """The report's model of ``plan``; ``collapse`` None collapses plans of more than :data:`MAX_FLAT` nodes."""
    graph = graph if graph is not None else plan.graph
    names = plan.names
    n = len(names)
    full = _graph_edges(plan, graph)
    edges = full if full is not None else _plan_edges(plan)
    cast_edges: dict[tuple[int, int], list[int]] = {}
    for ci, cast in enumerate(plan._casts):
        for k in cast.consumers:
            cast_edges.setdefault((cast.src, k), []).append(ci)
    preds: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        preds[b].append(a)

    clusters: list[Cluster] = []
    if collapse is None:
        collapse = n > MAX_FLAT
    if collapse:
        clusters = _collapse(plan, preds)
    item_of = [-1] * n
    items: list[tuple[str, int]] = []
    first_member = {c.members[0]: k for k, c in enumerate(clusters)}
    in_cluster = [-1] * n
    for k, c in enumerate(clusters):
        for i in c.members:
            in_cluster[i] = k
    for i in range(n):  # items in graph order: a cluster where its first member is
        k = in_cluster[i]
        if k < 0:
            item_of[i] = len(items)
            items.append(("n", i))
        elif i in first_member:
            items.append(("c", k))
    cluster_item = {k: idx for idx, (kind, k) in enumerate(items) if kind == "c"}
    for i in range(n):
        if in_cluster[i] >= 0:
            item_of[i] = cluster_item[in_cluster[i]]

    templates = _templates(plan, clusters, preds, in_cluster)
    agg: dict[tuple[int, int], list[int]] = {}
    for a, b in edges:
        ia, ib = item_of[a], item_of[b]
        if ia != ib:
            agg.setdefault((ia, ib), []).extend(cast_edges.get((a, b), ()))
    keys = sorted(agg)
    return ReportModel(
        plan=plan,
        edges=edges,
        edges_complete=full is not None,
        cast_edges=cast_edges,
        clusters=clusters,
        templates=templates,
        items=items,
        item_of=item_of,
        overview_edges=keys,
        overview_casts=[sorted(set(agg[k])) for k in keys],
    )


def _signature(plan: CastPlan, prefix: str, members: list[int], preds: list[list[int]]) -> tuple:
    local = {g: k for k, g in enumerate(members)}
    return tuple(
        (plan.names[g][len(prefix):], plan.op_types[g], tuple(sorted(local[p] for p in preds[g] if p in local)))
        for g in members
    )


def _collapse(plan: CastPlan, preds: list[list[int]]) -> list[Cluster]:
    names = plan.names
    instances: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        p = _block_prefix(name)
        if p is not None:
            instances.setdefault(p, []).append(i)
    # a family (the prefix with its numbers masked) is repeated when two instances have one signature
    by_sig: dict[tuple[str, tuple], list[str]] = {}
    for p, members in instances.items():
        if len(members) >= 2:
            by_sig.setdefault((_DIGIT.sub("#", p), _signature(plan, p, members, preds)), []).append(p)
    clusters: list[Cluster] = []
    taken = [False] * len(names)
    for prefixes in by_sig.values():
        if len(prefixes) < 2:
            continue
        for p in prefixes:
            clusters.append(Cluster(p, "block", instances[p]))
            for i in instances[p]:
                taken[i] = True
    rest = [i for i in range(len(names)) if not taken[i]]
    if len(rest) + len(clusters) > MAX_FLAT:
        single: list[int] = []
        _group(rest, names, 0, "", clusters, single)
    clusters.sort(key=lambda c: c.members[0])
    return clusters


def _templates(plan: CastPlan, clusters: list[Cluster], preds: list[list[int]], in_cluster: list[int]) -> list[Template]:
    templates: list[Template] = []
    seen: dict[tuple, int] = {}
    for k, c in enumerate(clusters):
        prefix = c.label if c.kind == "block" else ""
        sig = _signature(plan, prefix, c.members, preds) if c.kind == "block" else None
        t = seen.get(sig) if sig is not None else None
        if t is None:
            local = {g: j for j, g in enumerate(c.members)}
            edges = sorted({(local[p], local[g]) for g in c.members for p in preds[g] if in_cluster[p] == k})
            t = len(templates)
            templates.append(Template(len(c.members), edges))
            if sig is not None:
                seen[sig] = t
        c.template = t
        templates[t].clusters.append(k)
    return templates


__all__ = ["MAX_FLAT", "MAX_GROUP", "Cluster", "ReportModel", "Template", "build_model"]
