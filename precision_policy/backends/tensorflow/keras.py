"""Keras 3 models under a precision mode: each layer gets the DTypePolicy its plan gives it.

The model is read as a graph of layers (op types from ``opinfo_db/aliases/keras.json``:
``Dense`` -> ``MatMul``, ``Conv2D`` -> ``Conv2D``, an ``Activation("relu")`` -> ``Relu``),
planned like any graph (gray layers follow their upstream layer), and every layer whose
plan dtype is low gets ``mixed_bfloat16`` / ``mixed_float16`` (float32 variables, low
compute); the others ``float32``. Train it with ``model.fit`` as usual.

How a model becomes a graph:

- Functional and Sequential models used as layers (a ``keras.applications`` backbone) are
  flattened: their layers are nodes named by path, ``backbone/block_1_expand``.
- Composite layers (``MultiHeadAttention``, a custom layer with sublayers) are traced once on
  placeholder values. Their sublayers become nodes (``mha/query``, ``mha/attention_output``),
  and the composite's own computations between them become nodes named after it
  (``mha``, then ``mha/ops2``, ...) with the composite's op type. The composite's policy is
  the dtype of those nodes; sublayer outputs that reach them are cast to it.
- Recurrent layers (``LSTM``, ``GRU``, ``RNN``) and ``Bidirectional`` / ``TimeDistributed`` are one
  node; their cells and wrapped layers take its dtype.
- Keras ops applied in a functional graph (``x + y``, ``keras.ops.exp(x)``) are not layers:
  they run in the promoted dtype of their inputs, which is what a gray op does, so they are
  planned as ``Identity``.

By-name overrides (``keep_dtype``, ``customize_dtypes``) use these names; a name that matches
no node is an error. Layers whose op type the library does not know keep their dtype and
are named in one ``WARNING`` log line.

float16 is emulated unless ``RunConfig.native_fp16`` is set, as in the rest of the project:
an emulated layer keeps the ``float32`` policy and computes in float32, but its inputs,
its weights (as read by its call) and its outputs are rounded to float16 values. With
``native_fp16=True`` it gets Keras' ``mixed_float16`` (TensorFlow's float16 kernels, slow
on CPU). Emulation lives in a hook on the layer's ``call``: it is not saved with the model,
apply again after loading.

Example:
    >>> import keras, precision_policy as pp
    >>> from precision_policy.keras import apply
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"),
    ...                           keras.layers.Dense(3, name="logits"), keras.layers.Softmax(name="probs")])
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
    >>> model = apply(model, cfg)
    >>> [layer.dtype_policy.name for layer in model.layers]
    ['mixed_bfloat16', 'mixed_bfloat16', 'mixed_bfloat16']
    >>> model.precision_plan["probs"].reason
    'gray: follows logits'

    A multi-head attention layer is planned through its sublayers:

    >>> x = keras.Input((4, 8), name="tokens")
    >>> y = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    >>> model = apply(keras.Model(x, keras.layers.LayerNormalization(name="ln")(y)), cfg)
    >>> model.get_layer("mha")._query_dense.dtype_policy.name, model.precision_plan["mha/query"].op_type
    ('mixed_bfloat16', 'Einsum')
    >>> model.get_layer("ln").dtype_policy.name  # black in tf_amp_bf16: statistics stay float32
    'float32'
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import keras
from keras import tree
from keras.src.backend import AutocastScope  # no public name in Keras 3; used to round weight reads
from keras.src.models.functional import Functional

from precision_policy import dtypes
from precision_policy.api import plan as make_plan
from precision_policy.config import RunConfig
from precision_policy.errors import GraphError, OverrideError
from precision_policy.graph import OpGraph
from precision_policy.opinfo.library import shipped_root
from precision_policy.plan import CastPlan

logger = logging.getLogger(__name__)

_POLICY = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16", "float32": "float32", "float64": "float64"}
#: Keras operations (not layers) that a functional graph can hold, by class name. A Keras ``Cast``
#: always writes the dtype it names: no library knows ``keras:op.Cast``, so it keeps that dtype. Every
#: other operation runs in the promoted dtype of its inputs: planned as a gray Identity.
_OPERATIONS = {"Cast": "keras:op.Cast"}
_GRAY_OPERATION = "Identity"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: origin policy of every layer an apply changed, so that a second apply starts from the origin
_ORIGIN: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, str]]:
    return json.loads((shipped_root() / "aliases" / "keras.json").read_text(encoding="utf-8"))


def layer_op_type(layer: Any) -> str:
    """Canonical op type of a Keras layer; ``keras:<Class>`` when the table does not know it.

    Wrappers (``TimeDistributed``, ``Bidirectional``) take the op type of the layer they wrap.

    Example:
        >>> import keras
        >>> layer_op_type(keras.layers.Dense(2)), layer_op_type(keras.layers.Activation("gelu"))
        ('MatMul', 'Gelu')
        >>> layer_op_type(keras.layers.Bidirectional(keras.layers.LSTM(2))), layer_op_type(keras.layers.Lambda(abs))
        ('DynamicRNN', 'keras:Lambda')
    """
    table = _table()
    if isinstance(layer, keras.layers.Bidirectional):
        return layer_op_type(layer.forward_layer)
    if isinstance(layer, keras.layers.Wrapper):
        return layer_op_type(layer.layer)
    if isinstance(layer, keras.layers.Activation):
        act = getattr(layer.activation, "__name__", str(layer.activation))
        return table["activations"].get(act, f"keras:activation.{act}")
    for cls in type(layer).__mro__:
        op = table["layers"].get(cls.__name__)
        if op is not None:
            return op
    return f"keras:{type(layer).__name__}"


# ---------------------------------------------------------------------- the graph of layers
def _functional_of(layer: Any) -> Functional | None:
    """The functional graph of a Functional model or a built Sequential, else None."""
    if isinstance(layer, Functional):
        return layer
    if isinstance(layer, keras.Sequential):
        return getattr(layer, "_functional", None)
    return None


def _opaque(layer: Any) -> bool:
    """Layers planned as one node whose sublayers take its dtype (their internals are loops)."""
    return isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional, keras.layers.Wrapper))


def _sublayers(layer: Any, recursive: bool = False) -> list[Any]:
    return list(layer._flatten_layers(include_self=False, recursive=recursive))


def _dtype(name: Any) -> str:
    text = keras.backend.standardize_dtype(name) if name is not None else "float32"
    return text if dtypes.is_known(text) else "variant"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@dataclass
class _Frame:
    """One traced ``call`` of a layer: its tensors as seen inside ``call`` and its sublayer calls."""

    layer: Any
    inputs: list[Any]
    outputs: list[Any] = field(default_factory=list)
    children: list[_Frame] = field(default_factory=list)


@dataclass
class _Composite:
    """A traced composite layer: the nodes of its own ops and the sublayer outputs they read."""

    layer: Any
    path: str
    segments: list[str] = field(default_factory=list)
    feeds: list[tuple[Any, int, str]] = field(default_factory=list)  # (direct sublayer, output index, ref)


@dataclass
class _LayerGraph:
    """An :class:`OpGraph` of a Keras model plus which layers each node decides."""

    graph: OpGraph
    owners: dict[str, Any]  # node -> the layer it stands for (layers, opaque composites)
    opaque: list[tuple[Any, str]]  # (layer, node) whose sublayers take the node's dtype
    composites: list[_Composite]
    keras_ops: set[str]  # nodes of Keras operations: no policy, they follow their inputs


class _Builder:
    """Accumulates nodes in dependency order; a layer called again merges into its node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.order: list[str] = []
        self.ops: dict[str, str] = {}
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        self.owner_of: dict[str, Any] = {}
        self.owners: dict[str, Any] = {}
        self.opaque: list[tuple[Any, str]] = []
        self.composites: list[_Composite] = []
        self.keras_ops: set[str] = set()

    # -------------------------------------------------------------- nodes
    def add(self, name: str, op: str, inputs: list[str], outputs: list[str], owner: Any) -> str:
        if name in self.ops and self.owner_of[name] is not owner:
            k = 2
            while f"{name}~{k}" in self.ops and self.owner_of[f"{name}~{k}"] is not owner:
                k += 1
            name = f"{name}~{k}"
        if name not in self.ops:
            self.order.append(name)
            self.ops[name] = op
            self.inputs[name] = list(dict.fromkeys(inputs))
            self.outputs[name] = list(outputs) or ["float32"]
            self.owner_of[name] = owner
            return name
        # a shared layer called again: only inputs from nodes placed before it (keeps a DAG)
        position = {n: i for i, n in enumerate(self.order)}
        mine = position[name]
        have = self.inputs[name]
        for ref in inputs:
            if ref not in have and position.get(ref.rpartition(":")[0], mine) < mine:
                have.append(ref)
        if len(outputs) > len(self.outputs[name]):
            self.outputs[name] += list(outputs[len(self.outputs[name]):])
        return name

    def layer_node(self, layer: Any, path: str, inputs: list[str], outputs: list[str]) -> list[str]:
        name = self.add(path, layer_op_type(layer), inputs, outputs, layer)
        self.owners[name] = layer
        if _opaque(layer) and all(lay is not layer for lay, _ in self.opaque):
            self.opaque.append((layer, name))
        return [f"{name}:{k}" for k in range(len(outputs))]

    def to_graph(self, fetches: list[str]) -> OpGraph:
        g = OpGraph(self.name, lookahead=False)
        for name in self.order:
            g.add_node(name, self.ops[name], self.inputs[name], self.outputs[name])
        g.set_outputs(list(dict.fromkeys(fetches)))
        g.resolve()
        return g

    # -------------------------------------------------------------- functional graphs
    def functional(self, fn: Functional, prefix: str, in_refs: list[str]) -> list[str]:
        local: dict[int, str] = {id(t): r for t, r in zip(fn.inputs, in_refs)}
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for node in fn._nodes_by_depth[depth]:
                op = node.operation
                if op is None or node.is_input:
                    continue
                args = node.arguments.keras_tensors
                if any(id(t) not in local for t in args):
                    continue  # not computable from these inputs (Keras skips it too)
                outs = self.operation(op, prefix, node, local)
                for t, r in zip(node.outputs, outs):
                    local[id(t)] = r
        return [local[id(t)] for t in fn.outputs]

    def operation(self, op: Any, prefix: str, node: Any, local: dict[int, str]) -> list[str]:
        path = _join(prefix, op.name)
        ins = [local[id(t)] for t in node.arguments.keras_tensors]
        outs = [_dtype(t.dtype) for t in node.outputs]
        if not isinstance(op, keras.layers.Layer):
            name = self.add(path, _OPERATIONS.get(type(op).__name__, _GRAY_OPERATION), ins, outs, op)
            self.keras_ops.add(name)
            return [f"{name}:{k}" for k in range(len(outs))]
        fn = _functional_of(op)
        if fn is not None:
            args = node.arguments.args
            first = args[0] if args else next(iter(node.arguments.kwargs.values()), None)
            sub_in = [local[id(t)] for t in tree.flatten(first) if isinstance(t, keras.KerasTensor)]
            if len(sub_in) == len(fn.inputs) and len(node.outputs) == len(fn.outputs):
                return self.functional(fn, path, sub_in)
        if _opaque(op) or not _sublayers(op):
            return self.layer_node(op, path, ins, outs)
        return self.traced(op, path, node, local, ins, outs)

    # -------------------------------------------------------------- composite layers
    def traced(self, layer: Any, path: str, node: Any, local: dict[int, str], ins: list[str],
               outs: list[str]) -> list[str]:
        """Trace a composite layer once on placeholder values and add its inner nodes."""
        by_dummy: dict[int, str] = {}
        dummies: list[Any] = []

        def dummy(x: Any) -> Any:
            if not isinstance(x, keras.KerasTensor):
                return x
            shape = tuple(2 if d is None else d for d in x.shape)
            value = keras.ops.ones(shape, dtype=x.dtype)
            by_dummy[id(value)] = local[id(x)]
            dummies.append(value)
            return value

        args = tree.map_structure(dummy, node.arguments.args)
        kwargs = tree.map_structure(dummy, node.arguments.kwargs)
        try:
            frame = _trace(layer, args, kwargs)
        except Exception as exc:  # a layer that cannot run on placeholders: plan it as one node
            logger.warning("could not trace composite layer %s (%s: %s); planned as one node whose sublayers "
                           "take its dtype", path, type(exc).__name__, _first_line(exc))
            return self._opaque_fallback(layer, path, ins, outs)
        known: dict[int, str] = {}
        for t in frame.inputs:
            if id(t) in by_dummy:
                known[id(t)] = by_dummy[id(t)]
        if len(known) < len(frame.inputs) and len(frame.inputs) == len(dummies):
            known = {id(t): by_dummy[id(d)] for t, d in zip(frame.inputs, dummies)}  # cast on entry
        if len(frame.outputs) != len(outs):
            logger.warning("composite layer %s returned %d tensors when traced, %d in the model; planned as one "
                           "node whose sublayers take its dtype", path, len(frame.outputs), len(outs))
            return self._opaque_fallback(layer, path, ins, outs)
        return self.frame(frame, path, known)

    def _opaque_fallback(self, layer: Any, path: str, ins: list[str], outs: list[str]) -> list[str]:
        refs = self.layer_node(layer, path, ins, outs)
        if all(lay is not layer for lay, _ in self.opaque):
            self.opaque.append((layer, refs[0].rpartition(":")[0]))
        return refs

    def frame(self, frame: _Frame, path: str, known: dict[int, str]) -> list[str]:
        """Nodes of one traced composite call; returns the refs of its outputs."""
        layer = frame.layer
        comp = next((c for c in self.composites if c.layer is layer and c.path == path), None)
        if comp is None:
            comp = _Composite(layer, path)
            self.composites.append(comp)
        op_type = layer_op_type(layer)
        compute = _dtype(layer.compute_dtype)  # the composite's own ops compute in it
        read_later: list[set[int]] = [set() for _ in frame.children]  # read by a child after child i
        for i in range(len(frame.children) - 2, -1, -1):
            read_later[i] = read_later[i + 1] | {id(t) for t in frame.children[i + 1].inputs}
        returned = {id(t) for t in frame.outputs}
        own_inputs = [known[id(t)] for t in frame.inputs if id(t) in known]
        # tensors the composite's own ops may read that no segment has taken yet: its inputs (as
        # its policy casts them) and sublayer outputs that no later sublayer reads
        pending = list(dict.fromkeys(own_inputs))
        state: dict[str, Any] = {"last": None, "count": 0}

        def segment(dtype: str) -> str:
            nonlocal pending
            if state["last"] is not None and not pending:
                return state["last"]
            feed = pending + ([state["last"]] if state["last"] else [])
            state["count"] += 1
            name = path if state["count"] == 1 else f"{path}/ops{state['count']}"
            out = compute if dtypes.is_float(compute) else dtype
            name = self.add(name, op_type, feed or list(dict.fromkeys(own_inputs)), [out], layer)
            if name not in comp.segments:
                comp.segments.append(name)
            state["last"] = f"{name}:0"
            pending = []
            return state["last"]

        for i, child in enumerate(frame.children):
            refs = []
            for t in child.inputs:
                ref = known.get(id(t))
                if ref is None:
                    ref = known[id(t)] = segment(_dtype(t.dtype))
                refs.append(ref)
            child_path = _join(path, child.layer.name)
            outs = self.child(child, child_path, refs)
            for k, (t, ref) in enumerate(zip(child.outputs, outs)):
                known.setdefault(id(t), ref)
                if id(t) not in read_later[i] and id(t) not in returned:
                    pending.append(ref)
                    comp.feeds.append((child.layer, k, ref))
        result = []
        for t in frame.outputs:
            ref = known.get(id(t))
            result.append(ref if ref is not None else segment(_dtype(t.dtype)))
        return result

    def child(self, frame: _Frame, path: str, refs: list[str]) -> list[str]:
        layer = frame.layer
        outs = [_dtype(t.dtype) for t in frame.outputs]
        fn = _functional_of(layer)
        if fn is not None and len(refs) >= len(fn.inputs) and len(frame.outputs) == len(fn.outputs):
            return self.functional(fn, path, refs[: len(fn.inputs)])
        if _opaque(layer) or not _sublayers(layer):
            return self.layer_node(layer, path, refs, outs)
        return self.frame(frame, path, {id(t): r for t, r in zip(frame.inputs, refs)})


def _trace(layer: Any, args: tuple, kwargs: dict) -> _Frame:
    """Call ``layer`` once, recording every (sub)layer ``call`` with the tensors it saw."""
    root = _Frame(None, [])
    stack = [root]
    saved: list[tuple[Any, Any]] = []

    def hook(target: Any, orig: Callable) -> Callable:
        def call(*a: Any, **kw: Any) -> Any:
            frame = _Frame(target, _tensors((a, kw)))
            stack[-1].children.append(frame)
            stack.append(frame)
            try:
                out = orig(*a, **kw)
            finally:
                stack.pop()
            frame.outputs = _tensors(out)
            return out

        return call

    try:
        for target in [layer] + _sublayers(layer, recursive=True):
            if any(t is target for t, _ in saved):
                continue
            saved.append((target, target.__dict__.get("call", _NONE)))
            target.__dict__["call"] = hook(target, target.call)
        with keras.StatelessScope():  # variable updates (statistics, seeds) are dropped, not applied
            layer(*args, **kwargs)
    finally:
        for target, prev in reversed(saved):
            if prev is _NONE:
                target.__dict__.pop("call", None)
            else:
                target.__dict__["call"] = prev
    frames = [f for f in root.children if f.layer is layer]
    if not frames:
        raise GraphError(f"tracing {layer.name!r} recorded no call")
    return frames[0]


def _first_line(exc: Exception) -> str:
    """The message of an exception, without Keras' call-context wrapping."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        return lines[1]
    return lines[0] if lines else ""


def _tensors(structure: Any) -> list[Any]:
    return [t for t in tree.flatten(structure) if keras.ops.is_tensor(t)]


_NONE = object()


def _build(model: keras.Model) -> _LayerGraph:
    fn = _functional_of(model)
    if fn is None:
        raise GraphError(
            f"model {model.name!r} is a subclassed model ({type(model).__name__}): its layer graph is not known. "
            "Call it inside a functional model, e.g. inp = keras.Input(shape); keras.Model(inp, model(inp))"
        )
    b = _Builder(model.name)
    in_refs = []
    for t in fn.inputs:
        op = t._keras_history.operation
        name = b.add(op.name, "Placeholder", [], [_dtype(t.dtype)], op)
        in_refs.append(f"{name}:0")
    fetches = b.functional(fn, "", in_refs)
    return _LayerGraph(b.to_graph(fetches), b.owners, b.opaque, b.composites, b.keras_ops)


def layer_graph(model: keras.Model) -> OpGraph:
    """The model as a graph of layers (nested models flattened, composite layers traced).

    Example:
        >>> import keras
        >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="fc")], name="block")
        >>> x = keras.Input((4,), name="x")
        >>> g = layer_graph(keras.Model(x, keras.layers.ReLU(name="act")(inner(x))))
        >>> g.node_names, g.node("act").inputs
        (['x', 'block/fc', 'act'], ['block/fc:0'])
    """
    return _build(model).graph


# ---------------------------------------------------------------------- applying a plan
class _Float16Rounding(AutocastScope):
    """Autocast scope of an emulated float16 layer: weights are read as float16 values in float32."""

    def __init__(self) -> None:
        super().__init__("float32")

    def maybe_cast(self, value: Any) -> Any:
        return _round16(value)


def _round16(x: Any) -> Any:
    if keras.ops.is_tensor(x) and keras.backend.standardize_dtype(x.dtype) == "float32":
        return keras.ops.cast(keras.ops.cast(x, "float16"), "float32")
    return x


@dataclass
class _Hook:
    """What the ``call`` hook of one layer does: emulate float16, shield, cast some outputs."""

    emulate: bool = False
    guard: bool = False  # a float32 layer inside an emulated one: its weights are not rounded
    out_casts: dict[int, str] = field(default_factory=dict)  # flat output index -> plan dtype


_HOOK_MARK = "_precision_policy_previous_call"


def _remove_hooks(layers: list[Any]) -> None:
    for layer in layers:
        fn = layer.__dict__.get("call")
        if fn is not None and hasattr(fn, _HOOK_MARK):
            prev = getattr(fn, _HOOK_MARK)
            if prev is _NONE:
                del layer.__dict__["call"]
            else:
                layer.__dict__["call"] = prev


def _runtime_cast(x: Any, dtype: str, native_fp16: bool) -> Any:
    if not keras.ops.is_tensor(x) or not keras.backend.is_float_dtype(x.dtype):
        return x
    if dtype == "float16" and not native_fp16:
        return _round16(keras.ops.cast(x, "float32"))
    if keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return keras.ops.cast(x, dtype)


def _install_hook(layer: Any, spec: _Hook, native_fp16: bool) -> None:
    prev = layer.__dict__.get("call", _NONE)
    orig = layer.call

    def call(*args: Any, **kwargs: Any) -> Any:
        if spec.emulate:
            args, kwargs = tree.map_structure(_round16, (args, kwargs))
            with _Float16Rounding():
                out = orig(*args, **kwargs)
            out = tree.map_structure(_round16, out)
        elif spec.guard:
            with AutocastScope(None):
                out = orig(*args, **kwargs)
        else:
            out = orig(*args, **kwargs)
        if spec.out_casts:
            flat = tree.flatten(out)
            k = 0
            for i, leaf in enumerate(flat):
                if keras.ops.is_tensor(leaf):
                    if k in spec.out_casts:
                        flat[i] = _runtime_cast(leaf, spec.out_casts[k], native_fp16)
                    k += 1
            out = tree.pack_sequence_as(out, flat)
        return out

    setattr(call, _HOOK_MARK, prev)
    layer.__dict__["call"] = call


def _widest(values: list[str | None]) -> str | None:
    found = [v for v in values if v is not None and dtypes.is_float(v)]
    if not found:
        return None
    return max(found, key=lambda d: (dtypes.rank(d), dtypes.bits(d), d == "float16"))


def _check_names(config: RunConfig, built: _LayerGraph) -> None:
    """By-name overrides must each match a layer: a name that matches nothing is an error."""
    graph = built.graph
    ov = config.overrides()
    named = [(n, where, "keep_dtype") for n, where in ov.keep_names.items()]
    named += [(n, spec.where, "customize_dtypes") for n, spec in ov.custom_names.items()]
    names = graph.node_names
    for name, where, what in named:
        if name in built.keras_ops:
            raise OverrideError(f"{what}: {name!r} is a Keras operation, not a layer: it has no policy and runs in "
                                "the dtype of its inputs; name the layer that produces them", file=where)
        if name in graph:
            continue
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        close += [n for n in names if n.endswith("/" + name) and n not in close][:3]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise OverrideError(f"{what}: {name!r} matches no layer of model {graph.name!r} (nested layers are named "
                            f"by path, 'outer/inner'){hint}", file=where)


def _warn_unknown(plan: CastPlan, config: RunConfig) -> None:
    # Keras operations (keras:op.*) are not layers and have no policy to set: not listed
    hits = sorted((plan.names.index(n), n, op) for op, names in plan.unknown.items() if not op.startswith("keras:op.")
                  for n in dict.fromkeys(names))
    if not hits:
        return
    kept = {plan[n].dtype for _, n, _ in hits}
    where = "float32" if kept <= {"float32", None} else "their origin dtype"
    listed = ", ".join(f"{n} ({op})" for _, n, op in hits)
    logger.warning("%d layer(s) kept in %s, op type unknown to library %s: %s; add them to the library or map "
                   "them in opinfo_db/aliases/keras.json", len(hits), where, config.op_info, listed)


def apply(model: keras.Model, config: RunConfig) -> keras.Model:
    """Give every layer of ``model`` the DTypePolicy of its plan (in place); returns the model.

    Variables stay float32 (the policies are Keras' mixed ones), so training with
    ``model.fit`` keeps float32 master weights. The plan is kept as ``model.precision_plan``.
    A model that already ran (``predict``, ``fit``) drops its compiled functions so the next
    call runs with the new policies; applying again starts from the origin policies.
    """
    every = _sublayers(model, recursive=True)
    _remove_hooks(every)
    for layer in every:
        origin = _ORIGIN.get(layer)
        if origin is not None and layer.dtype_policy.name != origin:
            layer.dtype_policy = keras.DTypePolicy(origin)
    built = _build(model)
    _check_names(config, built)
    plan = make_plan(built.graph, config.model_copy(update={"keep_output_dtype": False}))
    _warn_unknown(plan, config)

    chosen: dict[int, tuple[Any, str]] = {}

    def put(layer: Any, dtype: str | None) -> None:
        if dtype is None or not dtypes.is_float(dtype):
            return
        have = chosen.get(id(layer))
        chosen[id(layer)] = (layer, dtype if have is None else _widest([have[1], dtype]) or dtype)

    for name, layer in built.owners.items():
        put(layer, plan[name].dtype)
    comp_dtype: dict[int, str] = {}
    for comp in built.composites:
        seg = [plan[s].dtype for s in comp.segments]
        if len({d for d in seg if d}) > 1:
            logger.warning("the own ops of %s were planned in %s; they run in one dtype, the widest", comp.path,
                           ", ".join(f"{s}={d}" for s, d in zip(comp.segments, seg)))
        origin = keras.backend.standardize_dtype(comp.layer.compute_dtype)
        d = _widest(seg) or ("float64" if origin == "float64" else "float32")
        put(comp.layer, d)
        comp_dtype[id(comp.layer)] = chosen[id(comp.layer)][1]
    for layer, name in built.opaque:
        for sub in _sublayers(layer, recursive=True):
            put(sub, chosen.get(id(layer), (None, plan[name].dtype))[1])
    for comp in built.composites:  # sublayers the trace did not reach (a fused attention's softmax)
        for sub in _sublayers(comp.layer, recursive=True):
            if id(sub) not in chosen:
                put(sub, comp_dtype[id(comp.layer)])

    native = config.native_fp16
    hooks: dict[int, tuple[Any, _Hook]] = {}
    for layer, d in chosen.values():
        if isinstance(layer, keras.layers.InputLayer) or _functional_of(layer) is not None:
            continue
        _ORIGIN.setdefault(layer, layer.dtype_policy.name)
        emulate = d == "float16" and not native
        policy = "float32" if emulate else _POLICY.get(d)
        if policy is not None and layer.dtype_policy.name != policy:
            layer.dtype_policy = keras.DTypePolicy(policy)
        if emulate:
            hooks[id(layer)] = (layer, _Hook(emulate=True))
    for comp in built.composites:
        target = comp_dtype[id(comp.layer)]
        for child, k, ref in comp.feeds:
            src, _, port = ref.rpartition(":")
            have = plan[src].outputs[int(port)] if int(port) < len(plan[src].outputs) else None
            if have != target:
                hooks.setdefault(id(child), (child, _Hook()))[1].out_casts[k] = target
    for layer, spec in list(hooks.values()):
        if spec.emulate:
            for sub in _sublayers(layer, recursive=True):
                if id(sub) not in hooks and keras.backend.standardize_dtype(sub.compute_dtype) == "float32":
                    hooks[id(sub)] = (sub, _Hook(guard=True))
    for layer, spec in hooks.values():
        _install_hook(layer, spec, native)
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.precision_plan = plan
    return model


def plan_of(model: keras.Model) -> CastPlan | None:
    """The plan ``apply`` gave ``model`` (None before ``apply``)."""
    return getattr(model, "precision_plan", None)
