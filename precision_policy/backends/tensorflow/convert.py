"""Reading and writing TensorFlow models: frozen/plain GraphDefs (.pb, .pbtxt) and SavedModels.

``rewrite`` plans a GraphDef and applies the plan; ``convert`` does it file to file, as the
seeds' ``gen_bf16_pb.py`` does with TF's own pass, writing atomically.

What each input becomes:

- a .pb/.pbtxt GraphDef -> a .pb/.pbtxt GraphDef;
- a TF1 SavedModel (``tf.compat.v1.saved_model`` builder, ``VariableV2`` or resource variables)
  -> a SavedModel with the same meta graph, signatures and variables (the graph rewritten),
  or a .pb;
- a TF2 SavedModel (``tf.saved_model.save`` of a ``tf.Module``, Keras ``model.export``) ->
  every signature is frozen (variables become constants; function calls are inlined and
  control flow lowered), planned on its own and rewritten; the result is a SavedModel that
  serves the same signature names, input names/shapes/dtypes and output keys (outputs keep
  their dtypes), or a .pb of one signature.

GraphDefs with a function library (``While``, ``StatelessIf``, ``StatefulPartitionedCall``, ...)
are inlined and lowered with TensorFlow's own grappler pass before planning, so function bodies
are planned like the rest; calls TensorFlow will not inline (functions marked ``_noinline``,
such as Keras' XLA-compiled grouped convolutions) stay calls, run in their origin dtype, and are
named in a WARNING. Nothing is written unless it loads: every output is imported into a fresh
``tf.Graph`` (a SavedModel is loaded) before the final rename.

Example (the seeds' flow):
    precision-policy convert ./model ./model_bf16 --mode allow_mix_precision_bf16 --op-info tf_amp_bf16
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import message, text_format
from tensorflow.core.framework import graph_pb2, node_def_pb2
from tensorflow.core.protobuf import saved_model_pb2

from precision_policy import fileio
from precision_policy.api import plan as make_plan
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph
from precision_policy.config import RunConfig
from precision_policy.errors import GraphError, PrecisionPolicyError, WriteError
from precision_policy.graph import GRAPH_LOADERS, OpGraph
from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

#: Ops that run a function of the GraphDef's library (besides ops named after a library function).
CALL_OPS = frozenset({
    "StatefulPartitionedCall", "PartitionedCall", "If", "StatelessIf", "While", "StatelessWhile", "Case",
    "StatelessCase", "For", "RemoteCall", "SymbolicGradient",
})
#: v2 control flow, lowered to Switch/Merge/Enter/Exit when ``_lower_using_switch_merge`` is set.
_CONTROL_FLOW_V2 = frozenset({"If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase"})
#: Attributes naming the functions a call node runs.
_FUNC_ATTRS = ("f", "then_branch", "else_branch", "body", "cond", "branches")
#: Signature inputs and outputs are served under these names in a converted TF2 SavedModel.
_SERVING_DEFAULT = "serving_default"


@dataclass
class SignatureGraph:
    """One signature of a TF2 SavedModel, frozen: its GraphDef and how its tensors map to the signature."""

    name: str
    graph_def: graph_pb2.GraphDef
    fetches: list[str]  # output tensor names in the GraphDef, in ``output_keys`` order
    output_keys: list[str]
    inputs: list[tuple[str, str, Any]]  # (signature key, tensor name in the GraphDef, tf.TensorSpec)
    output_specs: list[Any] = field(default_factory=list)  # the original outputs' tf.TensorSpec, in key order


@dataclass
class LoadedModel:
    """A GraphDef with what a rewrite must preserve: its fetches and, for a SavedModel, the rest of it.

    ``signatures`` is set for TF2 SavedModels (one frozen graph per signature; ``graph_def`` is
    then the default signature's). ``warnings`` says what could not be made plannable (function
    calls TensorFlow would not inline).
    """

    graph_def: graph_pb2.GraphDef
    fetches: list[str]
    path: Path
    saved_model: saved_model_pb2.SavedModel | None = None
    meta_index: int = 0
    inputs: dict[str, str] = field(default_factory=dict)
    signatures: dict[str, SignatureGraph] | None = None
    warnings: list[str] = field(default_factory=list)
    signature_names: list[str] = field(default_factory=list)  # a TF2 SavedModel's, frozen or not

    @property
    def is_tf2(self) -> bool:
        return self.signatures is not None


@dataclass
class ConversionResult:
    """What ``convert_model`` did: one plan per converted graph (per signature for a TF2 SavedModel)."""

    src: Path
    dst: Path
    plans: dict[str, CastPlan]
    per_signature: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def plan(self) -> CastPlan:
        """The main plan: ``serving_default``'s, else the first signature's, else the only one."""
        if _SERVING_DEFAULT in self.plans:
            return self.plans[_SERVING_DEFAULT]
        return next(iter(self.plans.values()))


# ---------------------------------------------------------------------- reading
def _read_pb(path: Path) -> graph_pb2.GraphDef:
    gd = graph_pb2.GraphDef()
    data = fileio.read_input(path, GraphError)
    try:
        if path.suffix == ".pbtxt":
            text_format.Parse(data.decode("utf-8"), gd)
        else:
            gd.ParseFromString(data)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        raise GraphError(f"not a TensorFlow GraphDef: {exc}", file=path) from None
    if path.suffix != ".pbtxt" and gd.node and not gd.HasField("versions"):
        # protobuf parses any prefix that ends between two nodes; TensorFlow writes ``versions`` after the nodes
        raise GraphError(f"looks truncated: it parses as {len(gd.node)} node(s) but has no 'versions' field, which "
                         "TensorFlow writes after the nodes of every GraphDef; copy or export the file again", file=path)
    return gd


def _default_fetches(gd: graph_pb2.GraphDef) -> list[str]:
    """Nodes nobody reads: what a frozen inference graph is run for."""
    read = set()
    for n in gd.node:
        for ref in n.input:
            read.add(ref.lstrip("^").split(":")[0])
    return [n.name for n in gd.node if n.name not in read and n.op not in ("NoOp", "Assert", "SaveV2", "RestoreV2")]


def function_calls(graph_def: graph_pb2.GraphDef) -> list[node_def_pb2.NodeDef]:
    """Top-level nodes that run a function of ``graph_def``'s library (calls and v2 control flow)."""
    library = {f.signature.name for f in graph_def.library.function}
    return [n for n in graph_def.node if n.op in CALL_OPS or n.op in library]


def _called_functions(node: node_def_pb2.NodeDef) -> list[str]:
    names = []
    for key in _FUNC_ATTRS:
        if key in node.attr:
            value = node.attr[key]
            if value.HasField("func"):
                names.append(value.func.name)
            names += [f.name for f in value.list.func]
    if not names and node.op not in CALL_OPS:
        names.append(node.op)
    return names


def _why_not_inlined(node: node_def_pb2.NodeDef, library: dict[str, Any]) -> str:
    reasons = []
    for fname in _called_functions(node):
        fdef = library.get(fname)
        if fdef is None:
            continue
        if fdef.attr["_noinline"].b if "_noinline" in fdef.attr else False:
            reasons.append("the function is marked _noinline")
        if fdef.attr["_XlaMustCompile"].b if "_XlaMustCompile" in fdef.attr else False:
            reasons.append("XLA-compiled: jit_compile=True")
        if "api_implements" in fdef.attr:
            reasons.append(f"a device-specific implementation: {fdef.attr['api_implements'].s.decode()}")
    if node.op in _CONTROL_FLOW_V2 and not reasons:
        reasons.append("control flow TensorFlow did not lower")
    if not reasons:
        reasons.append("TensorFlow did not inline them")
    return "; ".join(dict.fromkeys(reasons))


def _calls_warning(graph_def: graph_pb2.GraphDef, where: str) -> list[str]:
    """One warning per reason for the function calls left in ``graph_def`` (none when there are none)."""
    calls = function_calls(graph_def)
    if not calls:
        return []
    library = {f.signature.name: f for f in graph_def.library.function}
    by_reason: dict[str, list[str]] = {}
    for n in calls:
        by_reason.setdefault(_why_not_inlined(n, library), []).append(f"{n.name} ({n.op})")
    out = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        out.append(f"{where}: {len(names)} function call(s) not converted: they run in their origin dtype, with "
                   f"casts around them (the planner does not see inside a function); TensorFlow kept them as "
                   f"calls ({reason}): {shown}")
    return out


def _protect_fetched_calls(gd: graph_pb2.GraphDef, fetched: set[str]) -> None:
    """Lowering removes a control-flow node's name: a fetched one moves aside behind an IdentityN of its name."""
    taken = {n.name for n in gd.node}
    extra = []
    for n in gd.node:
        if n.name not in fetched or n.op not in CALL_OPS:
            continue
        types = list(n.attr["Tout"].list.type) if "Tout" in n.attr else list(n.attr["T"].list.type)
        if not types:
            continue
        new = f"{n.name}/call"
        while new in taken:
            new += "_"
        taken.add(new)
        ident = node_def_pb2.NodeDef(name=n.name, op="IdentityN", device=n.device,
                                     input=[f"{new}:{k}" for k in range(len(types))])
        ident.attr["T"].list.type.extend(types)
        n.name = new
        extra.append(ident)
    gd.node.extend(extra)


def inline_functions(graph_def: graph_pb2.GraphDef, keep: Sequence[str] = (), *,
                     file: str | Path | None = None) -> graph_pb2.GraphDef:
    """``graph_def`` with its function calls inlined and v2 control flow lowered, by TensorFlow's grappler.

    This is what ``convert_variables_to_constants_v2`` does to a ``tf.function`` before freezing
    it (grappler's function optimizer with control-flow lowering), applied to a GraphDef: every
    ``PartitionedCall``/``StatefulPartitionedCall`` TensorFlow agrees to inline is replaced by its
    body, and ``If``/``While`` (stateless or not) become ``Switch``/``Merge``/``Enter``/``Exit``
    graphs, so the planner sees every op. Node names outside the calls are kept; ``keep`` names
    nodes (or tensors) that must stay fetchable. A GraphDef without calls comes back unchanged.
    Calls TensorFlow refuses to inline (``_noinline`` functions, e.g. XLA-compiled ones) remain.
    """
    if not function_calls(graph_def):
        return graph_def
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    gd = graph_pb2.GraphDef()
    gd.CopyFrom(graph_def)
    keep_nodes = {k.lstrip("^").split(":")[0] for k in keep}
    _protect_fetched_calls(gd, keep_nodes)
    for nodes in [gd.node] + [f.node_def for f in gd.library.function]:
        for n in nodes:
            if n.op in _CONTROL_FLOW_V2:
                n.attr["_lower_using_switch_merge"].b = True
    for fdef in gd.library.function:
        if "api_implements" in fdef.attr:  # a device-specific alternative (cuDNN RNN) would block inlining
            del fdef.attr["api_implements"]
    g = tf.Graph()
    try:
        with g.as_default():
            tf.graph_util.import_graph_def(gd, name="")
            meta = tf.compat.v1.train.export_meta_graph(graph=g)
    except (ValueError, TypeError) as exc:
        raise GraphError(f"the graph does not import into TensorFlow: {_tf_error_text(exc)}", file=file,
                         node=_node_in_message(str(exc))) from None
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(sorted(keep_nodes | {n.name for n in gd.node if n.op not in CALL_OPS}))
    meta.collection_def["train_op"].CopyFrom(fetch)
    cfg = config_pb2.ConfigProto()
    rewrite_options = cfg.graph_options.rewrite_options
    rewrite_options.min_graph_nodes = -1  # small graphs too
    rewrite_options.optimizers.append("function")  # only inlining and lowering: nothing else changes
    try:
        out = tf_optimizer.OptimizeGraph(cfg, meta)
    except Exception as exc:  # noqa: BLE001 - grappler's errors come as several TF types
        raise GraphError(f"TensorFlow could not inline the graph's function calls: {_tf_error_text(exc)}",
                         file=file, node=_node_in_message(str(exc))) from None
    out.versions.CopyFrom(graph_def.versions)
    return _canonical_order(out)


def _prepare(gd: graph_pb2.GraphDef, keep: Sequence[str], path: Path, where: str) -> tuple[graph_pb2.GraphDef, list[str]]:
    """Inline/lower ``gd``'s function calls; the warnings for any left (already logged)."""
    gd = inline_functions(gd, keep, file=path)
    warnings = _calls_warning(gd, where)
    for w in warnings:
        log.warning("%s", w)
    return gd, warnings


def load_model(path: str | Path, tags: Sequence[str] | None = None, *, all_signatures: bool = True) -> LoadedModel:
    """Load a .pb/.pbtxt GraphDef or a SavedModel directory, ready to plan.

    TF2 SavedModels are frozen signature by signature (``signatures``; with ``all_signatures=False``
    only the default one, ``serving_default`` or else the first by name); GraphDefs with function
    calls or v2 control flow are inlined and lowered (``inline_functions``); what could not be is
    listed in ``warnings`` (and logged).
    """
    p = Path(path)
    if os.path.isdir(p):
        pb = p / "saved_model.pb"
        if not os.path.exists(pb):
            raise GraphError("a directory must be a SavedModel (holding saved_model.pb)", file=p)
        sm = saved_model_pb2.SavedModel()
        try:
            sm.ParseFromString(fileio.read_input(pb, GraphError))
        except message.DecodeError as exc:
            raise GraphError(f"saved_model.pb does not parse: {exc}", file=pb) from None
        if not sm.meta_graphs:
            raise GraphError("saved_model.pb holds no meta graph", file=pb)
        index = 0
        if tags:
            wanted = set(tags)
            for k, mg in enumerate(sm.meta_graphs):
                if set(mg.meta_info_def.tags) == wanted:
                    index = k
                    break
            else:
                have = [sorted(mg.meta_info_def.tags) for mg in sm.meta_graphs]
                raise GraphError(f"no meta graph with tags {sorted(wanted)}; it has {have}", file=p)
        mg = sm.meta_graphs[index]
        _check_links(p)
        _check_variables(p, mg.graph_def)
        if mg.HasField("object_graph_def") and mg.object_graph_def.nodes and any(
                n.op in ("StatefulPartitionedCall", "PartitionedCall") for n in mg.graph_def.node):
            return _load_tf2_saved_model(p, list(mg.meta_info_def.tags), all_signatures)
        fetches: list[str] = []
        inputs: dict[str, str] = {}
        for sig in mg.signature_def.values():
            fetches += [t.name for t in sig.outputs.values()]
            inputs.update({k: t.name for k, t in sig.inputs.items()})
        fetches = sorted(set(fetches))
        gd = mg.graph_def
        _check_graph(gd, fetches + list(inputs.values()), pb)
        warnings: list[str] = []
        if function_calls(gd):
            keep = fetches + list(inputs.values()) + _saved_model_nodes(mg)
            gd, warnings = _prepare(gd, keep, p, str(p))
        return LoadedModel(gd, fetches, p, sm, index, inputs, warnings=warnings)
    gd = _read_pb(p)  # (a missing or unreadable file is named there)
    _check_graph(gd, [], p)
    fetches = _default_fetches(gd)
    warnings = []
    if function_calls(gd):
        gd, warnings = _prepare(gd, fetches, p, str(p))  # fetches keep their names through inlining
    return LoadedModel(gd, fetches, p, warnings=warnings)


_VARIABLE_OPS = frozenset({"VariableV2", "VarHandleOp", "RestoreV2", "Variable"})


def _check_graph(gd: graph_pb2.GraphDef, tensors: Sequence[str], file: Path) -> None:
    """A graph to convert has nodes, and the tensors its signatures name exist in it."""
    if not gd.node:
        raise GraphError("holds no nodes: an empty graph (or not a GraphDef at all) has nothing to convert", file=file)
    names = {n.name for n in gd.node}
    missing = sorted({t.lstrip("^").split(":")[0] for t in tensors} - names)
    if missing:
        raise GraphError(f"its signatures name tensors of nodes the graph does not have: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} (the file is truncated or was edited)", file=file)


def _check_variables(folder: Path, gd: graph_pb2.GraphDef) -> None:
    """A SavedModel whose graph has variables needs its ``variables/`` checkpoint: say so, by name."""
    ops = sorted({n.op for n in gd.node if n.op in _VARIABLE_OPS})
    if not ops:
        return
    index = folder / "variables" / "variables.index"
    if not index.is_file():
        what = "folder" if not (folder / "variables").is_dir() else "checkpoint (variables/variables.index)"
        raise GraphError(f"the SavedModel's graph has variables ({', '.join(ops)}) but its variables/ {what} is "
                         "missing: copy the whole SavedModel folder, variables/ included", file=folder)


def _saved_model_nodes(mg: Any) -> list[str]:
    """Nodes a TF1 SavedModel's loader runs besides the signatures: saver ops, init ops, collections."""
    names = [mg.saver_def.restore_op_name, mg.saver_def.save_tensor_name, mg.saver_def.filename_tensor_name]
    for col in mg.collection_def.values():
        names += list(col.node_list.value)
    return [n for n in names if n]


def _frozen_signature(name: str, fn: Any, path: Path) -> SignatureGraph:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        frozen = convert_variables_to_constants_v2(fn)  # inlines calls and lowers control flow, as TF does
    except Exception as exc:  # noqa: BLE001 - TF raises many types here; the user needs the signature and why
        raise GraphError(f"signature {name!r} cannot be frozen by TensorFlow: {type(exc).__name__}: "
                         f"{_tf_error_text(exc)}", file=path) from None
    in_specs = tf.nest.flatten(fn.structured_input_signature)
    if len(in_specs) != len(frozen.inputs):
        raise GraphError(f"signature {name!r}: {len(in_specs)} inputs in its signature but {len(frozen.inputs)} "
                         "placeholders after freezing; only plain tensor inputs can be converted", file=path)
    args, kwargs = fn.structured_input_signature
    keys_in = tf.nest.flatten({k: k for k in kwargs}) if not args else [s.name for s in in_specs]
    placeholders = [t.name.split(":")[0] for t in frozen.inputs]
    if sorted(placeholders) == sorted(keys_in):  # TF names each placeholder after its signature key
        by_key = dict(zip(keys_in, in_specs))
        keys_in, in_specs = placeholders, [by_key[k] for k in placeholders]
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict):
        outputs = {"output_0": outputs}
    keys_out = tf.nest.flatten({k: k for k in outputs})
    out_specs = tf.nest.flatten(outputs)
    if len(keys_out) != len(frozen.outputs):
        raise GraphError(f"signature {name!r}: only plain tensor outputs can be converted", file=path)
    inputs = [(key, t.name, tf.TensorSpec(spec.shape, spec.dtype, name=key))
              for key, t, spec in zip(keys_in, frozen.inputs, in_specs)]
    specs = [tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in zip(keys_out, out_specs)]
    fetches = [t.name for t in frozen.outputs]
    gd = _reachable(frozen.graph.as_graph_def(), fetches + [t for _, t, _ in inputs])
    return SignatureGraph(name, gd, fetches, keys_out, inputs, specs)


def _reachable(gd: graph_pb2.GraphDef, keep: Sequence[str]) -> graph_pb2.GraphDef:
    """``gd`` without the nodes no kept tensor depends on (freezing leaves a varying number of unused
    ``unused_control_flow_input`` placeholders behind: dropping them makes the plan reproducible)."""
    inputs = {n.name: [r.lstrip("^").split(":")[0] for r in n.input] for n in gd.node}
    seen: set[str] = set()
    stack = [k.lstrip("^").split(":")[0] for k in keep]
    while stack:
        name = stack.pop()
        if name in seen or name not in inputs:
            continue
        seen.add(name)
        stack.extend(inputs[name])
    return _canonical_order(gd, seen)


def _canonical_order(gd: graph_pb2.GraphDef, only: set[str] | None = None) -> graph_pb2.GraphDef:
    """``gd``'s nodes (those in ``only``) in one reproducible order: producers first, ties by name.

    TensorFlow's function inlining emits the same nodes in a different order from one process to
    the next; planning a canonical order keeps a plan byte-identical for the same model.
    """
    import heapq

    nodes = {n.name: n for n in gd.node if only is None or n.name in only}
    readers: dict[str, list[str]] = {}
    waiting: dict[str, int] = {}
    for n in nodes.values():
        deps = set()
        if n.op not in ("NextIteration", "RefNextIteration"):  # a loop's back edge is not a dependency
            deps = {r.lstrip("^").split(":")[0] for r in n.input} & nodes.keys()
        deps.discard(n.name)
        waiting[n.name] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(n.name)
    ready = [name for name, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for r in readers.get(name, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    placed = set(order)
    order += sorted(name for name in nodes if name not in placed)  # a cycle without a back edge: as named
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(gd.versions)
    out.library.CopyFrom(gd.library)
    out.node.extend(nodes[name] for name in order)
    return out


def _load_tf2_saved_model(p: Path, tags: list[str], all_signatures: bool = True) -> LoadedModel:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(p), tags=tags or None)
    except Exception as exc:  # noqa: BLE001 - whatever TF says, the user needs the file and the message
        raise GraphError(f"TensorFlow cannot load this SavedModel: {type(exc).__name__}: {_tf_error_text(exc)}",
                         file=p) from None
    sigs = dict(loaded.signatures)
    if not sigs:
        raise GraphError("TF2 SavedModel has no signatures to convert; save it with "
                         "tf.saved_model.save(obj, path, signatures=...)", file=p)
    order = ([_SERVING_DEFAULT] if _SERVING_DEFAULT in sigs else []) + sorted(k for k in sigs if k != _SERVING_DEFAULT)
    groups: dict[Any, list[str]] = {}  # signatures that run the same function (Keras: serve, serving_default)
    for name in order:
        groups.setdefault(_same_function_key(sigs[name]), []).append(name)
    signatures: dict[str, SignatureGraph] = {}
    warnings: list[str] = []
    for names in list(groups.values()) if all_signatures else list(groups.values())[:1]:
        sg = _frozen_signature(names[0], sigs[names[0]], p)
        label = " and ".join(repr(n) for n in names)
        for w in _calls_warning(sg.graph_def, f"{p}: signature {label}"):
            log.warning("%s", w)
            warnings.append(w)
        for name in names:
            signatures[name] = sg if name == names[0] else dataclasses.replace(sg, name=name)
    signatures = {name: signatures[name] for name in order if name in signatures}
    main = signatures[order[0]]
    return LoadedModel(main.graph_def, list(main.fetches), p, None, 0, {k: t for k, t, _ in main.inputs},
                       signatures=signatures, warnings=warnings, signature_names=order)


def _same_function_key(fn: Any) -> Any:
    """Equal for two signatures that compute the same thing: the same body, captures, inputs and outputs."""
    from tensorflow.core.framework import function_pb2

    fdef = function_pb2.FunctionDef()
    fdef.CopyFrom(fn.function_def)
    fdef.signature.name = ""
    fdef.ClearField("arg_attr")  # argument names TF numbered per trace; captures compare by identity below
    fdef.ClearField("resource_arg_unique_id")
    return (fdef.SerializeToString(deterministic=True), tuple(id(t) for t in fn.captured_inputs),
            repr(fn.structured_input_signature), repr(fn.structured_outputs))


def load_graph_def(path: str | Path) -> tuple[graph_pb2.GraphDef, list[str]]:
    m = load_model(path)
    return m.graph_def, m.fetches


def _opgraph_loader(path: Path) -> OpGraph:
    m = load_model(path, all_signatures=False)
    if len(m.signature_names) > 1:
        log.info("%s: planning signature %r of %s", path, m.signature_names[0], ", ".join(m.signature_names))
    with _calls_already_reported():  # load_model said which calls remain, and why
        return to_opgraph(m.graph_def, m.fetches, name=path.stem or path.name, source=str(path))[0]


GRAPH_LOADERS["tensorflow"] = _opgraph_loader


# ---------------------------------------------------------------------- rewriting
def rewrite_with_plan(graph_def: graph_pb2.GraphDef, config: RunConfig, fetches: Sequence[str] | None = None,
                      name: str = "graph", *, max_const_bytes: int | None = None) -> tuple[graph_pb2.GraphDef, CastPlan]:
    """Plan ``graph_def`` under ``config`` and apply the plan (function calls are left as they are, with a
    warning: ``load_model`` or ``inline_functions`` inlines them first). ``max_const_bytes``: the largest
    constant materialised while converting (see :func:`~precision_policy.backends.tensorflow.graphdef.apply_plan`)."""
    og, info = to_opgraph(graph_def, fetches, name=name)
    plan = make_plan(og, config)
    return apply_plan(info, plan, max_const_bytes=max_const_bytes), plan


class _CallsReported(logging.Filter):
    """Drops to_opgraph's generic 'calls not seen' warning where load_model already said which calls and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "call functions whose bodies" not in str(record.msg)


@contextlib.contextmanager
def _calls_already_reported() -> Iterator[None]:
    graphdef_log = logging.getLogger(to_opgraph.__module__)
    quiet = _CallsReported()
    graphdef_log.addFilter(quiet)
    try:
        yield
    finally:
        graphdef_log.removeFilter(quiet)


def _plan_and_apply(graph_def: graph_pb2.GraphDef, config: RunConfig, fetches: Sequence[str] | None,
                    name: str, max_const_bytes: int | None = None) -> tuple[graph_pb2.GraphDef, CastPlan]:
    with _calls_already_reported():
        return rewrite_with_plan(graph_def, config, fetches, name, max_const_bytes=max_const_bytes)


def rewrite(graph_def: graph_pb2.GraphDef, config: RunConfig, fetches: Sequence[str] | None = None) -> graph_pb2.GraphDef:
    """``graph_def`` with ``config``'s precision mode applied (fetches keep their names and dtypes)."""
    return rewrite_with_plan(graph_def, config, fetches)[0]


# ---------------------------------------------------------------------- verifying
_NODE_PATTERNS = (
    re.compile(r"\{\{node ([^}]+)\}\}"),
    re.compile(r"\bnode '([^']+)'"),
    re.compile(r'\bnode "([^"]+)"'),
    re.compile(r"\bnode ([^\s,;:'\"()]+)"),
    re.compile(r"\btensor '([^':]+)"),
)


def _node_in_message(text: str) -> str | None:
    """The node TensorFlow names in an error message (``... of node NAME was passed ...``), if any."""
    for pattern in _NODE_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1).rstrip(".")
    return None


def verify_graph_def(graph_def: graph_pb2.GraphDef, fetches: Sequence[str] = (), *,
                     file: str | Path | None = None) -> None:
    """Import ``graph_def`` into a fresh ``tf.Graph``, fetches included; GraphError naming the node if TF refuses.

    This is the check ``convert`` runs before it writes anything: a converted graph that does not
    import (an edge delivering the wrong dtype, a dtype an op's kernel does not take, a missing
    fetch) is reported instead of written.
    """
    import tensorflow as tf

    wanted = [f if ":" in f else f"{f}:0" for f in fetches if not f.startswith("^")]
    g = tf.Graph()
    try:
        with g.as_default():
            tf.graph_util.import_graph_def(graph_def, name="", return_elements=wanted or None)
    except (ValueError, TypeError, KeyError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        node = _node_in_message(text)
        raise GraphError(
            f"the converted graph does not load in TensorFlow, so nothing was written: {first}. Either the "
            "op-info library gives this op a dtype TensorFlow has no kernel for, or the rewrite is wrong (please "
            f"report it with the model); to convert meanwhile, keep {'that node' if node else 'the node'} in its "
            "origin dtype: list its name in a keep_dtype file (--keep-dtype)", file=file, node=node) from None


def _tf_error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------- writing
def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Atomic, mode/owner/symlink-keeping write; a crash's temp file is removed by the next write."""
    fileio.atomic_write(path, data)


def _write_graph_file(gd: graph_pb2.GraphDef, out: Path) -> None:
    """Deterministic bytes: the same input gives the same file (map fields such as ``attr`` sorted)."""
    if out.suffix == ".pbtxt":
        _write_bytes_atomic(out, text_format.MessageToString(gd).encode("utf-8"))
    else:
        _write_bytes_atomic(out, gd.SerializeToString(deterministic=True))


def _check_links(src: Path) -> None:
    """A SavedModel folder whose links lead out of it (or nowhere) is refused, naming the link: copying it
    would put a file from outside the model into the converted one."""
    root = fileio.resolve(src)
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            item = Path(dirpath) / name
            if not item.is_symlink():
                continue
            target = Path(os.path.realpath(item))
            if not target.exists():
                raise GraphError(f"{item} is a link to {os.readlink(item)}, which does not exist", file=src)
            if target != root and root not in target.parents:
                raise GraphError(f"{item} is a link pointing outside the SavedModel (to {target}); refusing to copy "
                                 "it into the converted model: replace the link with the file it names", file=src)


def _write_tf1_saved_model(model: LoadedModel, gd: graph_pb2.GraphDef, src: Path, out: Path) -> None:
    sm = saved_model_pb2.SavedModel()
    sm.CopyFrom(model.saved_model)
    sm.meta_graphs[model.meta_index].graph_def.CopyFrom(gd)
    tags = list(sm.meta_graphs[model.meta_index].meta_info_def.tags)
    with fileio.new_folder(out) as tmp:
        try:
            for item in src.iterdir():
                if item.name == "saved_model.pb":
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
            (tmp / "saved_model.pb").write_bytes(sm.SerializeToString(deterministic=True))
        except OSError as exc:
            raise WriteError(f"cannot write: {exc.strerror or exc}", file=out) from None
        _check_tf1_saved_model(tmp, tags, model, out)


def _check_tf1_saved_model(folder: Path, tags: list[str], model: LoadedModel, out: Path) -> None:
    """Load the written TF1 SavedModel as a user would (a fresh session graph, variables restored)."""
    import tensorflow as tf
    from tensorflow.python.util import deprecation

    g = tf.Graph()
    try:
        with deprecation.silence(), tf.compat.v1.Session(graph=g) as sess:  # TF1's loader is what TF1 users run
            tf.compat.v1.saved_model.loader.load(sess, tags, str(folder))
            for t in list(model.fetches) + list(model.inputs.values()):
                g.as_graph_element(t)
    except Exception as exc:  # noqa: BLE001 - any failure to load means: do not write it
        text = str(exc)
        raise GraphError(f"the converted SavedModel does not load in TensorFlow, so nothing was written: "
                         f"{_tf_error_text(exc)}", file=out, node=_node_in_message(text)) from None


def _rebuild_module(model: LoadedModel, graphs: dict[str, graph_pb2.GraphDef]) -> tuple[Any, dict[str, Any]]:
    """A ``tf.Module`` serving each converted signature graph under its original name, inputs and outputs."""
    import tensorflow as tf

    module = tf.Module()  # no variables: freezing made them constants of the signature graphs
    signatures: dict[str, Any] = {}
    built: dict[int, Any] = {}
    for name, gd in graphs.items():
        sg = model.signatures[name]  # type: ignore[index]
        graph_id = id(gd)
        if graph_id in built:  # the same graph as an earlier signature: the same function serves both
            signatures[name] = built[graph_id]
            continue
        gd = _without_custom_gradients(gd)

        def _import(gd: graph_pb2.GraphDef = gd) -> None:
            tf.graph_util.import_graph_def(gd, name="")

        wrapped = tf.compat.v1.wrap_function(_import, [])
        feeds = [wrapped.graph.get_tensor_by_name(t) for _, t, _ in sg.inputs]
        fetches = {key: wrapped.graph.get_tensor_by_name(t) for key, t in zip(sg.output_keys, sg.fetches)}
        pruned = wrapped.prune(feeds, fetches)
        order = [key for key, _, _ in sg.inputs]

        shapes = {key: spec.shape for key, spec in zip(sg.output_keys, sg.output_specs)}

        def make(pruned: Any = pruned, order: list[str] = order, shapes: dict = shapes) -> Any:
            def serve(**kwargs: Any) -> dict[str, Any]:
                outputs = dict(pruned(*[kwargs[k] for k in order]))
                for key, value in outputs.items():  # the static shapes the original signature promised
                    if key in shapes and value.shape.is_compatible_with(shapes[key]):
                        value.set_shape(shapes[key])
                return outputs
            return serve

        specs = {key: spec for key, _, spec in sg.inputs}
        signatures[name] = built[graph_id] = tf.function(make()).get_concrete_function(**specs)
    return module, signatures


def _without_custom_gradients(gd: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """A frozen inference graph has no use for custom gradients (Keras' swish carries one): loading a
    SavedModel whose ops name unsaved ones warns, so the served copy drops the marks."""
    if not any("_gradient_op_type" in n.attr for n in gd.node):
        return gd
    out = graph_pb2.GraphDef()
    out.CopyFrom(gd)
    for n in out.node:
        if "_gradient_op_type" in n.attr:
            del n.attr["_gradient_op_type"]
    return out


def _write_tf2_saved_model(model: LoadedModel, graphs: dict[str, graph_pb2.GraphDef], src: Path, out: Path) -> None:
    import tensorflow as tf

    with fileio.new_folder(out) as tmp:
        try:
            module, signatures = _rebuild_module(model, graphs)
            # an inference graph: ops carrying a custom gradient (Keras' swish) are saved without it
            options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
            tf.saved_model.save(module, str(tmp), signatures=signatures, options=options)
        except OSError as exc:
            raise WriteError(f"cannot write: {exc.strerror or exc}", file=out) from None
        except PrecisionPolicyError:
            raise
        except Exception as exc:  # noqa: BLE001 - TF's failure to rebuild or save: report, write nothing
            raise GraphError(f"TensorFlow cannot save the converted signatures, so nothing was written: "
                             f"{type(exc).__name__}: {_tf_error_text(exc)}", file=out,
                             node=_node_in_message(str(exc))) from None
        _check_tf2_saved_model(tmp, model, graphs, out)


def _check_tf2_saved_model(folder: Path, model: LoadedModel, graphs: dict[str, graph_pb2.GraphDef], out: Path) -> None:
    """Load the written SavedModel; each signature must have its original input specs and output keys."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:  # noqa: BLE001 - any failure to load means: do not write it
        raise GraphError(f"the converted SavedModel does not load in TensorFlow, so nothing was written: "
                         f"{_tf_error_text(exc)}", file=out, node=_node_in_message(str(exc))) from None
    for name in graphs:
        sg = model.signatures[name]  # type: ignore[index]
        fn = loaded.signatures.get(name)
        problem = None
        if fn is None:
            problem = "is missing"
        else:
            have_in = {k: (s.shape.as_list() if s.shape.rank is not None else None, s.dtype)
                       for k, s in fn.structured_input_signature[1].items()}
            want_in = {k: (s.shape.as_list() if s.shape.rank is not None else None, s.dtype) for k, _, s in sg.inputs}
            if have_in != want_in:
                problem = f"takes {have_in}, not {want_in}"
            elif sorted(fn.structured_outputs) != sorted(sg.output_keys):
                problem = f"returns {sorted(fn.structured_outputs)}, not {sorted(sg.output_keys)}"
        if problem:
            raise GraphError(f"the converted SavedModel's signature {name!r} {problem}; nothing was written "
                             "(a rewrite bug: please report it)", file=out)


#: Graphs with more nodes than this show a progress bar while they convert (when stderr is a terminal).
PROGRESS_NODES = 10_000


class _Stages:
    """A progress bar over a conversion's stages (load, plan and rewrite, verify, write), or nothing."""

    def __init__(self, enabled: bool, total: int, name: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"convert {name}", unit="stage", leave=True)

    def done(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def convert_model(src: str | Path, dst: str | Path, config: RunConfig, *,
                  tags: Sequence[str] | None = None, max_const_bytes: int | None = None,
                  progress: bool | None = None) -> ConversionResult:
    """Convert a model file to ``config``'s precision; every plan made and every warning (see the module doc).

    .pb/.pbtxt -> .pb/.pbtxt; a TF1 SavedModel -> a SavedModel or .pb; a TF2 SavedModel -> a
    SavedModel serving every signature, or a .pb of its default signature. The output appears
    whole or not at all, and only once it loads in TensorFlow (GraphError otherwise, naming
    the node TensorFlow complained about). An output that is the input (or lies inside it) is
    refused; constants whose converted size exceeds ``max_const_bytes`` are refused before any
    allocation (splat constants are never materialised). ``progress``: a progress bar over the
    stages (None: for graphs over :data:`PROGRESS_NODES` nodes when stderr is a terminal).
    """
    src_p, out = Path(src), Path(dst)
    to_graph_file = out.suffix in (".pb", ".pbtxt")
    fileio.refuse_output_over_input(src_p, out)
    model = load_model(src_p, tags, all_signatures=not to_graph_file)
    graph_defs = [sg.graph_def for sg in model.signatures.values()] if model.is_tf2 else [model.graph_def]  # type: ignore[union-attr]
    nodes = sum(len(gd.node) for gd in graph_defs)
    if progress is None:
        progress = nodes > PROGRESS_NODES and sys.stderr.isatty()
    stages = _Stages(progress, 1 + 2 * len(graph_defs) + 1, src_p.name)
    stages.done(f"loaded {nodes:,} nodes")
    try:
        return _convert_loaded(model, src_p, out, config, to_graph_file, max_const_bytes, stages)
    finally:
        stages.close()


def _convert_loaded(model: LoadedModel, src_p: Path, out: Path, config: RunConfig, to_graph_file: bool,
                    max_const_bytes: int | None, stages: _Stages) -> ConversionResult:
    if not to_graph_file and model.saved_model is None and not model.is_tf2:
        raise GraphError(f"a GraphDef ({src_p}) converts to a .pb or .pbtxt file, not to a SavedModel folder: "
                         "name the output with a .pb or .pbtxt suffix (a SavedModel output needs a SavedModel input)",
                         file=out)
    if not to_graph_file and out.exists():
        raise WriteError("already exists; choose a new folder (nothing was written)", file=out)
    warnings = list(model.warnings)
    plans: dict[str, CastPlan] = {}
    if model.is_tf2:
        names = list(model.signatures)  # type: ignore[arg-type]
        rest = [n for n in model.signature_names if n not in model.signatures]  # type: ignore[operator]
        if to_graph_file:
            names = names[:1]  # (the signatures left in ``model.signatures`` compute the same graph)
        if rest:
            w = (f"{src_p}: a {out.suffix} file holds one graph: wrote signature {names[0]!r}; "
                 f"not written: {', '.join(repr(n) for n in rest)} (convert to a SavedModel folder for all)")
            log.warning("%s", w)
            warnings.append(w)
        graphs: dict[str, graph_pb2.GraphDef] = {}
        done: dict[int, str] = {}  # signatures sharing one frozen graph share its plan and rewrite
        for name in names:
            sg = model.signatures[name]  # type: ignore[index]
            first = done.setdefault(id(sg.graph_def), name)
            if first != name:
                graphs[name], plans[name] = graphs[first], plans[first]
                continue
            gd, plans[name] = _plan_and_apply(sg.graph_def, config, sg.fetches, f"{src_p.name}:{name}", max_const_bytes)
            stages.done(f"{name}: planned and rewritten")
            verify_graph_def(gd, sg.fetches + [t for _, t, _ in sg.inputs], file=src_p)
            stages.done(f"{name}: imports in TensorFlow")
            graphs[name] = gd
        if to_graph_file:
            _write_graph_file(graphs[names[0]], out)
        else:
            _write_tf2_saved_model(model, graphs, src_p, out)
        stages.done("written")
        return ConversionResult(src_p, out, plans, per_signature=True, warnings=warnings)
    gd, plan = _plan_and_apply(model.graph_def, config, model.fetches, src_p.name, max_const_bytes)
    stages.done("planned and rewritten")
    plans[src_p.name] = plan
    verify_graph_def(gd, list(model.fetches) + list(model.inputs.values()), file=src_p)
    stages.done("imports in TensorFlow")
    if to_graph_file:
        _write_graph_file(gd, out)
    else:
        _write_tf1_saved_model(model, gd, src_p, out)
    stages.done("written")
    return ConversionResult(src_p, out, plans, warnings=warnings)


def convert(src: str | Path, dst: str | Path, config: RunConfig, *, tags: Sequence[str] | None = None,
            max_const_bytes: int | None = None) -> CastPlan:
    """Convert a model file to ``config``'s precision: .pb/.pbtxt -> .pb/.pbtxt, SavedModel -> SavedModel or .pb.

    The output appears whole or not at all (temporary file/folder, then rename), and only if it
    loads in TensorFlow. Returns the plan (``serving_default``'s for a TF2 SavedModel; every
    signature's plan is in ``convert_model(...).plans``).
    """
    return convert_model(src, dst, config, tags=tags, max_const_bytes=max_const_bytes).plan
