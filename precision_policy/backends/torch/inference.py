"""Inference conversion: a model rewritten once for a precision mode, weights cast ahead of time.

:func:`~precision_policy.backends.torch.fx.apply` keeps parameters as float32 masters and
casts them on every forward (training needs that: the optimizer updates the masters).
For inference nothing updates them, so :func:`convert_for_inference` traces the model,
plans it, applies the plan, and then folds every parameter/buffer cast (``get_attr`` ->
``.to(low)``) into a low-precision copy stored in the converted module, made once. Casts that
turned out to be no-ops (a tensor cast to the dtype it already has) are dropped, and so are
upcasts feeding a type-promoting elementwise op (``x_bf16.to(float32) + y_fp32``: the kernel
upcasts ``x`` itself, bitwise alike, as under autocast).

The original model is left as it was (its parameters, buffers, ``training`` flag and
``requires_grad`` flags); the converted module is in eval mode, holds no tensor that wants
grad, and returns the plan's output dtypes (float32 by default, as ``keep_output_dtype``).
Numerics are those of the FX route (which are autocast's with the ``torch_autocast_cpu``
library): the same ops run in the same dtypes on the same values; only the point where a
weight is rounded to the low dtype moves (once, ahead of time, instead of each forward).

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.backends.torch.inference import convert_for_inference
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu",
    ...                    use_env_lists=False)
    >>> x = torch.randn(1, 8)
    >>> fast = convert_for_inference(model, cfg, example_inputs=(x,))
    >>> fast(x).dtype, fast.training, model[0].weight.dtype
    (torch.float32, False, torch.float32)
    >>> sorted({p.dtype for p in fast.parameters()})
    [torch.bfloat16]
    >>> with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
    ...     ref = model(x)
    >>> torch.equal(fast(x), ref.float())
    True
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from precision_policy.backends.torch.eager import TO_TORCH
from precision_policy.backends.torch.fx import TracedModel, _fetch_attr, apply, trace_fx
from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, GraphError, PrecisionPolicyError
from precision_policy.modes.standard import ForceFP32, MustKeepOriginDtype
from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

__all__ = ["ExportedInference", "InferenceStats", "convert_for_inference"]

_LOW = frozenset({torch.float16, torch.bfloat16})


class InferenceStats:
    """What a conversion did (``converted.pp_inference_stats``): counts for logs and tests."""

    __slots__ = ("low_ops", "ops", "folded", "dropped", "promoted", "low_params")

    def __init__(self) -> None:
        self.low_ops = 0  # ops the plan runs in a 16-bit dtype
        self.ops = 0  # ops in the plan
        self.folded = 0  # parameter/buffer casts done once at conversion
        self.dropped = 0  # casts removed because their input already had the dtype
        self.promoted = 0  # upcasts removed before a type-promoting op that upcasts alike
        self.low_params: dict[str, torch.dtype] = {}  # converted module's name -> stored low dtype

    def __repr__(self) -> str:
        return (f"InferenceStats({self.low_ops}/{self.ops} ops low, {self.folded} weight cast(s) folded, "
                f"{self.dropped} no-op cast(s) dropped, {self.promoted} upcast(s) left to type promotion)")


def convert_for_inference(
    model: torch.nn.Module,
    plan_or_config: CastPlan | RunConfig,
    example_inputs: Sequence[Any] | torch.Tensor,
    kwargs: dict[str, Any] | None = None,
    *,
    traced: Any = None,
    drop_noop_casts: bool = True,
) -> torch.nn.Module:
    """``model`` rewritten for inference under a precision mode, its weights cast once.

    Args:
        model: the float32 model; it is traced on ``example_inputs`` and left unchanged.
        plan_or_config: a :class:`~precision_policy.RunConfig` (planned here) or a
            :class:`~precision_policy.CastPlan` made for ``trace(model, example_inputs)``.
        example_inputs: positional inputs to trace with (a tensor or a tuple).
        kwargs: keyword inputs (Hugging Face models: ``{"input_ids": ids}``).
        traced: an existing ``trace_fx`` (or ``trace_export``) result, to skip re-tracing; trace
            the model in eval mode (Python-level ``if self.training`` branches are frozen in a trace).
        drop_noop_casts: remove casts whose input already has the target dtype, and upcasts that a
            type-promoting elementwise op makes itself (bitwise the same result).

    Returns:
        An ``fx.GraphModule`` in eval mode whose parameters are stored in the dtype the plan
        reads them in (bfloat16/float16 for the weights of low ops); nothing in it wants grad.
        Where torch.fx cannot trace the model (Hugging Face transformers) and the package has the
        torch.export route, an :class:`ExportedInference` wrapping one (called as the model; the
        capture is specialised on the example inputs' shapes).

    Raises:
        ConfigError: the config's mode has no low dtype to convert to (``force_fp32``,
            ``must_keep_origin_dtype``), or ``plan_or_config`` is neither a plan nor a config.
        GraphError: the model does not trace (use the eager route), or the plan was made for
            another graph.
        PrecisionError: the mode cannot be honoured for this model.
    """
    if isinstance(plan_or_config, RunConfig):
        mode = plan_or_config.mode
        if isinstance(mode, (ForceFP32, MustKeepOriginDtype)):
            raise ConfigError(
                f"convert_for_inference: precision mode {mode.name!r} names no low dtype to convert to "
                "(every op keeps float32 or its origin dtype); use a mixed or force mode such as "
                "'allow_mix_precision_bf16' or 'force_bf16'")
    elif not isinstance(plan_or_config, CastPlan):
        raise ConfigError(f"convert_for_inference: expected a RunConfig or a CastPlan, got "
                          f"{type(plan_or_config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise GraphError(f"convert_for_inference: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)

    if traced is None:
        traced = _trace(model, example_inputs, kwargs)
    exported = None if isinstance(traced, TracedModel) else traced  # a torch.export capture (ExportTrace)
    inner: TracedModel = traced if exported is None else exported.traced
    if isinstance(plan_or_config, RunConfig):
        from precision_policy.api import plan as make_plan

        plan = make_plan(inner.graph, plan_or_config)
    else:
        plan = plan_or_config
    if plan.graph is not None and plan.graph.node_names != inner.graph.node_names:
        raise GraphError("convert_for_inference: the plan was made for another graph than this model traces to; "
                         "re-plan with precision_policy.torch.trace(model, ...)")
    stats = InferenceStats()
    stats.ops = len(plan.names)
    stats.low_ops = sum(1 for d in plan.dtype if d is not None and d in TO_TORCH and TO_TORCH[d] in _LOW)
    if stats.low_ops == 0:
        log.warning("convert_for_inference: the plan runs no op of %s in a 16-bit dtype; the converted model "
                    "computes as the original", type(model).__name__)

    if exported is None:
        gm = apply(model, plan, traced=inner)
        assert isinstance(gm, fx.GraphModule)  # an FX trace (not a torch.export one) rewrites to a GraphModule
        graph = fx.Graph()  # a copy owned by no module: it is rewritten to read attributes gm does not have
        graph.output(graph.graph_copy(gm.graph, {}))
        values = _graph_values(gm)  # target -> the original object (tensor, module, flag)
    else:
        from precision_policy.backends.torch import fx as fx_route

        native_fp16 = plan.config.get("float16") == "native"
        graph = fx_route._rewrite(inner, plan, native_fp16)
        values = dict(exported.root)
    folded: dict[tuple[str, torch.dtype], fx.Node] = {}
    low_values: dict[str, torch.Tensor] = {}
    taken = set(values)

    def low_name(target: str, dt: torch.dtype) -> str:
        base = f"{target}_{str(dt).replace('torch.', '')}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    # fold get_attr -> .to(dtype) into one stored copy per (tensor, dtype)
    for node in list(graph.nodes):
        if not (node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs):
            continue
        src, dt = node.args
        if not (isinstance(src, fx.Node) and src.op == "get_attr" and isinstance(dt, torch.dtype)):
            continue
        value = values.get(str(src.target))
        if not isinstance(value, torch.Tensor):
            continue
        key = (str(src.target), dt)
        hit = folded.get(key)
        if hit is None:
            name = low_name(str(src.target), dt)
            with torch.no_grad():
                low_values[name] = value.detach().to(dt)
            with graph.inserting_before(node):
                hit = graph.get_attr(name)
            folded[key] = hit
            stats.folded += 1
        node.replace_all_uses_with(hit)
        graph.erase_node(node)
    for node in list(graph.nodes):  # the float32 tensors no longer read
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)

    # the stored copies take the name of the float32 tensor they replace when it is no longer read
    used = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    modules = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    for (target, _), node in folded.items():
        inside_module = any(target.startswith(m + ".") for m in modules)
        if target not in used and not inside_module:
            old = str(node.target)
            low_values[target] = low_values.pop(old)
            node.target = target
            used.add(target)
            taken.discard(old)

    root: dict[str, Any] = {}
    leaf_copies: dict[int, torch.nn.Module] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        if target in root:
            continue
        if target in low_values:
            root[target] = torch.nn.Parameter(low_values[target], requires_grad=False)
            stats.low_params[target] = low_values[target].dtype
            continue
        value = values[target]
        if isinstance(value, torch.nn.Module):  # a leaf module (BatchNorm...): a copy, so eval() leaves the model alone
            if id(value) not in leaf_copies:
                leaf_copies[id(value)] = copy.deepcopy(value).requires_grad_(False)
            root[target] = leaf_copies[id(value)]
        elif isinstance(value, torch.nn.Parameter):  # a copy: training the model later leaves this one as converted
            root[target] = torch.nn.Parameter(value.detach().clone(), requires_grad=False)
        elif isinstance(value, torch.Tensor):
            root[target] = value.detach().clone()
        else:  # a flag such as ``attn.training`` (set by eval() below)
            root[target] = value

    if drop_noop_casts:
        stats.dropped, stats.promoted = _drop_noop_casts(
            graph, root, _placeholder_values(graph, model, example_inputs, kwargs, exported))
    graph.lint()
    converted = fx.GraphModule(root, graph, class_name=f"{type(model).__name__}Inference")
    out: torch.nn.Module = converted if exported is None else ExportedInference(converted, exported)
    out.eval()
    out.pp_inference_stats = stats  # type: ignore[assignment]  # Module.__setattr__'s stub admits tensors and modules only
    log.info("convert_for_inference(%s): %r", type(model).__name__, stats)
    return out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode while it is traced (``training`` flags read as Python bools, such as
    torchvision's ``stochastic_depth(x, p, "row", self.training)``, are frozen into the trace),
    its modules' flags put back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _trace(model: torch.nn.Module, example_inputs: tuple, kwargs: dict[str, Any] | None) -> Any:
    """The FX trace of the model in eval mode; where FX fails (Hugging Face models), the
    torch.export capture (when this version of the package has it)."""
    with _eval_mode(model):
        try:
            return _trace_fx(model, example_inputs, kwargs)
        except GraphError as fx_error:
            try:
                from precision_policy.backends.torch.export import trace_export
            except ImportError:
                raise fx_error from None
            log.info("convert_for_inference: FX could not trace %s (%s); capturing with torch.export",
                     type(model).__name__, fx_error)
            try:
                return trace_export(model, example_inputs, kwargs)
            except GraphError as export_error:
                raise GraphError(f"convert_for_inference: {type(model).__name__} could be captured neither by "
                                 f"torch.fx ({fx_error}) nor by torch.export ({export_error})") from None


def _trace_fx(model: torch.nn.Module, example_inputs: tuple, kwargs: dict[str, Any] | None) -> TracedModel:
    if kwargs and "kwargs" not in inspect.signature(trace_fx).parameters:
        raise GraphError(
            f"convert_for_inference: {type(model).__name__} takes keyword inputs ({', '.join(sorted(kwargs))}), "
            "which the FX tracer does not capture in this version; pass them positionally, or use the eager route "
            "(`with precision_policy.torch.precision(config, model=model): ...`)")
    try:
        if kwargs:
            return trace_fx(model, example_inputs, kwargs=kwargs)
        return trace_fx(model, example_inputs)
    except PrecisionPolicyError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a bad example input: a typed error that says what failed
        raise GraphError(f"convert_for_inference: could not trace {type(model).__name__}: "
                         f"{type(exc).__name__}: {exc}") from None


class ExportedInference(torch.nn.Module):
    """A converted torch.export capture, called as the model was (same positional and keyword
    inputs, same output structure: a Hugging Face ``ModelOutput``...).

    torch.export specialises the graph on the example inputs' shapes and non-tensor values:
    other shapes raise :class:`GraphError` (convert again for them).
    """

    def __init__(self, graph_module: fx.GraphModule, exported: Any) -> None:
        super().__init__()
        self.graph_module = graph_module
        self._in_spec = exported.in_spec
        self._out_spec = exported.out_spec
        self._defaults = dict(exported.defaults)
        self._order = list(exported.kwargs)
        self._shapes = dict(exported.shapes)
        self._n_mutated = len(exported.mutated)
        self._name = type(exported.traced.module).__name__
        self._n_args = len(exported.args)
        try:
            self._sig: inspect.Signature | None = inspect.signature(exported.traced.module.forward)
        except (TypeError, ValueError):
            self._sig = None

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def _flatten(self, args: tuple, kwargs: dict) -> tuple[list, Any]:
        kwargs = {**self._defaults, **kwargs}
        if set(kwargs) == set(self._order):
            kwargs = {k: kwargs[k] for k in self._order}  # the captured order: the same pytree spec
        return tree_flatten((args, kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = self._flatten(args, kwargs)
        if spec != self._in_spec and self._sig is not None:  # inputs given by position, captured by name...
            try:
                bound = dict(self._sig.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                bound = None
            if bound is not None:
                names = list(bound)
                leaves, spec = self._flatten(tuple(bound[n] for n in names[:self._n_args]),
                                             {n: bound[n] for n in names[self._n_args:]})
        if spec != self._in_spec:
            raise GraphError(f"{self._name} was converted for inputs structured as {self._in_spec}, called with {spec}")
        for i, (shape, dtype) in self._shapes.items():
            if tuple(leaves[i].shape) != shape or leaves[i].dtype != dtype:
                raise GraphError(f"{self._name} was converted (by torch.export) for input {i} of shape {shape} "
                                 f"and dtype {dtype}, called with {tuple(leaves[i].shape)}, {leaves[i].dtype}; "
                                 "convert again for these shapes")
        outs = self.graph_module(*leaves)
        return tree_unflatten(list(outs[self._n_mutated:]), self._out_spec)


def _placeholder_values(graph: fx.Graph, model: torch.nn.Module, example_inputs: tuple,
                        kwargs: dict[str, Any] | None, exported: Any) -> list[Any] | None:
    """The example value of every placeholder of ``graph``, in order (None when unknown)."""
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if exported is not None:
        leaves, _ = tree_flatten((exported.args, exported.kwargs))
        return leaves if len(leaves) == len(holders) else None
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    by_name = dict(zip(params, example_inputs)) | dict(kwargs or {})
    out = []
    for n in holders:
        key = str(n.target).lstrip("*")
        if key not in by_name:
            key = key.rsplit("_", 1)[0]
        if key in by_name:
            out.append(by_name[key])
        elif n.args:  # a concrete argument FX bound to its default
            out.append(n.args[0])
        else:
            return None
    return out


def _graph_values(gm: fx.GraphModule) -> dict[str, Any]:
    """Every get_attr/call_module target of ``gm`` -> the object it names (in the original model)."""
    out: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            if target not in out:
                out[target] = _fetch_attr(gm, target)
    return out


#: Elementwise ops whose kernels type-promote mixed float inputs (TensorIterator): ``x_bf16 + y_fp32``
#: upcasts ``x`` exactly and computes in float32, as an explicit ``x.to(float32)`` first would.
PROMOTING = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                       torch.div, torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
                       torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Tensor,
                       torch.ops.aten.div.Tensor})
_PROMOTING_METHODS = frozenset({"add", "sub", "mul", "div"})


def _drop_noop_casts(graph: fx.Graph, root: dict[str, Any], inputs: list[Any] | None) -> tuple[int, int]:
    """Remove ``x.to(dt)`` where ``x`` already has ``dt`` on the example inputs (dtype flow is static
    in a traced graph: the same ops on the same input dtypes give the same output dtypes), and
    upcasts that feed a type-promoting elementwise op (:data:`PROMOTING`) whose result dtype is
    the cast's dtype anyway (bitwise the same result, one memory pass less: autocast's kernels
    read such mixed inputs as they are). Returns (no-op casts, promoting upcasts) removed."""
    from torch.fx.passes.shape_prop import ShapeProp

    if inputs is None:
        return 0, 0
    gm = fx.GraphModule(root, copy.deepcopy(graph))
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001 - an optimisation only: keep every cast
        log.debug("no-op cast removal skipped: %s: %s", type(exc).__name__, exc)
        return 0, 0
    meta: dict[str, Any] = {}
    for n in gm.graph.nodes:
        m = n.meta.get("tensor_meta")
        if m is not None and hasattr(m, "dtype"):
            meta[n.name] = m
    dropped = 0
    for node in list(graph.nodes):
        if not (node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs):
            continue
        src, dt = node.args
        if isinstance(src, fx.Node) and isinstance(dt, torch.dtype) and src.name in meta and meta[src.name].dtype == dt:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            dropped += 1
    promoted = 0
    for node in list(graph.nodes):
        promoting = ((node.op == "call_function" and node.target in PROMOTING)
                     or (node.op == "call_method" and node.target in _PROMOTING_METHODS))
        if not promoting or len(node.args) != 2 or any(k != "alpha" for k in node.kwargs) or node.name not in meta:
            continue
        args = list(node.args)
        for k, a in enumerate(args):
            if not (isinstance(a, fx.Node) and a.op == "call_method" and a.target == "to" and len(a.args) == 2
                    and isinstance(a.args[0], fx.Node) and a.args[0].name in meta):
                continue
            src, dst = a.args[0], a.args[1]
            if not isinstance(dst, torch.dtype) or dst != meta[node.name].dtype or not _widens(meta[src.name].dtype, dst):
                continue
            other = args[1 - k]
            fakes = [_fake(meta[src.name]) if j == k else (_fake(meta[o.name]) if isinstance(o, fx.Node) and
                     o.name in meta else o) for j, o in enumerate(args)]
            if any(isinstance(f, fx.Node) for f in fakes):
                continue
            try:
                if torch.result_type(*fakes) != meta[node.name].dtype:
                    continue
            except (TypeError, RuntimeError):
                continue
            if isinstance(other, fx.Node) and other is a:
                continue  # x.to(fp32) * x.to(fp32): no float32 operand to promote to
            args[k] = src
            node.args = tuple(args)
            promoted += 1
            if not a.users:
                graph.erase_node(a)
    return dropped, promoted


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    return src in (torch.bfloat16, torch.float16) and dst in (torch.float32, torch.float64)


def _fake(m: Any) -> torch.Tensor:
    return torch.empty(tuple(m.shape), dtype=m.dtype, device="meta")
