"""CastPlan: every op's compute dtype, the reason, and the casts to insert.

A plan is produced by a precision mode (``precision_policy.plan(graph, config)``)
and consumed by a backend, a person (``summary()``, ``explain()``) or a tool
(the versioned JSON form, byte-identical for the same input).

Example:
    >>> import precision_policy as pp
    >>> g = pp.OpGraph.from_dict({"nodes": [
    ...     {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
    ...     {"name": "w", "op": "Const", "outputs": ["float32"]},
    ...     {"name": "conv", "op": "Conv2D", "inputs": ["x:0", "w:0"], "outputs": ["float32"]},
    ...     {"name": "relu", "op": "Relu", "inputs": ["conv:0"], "outputs": ["float32"]}],
    ...     "outputs": ["relu:0"]})
    >>> plan = pp.plan(g, pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910"))
    >>> plan.summary()
    'Converted 2/4 nodes to float16 precision using 1 cast(s) to float16 (excluding Const and Variable casts)'
    >>> plan["relu"].dtype, plan["relu"].rule.value, plan["relu"].followed
    ('float16', 'gray_follows', 'conv')
    >>> plan["relu"].reason
    'gray: follows conv'
    >>> [(c.tensor, c.to) for c in plan.casts]
    [('x:0', 'float16'), ('w:0', 'float16'), ('relu:0', 'float32')]
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from precision_policy import dtypes
from precision_policy.errors import GraphError, PlanFormatError
from precision_policy.reasons import render
from precision_policy.rules import Rule, Why

if TYPE_CHECKING:
    from precision_policy.graph import OpGraph
    from precision_policy.modes.base import PrecisionMode
    from precision_policy.opinfo.library import Library

PLAN_FORMAT = "precision_policy.cast_plan"
#: Version 2 added each node's ``rule`` and ``followed``; version 3 the rest of its structured
#: reason (``detail``, ``where``, ``wanted``, ``inner``: see :class:`~precision_policy.rules.Why`),
#: from which ``reason`` is rendered. Older plans still load with the reason text they stored
#: (version 1 nodes' ``rule`` and ``followed`` are None: the prose is never parsed back).
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


#: ``explain`` shows gray chains of at most this many links whole; longer ones keep their two ends.
_CHAIN_SHOWN = 20


class Cast:
    """One cast to insert: tensor ``src:port`` from ``from_dtype`` to ``to``, shared by its consumers.

    ``kind`` is where the tensor comes from: ``"const"`` (converted once, ahead of time),
    ``"variable"`` (cast after each read; the variable stays a float32 master),
    ``"input"`` (a graph input) or ``"op"``.
    """

    __slots__ = ("src", "port", "from_dtype", "to", "kind", "consumers", "for_fetch")

    def __init__(self, src: int, port: int, from_dtype: str, to: str, kind: str, consumers: list[int], for_fetch: bool):
        self.src = src
        self.port = port
        self.from_dtype = from_dtype
        self.to = to
        self.kind = kind
        self.consumers = consumers
        self.for_fetch = for_fetch

    @property
    def ahead_of_time(self) -> bool:
        """Const casts are done once when the plan is applied, not on every step."""
        return self.kind == "const"

    @property
    def counted(self) -> bool:
        """Counted in the summary (TF counts neither Const nor Variable casts)."""
        return self.kind not in ("const", "variable")


@dataclass(frozen=True)
class CastView:
    """A cast with node names resolved, as users and backends see it."""

    tensor: str
    from_dtype: str
    to: str
    kind: str
    consumers: tuple[str, ...]
    for_fetch: bool

    @property
    def source(self) -> str:
        return self.tensor.rpartition(":")[0]

    @property
    def counted(self) -> bool:
        return self.kind not in ("const", "variable")


@dataclass(frozen=True)
class NodeDecision:
    """One node's decision: compute dtype, per-tensor dtypes, the rule that decided, and why in words.

    ``rule`` (a :class:`~precision_policy.rules.Rule`) and ``followed`` (the node a gray op
    followed) are what code reads; ``reason`` is the same decision rendered for people. Both
    are None for plans read from a version-1 JSON file, which did not record them.
    """

    name: str
    op_type: str
    origin: str | None
    dtype: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reason: str
    identity: bool = False
    rule: Rule | None = None
    followed: str | None = None
    why: Why | None = None
    """The whole structured reason (rule, followed node, override, wanted dtypes, inner decision)."""

    @property
    def converted(self) -> bool:
        """True when the node computes in a dtype other than its origin (sources never do)."""
        return _converted(self.origin, self.dtype, self.rule)


def _converted(origin: str | None, dtype: str | None, rule: Rule | None) -> bool:
    return dtype is not None and origin is not None and dtype != origin and rule is not Rule.SOURCE


class CastPlan:
    """The result of planning a graph under a precision mode (see the module docstring)."""

    def __init__(
        self,
        *,
        graph: OpGraph | None,
        mode: PrecisionMode | str,
        library: Library | str | None,
        origin: list[str | None],
        dtype: list[str | None],
        in_dtypes: list[tuple[str, ...]],
        out_dtypes: list[tuple[str, ...]],
        whys: Sequence[Why | None],
        casts: list[Cast],
        identity: set[int],
        reasons: list[str] | None = None,
        input_refs: list[tuple[str, ...]] | None = None,
        unknown: dict[str, list[str]],
        warnings: list[str],
        keep_output_dtype: bool = True,
        config: dict | None = None,
        names: list[str] | None = None,
        op_types: list[str] | None = None,
        fetches: list[str] | None = None,
        low: str | None = None,
    ) -> None:
        self.graph = graph
        self._mode = mode
        self.mode_name: str = mode if isinstance(mode, str) else mode.name
        self.low: str = low or (mode.low if not isinstance(mode, str) else dtypes.FLOAT16)
        self.library = library if not isinstance(library, str) else None
        self.library_name: str = library if isinstance(library, str) else (library.name if library is not None else "")
        self.names: list[str] = names if names is not None else graph.names  # type: ignore[union-attr]
        self.op_types: list[str] = op_types if op_types is not None else graph.op_types  # type: ignore[union-attr]
        self.fetches: list[str] = fetches if fetches is not None else (graph.outputs if graph is not None else [])
        self.origin = origin
        self.dtype = dtype
        self.in_dtypes = in_dtypes
        self.out_dtypes = out_dtypes
        self.whys: list[Why | None] = list(whys)
        self.rules: list[Rule | None] = [w.rule if w is not None else None for w in self.whys]
        self.followed: list[str | None] = [w.followed if w is not None else None for w in self.whys]
        self._reasons = reasons  # the text a version-1/2 file stored; else rendered from whys on demand
        self._input_refs = input_refs  # each node's data inputs, as a plan JSON recorded them (else from the graph)
        self._casts = casts
        self.identity = identity
        self.unknown = unknown
        self.warnings = warnings
        self.keep_output_dtype = keep_output_dtype
        self.config = config or {}
        self._index: dict[str, int] | None = None

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.names)

    @property
    def reasons(self) -> list[str]:
        """Each node's reason in words, rendered from its :class:`~precision_policy.rules.Why`."""
        if self._reasons is None:
            ident = self.identity
            self._reasons = [
                render(w, self.dtype[i], self.in_dtypes[i], self.out_dtypes[i], identity=i in ident) if w is not None else ""
                for i, w in enumerate(self.whys)
            ]
        return self._reasons

    def input_refs(self) -> list[tuple[str, ...]] | None:
        """Each node's data inputs as ``node:port``: from the graph, or as the plan JSON recorded them (None: neither).

        Plan JSON (version 3) records them as each node's ``from``, so a report drawn from the file alone
        has every edge of the graph.
        """
        if self._input_refs is None and self.graph is not None:
            names = self.graph.names
            self._input_refs = [tuple(f"{names[j]}:{p}" for j, p in ins) for ins in self.graph.resolve().data_inputs]
        return self._input_refs

    def why(self, name: str) -> Why | None:
        """The structured reason of node ``name`` (None for a plan read from a version-1 file)."""
        return self.whys[self._idx(name)]

    def _idx(self, name: str) -> int:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        try:
            return self._index[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, self.names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise GraphError(f"no such node in the plan{hint}", node=name) from None

    def _decision(self, i: int) -> NodeDecision:
        return NodeDecision(
            name=self.names[i],
            op_type=self.op_types[i],
            origin=self.origin[i],
            dtype=self.dtype[i],
            inputs=tuple(self.in_dtypes[i]),
            outputs=tuple(self.out_dtypes[i]),
            reason=self.reasons[i],
            identity=i in self.identity,
            rule=self.rules[i],
            followed=self.followed[i],
            why=self.whys[i],
        )

    def __getitem__(self, name: str) -> NodeDecision:
        return self._decision(self._idx(name))

    def node(self, name: str) -> NodeDecision:
        """The decision for node ``name``."""
        return self[name]

    def __iter__(self) -> Iterator[NodeDecision]:
        for i in range(len(self.names)):
            yield self._decision(i)

    @property
    def casts(self) -> list[CastView]:
        names = self.names
        return [
            CastView(f"{names[c.src]}:{c.port}", c.from_dtype, c.to, c.kind, tuple(names[k] for k in c.consumers), c.for_fetch)
            for c in self._casts
        ]

    def converted(self) -> list[NodeDecision]:
        """Nodes computing in a dtype other than their origin, in graph order."""
        return [d for d in self if d.converted]

    def converted_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in range(len(self.names)):
            d = self.dtype[i]
            if d is not None and _converted(self.origin[i], d, self.rules[i]):
                counts[d] = counts.get(d, 0) + 1
        return counts

    def cast_counts(self) -> dict[str, int]:
        """Counted casts (excluding Const and Variable casts) per target dtype."""
        counts: dict[str, int] = {}
        for c in self._casts:
            if c.counted:
                counts[c.to] = counts.get(c.to, 0) + 1
        return counts

    # ------------------------------------------------------------------ reading out
    def summary(self) -> str:
        """One line in the words of TensorFlow's AMP pass."""
        conv = self.converted_counts()
        casts = self.cast_counts()
        low = self.low
        line = (
            f"Converted {conv.get(low, 0)}/{len(self)} nodes to {low} precision using {casts.get(low, 0)} cast(s) "
            f"to {low} (excluding Const and Variable casts)"
        )
        extra = [f"{n} to {d}" for d, n in sorted(conv.items()) if d != low]
        if extra:
            line += f"; also converted {', '.join(extra)}"
        return line

    def explain(self, name: str) -> str:
        """Why node ``name`` runs in the dtype it does, its casts, and what the library says of it."""
        i = self._idx(name)
        d = self._decision(i)
        lines = [f"{d.name} ({d.op_type})"]
        lines.append(f"  origin dtype : {d.origin or '-'}")
        status = "converted" if d.converted else "unchanged"
        emulated = d.dtype == "float16" and self.config.get("float16", "emulated") == "emulated"
        how = " (emulated: float16 storage, float32 compute)" if emulated else ""
        lines.append(f"  computes in  : {d.dtype or '-'}{how}  [{status}]")
        lines.append(f"  why          : {d.reason}")
        chain = self._chain(i)
        if len(chain) > _CHAIN_SHOWN:  # a long chain: its two ends, and how many links lie between
            half = _CHAIN_SHOWN // 2
            chain = chain[:half] + [f"... {len(chain) - 2 * half} more ..."] + chain[-half:]
        if len(chain) > 1:
            lines.append("  gray chain   : " + " <- ".join(chain))
        in_casts = {(c.src, c.port, c.to): c for c in self._casts if i in c.consumers}
        if self.graph is not None:
            res = self.graph.resolve()
            parts = []
            for m, (j, p) in enumerate(res.data_inputs[i]):
                have = self.out_dtypes[j][p]
                want = d.inputs[m] if m < len(d.inputs) else have
                text = f"{self.names[j]}:{p} {have}"
                c = in_casts.get((j, p, want))
                if c is not None:
                    others = len(c.consumers) - 1
                    how = {"const": "const, cast once ahead of time", "variable": "variable read, cast after the read"}.get(
                        c.kind, "cast"
                    )
                    text += f" -> {want} ({how}" + (f", shared with {others} other consumer(s)" if others else "") + ")"
                parts.append(text)
            if parts:
                lines.append("  inputs       : " + "; ".join(parts))
        else:
            lines.append(f"  inputs       : {', '.join(d.inputs) or '-'}")
        outs = []
        for k, dt in enumerate(d.outputs):
            text = f"{k}: {dt}"
            for c in self._casts:
                if c.src == i and c.port == k:
                    role = "fetch" if c.for_fetch and not c.consumers else f"{len(c.consumers)} consumer(s)"
                    text += f" (cast to {c.to} for {role})"
            outs.append(text)
        if outs:
            lines.append("  outputs      : " + "; ".join(outs))
        lib = self.library
        if lib is not None and d.op_type in lib:
            info = lib[d.op_type]
            flag = info.flag + ("-list" if info.flag != "gray" else "")
            heavy = ", cube op (heavyOp)" if info.heavy else ""
            lines.append(
                f"  library      : {lib.name}: {flag}{heavy}; kernels: {info.describe_dtypes()} ({Path(info.source).name})"
            )
        elif d.op_type in self.unknown:
            lines.append(f"  library      : {self.library_name}: op type {d.op_type!r} is not in the library "
                         "(add it to choose its precision)")
        return "\n".join(lines)

    def _chain(self, i: int) -> list[str]:
        """Node ``i``, the producer its gray rule followed, that one's, ... and why the last one runs so."""
        chain = [self.names[i]]
        seen = {i}
        while True:
            prod = self.followed[i]
            if self.rules[i] is not Rule.GRAY_FOLLOWS or prod is None:
                if len(chain) > 1:
                    chain[-1] += f" ({self.reasons[i]})"
                return chain
            if self._index is None:
                self._index = {n: k for k, n in enumerate(self.names)}
            j = self._index.get(prod)
            if j is None or j in seen:
                return chain
            seen.add(j)
            chain.append(prod)
            i = j

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        reasons = self.reasons
        refs = self.input_refs()
        for i, name in enumerate(self.names):
            entry: dict[str, Any] = {
                "op": self.op_types[i],
                "origin": self.origin[i],
                "dtype": self.dtype[i],
                "inputs": list(self.in_dtypes[i]),
                "outputs": list(self.out_dtypes[i]),
                "reason": reasons[i],
            }
            if refs is not None:
                entry["from"] = list(refs[i])
            why = self.whys[i]
            if why is not None:
                entry.update(why.to_dict())
            if i in self.identity:
                entry["identity"] = True
            nodes[name] = entry
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "mode": self.mode_name,
            "low_dtype": self.low,
            "op_info": self.library_name,
            "config": self.config,
            "keep_output_dtype": self.keep_output_dtype,
            "summary": self.summary(),
            "outputs": list(self.fetches),
            "nodes": nodes,
            "casts": [
                {
                    "tensor": c.tensor,
                    "from": c.from_dtype,
                    "to": c.to,
                    "source": c.kind,
                    "consumers": list(c.consumers),
                    "fetch": c.for_fetch,
                }
                for c in self.casts
            ],
            "unknown_ops": {k: v for k, v in sorted(self.unknown.items())},
            "warnings": list(self.warnings),
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        """The versioned JSON form; the same input gives byte-identical output."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False) + "\n"
        if path is not None:
            from precision_policy.opinfo.edit import atomic_write_text

            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, data: Any) -> CastPlan:
        """Read back :meth:`to_dict`'s form (graph and library objects are not restored)."""
        try:
            if data.get("format") != PLAN_FORMAT:
                raise PlanFormatError(f"not a cast plan: 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
            if data.get("version") not in READABLE_VERSIONS:
                raise PlanFormatError(f"cast plan version {data.get('version')!r} is not supported "
                                      f"(reads {', '.join(map(str, READABLE_VERSIONS))})")
            version = data["version"]
            names = list(data["nodes"])
            index = {n: i for i, n in enumerate(names)}
            nodes = [data["nodes"][n] for n in names]
            whys = [_why(e, version) for e in nodes]
            casts = []
            for c in data["casts"]:
                src, _, port = c["tensor"].rpartition(":")
                casts.append(
                    Cast(index[src], int(port), c["from"], c["to"], c["source"], [index[k] for k in c["consumers"]], bool(c["fetch"]))
                )
            return cls(
                graph=None,
                mode=data["mode"],
                library=data.get("op_info", ""),
                origin=[e["origin"] for e in nodes],
                dtype=[e["dtype"] for e in nodes],
                in_dtypes=[tuple(e["inputs"]) for e in nodes],
                out_dtypes=[tuple(e["outputs"]) for e in nodes],
                whys=whys,
                reasons=None if version >= 3 else [str(e["reason"]) for e in nodes],
                input_refs=[tuple(str(r) for r in e["from"]) for e in nodes] if all("from" in e for e in nodes) else None,
                casts=casts,
                identity={i for i, e in enumerate(nodes) if e.get("identity")},
                unknown={k: list(v) for k, v in data.get("unknown_ops", {}).items()},
                warnings=list(data.get("warnings", [])),
                keep_output_dtype=bool(data.get("keep_output_dtype", True)),
                config=dict(data.get("config", {})),
                names=names,
                op_types=[e["op"] for e in nodes],
                fetches=list(data.get("outputs", [])),
                low=data.get("low_dtype"),
            )
        except PlanFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanFormatError(f"malformed cast plan JSON: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> CastPlan:
        from precision_policy._jsonio import load_json_file

        def err(message: str, file: Any = None, **_: Any) -> PlanFormatError:
            return PlanFormatError(f"{file}: {message}")

        return cls.from_dict(load_json_file(path, err))

    # ------------------------------------------------------------------ comparing
    def diff(self, other: CastPlan) -> PlanDiff:
        """What changes from this plan to ``other``: node dtypes, reasons, casts."""
        mine = {n: i for i, n in enumerate(self.names)}
        theirs = {n: i for i, n in enumerate(other.names)}
        changed = []
        for n, i in mine.items():
            j = theirs.get(n)
            if j is None:
                continue
            a, b = self.dtype[i], other.dtype[j]
            if a != b or self.in_dtypes[i] != other.in_dtypes[j] or self.out_dtypes[i] != other.out_dtypes[j]:
                changed.append(ChangedNode(n, a, b, self.reasons[i], other.reasons[j]))
        key = lambda c: (c.tensor, c.to)  # noqa: E731
        c1 = {key(c) for c in self.casts}
        c2 = {key(c) for c in other.casts}
        return PlanDiff(
            changed=changed,
            only_here=sorted(set(mine) - set(theirs)),
            only_there=sorted(set(theirs) - set(mine)),
            casts_removed=sorted(c1 - c2),
            casts_added=sorted(c2 - c1),
        )

    def __repr__(self) -> str:
        return f"CastPlan(mode={self.mode_name!r}, {len(self)} nodes: {self.summary()!r})"


def _why(entry: dict[str, Any], version: int) -> Why | None:
    """A node's structured reason from its JSON entry: all of it (v3), the rule and followed node (v2), none (v1)."""
    value = entry.get("rule")
    if value is None:
        return None
    try:
        if version >= 3:
            return Why.from_dict(entry)
        followed = entry.get("followed")
        return Why(Rule(value), followed=None if followed is None else str(followed))
    except ValueError:
        raise PlanFormatError(f"unknown rule {value!r} (known: {', '.join(r.value for r in Rule)})") from None


class ChangedNode(NamedTuple):
    """A node whose dtypes differ between two plans."""

    name: str
    dtype: str | None
    other_dtype: str | None
    reason: str
    other_reason: str


@dataclass(frozen=True)
class PlanDiff:
    """Differences between two plans; ``str()`` renders them for people."""

    changed: list[ChangedNode]
    only_here: list[str]
    only_there: list[str]
    casts_removed: list[tuple[str, str]]
    casts_added: list[tuple[str, str]]

    @property
    def empty(self) -> bool:
        return not (self.changed or self.only_here or self.only_there or self.casts_removed or self.casts_added)

    def __str__(self) -> str:
        if self.empty:
            return "plans are identical"
        lines = []
        for n, a, b, ra, rb in self.changed:
            lines.append(f"~ {n}: {a} -> {b}  ({ra} -> {rb})")
        lines += [f"- node {n}" for n in self.only_here]
        lines += [f"+ node {n}" for n in self.only_there]
        lines += [f"- cast {t} -> {to}" for t, to in self.casts_removed]
        lines += [f"+ cast {t} -> {to}" for t, to in self.casts_added]
        return "\n".join(lines)
