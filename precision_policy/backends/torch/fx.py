"""torch.fx route: trace a model to an OpGraph, and apply a CastPlan as a static graph rewrite.

Tracing is *concrete*: every FX node is also run on the example inputs, so Python control
flow on shapes (``if x.dim() != 3``) is resolved for those inputs, as ``torch.jit.trace``
would, and dtypes come from real values. Modules are traced through down to torch
functions, and so are ``torch.fx.wrap``'d helpers, so the traced ops are exactly the calls
the eager route sees. BatchNorm, InstanceNorm and Dropout modules stay whole (one op each),
so the rewritten module follows ``train()``/``eval()``; tracing leaves the model's buffers
(running statistics, ``num_batches_tracked``) and the RNG state as they were.

:func:`trace` tries this FX trace first and captures with ``torch.export`` where it fails
(Hugging Face transformers models, keyword-only inputs...): see ``export.py``. Both give an
OpGraph named by module paths, with the same op types for the same ops, and :func:`apply`
rewrites either.

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.torch import trace, apply
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> x = torch.randn(2, 8)
    >>> graph = trace(model, (x,))
    >>> [n.name for n in graph if n.op_type == "MatMulV2"]
    ['0']
    >>> plan = pp.plan(graph, precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
    >>> apply(model, plan)(x).dtype
    torch.float32
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout())
    >>> g = trace(net, (x,))
    >>> int(net[1].num_batches_tracked), g.node("1").op_type, g.node("2").op_type
    (0, 'BatchNorm', 'Dropout')
    >>> gm = apply(net, pp.plan(g, precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")).eval()
    >>> torch.equal(gm(x), gm(x)), net[1].training
    (True, False)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import sys
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_trace
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from precision_policy.backends.torch.eager import FROM_TORCH, TO_TORCH
from precision_policy.backends.torch.ops import (
    aten_is_inplace,
    aten_op_type,
    func_label,
    is_inplace,
    method_op_type,
    module_op_type,
    op_type_of,
)
from precision_policy.errors import GraphError
from precision_policy.graph import OpGraph
from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

#: Functions kept whole (one op in the graph) instead of traced through.
LEAF_FUNCTIONS = (F.multi_head_attention_forward,)

#: Functions that branch in Python on a ``training`` argument (``if not training: return x``) and
#: are called with the calling module's flag, by the module that imports them. Traced through,
#: the branch of the trace-time mode would be frozen into the graph; kept whole, with ``training``
#: read from the module when the rewrite runs, they follow ``train()``/``eval()``. Each is
#: (module name, function name); only those already imported are used (nothing is imported).
TRAINING_LEAF_FUNCTIONS = (
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("timm.layers.drop", "drop_path"),
)

#: torch functions called as ``F.dropout(x, p, self.training)`` in a forward: their ``training``
#: argument is bound to the calling module's flag too (they are traced as one call anyway).
TRAINING_ARGUMENT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                               F.feature_alpha_dropout)


def _training_leaf_functions() -> tuple[Any, ...]:
    found = []
    for module_name, name in TRAINING_LEAF_FUNCTIONS:
        fn = getattr(sys.modules.get(module_name), name, None)
        if callable(fn):
            found.append(fn)
    return tuple(found)


def _training_position(fn: Any) -> int | None:
    """Index of ``fn``'s positional parameter named ``training`` (None if it has none)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("training") if "training" in params else None

#: Modules kept whole (``call_module`` nodes): their forward reads ``self.training`` and updates
#: running statistics when it runs, so the rewritten module follows ``train()``/``eval()``
#: instead of a training flag frozen at trace time. Each calls exactly one mapped torch function
#: (``F.batch_norm``, ``F.instance_norm``, ``F.dropout``...), as the eager route sees it.
LEAF_MODULES: tuple[type, ...] = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.modules.dropout._DropoutNd,
)


#: Python comparison operators FX records on tensors, which ``ops.OPERATORS`` does not map
#: (the eager route sees ``Tensor.__eq__``... as Equal...).
COMPARISON_OPERATORS: dict[Any, str] = {
    operator.eq: "Equal", operator.ne: "NotEqual", operator.lt: "Less", operator.le: "LessEqual",
    operator.gt: "Greater", operator.ge: "GreaterEqual",
}

#: ``x += y`` and friends as FX records them: in-place updates of ``x`` (the eager route sees
#: ``Tensor.add_``), so not ops, as every in-place call.
INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
})


def _is_leaf(m: torch.nn.Module) -> bool:
    return isinstance(m, LEAF_MODULES) and module_op_type(m) is not None


@contextlib.contextmanager
def _trace_through_fx_wrap() -> Iterator[None]:
    """Trace through ``torch.fx.wrap``'d functions, so their torch calls become nodes.

    The eager route sees every torch call inside such a helper (torchvision's
    ``stochastic_depth``, Swin's ``shifted_window_attention``...); a concrete tracer can run
    them on real values, so they need not be one opaque call.
    """
    saved_fns = dict(_fx_trace._wrapped_fns_to_patch)
    saved_methods = list(_fx_trace._wrapped_methods_to_patch)
    if saved_fns or saved_methods:
        log.debug("tracing through %d torch.fx.wrap'd function(s): %s", len(saved_fns),
                  ", ".join(sorted(name for _, name in saved_fns))[:200])
    _fx_trace._wrapped_fns_to_patch.clear()
    _fx_trace._wrapped_methods_to_patch.clear()
    try:
        yield
    finally:
        _fx_trace._wrapped_fns_to_patch.update(saved_fns)
        _fx_trace._wrapped_methods_to_patch[:] = saved_methods


@contextlib.contextmanager
def _model_state_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Run the enclosed code and put back the model's buffers and the RNG state.

    Tracing runs the model once: BatchNorm would update its running statistics and
    ``num_batches_tracked``, and dropout would draw from the global generator.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers())
                      if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)


def _dtype_name(t: torch.Tensor) -> str:
    return FROM_TORCH.get(t.dtype) or str(t.dtype).replace("torch.", "")


class _ConcreteProxy(fx.Proxy):
    concrete: Any = None

    def __len__(self) -> int:
        return len(self.concrete)

    def __iter__(self):
        if isinstance(self.concrete, (tuple, list)):
            # fx.Proxy's operator methods are installed at import time, unseen by type checkers
            return iter([self[i] for i in range(len(self.concrete))])  # type: ignore[index]
        return super().__iter__()

    # ``x += y`` on a proxy would fall back to ``x = x + y`` (a new op); record the in-place update
    def __iadd__(self, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        """``mask[a:b] = v`` (Swin's attention mask): an in-place call, run on the concrete value too."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _ConcreteTracer(fx.Tracer):
    def __init__(self, root: torch.nn.Module, inputs: dict[str, Any]) -> None:
        self._training_leaves = _training_leaf_functions()
        super().__init__(autowrap_functions=LEAF_FUNCTIONS + self._training_leaves)
        self.root_module = root
        self._inputs = inputs  # forward's parameter name -> example value (or default)
        self.concrete: dict[fx.Node, Any] = {}
        self._running_leaf = False

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return _is_leaf(m)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._running_leaf:  # running a leaf module on real values: no tracing inside it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._running_leaf:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete[obj.node])

    def iter(self, obj: fx.Proxy):
        return iter(obj)

    def keys(self, obj: fx.Proxy):
        return self.concrete[obj.node].keys()

    def _value(self, a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a not in self.concrete and a.op == "get_attr":  # tensors FX turned into get_attr nodes itself
            self.concrete[a] = _fetch_attr(self.root_module, str(a.target))
        return self.concrete[a]

    def _follow_training(self, target: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``F.multi_head_attention_forward(..., training=self.training)``, ``stochastic_depth(x, p,
        mode, self.training)``, ``F.dropout(x, p, self.training)``: read the calling module's flag
        when the rewrite runs, so they follow ``train()``/``eval()``."""
        if not (target in LEAF_FUNCTIONS or target in self._training_leaves
                or target in TRAINING_ARGUMENT_FUNCTIONS):
            return args, kwargs
        path = list(self.module_stack.values())[-1][0] if self.module_stack else ""  # "": the root's forward
        try:
            flag = self.root_module.get_submodule(path).training
        except AttributeError:
            return args, kwargs
        attr = f"{path}.training" if path else "training"
        if kwargs.get("training") is flag:
            kwargs = {**kwargs, "training": self.create_proxy("get_attr", attr, (), {})}
            return args, kwargs
        k = _training_position(target)
        if k is not None and k < len(args) and args[k] is flag:
            args = args[:k] + (self.create_proxy("get_attr", attr, (), {}),) + args[k + 1:]
        return args, kwargs

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_function":
            args, kwargs = self._follow_training(target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        cargs = fx.node.map_aggregate(node.args, self._value)
        ckwargs = fx.node.map_aggregate(node.kwargs, self._value)
        if kind == "placeholder":
            key = str(target).lstrip("*")
            if key not in self._inputs:
                key = key.rsplit("_", 1)[0]  # FX suffixes the names of concrete-arg placeholders
            value = self._inputs.get(key)
        elif kind == "get_attr":
            value = _fetch_attr(self.root_module, str(target))
        elif kind == "call_function":
            value = target(*cargs, **ckwargs)
        elif kind == "call_method":
            value = getattr(cargs[0], target)(*cargs[1:], **ckwargs)
        elif kind == "call_module":
            self._running_leaf = True
            try:
                value = self.root_module.get_submodule(target)(*cargs, **ckwargs)
            finally:
                self._running_leaf = False
        else:  # output
            value = cargs[0] if cargs else None
        self.concrete[node] = value
        if isinstance(proxy, _ConcreteProxy):
            proxy.concrete = value
        return proxy


def _fetch_attr(root: torch.nn.Module, target: str) -> Any:
    """``root.a.b.weight`` without going through Module.__getattr__ (which FX patches while tracing)."""
    obj: Any = root
    for part in target.split("."):
        if isinstance(obj, torch.nn.Module):
            d = obj.__dict__
            for store in ("_parameters", "_buffers", "_modules"):
                if part in d.get(store, {}):
                    obj = d[store][part]
                    break
            else:
                obj = object.__getattribute__(obj, part)
        else:
            obj = getattr(obj, part)
    return obj


class TracedModel:
    """A traced FX graph with its concrete values and the OpGraph built from it."""

    def __init__(self, module: torch.nn.Module, graph: fx.Graph, concrete: dict[fx.Node, Any], opgraph: OpGraph,
                 tensor_of: dict[fx.Node, str], op_node: dict[fx.Node, str]) -> None:
        self.module = module
        self.fx_graph = graph
        self.concrete = concrete
        self.graph = opgraph
        self.tensor_of = tensor_of  # fx node producing a tensor -> OpGraph "node:port"
        self.op_node = op_node  # fx node -> OpGraph node name (ops only)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return str(path)


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def trace_fx(model: torch.nn.Module, example_inputs: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
             ) -> TracedModel:
    """Concrete-trace ``model`` on ``example_inputs`` (and keyword ``kwargs``, by the names of
    ``forward``'s parameters) and build its OpGraph (see the module docstring)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    kwargs = dict(kwargs or {})
    sig = inspect.signature(model.forward)
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(example_inputs) > len(params):
        raise GraphError(f"{type(model).__name__}.forward takes {len(params)} positional input(s), "
                         f"{len(example_inputs)} example input(s) given")
    named = {p.name for p in params[len(example_inputs):]}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise GraphError(f"torch.fx traces {type(model).__name__}.forward's positional-or-keyword parameters only; "
                         f"keyword input(s) {', '.join(unknown)} are not among them")
    concrete_args = {p.name: p.default for p in params[len(example_inputs):]
                     if p.name not in kwargs and p.default is not inspect.Parameter.empty}
    values = {p.name: v for p, v in zip(params, example_inputs)} | kwargs | concrete_args
    tracer = _ConcreteTracer(model, values)
    try:
        with torch.no_grad(), _model_state_unchanged(model), _trace_through_fx_wrap():
            graph = tracer.trace(model, concrete_args=concrete_args or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes a typed, explained error
        raise GraphError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Use the eager route instead: `with precision_policy.torch.precision(config, model=model): ...`"
        ) from None
    graph.eliminate_dead_code(is_impure_node=_has_side_effects)
    for node in graph.nodes:
        if node.op == "get_attr":
            tracer._value(node)
    return _to_opgraph(model, graph, tracer.concrete)


def _to_opgraph(model: torch.nn.Module, graph: fx.Graph, concrete: dict[fx.Node, Any]) -> TracedModel:
    # the eager route must reproduce it op by op; parameters and buffers take part in torch's
    # type promotion, so they vote for gray ops as torch promotes them
    og = OpGraph(type(model).__name__, lookahead=False)
    og.variables_vote = True
    og.env_lists = False  # TF's env lists reach torch plans only with use_env_lists=True
    tensor_of: dict[fx.Node, str] = {}
    op_node: dict[fx.Node, str] = {}
    used: dict[str, int] = {}
    first_op_in: set[str] = set()
    training_leaves = _training_leaf_functions()

    def unique(name: str) -> str:
        if name not in used and name not in og:
            used[name] = 1
            return name
        k = used.get(name, 1)
        while f"{name}_{k}" in og:
            k += 1
        used[name] = k + 1
        return f"{name}_{k}"

    for node in graph.nodes:
        value = concrete.get(node)
        if node.op == "placeholder":
            if isinstance(value, torch.Tensor):
                name = unique(node.target)
                og.add_node(name, "Placeholder", outputs=[_dtype_name(value)])
                tensor_of[node] = f"{name}:0"
            continue
        if node.op == "get_attr":
            if isinstance(value, torch.Tensor):
                name = unique(str(node.target))
                # a 0-dim parameter does not vote: torch promotes a dimensioned tensor over it
                og.add_node(name, "Parameter", outputs=[_dtype_name(value)],
                            attrs={"rank": 0} if value.dim() == 0 else None)
                tensor_of[node] = f"{name}:0"
            continue
        if node.op == "output":
            fetches = [tensor_of[n] for n in tree_flatten(node.args)[0] if isinstance(n, fx.Node) and n in tensor_of]
            og.set_outputs(fetches)
            continue
        leaves = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]
        if node.op == "call_function" and node.target is __import__("operator").getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and isinstance(concrete.get(src), (tuple, list)) and src in op_node:
                # element k of a multi-output op: that op's port, not a new op
                seq = concrete[src]
                k = node.args[1]
                if isinstance(k, int) and isinstance(seq[k], torch.Tensor):
                    port = sum(1 for t in seq[:k] if isinstance(t, torch.Tensor))
                    tensor_of[node] = f"{op_node[src]}:{port}"
                continue
        if node.op == "call_method":
            label = f"Tensor.{node.target}"
            op = method_op_type(node.target)
            inplace = is_inplace(node.target)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):  # torch.export
            label = str(node.target)
            op = aten_op_type(node.target)
            inplace = aten_is_inplace(node.target)
        elif node.op == "call_function":
            label = func_label(node.target)
            op = COMPARISON_OPERATORS.get(node.target) or op_type_of(node.target)
            if node.target in training_leaves:
                op = None  # stochastic depth: the input, or the input times a mask of its own dtype
            inplace = is_inplace(getattr(node.target, "__name__", "")) or (
                node.target in INPLACE_OPERATORS and bool(leaves) and leaves[0] is node.args[0]
                and isinstance(concrete.get(node.args[0]), torch.Tensor))
        else:  # a leaf module (BatchNorm, Dropout...): one op, as its forward's one torch call
            sub = model.get_submodule(str(node.target))
            label, op, inplace = f"{type(sub).__module__}.{type(sub).__qualname__}", module_op_type(sub), False
        outs = _tensor_leaves(value)
        ins = [a for a in leaves if a in tensor_of]
        if (inplace or op is None) and ins and isinstance(value, torch.Tensor):
            tensor_of[node] = tensor_of[ins[0]]  # in-place update or detach-like: its first input
            continue
        if not outs or op is None:
            continue  # metadata: shapes, sizes, comparisons of Python numbers
        if not ins and node.op != "call_module" and _dtype_follows_a_tensor(node):
            # a factory such as torch.empty(shape, dtype=x.dtype): no float input, so the eager route
            # never sees it, and its dtype is read when the rewrite runs; not an op, not a voter
            continue
        path = str(node.target) if node.op == "call_module" else _module_path(node)
        base = path if path and path not in first_op_in else (f"{path}/{node.name}" if path else node.name)
        first_op_in.add(path)
        name = unique(base)
        og.add_node(name, op, inputs=[tensor_of[a] for a in ins], outputs=[_dtype_name(t) for t in outs],
                    attrs={"torch": label})
        op_node[node] = name
        if isinstance(value, torch.Tensor):
            tensor_of[node] = f"{name}:0"
    og.resolve()
    return TracedModel(model, graph, concrete, og, tensor_of, op_node)


def _has_side_effects(node: fx.Node) -> bool:
    """Kept even when its result is unused: a leaf module (BatchNorm updates its statistics) and
    every in-place update (``noise.div_(p)`` in torchvision's ``stochastic_depth``)."""
    if node.op == "call_module":
        return True
    if node.op == "call_method" and is_inplace(str(node.target)):
        return True
    if node.op == "call_function" and (node.target in INPLACE_OPERATORS
                                       or is_inplace(getattr(node.target, "__name__", ""))):
        return True
    return node.is_impure()


def _dtype_follows_a_tensor(node: fx.Node) -> bool:
    """Whether ``node`` takes its ``dtype`` argument from a traced tensor (``dtype=x.dtype``)."""
    dt = node.kwargs.get("dtype")
    return isinstance(dt, fx.Node) and dt.op == "call_function" and dt.target is getattr


_TRACES: weakref.WeakKeyDictionary[OpGraph, TracedModel] = weakref.WeakKeyDictionary()


def trace(model: torch.nn.Module, example_inputs: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
          route: str = "auto") -> OpGraph:
    """The model's OpGraph: op types from the torch alias table, node names from module paths.

    ``route="auto"`` traces with torch.fx (:func:`trace_fx`: torch calls, leaf BatchNorm and
    Dropout modules) and, where FX fails (Hugging Face models...), captures with torch.export
    (:func:`~precision_policy.backends.torch.export.trace_export`: ATen ops). ``"fx"`` and
    ``"export"`` force one. A model neither can capture gives a GraphError that names it and
    points to the eager route.

    Example:
        >>> import torch
        >>> g = trace(torch.nn.Linear(4, 2), kwargs={"input": torch.randn(3, 4)}, route="export")
        >>> [(n.name, n.op_type, n.attrs["torch"]) for n in g if n.op_type == "MatMulV2"]
        [('linear', 'MatMulV2', 'aten.linear.default')]
    """
    traced: Any
    if route not in ("auto", "fx", "export"):
        raise ValueError(f"route must be 'auto', 'fx' or 'export', not {route!r}")
    if route == "export":
        from precision_policy.backends.torch.export import trace_export

        traced = trace_export(model, example_inputs, kwargs)
        graph = traced.traced.graph
    else:
        try:
            traced = trace_fx(model, example_inputs, kwargs)
            graph = traced.graph
        except GraphError as fx_error:
            if route == "fx":
                raise
            from precision_policy.backends.torch.export import trace_export

            log.info("torch.fx could not trace %s, capturing it with torch.export: %s", type(model).__name__, fx_error)
            try:
                traced = trace_export(model, example_inputs, kwargs)
            except GraphError as export_error:
                fx_reason = str(fx_error).split(". Use the eager route")[0]
                raise GraphError(f"{type(model).__name__} could not be traced: {fx_reason}; and {export_error}") from None
            graph = traced.traced.graph
    _TRACES[graph] = traced
    return graph


def apply(model: torch.nn.Module, plan: CastPlan, example_inputs: Sequence[Any] | None = None, *,
          kwargs: dict[str, Any] | None = None, native_fp16: bool | None = None, traced: Any = None,
          config: Any = None) -> torch.nn.Module:
    """Rewrite ``model`` so that every op runs in the dtype ``plan`` gives it.

    Casts go where the plan puts them, one per (tensor, dtype); parameters stay float32
    masters and their low-precision copies are made once per forward. float16 is emulated
    (float16 storage, float32 compute) unless ``native_fp16=True`` (default: what the plan says).

    The graph is the one :func:`trace` made the plan's graph from (or ``traced=``), else
    ``model`` is traced again on ``example_inputs``/``kwargs``. An FX trace gives an
    ``fx.GraphModule``; a torch.export capture an
    :class:`~precision_policy.backends.torch.export.ExportedPrecision`, which captures and plans
    again (with ``config``, by default the plan's own settings) for the other of
    ``train()``/``eval()`` and for new input shapes.
    """
    from precision_policy.backends.torch.export import ExportedPrecision, ExportTrace

    if native_fp16 is None:
        native_fp16 = plan.config.get("float16") == "native"
    if traced is None and example_inputs is None and kwargs is None and plan.graph is not None:
        traced = _TRACES.get(plan.graph)
        if traced is not None and (traced.traced if isinstance(traced, ExportTrace) else traced).module is not model:
            traced = None
    if traced is None:
        if example_inputs is None and kwargs is None:
            raise GraphError("apply() needs the example_inputs the plan was traced with (or traced=...)")
        graph = trace(model, example_inputs or (), kwargs)
        traced = _TRACES[graph]
    inner = traced.traced if isinstance(traced, ExportTrace) else traced
    if plan.graph is not None and plan.graph.node_names != inner.graph.node_names:
        raise GraphError("the plan was made for another graph than this model traces to; re-plan with trace(model, ...)")
    if isinstance(traced, ExportTrace):
        return ExportedPrecision(model, traced, plan, config if config is not None else _config_of(plan), native_fp16)
    rewritten = _rewrite(traced, plan, native_fp16)
    gm = fx.GraphModule(model, rewritten, class_name=f"{type(model).__name__}Precision")
    return gm


def _config_of(plan: CastPlan) -> Any:
    """The RunConfig a plan was made with, from its ``config`` summary (to plan recaptures alike)."""
    from precision_policy.config import RunConfig

    c = dict(plan.config)
    settings: dict[str, Any] = {k: c[k] for k in ("precision_mode", "op_info", "modify_mixlist", "keep_dtype",
                                                   "customize_dtypes", "keep_output_dtype", "gray_disagreement")
                                if k in c}
    settings["native_fp16"] = c.get("float16") == "native"
    settings["use_env_lists"] = False
    return RunConfig(**settings)


def _rewrite(traced: TracedModel, plan: CastPlan, native_fp16: bool, per_use: bool = False) -> fx.Graph:
    """A copy of the traced graph with the plan's casts in (the trace stays reusable).

    A parameter (``get_attr``) is cast once per (tensor, dtype), as autocast's cast cache does.
    With ``per_use``, any other tensor is cast once per op that takes it, as autocast does: then
    the gradients of the casts are cast back and summed in float32, as under autocast (one
    shared bfloat16 cast would sum its consumers' gradients in bfloat16); and every cast goes
    just before the (first) op that takes it, as autocast makes it, so that backward sums a
    tied weight's gradients in autocast's order.
    """
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(traced.fx_graph, remap))
    concrete = {remap[n]: v for n, v in traced.concrete.items() if n in remap}
    traced = TracedModel(traced.module, graph, concrete, traced.graph,
                         {remap[n]: r for n, r in traced.tensor_of.items()},
                         {remap[n]: r for n, r in traced.op_node.items()})
    tensor_of = dict(traced.tensor_of)  # grows with the rounding casts of emulated float16 outputs
    index = {n: i for i, n in enumerate(plan.names)}
    # shared casts are keyed (src, dtype), per-use casts (src, dtype, consumer)
    casts: dict[tuple[fx.Node, torch.dtype] | tuple[fx.Node, torch.dtype, fx.Node], fx.Node] = {}

    def cast(src: fx.Node, dt: torch.dtype, before: fx.Node) -> fx.Node:
        shared = not per_use or src.op == "get_attr"
        key = (src, dt) if shared else (src, dt, before)
        hit = casts.get(key)
        if hit is None:
            with graph.inserting_before(before) if per_use else graph.inserting_after(src):
                hit = graph.call_method("to", (src, dt))
            casts[key] = hit
        return hit

    for node in list(graph.nodes):
        name = traced.op_node.get(node)
        if name is None:
            continue
        i = index[name]
        want = plan.in_dtypes[i]
        compute = plan.dtype[i]
        emulate = compute == "float16" and not native_fp16
        leaves, spec = tree_flatten((node.args, node.kwargs))
        m = 0
        changed = False
        for k, leaf in enumerate(leaves):
            if not isinstance(leaf, fx.Node) or leaf not in tensor_of:
                continue
            src_ref = tensor_of[leaf]
            have = _planned_dtype(plan, index, src_ref)
            w = want[m] if m < len(want) else have
            m += 1
            if have not in TO_TORCH or w not in TO_TORCH:
                continue
            new = leaf
            if w != have:
                new = cast(leaf, TO_TORCH[w], node)
            if emulate and w == "float16":
                new = cast(new, torch.float32, node)
            if new is not leaf:
                leaves[k] = new
                changed = True
        if changed:
            args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
            node.args, node.kwargs = tuple(args), dict(kwargs)
        if emulate:
            _round_outputs_to_fp16(graph, node, traced, tensor_of)
    fetch_casts = {c.tensor: c.to for c in plan.casts if c.for_fetch}
    if fetch_casts:
        out = next(n for n in graph.nodes if n.op == "output")
        leaves, spec = tree_flatten(out.args)
        for k, leaf in enumerate(leaves):
            ref = tensor_of.get(leaf) if isinstance(leaf, fx.Node) else None
            if ref in fetch_casts and fetch_casts[ref] in TO_TORCH:
                leaves[k] = cast(leaf, TO_TORCH[fetch_casts[ref]], out)
        out.args = tuple(torch.utils._pytree.tree_unflatten(leaves, spec))
    graph.lint()
    return graph


def _planned_dtype(plan: CastPlan, index: dict[str, int], ref: str) -> str:
    src, _, port = ref.rpartition(":")
    outs = plan.out_dtypes[index[src]]
    return outs[int(port)] if int(port) < len(outs) else ""


def _round_outputs_to_fp16(graph: fx.Graph, node: fx.Node, traced: TracedModel, tensor_of: dict) -> None:
    """After an emulated float16 op (computed in float32), store its float outputs as float16."""
    value = traced.concrete.get(node)
    targets = [node] if isinstance(value, torch.Tensor) else [u for u in node.users if u in tensor_of]
    for t in targets:
        if not (isinstance(traced.concrete.get(t), torch.Tensor) and traced.concrete[t].is_floating_point()):
            continue
        users = list(t.users)
        with graph.inserting_after(t):
            low = graph.call_method("to", (t, torch.float16))
        for u in users:
            u.replace_input_with(t, low)
        tensor_of[low] = tensor_of[t]
