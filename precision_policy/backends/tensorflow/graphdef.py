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

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2
from tensorflow.python.framework import op_def_registry, tensor_util

from precision_policy import dtypes
from precision_policy.errors import GraphError
from precision_policy.graph import OpGraph, parse_tensor_ref
from precision_policy.opinfo.overrides import tensorflow_aliases
from precision_policy.plan import CastPlan

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


def dtype_name(enum: int) -> str:
    return _ENUM_TO_NAME.get(enum % 100 if enum > 100 else enum, "invalid")


def dtype_enum(name: str) -> int:
    return _NAME_TO_ENUM[name]


@dataclass
class NodeTypes:
    """Which type attribute controls each input and output of a node (None: fixed or list-typed)."""

    inputs: list[str | None]
    outputs: list[str | None]
    out_dtypes: list[str]


@dataclass
class GraphInfo:
    """What the rewrite needs besides the OpGraph: the original nodes and their type attributes."""

    graph_def: graph_pb2.GraphDef
    types: dict[str, NodeTypes] = field(default_factory=dict)


def _arg_types(arg: Any, node: node_def_pb2.NodeDef) -> tuple[list[str | None], list[int]]:
    """(type attr per expanded tensor, dtype enum per tensor) of one OpDef arg on ``node``."""
    attrs = node.attr
    if arg.number_attr:
        n = attrs[arg.number_attr].i
        if arg.type_attr:
            return [arg.type_attr] * n, [attrs[arg.type_attr].type] * n
        return [None] * n, [arg.type] * n
    if arg.type_list_attr:
        types = list(attrs[arg.type_list_attr].list.type)
        return [None] * len(types), types
    if arg.type_attr:
        return [arg.type_attr], [attrs[arg.type_attr].type if arg.type_attr in attrs else types_pb2.DT_FLOAT]
    return [None], [arg.type]


def node_types(node: node_def_pb2.NodeDef) -> NodeTypes:
    op_def = op_def_registry.get(node.op)
    if op_def is None:
        raise GraphError(
            f"op type {node.op!r} is not registered in this TensorFlow; load the library that defines it first",
            node=node.name,
        )
    ins: list[str | None] = []
    for arg in op_def.input_arg:
        attrs, _ = _arg_types(arg, node)
        ins += attrs
    outs: list[str | None] = []
    out_dt: list[str] = []
    for arg in op_def.output_arg:
        attrs, enums = _arg_types(arg, node)
        outs += attrs
        out_dt += [dtype_name(e) for e in enums]
    return NodeTypes(ins, outs, out_dt)


def to_opgraph(graph_def: graph_pb2.GraphDef, fetches: Sequence[str] | None = None, name: str = "graph",
               source: str | None = None) -> tuple[OpGraph, GraphInfo]:
    """The OpGraph of a GraphDef (functions are not descended into: freeze or inline them first)."""
    aliases = tensorflow_aliases()
    og = OpGraph(name, source=source)
    info = GraphInfo(graph_def)
    for node in graph_def.node:
        nt = node_types(node)
        info.types[node.name] = nt
        op = _SOURCES.get(node.op) or aliases.get(node.op, node.op)
        outs = [d if d != "invalid" else "variant" for d in nt.out_dtypes]
        og.add_node(node.name, op, list(node.input), outs, {"tf_op": node.op} if op != node.op else None)
    og.set_outputs([f if ":" in f else f"{f}:0" for f in (fetches or []) if not f.startswith("^")])
    og.resolve()
    return og, info


# ---------------------------------------------------------------------- applying a plan
def _set_type(node: node_def_pb2.NodeDef, attr: str, dtype: str, done: dict, conflicts: list[str]) -> None:
    key = (node.name, attr)
    if key in done and done[key] != dtype:
        conflicts.append(f"{node.name}: type attr {attr} is wanted as {done[key]} and as {dtype}")
    done[key] = dtype
    node.attr[attr].type = dtype_enum(dtype)


def _cast_node(name: str, src: str, src_dtype: str, dst_dtype: str) -> node_def_pb2.NodeDef:
    n = node_def_pb2.NodeDef(name=name, op="Cast", input=[src])
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


def apply_plan(info: GraphInfo, plan: CastPlan, *, native_fp16: bool | None = None) -> graph_pb2.GraphDef:
    """A new GraphDef in which every node runs in the dtype ``plan`` gives it.

    Type attributes are changed; one Cast per (tensor, dtype), shared by its consumers;
    Consts are converted ahead of time (a new Const, the original kept for other readers);
    variables stay float32 with a Cast after the read; FusedBatchNorm/V2 become V3 with
    ``U=float``; fetched tensors keep their name and dtype (the converted node is renamed and
    a Cast takes its name); existing Casts that became identities are removed; float16 is
    emulated (float16 tensors, float32 kernels) unless ``native_fp16``.
    """
    if native_fp16 is None:
        native_fp16 = plan.config.get("float16") == "native"
    src = info.graph_def
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(src.versions)
    out.library.CopyFrom(src.library)
    index = {n: i for i, n in enumerate(plan.names)}
    nodes = {n.name: copy.deepcopy(n) for n in src.node}
    order = [nodes[n.name] for n in src.node]  # node objects: renames below keep their place
    taken = set(nodes)
    conflicts: list[str] = []
    set_attrs: dict[tuple[str, str], str] = {}
    consts = {n.name: n for n in src.node if n.op in ("Const", "HostConst")}
    emulated: set[str] = set()

    # 1. type attributes
    for name, node in nodes.items():
        i = index[name]
        nt = info.types[name]
        if plan.reasons[i].startswith(("source", "reads ", "no float")):
            continue
        compute = plan.dtype[i]
        emulate = compute == "float16" and not native_fp16 and node.op != "Cast"
        if emulate:
            emulated.add(name)
        want_in, outs = plan.in_dtypes[i], plan.out_dtypes[i]
        if node.op == "Cast":
            if want_in and dtypes.is_float(want_in[0]):
                node.attr["SrcT"].type = dtype_enum(want_in[0])
            if outs and dtypes.is_float(outs[0]):
                node.attr["DstT"].type = dtype_enum(outs[0])
            continue
        if node.op in ("FusedBatchNorm", "FusedBatchNormV2") and compute != plan.origin[i]:
            node.op = "FusedBatchNormV3"
            node.attr["U"].type = types_pb2.DT_FLOAT
            nt = info.types[name] = NodeTypes(["T", "U", "U", "U", "U"], ["T", "U", "U", "U", "U", "U"],
                                              nt.out_dtypes + ["float32"])
        for attr_list, dts in ((nt.inputs, want_in), (nt.outputs, outs)):
            for attr, dt in zip(attr_list, dts):
                if attr is None or not dtypes.is_float(dt):
                    continue
                _set_type(node, attr, "float32" if (emulate and dt == "float16") else dt, set_attrs, conflicts)
    # 2. casts
    rewire: dict[tuple[str, int, str], str] = {}  # (src node, port, dtype) -> tensor name to read instead
    made: dict[tuple[str, int, str], node_def_pb2.NodeDef] = {}  # every plan cast -> the node doing it
    new_nodes: list[node_def_pb2.NodeDef] = []
    for c in plan.casts:
        s, _, port = c.tensor.rpartition(":")
        port = int(port)
        suffix = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32", "float64": "FP64"}.get(c.to, c.to)
        if c.kind == "const" and s in consts and port == 0:
            const = consts[s]
            value = tensor_util.MakeNdarray(const.attr["value"].tensor)
            new = node_def_pb2.NodeDef(name=_unique(f"{s}/CastTo{suffix}", taken), op="Const")
            new.attr["dtype"].type = dtype_enum(c.to)
            new.attr["value"].tensor.CopyFrom(
                tensor_util.make_tensor_proto(value.astype(dtypes.to_numpy(c.to)), dtype=_tf_dtype(c.to)))
            new.device = const.device
        else:
            new = _cast_node(_unique(f"{s}/CastTo{suffix}" + (f"_{port}" if port else ""), taken), _ref(s, port),
                             c.from_dtype, c.to)
        new_nodes.append(new)
        made[(s, port, c.to)] = new
        if c.consumers:
            rewire[(s, port, c.to)] = new.name
    readers = {(s, int(p), c.to): set(c.consumers) for c in plan.casts for s, _, p in [c.tensor.rpartition(":")]}
    for name, node in nodes.items():
        want_in = plan.in_dtypes[index[name]]
        for k, m, ref in _data_inputs(node):
            if m < len(want_in):
                pname, port = parse_tensor_ref(ref)
                target = rewire.get((pname, port, want_in[m]))
                if target is not None and name in readers[(pname, port, want_in[m])]:
                    node.input[k] = target
    # 3. emulated float16: float32 kernels between float16 tensors
    for name in emulated:
        node = nodes[name]
        want_in = plan.in_dtypes[index[name]]
        for k, m, ref in _data_inputs(node):
            if m < len(want_in) and want_in[m] == "float16":
                up = _cast_node(_unique(f"{name}/Upcast_{m}", taken), ref, "float16", "float32")
                new_nodes.append(up)
                node.input[k] = up.name
        outs = plan.out_dtypes[index[name]]
        for port, dt in enumerate(outs):
            if dt == "float16":
                down = _cast_node(_unique(f"{name}/Round_{port}", taken), _ref(name, port), "float32", "float16")
                new_nodes.append(down)
                _redirect_readers(nodes, new_nodes, name, port, down.name, skip=down.name)
    # 4. fetches keep their names and dtypes: the converted node moves aside, a Cast takes its name
    for c in plan.casts:
        if not c.for_fetch:
            continue
        s, _, port = c.tensor.rpartition(":")
        port = int(port)
        node = nodes[s]
        if len(info.types[s].out_dtypes) != 1:
            continue  # multi-output fetch: left converted (its readers were already rewired)
        moved = _unique(f"{s}/{plan.dtype[index[s]]}", taken)
        _rename(nodes, new_nodes, s, moved)
        _rename(nodes, new_nodes, made[(s, port, c.to)].name, s)  # the fetch cast takes the fetched name
        taken.add(s)
    # 5. identity Casts: readers take the Cast's input directly
    for i in plan.identity:
        name = plan.names[i]
        node = nodes.get(name)
        if node is None or node.op != "Cast" or name in {c.tensor.rpartition(":")[0] for c in plan.casts if c.for_fetch}:
            continue
        if any(f.rpartition(":")[0] == name or f == name for f in plan.fetches):
            continue
        source = node.input[0]
        _redirect_readers(nodes, new_nodes, name, 0, source, skip=name)
    if conflicts:
        raise GraphError("the plan gives one type attribute two dtypes: " + "; ".join(conflicts[:10]))
    by_name = {n.name: n for n in new_nodes}
    for node in order:
        out.node.append(node)
        # casts right after their source keep the GraphDef readable
        for extra in [n for n in new_nodes if n.input and parse_tensor_ref(n.input[0])[0] == node.name]:
            out.node.append(extra)
            by_name.pop(extra.name, None)
    for extra in new_nodes:
        if extra.name in by_name:
            out.node.append(extra)
            by_name.pop(extra.name)
    return out


def _tf_dtype(name: str) -> Any:
    import tensorflow as tf

    return tf.as_dtype(name)


def _data_inputs(node: node_def_pb2.NodeDef):
    """(position in node.input, data-input index, ref) for each data (non-control) input."""
    m = 0
    for k, ref in enumerate(node.input):
        if ref.startswith("^"):
            continue
        yield k, m, ref
        m += 1


def _redirect_readers(nodes: dict, extra: list, name: str, port: int, new_ref: str, *, skip: str) -> None:
    old_refs = {_ref(name, port), f"{name}:{port}"}
    for n in list(nodes.values()) + extra:
        if n.name == skip:
            continue
        for k, ref in enumerate(n.input):
            if ref in old_refs:
                n.input[k] = new_ref


def _rename(nodes: dict, extra: list, old: str, new: str) -> None:
    if old in nodes:
        node = nodes.pop(old)
        node.name = new
        nodes[new] = node
    for n in list(nodes.values()) + extra:
        if n.name == old:
            n.name = new
        for k, ref in enumerate(n.input):
            if ref == old or ref.startswith(old + ":"):
                n.input[k] = new + ref[len(old):]
            elif ref == "^" + old:
                n.input[k] = "^" + new
