"""OpGraph: the framework-neutral graph every precision mode plans over.

A graph is a list of nodes. Each node has a unique ``name``, a canonical
``op_type`` (``Conv2D``, ``MatMulV2``, ...), data ``inputs`` written
``"producer:port"`` (``"^name"`` is a control dependency) and the dtype of each
of its ``outputs``. The graph's ``outputs`` are its fetches. Storage is
columnar so that graphs of a million nodes stay cheap to build and plan.

Source ops (graph inputs, constants, variable reads) are recognised by op type:
see :data:`SOURCE_KINDS`.

Example:
    >>> from precision_policy.graph import OpGraph
    >>> g = OpGraph("tiny")
    >>> g.add_node("x", "Placeholder", outputs=["float32"])
    >>> g.add_node("w", "Const", outputs=["float32"])
    >>> g.add_node("mm", "MatMulV2", inputs=["x:0", "w:0"], outputs=["float32"])
    >>> g.add_node("y", "Relu", inputs=["mm"], outputs=["float32"])
    >>> g.set_outputs(["y:0"])
    >>> len(g), g.node("mm").inputs
    (4, ['x:0', 'w:0'])
    >>> OpGraph.from_dict(g.to_dict()).to_dict() == g.to_dict()
    True
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precision_policy import dtypes
from precision_policy._jsonio import load_json_file
from precision_policy.errors import DTypeError, GraphError
from precision_policy.optypes import (  # noqa: F401  (re-exported: the taxonomy lives in optypes)
    BACK_EDGE_OPS,
    CONTROL_FLOW_OPS,
    HANDLE_TYPED_PREFIXES,
    PASSTHROUGH_OPS,
    SOURCE_KINDS,
)

GRAPH_FORMAT = "precision_policy.graph"
GRAPH_VERSION = 1

@dataclass(frozen=True)
class Node:
    """A read-only view of one node of an :class:`OpGraph`."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    is_output: bool = False

    @property
    def source_kind(self) -> str | None:
        """``"input"``, ``"const"``, ``"variable"`` or None for a computing op."""
        return SOURCE_KINDS.get(self.op_type)


class Resolved:
    """Index form of a validated graph (internal, shared by the planner)."""

    __slots__ = ("data_inputs", "order", "fetches", "is_fetch")

    def __init__(
        self,
        data_inputs: list[tuple[tuple[int, int], ...]],
        order: list[int],
        fetches: list[tuple[int, int]],
    ) -> None:
        self.data_inputs = data_inputs
        self.order = order
        self.fetches = fetches
        self.is_fetch = {f for f in fetches}


def parse_tensor_ref(ref: str) -> tuple[str, int]:
    """Split ``"node:port"`` into ``("node", port)``; a bare ``"node"`` means port 0."""
    name, sep, port = ref.rpartition(":")
    if not sep:
        return ref, 0
    if port.isascii() and port.isdigit():
        return name, int(port)
    raise ValueError(f"bad tensor reference {ref!r}: expected 'node:port' with an integer port")


class OpGraph:
    """A framework-neutral dataflow graph of named ops with dtypes on their outputs."""

    def __init__(self, name: str = "graph", *, source: str | None = None, lookahead: bool = True,
                 variables_vote: bool = False) -> None:
        self.name = name
        self.source = source  # file it came from, for error messages
        #: Whether a plan may look at an op's readers (a gray op between a black and a white op
        #: then runs low, moving the cast before it). Graphs that an eager route must reproduce
        #: op by op, with no look-ahead, set it to False.
        self.lookahead = lookahead
        #: Whether variables (parameters, buffers) and reads of them vote for the gray ops that
        #: read them, at the inputs whose kernel takes the low dtype. TensorFlow's AMP never lets
        #: them vote (False); torch's type promotion does (``linear(h) + bias_param`` is float32
        #: under autocast), so torch traces set it to True.
        self.variables_vote = variables_vote
        #: Whether TensorFlow's ``TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_*`` lists apply to this
        #: graph when the RunConfig leaves ``use_env_lists`` unset (None): True for TensorFlow
        #: graphs (and graphs built in Python); torch traces and graph JSON files set it to False.
        self.env_lists: bool = True
        self._names: list[str] = []
        self._ops: list[str] = []
        self._inputs: list[tuple[str, ...]] = []
        self._outputs: list[tuple[str, ...]] = []
        self._attrs: dict[int, dict[str, Any]] = {}
        self._index: dict[str, int] = {}
        self._fetches: list[str] = []
        self._resolved: Resolved | None = None

    # ------------------------------------------------------------------ building
    def add_node(
        self,
        name: str,
        op_type: str,
        inputs: Sequence[str] = (),
        outputs: Sequence[str] = ("float32",),
        attrs: dict[str, Any] | None = None,
    ) -> None:
        """Append a node. Inputs may name nodes added later; :meth:`resolve` checks them."""
        if not isinstance(name, str) or not name:
            raise GraphError("node name must be a non-empty string", file=self.source, node=str(name))
        if name in self._index:
            raise GraphError("duplicate node name", file=self.source, node=name)
        if not isinstance(op_type, str) or not op_type:
            raise GraphError("'op' must be a non-empty string", file=self.source, node=name)
        for what, value in (("inputs", inputs), ("outputs", outputs)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise GraphError(f"{what!r} must be a list of strings, not {type(value).__name__} {value!r}"
                                 + (f" (write [{value!r}])" if isinstance(value, str) else ""), file=self.source, node=name)
        if attrs is not None and not isinstance(attrs, dict):
            raise GraphError(f"'attrs' must be a dict, not {type(attrs).__name__}", file=self.source, node=name)
        try:
            outs = tuple(dtypes.canonical(d) for d in outputs)
        except DTypeError as exc:
            raise GraphError(f"'outputs': {exc}", file=self.source, node=name) from None
        except TypeError:
            raise GraphError("'outputs' must be a list of dtype names", file=self.source, node=name) from None
        ins = tuple(inputs)
        for ref in ins:
            if not isinstance(ref, str) or not ref:
                raise GraphError(f"input {ref!r} must be a 'node:port' string", file=self.source, node=name)
        self._index[name] = len(self._names)
        self._names.append(name)
        self._ops.append(op_type)
        self._inputs.append(ins)
        self._outputs.append(outs)
        if attrs:
            self._attrs[len(self._names) - 1] = dict(attrs)
        self._resolved = None

    def set_outputs(self, fetches: Iterable[str]) -> None:
        """Declare the graph's fetches (``"node:port"``); their dtypes are kept by default."""
        if isinstance(fetches, (str, bytes)) or not isinstance(fetches, Iterable):
            raise GraphError(f"fetches must be a list of 'node:port' strings, not {type(fetches).__name__} {fetches!r}",
                             file=self.source)
        fetches = list(fetches)
        bad = [f for f in fetches if not isinstance(f, str) or not f]
        if bad:
            raise GraphError(f"fetch {bad[0]!r} must be a 'node:port' string", file=self.source)
        self._fetches = fetches
        self._resolved = None

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[Node]:
        for i in range(len(self._names)):
            yield self._node(i)

    @property
    def node_names(self) -> list[str]:
        return list(self._names)

    @property
    def outputs(self) -> list[str]:
        """The graph's fetches as ``"node:port"`` strings."""
        return list(self._fetches)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise GraphError(self._missing_message(name), file=self.source, node=name) from None

    def node(self, name: str) -> Node:
        """The node called ``name``; an unknown name raises GraphError with the closest names."""
        return self._node(self.index(name))

    def _missing_message(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(name, self._names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"no such node in graph {self.name!r}{hint}"

    def _node(self, i: int) -> Node:
        fetch_names = {parse_tensor_ref(f)[0] for f in self._fetches if not f.startswith("^")}
        return Node(
            name=self._names[i],
            op_type=self._ops[i],
            inputs=list(self._inputs[i]),
            outputs=list(self._outputs[i]),
            attrs=dict(self._attrs.get(i, {})),
            is_output=self._names[i] in fetch_names,
        )

    # columnar accessors used by the planner (no copies)
    @property
    def op_types(self) -> list[str]:
        return self._ops

    @property
    def output_dtypes(self) -> list[tuple[str, ...]]:
        return self._outputs

    @property
    def names(self) -> list[str]:
        return self._names

    # ------------------------------------------------------------------ validation
    def resolve(self) -> Resolved:
        """Check every reference and compute a topological order (cached until the graph changes)."""
        if self._resolved is not None:
            return self._resolved
        index = self._index
        outputs = self._outputs
        names = self._names
        n = len(names)
        data_inputs: list[tuple[tuple[int, int], ...]] = [()] * n
        in_order = True
        for i in range(n):
            refs = self._inputs[i]
            if not refs:
                continue
            data: list[tuple[int, int]] = []
            for ref in refs:
                control = ref[0] == "^"
                if control:
                    pname, port = ref[1:], -1
                else:
                    colon = ref.rfind(":")
                    if colon < 0:
                        pname, port = ref, 0
                    else:
                        pname, tail = ref[:colon], ref[colon + 1:]
                        if not (tail.isascii() and tail.isdigit()):
                            raise GraphError(
                                f"input {ref!r}: expected 'node:port' with an integer port", file=self.source, node=names[i]
                            )
                        port = int(tail)
                j = index.get(pname)
                if j is None:
                    raise GraphError(f"input {ref!r} names a node that is not in the graph", file=self.source, node=names[i])
                if j >= i and self._ops[j] not in BACK_EDGE_OPS:
                    in_order = False
                if control:
                    continue
                if port >= len(outputs[j]):
                    raise GraphError(
                        f"input {ref!r}: node {pname!r} has {len(outputs[j])} output(s), port {port} does not exist",
                        file=self.source,
                        node=names[i],
                    )
                data.append((j, port))
            data_inputs[i] = tuple(data)
        order = list(range(n)) if in_order else self._toposort()
        fetches: list[tuple[int, int]] = []
        for ref in self._fetches:
            try:
                pname, port = parse_tensor_ref(ref)
            except (ValueError, AttributeError):
                raise GraphError(f"graph output {ref!r} must be a 'node:port' string", file=self.source) from None
            j = index.get(pname)
            if j is None:
                raise GraphError(f"graph output {ref!r} names a node that is not in the graph", file=self.source)
            if port >= len(outputs[j]):
                raise GraphError(f"graph output {ref!r}: node {pname!r} has no output {port}", file=self.source)
            fetches.append((j, port))
        self._resolved = Resolved(data_inputs, order, fetches)
        return self._resolved

    def _toposort(self) -> list[int]:
        """Kahn's algorithm over data and control edges (loop back edges excluded), stable in node order."""
        import heapq

        n = len(self._names)
        consumers: list[list[int]] = [[] for _ in range(n)]
        indeg = [0] * n
        for i, refs in enumerate(self._inputs):
            for ref in refs:
                pname = ref[1:] if ref[0] == "^" else parse_tensor_ref(ref)[0]
                j = self._index[pname]
                if self._ops[j] in BACK_EDGE_OPS:
                    continue
                consumers[j].append(i)
                indeg[i] += 1
        ready = [i for i in range(n) if indeg[i] == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for c in consumers[i]:
                indeg[c] -= 1
                if indeg[c] == 0:
                    heapq.heappush(ready, c)
        if len(order) != n:
            stuck = [self._names[i] for i in range(n) if indeg[i] > 0]
            raise GraphError(
                f"graph has a cycle through {len(stuck)} node(s), e.g. {', '.join(repr(s) for s in stuck[:5])}; "
                "precision planning needs an acyclic graph (loops are fine only through NextIteration back edges)",
                file=self.source,
            )
        return order

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for i in range(len(self._names)):
            entry: dict[str, Any] = {
                "name": self._names[i],
                "op": self._ops[i],
                "inputs": list(self._inputs[i]),
                "outputs": list(self._outputs[i]),
            }
            if i in self._attrs:
                entry["attrs"] = self._attrs[i]
            nodes.append(entry)
        doc = {
            "format": GRAPH_FORMAT,
            "version": GRAPH_VERSION,
            "name": self.name,
            "nodes": nodes,
            "outputs": list(self._fetches),
        }
        if not self.lookahead:
            doc["lookahead"] = False
        if self.variables_vote:
            doc["variables_vote"] = True
        return doc

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent) + "\n"
        if path is not None:
            from precision_policy.opinfo.edit import atomic_write_text

            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> OpGraph:
        """Build a graph from its JSON form; every structural problem raises GraphError."""
        if not isinstance(data, dict):
            raise GraphError("a graph must be a JSON object with 'nodes' and 'outputs'", file=source)
        fmt = data.get("format", GRAPH_FORMAT)
        if fmt != GRAPH_FORMAT:
            raise GraphError(f"'format' is {fmt!r}, expected {GRAPH_FORMAT!r}", file=source)
        version = data.get("version", GRAPH_VERSION)
        if version != GRAPH_VERSION:
            raise GraphError(f"graph format version {version!r} is not supported (this release reads {GRAPH_VERSION})", file=source)
        nodes = data.get("nodes")
        if not isinstance(nodes, list):
            raise GraphError("'nodes' must be a list of node objects", file=source)
        name = data.get("name", Path(source).stem if source else "graph")
        lookahead = data.get("lookahead", True)
        if not isinstance(lookahead, bool):
            raise GraphError("'lookahead' must be true or false", file=source)
        variables_vote = data.get("variables_vote", False)
        if not isinstance(variables_vote, bool):
            raise GraphError("'variables_vote' must be true or false", file=source)
        graph = cls(str(name), source=source, lookahead=lookahead, variables_vote=variables_vote)
        for k, entry in enumerate(nodes):
            if not isinstance(entry, dict):
                raise GraphError(f"nodes[{k}] must be an object with 'name', 'op', 'inputs', 'outputs'", file=source)
            nname = entry.get("name")
            if not isinstance(nname, str) or not nname:
                raise GraphError(f"nodes[{k}]: 'name' must be a non-empty string", file=source)
            op = entry.get("op")
            if not isinstance(op, str) or not op:
                raise GraphError("'op' must be a non-empty string (the canonical op type, e.g. 'Conv2D')", file=source, node=nname)
            inputs = entry.get("inputs", [])
            if not isinstance(inputs, list) or not all(isinstance(r, str) for r in inputs):
                raise GraphError("'inputs' must be a list of 'node:port' strings", file=source, node=nname)
            outputs = entry.get("outputs", [])
            if not isinstance(outputs, list) or not all(isinstance(d, str) for d in outputs):
                raise GraphError("'outputs' must be a list of dtype names, one per output", file=source, node=nname)
            attrs = entry.get("attrs")
            if attrs is not None and not isinstance(attrs, dict):
                raise GraphError("'attrs' must be an object", file=source, node=nname)
            graph.add_node(nname, op, inputs, outputs, attrs)
        fetches = data.get("outputs", [])
        if not isinstance(fetches, list) or not all(isinstance(f, str) for f in fetches):
            raise GraphError("top-level 'outputs' must be a list of 'node:port' strings (the fetches)", file=source)
        graph.set_outputs(fetches)
        graph.resolve()
        return graph

    @classmethod
    def from_json(cls, path: str | Path) -> OpGraph:
        """Read a graph JSON file (see the module docstring for the format)."""
        data = load_json_file(path, GraphError)
        graph = cls.from_dict(data, source=str(path))
        graph.env_lists = False  # a framework-neutral file: TF's env lists only when use_env_lists=True
        return graph

    def __repr__(self) -> str:
        return f"OpGraph({self.name!r}, {len(self)} nodes, outputs={self._fetches!r})"


#: Graph readers by kind, filled by the backends when they are imported (``"tensorflow"``
#: reads .pb, .pbtxt and SavedModel directories).
GRAPH_LOADERS: dict[str, Callable[[Path], OpGraph]] = {}


@dataclass(frozen=True)
class GraphFormat:
    """A model file format a backend reads: how to recognise it cheaply, and which module registers its reader."""

    kind: str
    recognises: Callable[[Path], bool]
    module: str  # imported on first use: it puts its reader in GRAPH_LOADERS[kind]
    missing: str  # what to install when that module cannot be imported


#: Formats :func:`load_graph` recognises besides graph JSON, by kind. Backends register theirs
#: (see :mod:`precision_policy.backends`); the core knows none of them.
GRAPH_FORMATS: dict[str, GraphFormat] = {}


def register_graph_format(kind: str, recognises: Callable[[Path], bool], module: str, missing: str) -> None:
    """Let :func:`load_graph` read files that ``recognises(path)`` accepts, through ``GRAPH_LOADERS[kind]``.

    Example:
        >>> register_graph_format("demo", lambda p: p.suffix == ".demo", "no.such.module", "nothing: a demo")
        >>> load_graph("model.demo")
        Traceback (most recent call last):
        ...
        precision_policy.errors.GraphError: model.demo: reading demo files needs nothing: a demo
        >>> del GRAPH_FORMATS["demo"]
    """
    GRAPH_FORMATS[kind] = GraphFormat(kind, recognises, module, missing)


def load_graph(path: str | Path) -> OpGraph:
    """Load a graph: graph JSON here; other formats (TF ``.pb``/``.pbtxt``/SavedModel) through their backend."""
    p = Path(path)
    for fmt in list(GRAPH_FORMATS.values()):
        if not fmt.recognises(p):
            continue
        loader = GRAPH_LOADERS.get(fmt.kind)
        if loader is None:
            try:
                importlib.import_module(fmt.module)  # registers its loader
            except ImportError:
                pass
            loader = GRAPH_LOADERS.get(fmt.kind)
        if loader is None:
            raise GraphError(f"reading {fmt.kind} files needs {fmt.missing}", file=p)
        return loader(p)
    if os.path.isdir(p):
        raise GraphError("expected a graph JSON file (or a model directory a backend reads, such as a TensorFlow "
                         "SavedModel)", file=p)
    return OpGraph.from_json(p)


__all__ = ["BACK_EDGE_OPS", "CONTROL_FLOW_OPS", "GRAPH_FORMAT", "GRAPH_FORMATS", "GRAPH_LOADERS", "GRAPH_VERSION",
           "HANDLE_TYPED_PREFIXES", "GraphFormat", "Node", "OpGraph", "PASSTHROUGH_OPS", "SOURCE_KINDS", "load_graph",
           "parse_tensor_ref", "register_graph_format"]
