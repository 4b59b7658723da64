"""GraphDef <-> OpGraph, and a CastPlan applied to a GraphDef as TensorFlow's AMP pass would.

Op types are TensorFlow's own, translated to the canonical (Ascend) types the op-info
libraries use through ``opinfo_db/aliases/tensorflow.json`` (``Sum`` -> ``ReduceSum``);
the TF op stays in each node's ``attrs["tf_op"]``. Placeholders, Consts, variables
(``VariableV2``, ``VarHandleOp`` + ``ReadVariableOp``) and their ``Identity`` reads are
sources; existing ``Cast`` nodes are understood (and reused).

Example:
    >>> import tensorflow as tf
    >>> from precision_policy.backends.tensorflow.graphdef import to_opgraph
    >>> g = tf.Graph()
    >>> with g.as_default():
    ...     x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
    ...     y = tf.nn.relu(tf.matmul(x, tf.ones([4, 4])), name="y")
    >>> og, _ = to_opgraph(g.as_graph_def(), ["y"])
    >>> [(n.name, n.op_type) for n in og]
    [('x', 'Placeholder'), ('ones', 'Const'), ('MatMul', 'MatMul'), ('y', 'Relu')]
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2
from tensorflow.python.framework import op_def_registry

from precision_policy import dtypes
from precision_policy.backends.tensorflow.consts import convert_tensor
from precision_policy.errors import GraphError
from precision_policy.graph import HANDLE_TYPED_PREFIXES, OpGraph, parse_tensor_ref
from precision_policy.opinfo.overrides import tensorflow_aliases
from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

#: How a tensor's dtype is set on a node: a type attr's name, (list attr, index), or None (fixed by the OpDef).
TypeKey: TypeAlias = "str | tuple[str, int] | None"

_ENUM_TO_NAME: dict[int, str] = {}
_NAME_TO_ENUM: dict[str, int] = {}
for _name, _enum in types_pb2.DataType.items():
    if _name == "DT_INVALID" or _name.endswith("_REF"):
        continue
    try:
        _canon = dtypes.canonical(_name.lower())
    except Exception:  # noqa: BLE001 - a TF type we have no name for stays TF's
        _canon = _name[3:].lower()
    _ENUM_TO_NAME[_enum] = _canon
    _NAME_TO_ENUM.setdefault(_canon, _enum)
_NAME_TO_ENUM["float32"] = types_pb2.DT_FLOAT
_NAME_TO_ENUM["float16"] = types_pb2.DT_HALF
_NAME_TO_ENUM["float64"] = types_pb2.DT_DOUBLE
_NAME_TO_ENUM["bfloat16"] = types_pb2.DT_BFLOAT16

#: Ops that run a function from the graph's library (v2 control flow and calls).
FUNCTION_CALL_OPS = frozenset({"While", "StatelessWhile", "If", "StatelessIf", "Case", "StatelessCase",
                               "PartitionedCall", "StatefulPartitionedCall"})

#: TF source ops -> the op types OpGraph treats as sources.
_SOURCES = {
    "Placeholder": "Placeholder",
    "PlaceholderWithDefault": "Placeholder",
    "PlaceholderV2": "Placeholder",
    "Const": "Const",
    "HostConst": "Const",
    "VariableV2": "VariableV2",
    "Variable": "VariableV2",
    "VarHandleOp": "VarHandleOp",
    "ReadVariableOp": "ReadVariableOp",
}


_FLOAT_ENUMS = frozenset(e for e, n in _ENUM_TO_NAME.items() if dtypes.is_float(n))


def dtype_name(enum: int) -> str:
    return _ENUM_TO_NAME.get(enum % 100 if enum > 100 else enum, "invalid")


def dtype_enum(name: str) -> int:
    return _NAME_TO_ENUM[name]


@dataclass
class NodeTypes:
    """Which type attribute controls each input and output of a node: its name, ``(list attr, index)``
    for list-typed args (``IdentityN``'s ``T``), or None when the OpDef fixes the dtype."""

    inputs: list[Any]
    outputs: list[Any]
    out_dtypes: list[str]


@dataclass
class GraphInfo:
    """What the rewrite needs besides the OpGraph: the original nodes and their type attributes."""

    graph_def: graph_pb2.GraphDef
    types: dict[str, NodeTypes] = field(default_factory=dict)
    signatures: dict[str, tuple] = field(default_factory=dict)  # node -> _signature(node)


def _arg_types(arg: Any, node: node_def_pb2.NodeDef, op_def: Any = None) -> tuple[list[Any], list[int]]:
    """(type key per expanded tensor, dtype enum per tensor) of one OpDef arg on ``node``."""
    attrs = node.attr

    def attr_type(name: str) -> int:
        if name in attrs:
            return attrs[name].type
        for a in op_def.attr if op_def is not None else ():
            if a.name == name and a.HasField("default_value"):
                return a.default_value.type
        return types_pb2.DT_FLOAT

    if arg.number_attr:
        n = attrs[arg.number_attr].i if arg.number_attr in attrs else 0
        if arg.type_attr:
            return [arg.type_attr] * n, [attr_type(arg.type_attr)] * n
        return [None] * n, [arg.type] * n
    if arg.type_list_attr:
        types = list(attrs[arg.type_list_attr].list.type)
        return [(arg.type_list_attr, k) for k in range(len(types))], types
    if arg.type_attr:
        return [arg.type_attr], [attr_type(arg.type_attr)]
    return [None], [arg.type]


def _op_def(node: node_def_pb2.NodeDef) -> Any:
    op_def = op_def_registry.get(node.op)
    if op_def is None:
        raise GraphError(
            f"op type {node.op!r} is not registered in this TensorFlow; load the library that defines it first",
            node=node.name,
        )
    return op_def


def node_types(node: node_def_pb2.NodeDef) -> NodeTypes:
    """Which type attribute sets each input and output of ``node``, and its output dtypes."""
    ins, _, _, outs, out_enums = _signature(node)
    return NodeTypes(ins, outs, [dtype_name(e) for e in out_enums])


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Generational GC would rescan every protobuf object of a large graph many times over: off while we build."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def to_opgraph(graph_def: graph_pb2.GraphDef, fetches: Sequence[str] | None = None, name: str = "graph",
               source: str | None = None) -> tuple[OpGraph, GraphInfo]:
    """The OpGraph of a GraphDef, and what applying a plan to it needs (its nodes' type signatures).

    Function bodies are not descended into: ``convert`` inlines them first.
    """
    with _no_gc():
        return _to_opgraph(graph_def, fetches, name, source)


def _to_opgraph(graph_def: graph_pb2.GraphDef, fetches: Sequence[str] | None, name: str,
                source: str | None) -> tuple[OpGraph, GraphInfo]:
    aliases = tensorflow_aliases()
    og = OpGraph(name, source=source)
    info = GraphInfo(graph_def)
    for node in graph_def.node:
        sig = _signature(node)
        info.signatures[node.name] = sig
        nt = info.types[node.name] = NodeTypes(sig[0], sig[3], [dtype_name(e) for e in sig[4]])
        op = _SOURCES.get(node.op) or aliases.get(node.op, node.op)
        outs = [d if d != "invalid" else "variant" for d in nt.out_dtypes]
        og.add_node(node.name, op, list(node.input), outs, {"tf_op": node.op} if op != node.op else None)
    og.set_outputs([f if ":" in f else f"{f}:0" for f in (fetches or []) if not f.startswith("^")])
    og.resolve()
    calls = [n.name for n in graph_def.node if n.op in FUNCTION_CALL_OPS]
    if calls:
        log.warning("%d node(s) call functions whose bodies this plan does not see (%s): they keep their origin "
                    "dtype inside; convert() inlines and lowers them first", len(calls), ", ".join(calls[:5]))
    return og, info


# ---------------------------------------------------------------------- applying a plan
#: Ops that only move or select values: exact in float16, and TF has float16 CPU kernels for
#: them, so emulated float16 runs them natively instead of wrapping them in casts.
_MOVES_VALUES = frozenset({
    "Identity", "IdentityN", "Snapshot", "StopGradient", "PreventGradient", "Reshape", "Squeeze", "ExpandDims",
    "Transpose", "StridedSlice", "Slice", "ConcatV2", "Concat", "Pack", "Unpack", "Split", "SplitV", "Tile",
    "BroadcastTo", "GatherV2", "Gather", "GatherNd", "Pad", "PadV2", "MirrorPad", "ReverseV2", "ZerosLike",
    "OnesLike", "Fill", "Enter", "RefEnter", "Exit", "RefExit", "Switch", "RefSwitch", "Merge", "RefMerge",
    "NextIteration", "RefNextIteration", "Select", "SelectV2", "Where",
})
_SUFFIX = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32", "float64": "FP64"}
_CONSTS = ("Const", "HostConst")


def _args(args: Any, node: node_def_pb2.NodeDef, op_def: Any) -> tuple[list[TypeKey], list[int], list[bool]]:
    keys: list[TypeKey] = []
    enums: list[int] = []
    refs: list[bool] = []
    for arg in args:
        k, e = _arg_types(arg, node, op_def)
        keys += k
        enums += e
        refs += [arg.is_ref] * len(k)
    return keys, enums, refs


def _signature(node: node_def_pb2.NodeDef) -> tuple[list[TypeKey], list[int], list[bool], list[TypeKey], list[int]]:
    """(type attr, dtype enum, is-ref) of every input and (type attr, dtype enum) of every output of ``node``."""
    op_def = _op_def(node)
    ins, in_enums, refs = _args(op_def.input_arg, node, op_def)
    outs, out_enums, _ = _args(op_def.output_arg, node, op_def)
    return ins, in_enums, refs, outs, out_enums


def _set_type(node: node_def_pb2.NodeDef, key: TypeKey, enum: int, done: dict, conflicts: list[str]) -> None:
    if key is None:
        return
    if key in done and done[key] != enum:
        conflicts.append(f"{node.name}: type attr {key!r} is wanted as {dtype_name(done[key])} and as {dtype_name(enum)}")
    done[key] = enum
    if isinstance(key, tuple):
        node.attr[key[0]].list.type[key[1]] = enum
    else:
        node.attr[key].type = enum


def _cast_node(name: str, src: str, src_dtype: str, dst_dtype: str, device: str = "") -> node_def_pb2.NodeDef:
    n = node_def_pb2.NodeDef(name=name, op="Cast", input=[src], device=device)
    n.attr["SrcT"].type = dtype_enum(src_dtype)
    n.attr["DstT"].type = dtype_enum(dst_dtype)
    n.attr["Truncate"].b = False
    return n


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def _ref(name: str, port: int) -> str:
    return name if port == 0 else f"{name}:{port}"


class _Rewriter:
    """Builds the rewritten GraphDef: node attrs from the plan, then every edge made type-consistent."""

    def __init__(self, info: GraphInfo, plan: CastPlan, native_fp16: bool, max_const_bytes: int | None = None) -> None:
        self.plan = plan
        self.max_const_bytes = max_const_bytes
        self.native = native_fp16
        self.index = {n: i for i, n in enumerate(plan.names)}
        self.out = graph_pb2.GraphDef()
        self.out.node.extend(info.graph_def.node)  # one copy; the rewrite edits these nodes in place
        self.out.versions.CopyFrom(info.graph_def.versions)
        self.out.library.CopyFrom(info.graph_def.library)
        self.signatures = info.signatures
        self.nodes = list(self.out.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.original = {n.name: n for n in info.graph_def.node}
        self.taken = set(self.by_name)
        self.sig: dict[str, tuple] = {}
        self.emulated: set[str] = set()
        self.new_nodes: list[node_def_pb2.NodeDef] = []
        self.casts: dict[tuple[str, int], tuple[str, int]] = {}  # (tensor ref, dtype enum) -> (ref, dtype enum)
        self.delivered: dict[tuple[str, int], tuple[str, int]] = {}  # tensor -> (ref readers use, its dtype)
        self.dropped: dict[str, tuple[str, int]] = {}  # identity Cast -> (what it reads, its dtype)
        self._new_by_name: dict[str, node_def_pb2.NodeDef] = {}
        self.conflicts: list[str] = []

    # -- 1. every node's type attributes, as planned
    def set_attrs(self) -> None:
        plan = self.plan
        f16 = types_pb2.DT_HALF
        for node in self.nodes:
            i = self.index[node.name]
            sig = self.signatures.get(node.name) or _signature(node)
            ins, in_enums, _, outs, out_enums = sig
            want = list(zip(ins, in_enums, plan.in_dtypes[i])) + list(zip(outs, out_enums, plan.out_dtypes[i]))
            changes = [(k, e, d) for k, e, d in want if k is not None and dtypes.is_float(d) and dtype_enum(d) != e
                       and dtypes.is_float(dtype_name(e))]
            node_dtype = plan.dtype[i]
            if node.op.startswith(HANDLE_TYPED_PREFIXES) and node_dtype and dtypes.is_float(node_dtype):
                # a list's element dtype, also where no float tensor shows it (TensorListReserve)
                for attr in ("element_dtype", "dtype"):
                    if attr in node.attr and _is_float_enum(node.attr[attr].type):
                        node.attr[attr].type = dtype_enum(node_dtype)
            if not changes:
                self.sig[node.name] = sig
                continue
            emulate = (not self.native and node.op not in _MOVES_VALUES and node.op != "Cast"
                       and any(d == "float16" for _, _, d in changes))
            if node.op in ("FusedBatchNorm", "FusedBatchNormV2"):
                node.op = "FusedBatchNormV3"
                node.attr["U"].type = types_pb2.DT_FLOAT
                ins, outs = list(ins), list(outs)
                ins[1:5] = ["U"] * 4
                outs[1:5] = ["U"] * 4
                want = list(zip(ins, in_enums, plan.in_dtypes[i])) + list(zip(outs, out_enums, plan.out_dtypes[i]))
            done: dict = {}
            for k, e, d in want:
                if k is None or not dtypes.is_float(d) or not dtypes.is_float(dtype_name(e)):
                    continue
                target = dtype_enum(d)
                if emulate and target == f16:
                    target = e if e != f16 else types_pb2.DT_FLOAT
                _set_type(node, k, target, done, self.conflicts)
            if emulate:
                self.emulated.add(node.name)
            self.sig[node.name] = _signature(node)

    # -- casts, shared per (tensor, dtype); constants are converted ahead of time
    def convert(self, ref: str, have: int, to: int) -> str:
        if have == to or not (_is_float_enum(have) and _is_float_enum(to)):
            return ref
        key = (ref, to)
        hit = self.casts.get(key)
        if hit is not None:
            return hit[0]
        pname, port = parse_tensor_ref(ref)
        src = self.by_name.get(pname) or self._new_by_name.get(pname)
        base = pname + "/CastTo" + _SUFFIX.get(dtype_name(to), dtype_name(to)) + (f"_{port}" if port else "")
        if src is not None and src.op in _CONSTS and port == 0:
            # splats stay splats; packed content is checked against its shape and a size limit first
            tensor = convert_tensor(src.attr["value"].tensor, dtype_name(to), node=src.name, max_bytes=self.max_const_bytes)
            # control inputs place a constant in a loop's frame: the converted copy keeps them
            new = node_def_pb2.NodeDef(name=_unique(base, self.taken), op="Const", device=src.device,
                                       input=[r for r in src.input if r.startswith("^")])
            new.attr["dtype"].type = to
            new.attr["value"].tensor.CopyFrom(tensor)
        else:
            device = src.device if src is not None else ""
            new = _cast_node(_unique(base, self.taken), ref, dtype_name(have), dtype_name(to), device)
        self._add(new)
        self.casts[key] = (new.name, to)
        return new.name

    def _add(self, node: node_def_pb2.NodeDef) -> None:
        self.new_nodes.append(node)
        self._new_by_name[node.name] = node

    # -- 2. what readers of each tensor get: emulated float16 outputs are rounded once
    def round_emulated(self) -> None:
        for name in sorted(self.emulated, key=self.index.__getitem__):  # graph order: the same bytes every run
            i = self.index[name]
            outs = self.sig[name][4]
            for port, d in enumerate(self.plan.out_dtypes[i]):
                if d == "float16" and port < len(outs) and outs[port] != types_pb2.DT_HALF:
                    ref = _ref(name, port)
                    new = _cast_node(_unique(f"{name}/Round" + (f"_{port}" if port else ""), self.taken), ref,
                                     dtype_name(outs[port]), "float16", self.by_name[name].device)
                    self._add(new)
                    self.delivered[(name, port)] = (new.name, types_pb2.DT_HALF)

    def source(self, pname: str, port: int) -> tuple[str, int]:
        """The tensor readers of ``pname:port`` read instead, and its dtype."""
        hit = self.delivered.get((pname, port))
        if hit is not None:
            return hit
        through = self.dropped.get(pname) if port == 0 else None
        if through is not None:  # a dropped identity Cast: what it read, in its dtype
            ref, have = self.source(*parse_tensor_ref(through[0]))
            hit = (self.convert(ref, have, through[1]), through[1])
            self.delivered[(pname, port)] = hit
            return hit
        return _ref(pname, port), self.sig[pname][4][port]

    # -- 3. identity Casts drop out: their readers read what the Cast reads
    def drop_identity_casts(self, fetched: set[str]) -> dict[str, str]:
        removed: dict[str, str] = {}
        for i in sorted(self.plan.identity):
            name = self.plan.names[i]
            node = self.by_name.get(name)
            if node is None or node.op != "Cast" or name in fetched:
                continue
            if node.attr["SrcT"].type != node.attr["DstT"].type or not node.input or node.input[0].startswith("^"):
                continue
            self.dropped[name] = (node.input[0], node.attr["DstT"].type)
            removed[name] = parse_tensor_ref(node.input[0])[0]
        return removed

    # -- 4. every data edge delivers the dtype its reader's kernel takes
    def wire(self) -> None:
        plan = self.plan
        for node in self.nodes:
            i = self.index[node.name]
            _, in_enums, refs, _, _ = self.sig[node.name]
            want = plan.in_dtypes[i]
            emulated = node.name in self.emulated
            m = 0
            for k, ref in enumerate(node.input):
                if ref.startswith("^"):
                    continue
                if m < len(in_enums) and not refs[m]:
                    pname, port = parse_tensor_ref(ref)
                    new_ref, have = self.source(pname, port)
                    expect = in_enums[m]
                    if emulated and m < len(want) and want[m] == "float16" and _is_float_enum(have):
                        new_ref = self.convert(new_ref, have, types_pb2.DT_HALF)  # the values the plan gives
                        have = types_pb2.DT_HALF
                    node.input[k] = self.convert(new_ref, have, expect)
                m += 1

    def _rename_refs(self, renames: dict[str, str]) -> None:
        if not renames:
            return
        for n in self.nodes + self.new_nodes:
            for k, ref in enumerate(n.input):
                control = ref.startswith("^")
                pname, port = parse_tensor_ref(ref[1:] if control else ref)
                new = renames.get(pname)
                if new is not None:
                    n.input[k] = "^" + new if control else _ref(new, port)

    # -- 5. fetched tensors keep their names and dtypes: the converted node moves aside, a Cast takes its name
    def keep_fetches(self, fetches: list[tuple[str, int]]) -> None:
        plan = self.plan
        renames: dict[str, str] = {}
        pending = []
        for pname, port in fetches:
            i = self.index[pname]
            origin = self.original[pname]
            orig_enum = (self.signatures.get(pname) or _signature(origin))[4][port]
            ref, have = self.source(pname, port)
            if have == orig_enum or not (_is_float_enum(have) and _is_float_enum(orig_enum)):
                continue
            if len(self.sig[pname][4]) != 1 or pname in renames:
                log.info("fetched tensor %s:%d stays %s: %s has several outputs", pname, port, dtype_name(have), pname)
                continue
            moved = _unique(f"{pname}/{plan.dtype[i]}", self.taken)
            renames[pname] = moved
            pending.append((pname, ref, have, orig_enum))
        if not renames:
            return
        for node in self.nodes:
            if node.name in renames:
                del self.by_name[node.name]
                node.name = renames[node.name]
                self.by_name[node.name] = node
        self._rename_refs(renames)
        for pname, ref, have, orig_enum in pending:
            rp, rport = parse_tensor_ref(ref)
            ref = _ref(renames.get(rp, rp), rport)
            self._add(_cast_node(pname, ref, dtype_name(have), dtype_name(orig_enum),
                                 self.by_name[renames[pname]].device))

    def emit(self, removed: dict[str, str], keep: set[str]) -> graph_pb2.GraphDef:
        # control dependencies on a dropped Cast move to what it read
        if removed:
            final = {}
            for name, target in removed.items():
                while target in removed:
                    target = removed[target]
                final[name] = target
            for n in self.nodes + self.new_nodes:
                for k, ref in enumerate(n.input):
                    if ref.startswith("^") and ref[1:] in final:
                        n.input[k] = "^" + final[ref[1:]]
        read = set()
        for n in self.nodes + self.new_nodes:
            if n.name in removed:
                continue
            for ref in n.input:
                read.add(parse_tensor_ref(ref.lstrip("^"))[0])
            if "_class" in n.attr:  # colocation with a node ("loc:@W") needs that node in the graph
                read.update(v.decode()[5:] for v in n.attr["_class"].list.s if v.startswith(b"loc:@"))
        out = self.out
        drop = [k for k, node in enumerate(self.nodes)
                if node.name in removed or (node.op in _CONSTS and node.name not in read and node.name not in keep)]
        for k in reversed(drop):  # removed identity Casts; constants now read only through their converted copy
            del out.node[k]
        out.node.extend(self.new_nodes)
        return out


def _is_float_enum(enum: int) -> bool:
    return enum in _FLOAT_ENUMS


def apply_plan(info: GraphInfo, plan: CastPlan, *, native_fp16: bool | None = None,
               max_const_bytes: int | None = None) -> graph_pb2.GraphDef:
    """A new GraphDef in which every node runs in the dtype ``plan`` gives it.

    Type attributes (single and list-typed) are set from the plan's per-tensor dtypes; then
    every data edge is made to deliver the dtype its reader's kernel takes: one Cast per
    (tensor, dtype), shared by its readers; Consts converted ahead of time (a new Const; the
    original goes when nothing else reads it); variables stay float32 with a Cast after the
    read; FusedBatchNorm/V2 become V3 with ``U=float``; fetched tensors keep their name and
    dtype (the converted node is renamed, a Cast takes its name); existing Casts that became
    identities are removed; float16 is emulated (float16 tensors, float32 kernels) unless
    ``native_fp16``. Nothing here reads the plan's reasons: only its dtypes. Runs in time
    linear in the graph's size. Constants are converted without materialising splats; a packed
    one whose converted size exceeds ``max_const_bytes`` (default
    :data:`~precision_policy.backends.tensorflow.consts.DEFAULT_MAX_CONST_BYTES`) is a GraphError.
    """
    if native_fp16 is None:
        native_fp16 = plan.config.get("float16") == "native"
    with _no_gc():
        return _apply_plan(info, plan, native_fp16, max_const_bytes)


def _apply_plan(info: GraphInfo, plan: CastPlan, native_fp16: bool, max_const_bytes: int | None) -> graph_pb2.GraphDef:
    rw = _Rewriter(info, plan, native_fp16, max_const_bytes)
    rw.set_attrs()
    if rw.conflicts:
        raise GraphError("the plan gives one type attribute two dtypes: " + "; ".join(rw.conflicts[:10]))
    rw.round_emulated()
    fetches = []
    if plan.keep_output_dtype:
        for f in plan.fetches:
            pname, port = parse_tensor_ref(f)
            if pname in rw.by_name:
                fetches.append((pname, port))
    fetched = {p for p, _ in fetches} | {parse_tensor_ref(f)[0] for f in plan.fetches}
    removed = rw.drop_identity_casts(fetched)
    rw.wire()
    rw.keep_fetches(fetches)
    return rw.emit(removed, fetched)

