"""torch.export route: capture models torch.fx cannot trace (Hugging Face transformers...).

:func:`precision_policy.torch.trace` tries the concrete FX trace first (see ``fx.py``), and
falls back to ``torch.export.export(model, args, kwargs, strict=False)`` when it fails. The
exported graph holds ATen ops at the level ``torch.autocast`` sees them (``aten.linear``,
``aten.layer_norm``, ``aten.scaled_dot_product_attention``: autocast's CPU lists are ATen ops),
and :func:`~precision_policy.backends.torch.ops.aten_op_type` gives them the op types the FX and
eager routes give the torch functions of the same names.

The capture is turned into a plain ``torch.fx`` graph over the model's own tensors:

* parameters and buffers (lifted to placeholders by export) become ``get_attr`` nodes on the
  model's attributes, so they are "Parameter" nodes that vote as in the FX route (0-dim ones
  included), and the applied module computes with the model's own float32 masters;
* tensor constants created in ``forward`` become ``get_attr`` nodes too;
* ``aten._assert_tensor_metadata`` checks (they pin the trace-time dtypes the plan changes) are
  dropped, and ``wrap_with_set_grad_enabled`` regions (``@torch.no_grad()`` helpers) are inlined
  between ``torch._C._set_grad_enabled`` calls.

Node names are module paths, from each node's ``nn_module_stack`` (as in the FX route).

``torch.export`` specialises a graph on the training flag and on the input shapes. The module
:func:`~precision_policy.torch.apply` returns (:class:`ExportedPrecision`) therefore captures,
plans (with the plan's configuration) and rewrites again, once, for each new ``(train()/eval(),
input shapes, non-tensor inputs)`` it is called with; it follows ``train()``/``eval()`` as the
original model does.

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.torch import trace, apply
    >>> class Scaled(torch.nn.Module):  # keyword inputs, a dict output
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(4, 4)
    ...     def forward(self, x, *, scale):
    ...         return {"y": self.fc(x) * scale}
    >>> model, x = Scaled(), torch.randn(2, 4)
    >>> graph = trace(model, kwargs={"x": x, "scale": torch.tensor(2.0)})
    >>> graph.node("fc").op_type, graph.node("fc.weight").op_type
    ('MatMulV2', 'Parameter')
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
    >>> fast = apply(model, pp.plan(graph, cfg))
    >>> out = fast(x=x, scale=torch.tensor(2.0))
    >>> out["y"].dtype, next(fast.parameters()) is model.fc.weight
    (torch.float32, True)
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
import sys
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from precision_policy.errors import GraphError
from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

#: ATen ops dropped from the captured graph: they assert trace-time dtypes the plan changes.
DROPPED_OPS = frozenset({torch.ops.aten._assert_tensor_metadata.default})

_EAGER_HINT = "Use the eager route instead: `with precision_policy.torch.precision(config, model=model): ...`"


@contextlib.contextmanager
def _flags_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Put back every module's training flag and every parameter's ``requires_grad``."""
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)


class ExportTrace:
    """What :func:`trace_export` captured: the runnable graph, its OpGraph, and how to call it.

    Attributes:
        traced: the :class:`~precision_policy.backends.torch.fx.TracedModel` (fx graph, OpGraph).
        root: qualified name -> tensor for every ``get_attr`` of the graph (the model's own
            parameters and buffers, and the tensor constants ``forward`` creates).
        in_spec / out_spec: the pytree specs of ``(args, kwargs)`` and of the output.
        constants: the non-tensor inputs the graph was specialised on, by flat position.
        shapes: (shape, dtype) of the tensor inputs, by flat position (the graph is specialised on them).
        mutated: buffer names the graph writes (its first outputs), in order.
        flags: every module's training flag when captured (``model.modules()`` order).
        args / kwargs: the example inputs (kept to capture again in the other mode).
        defaults: keyword inputs the capture added (``use_cache=False``), filled in at each call.
    """

    def __init__(self, traced: Any, root: dict[str, Any], in_spec: Any, out_spec: Any, constants: dict[int, Any],
                 shapes: dict[int, tuple], mutated: list[str], flags: tuple[bool, ...], args: tuple, kwargs: dict,
                 defaults: dict[str, Any]) -> None:
        self.traced = traced
        self.root = root
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.constants = constants
        self.shapes = shapes
        self.mutated = mutated
        self.flags = flags
        self.args = args
        self.kwargs = kwargs
        self.defaults = defaults

    @property
    def graph(self) -> Any:
        """The OpGraph (what :func:`precision_policy.plan` takes)."""
        return self.traced.graph

    def module(self) -> ExportedPrecision:
        """The captured program, run as it is (no casts): the model as torch.export sees it.

        Example:
            >>> import torch
            >>> model, x = torch.nn.Linear(4, 2), torch.randn(3, 4)
            >>> torch.equal(trace_export(model, (x,)).module()(x), model(x))
            True
        """
        return ExportedPrecision(self.traced.module, self, None, None)


@contextlib.contextmanager
def _outside_user_modes() -> Iterator[None]:
    """Capture as if nothing were active: no autocast, no torch function or dispatch mode (a capture
    the applied module makes on its first call in eval mode may run inside the caller's modes)."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode
    from torch.utils._python_dispatch import _disable_current_modes

    popped = []
    while _get_current_function_mode_stack():
        popped.append(_pop_mode())
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_disable_current_modes())
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        for mode in reversed(popped):
            _push_mode(mode)


def _quiet_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``torch.export.export(strict=False)``; a failing export prints its partial graph to stderr,
    which goes to this module's debug log instead (the GraphError says what failed)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception:
        if buffer.getvalue():
            log.debug("torch.export of %s printed:\n%s", type(model).__name__, buffer.getvalue())
        raise
    if buffer.getvalue():
        sys.stderr.write(buffer.getvalue())  # warnings of a capture that worked: where they would have gone
    return ep


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
    """``torch.export.export(strict=False)``; a model returning a KV cache is captured with
    ``use_cache=False`` when the caller did not set ``use_cache`` (the cache is no training output)."""
    name = type(model).__name__
    try:
        return _quiet_export(model, args, kwargs), {}
    except Exception as exc:  # noqa: BLE001 - any capture failure becomes a typed, explained error
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        if takes_cache and "use_cache" not in kwargs and "Cache" in str(exc) and "output" in str(exc):
            log.info("%s returns a KV cache torch.export cannot capture: capturing with use_cache=False", name)
            try:
                return _quiet_export(model, args, {**kwargs, "use_cache": False}), {"use_cache": False}
            except Exception as exc2:  # noqa: BLE001
                exc = exc2
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GraphError(f"torch.export could not capture {name}: {type(exc).__name__}: {first[:500]}. "
                         f"{_EAGER_HINT}") from None


def trace_export(model: torch.nn.Module, example_inputs: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
                 ) -> ExportTrace:
    """Capture ``model`` with ``torch.export`` on the example inputs and build its OpGraph.

    The model is left as it was: buffers, RNG state, training flags and ``requires_grad``.
    A model torch.export cannot capture gives a :class:`~precision_policy.errors.GraphError`.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
        >>> tr = trace_export(model, (torch.randn(2, 4),))
        >>> [(n.name, n.op_type) for n in tr.traced.graph]  # doctest: +NORMALIZE_WHITESPACE
        [('0.weight', 'Parameter'), ('0.bias', 'Parameter'), ('input', 'Placeholder'), ('0', 'MatMulV2'),
         ('1', 'Gelu')]
    """
    from precision_policy.backends.torch.fx import _model_state_unchanged, _to_opgraph

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = tuple(example_inputs), dict(kwargs or {})
    with _outside_user_modes(), _model_state_unchanged(model), _flags_unchanged(model):
        ep, defaults = _export(model, args, kwargs)
    kwargs = {**kwargs, **defaults}
    try:
        graph, root, concrete, mutated = _runnable_graph(ep, model)
        traced = _to_opgraph(model, graph, concrete)
    except GraphError:
        raise
    except Exception as exc:  # noqa: BLE001 - a graph this route cannot read: typed, explained
        raise GraphError(f"the torch.export graph of {type(model).__name__} could not be read: "
                         f"{type(exc).__name__}: {exc}. {_EAGER_HINT}") from None
    leaves, in_spec = tree_flatten((args, kwargs))
    if in_spec != ep.call_spec.in_spec:
        raise GraphError(f"torch.export flattened the inputs of {type(model).__name__} unlike pytree; {_EAGER_HINT}")
    constants = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
    shapes = {i: (tuple(v.shape), v.dtype) for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)}
    return ExportTrace(traced, root, in_spec, ep.call_spec.out_spec, constants, shapes, mutated, _flags(model),
                       args, kwargs, defaults)


def _runnable_graph(ep: Any, model: torch.nn.Module) -> tuple[fx.Graph, dict[str, Any], dict[fx.Node, Any], list[str]]:
    """The exported graph over the model's own tensors (see the module docstring)."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    kinds = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    concrete: dict[fx.Node, Any] = {}
    root: dict[str, Any] = {}
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))

    def copy(node: fx.Node, env: dict[fx.Node, Any], stack: Any = None) -> fx.Node:
        new = graph.node_copy(node, lambda n: env[n])
        if stack and not new.meta.get("nn_module_stack"):
            new.meta["nn_module_stack"] = stack
        if "val" in node.meta:
            concrete[new] = node.meta["val"]
        return new

    def inline(hop: fx.Node, env: dict[fx.Node, Any], owner: torch.nn.Module) -> list[Any]:
        """``wrap_with_set_grad_enabled(flag, submod, *args)``: its body, with grad mode set around it."""
        if hop.target is not torch.ops.higher_order.wrap_with_set_grad_enabled:
            raise GraphError(f"torch.export captured {type(model).__name__} with the higher-order op "
                             f"{hop.target}, which this route does not rewrite. {_EAGER_HINT}")
        flag, sub = hop.args[0], hop.args[1]
        assert isinstance(sub, fx.Node)  # the get_attr of the region's body
        operands = cast(list[fx.Node], list(hop.args[2:]))  # the region's inputs: values of the graph
        body = getattr(owner, str(sub.target))
        inner: dict[fx.Node, Any] = {}
        stack = hop.meta.get("nn_module_stack")
        prev = graph.call_function(torch.is_grad_enabled, ())
        graph.call_function(torch._C._set_grad_enabled, (flag,))
        outs: list[Any] = []
        k = 0
        for node in body.graph.nodes:
            if node.op == "placeholder":
                inner[node] = env[operands[k]]
                k += 1
            elif node.op == "output":
                outs = [inner[o] if isinstance(o, fx.Node) else o for o in tree_flatten(node.args[0])[0]]
            elif node.op == "get_attr" or (node.op == "call_function" and node.target in DROPPED_OPS):
                continue  # nested regions' bodies: inlined below
            elif node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
                inner[node] = inline(node, inner, body)
            elif node.op == "call_function" and node.target is operator.getitem and isinstance(
                    inner.get(node.args[0]), list):
                inner[node] = inner[node.args[0]][node.args[1]]
            else:
                inner[node] = copy(node, inner, stack)
        graph.call_function(torch._C._set_grad_enabled, (prev,))
        return outs

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = kinds.get(node.name)
            kind = spec.kind if spec is not None else InputKind.USER_INPUT
            if kind in (InputKind.PARAMETER, InputKind.BUFFER):
                assert spec is not None  # (no spec: a user input)
                target = str(spec.target)
                value = state.get(target)
                if value is None:  # a buffer that is no module attribute (should not happen): its exported value
                    value = ep.state_dict.get(target, ep.constants.get(target))
                root[target] = value
                new = graph.get_attr(target)
            elif kind == InputKind.CONSTANT_TENSOR:
                assert spec is not None  # (no spec: a user input)
                target = f"_pp_constant_{len(root)}"
                root[target] = ep.constants[spec.target]
                value = root[target]
                new = graph.get_attr(target)
            elif kind == InputKind.USER_INPUT:
                new = graph.placeholder(node.name)
                value = node.meta.get("val")
            else:
                raise GraphError(f"torch.export captured {type(model).__name__} with an input of kind {kind.name}, "
                                 f"which this route does not support. {_EAGER_HINT}")
            new.meta = dict(node.meta)
            concrete[new] = value
            env[node] = new
        elif node.op == "get_attr":
            continue  # higher-order ops' bodies: inlined
        elif node.op == "call_function" and node.target in DROPPED_OPS:
            continue
        elif node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            env[node] = inline(node, env, ep.graph_module)
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), list):
            env[node] = env[node.args[0]][node.args[1]]  # an element of an inlined region's outputs
        elif node.op == "output":
            outs = [env[o] if isinstance(o, fx.Node) else o for o in tree_flatten(node.args[0])[0]]
            graph.output(tuple(outs))
        else:
            env[node] = copy(node, env)
    mutated = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated.append(str(spec.target))
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise GraphError(f"torch.export captured {type(model).__name__} with an output of kind {spec.kind.name} "
                             f"(an input written in place?), which this route does not support. {_EAGER_HINT}")
    if sig.output_specs[:len(mutated)] != [s for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION]:
        raise GraphError(f"torch.export put the buffer updates of {type(model).__name__} after its outputs")
    graph.lint()
    return graph, root, concrete, mutated


class ExportedPrecision(torch.nn.Module):
    """The module :func:`~precision_policy.torch.apply` returns for a model captured by torch.export.

    Called as the model (same positional and keyword inputs), it returns the model's output
    structure (a Hugging Face ``ModelOutput``, a dict...). Its parameters, buffers and submodules
    are the model's own (same objects, same ``state_dict`` keys): an optimizer step through it
    trains the model, and ``train()``/``eval()`` reach the model. Each new (training flag, input
    shapes, non-tensor inputs) is captured and planned once, with the plan's configuration.
    With ``plan=None`` (and ``config=None``) it runs the captured program unchanged: what
    :meth:`ExportTrace.module` returns.
    """

    # kept in the instance __dict__ (see __init__), not registered with the Module
    _pp_model: torch.nn.Module
    _config: Any
    _native_fp16: bool
    _runs: dict[tuple, tuple[ExportTrace, fx.GraphModule]]
    plan: CastPlan | None

    def __init__(self, model: torch.nn.Module, trace: ExportTrace, plan: CastPlan | None, config: Any,
                 native_fp16: bool = False) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        # not a submodule (keys and parameters are the model's own), and no attribute a child could be named
        self.__dict__["_pp_model"] = model
        self.__dict__["_config"] = config
        self.__dict__["_native_fp16"] = native_fp16
        self.__dict__["_runs"] = {}
        self.training = model.training  # as the model, without touching its submodules' flags
        self._add_run(trace, plan)
        self.__dict__["plan"] = plan

    def train(self, mode: bool = True) -> ExportedPrecision:
        super().train(mode)
        if "_pp_model" in self.__dict__:
            self._pp_model.train(mode)
        return self

    def _key(self, trace_or_leaves: Any, training: tuple[bool, ...]) -> tuple:
        if isinstance(trace_or_leaves, ExportTrace):
            t = trace_or_leaves
            shapes = tuple(sorted(t.shapes.items()))
            consts = tuple(sorted((i, repr(v)) for i, v in t.constants.items()))
            return training, str(t.in_spec), shapes, consts
        leaves, spec = trace_or_leaves
        shapes = tuple((i, (tuple(v.shape), v.dtype)) for i, v in enumerate(leaves) if isinstance(v, torch.Tensor))
        consts = tuple((i, repr(v)) for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor))
        return training, str(spec), shapes, consts

    def _add_run(self, trace: ExportTrace, plan: CastPlan | None) -> Any:
        from precision_policy.backends.torch.fx import _rewrite

        if plan is None:  # the captured program as it is
            graph = fx.Graph()
            graph.output(graph.graph_copy(trace.traced.fx_graph, {}))
        else:
            graph = _rewrite(trace.traced, plan, self._native_fp16, per_use=True)
        gm = fx.GraphModule(trace.root, graph, class_name=f"{type(self._pp_model).__name__}Precision")
        run = (trace, gm)
        self._runs[self._key(trace, trace.flags)] = run
        return run

    def _capture(self, args: tuple, kwargs: dict) -> Any:
        import precision_policy as pp

        log.info("capturing %s again (%s mode, or new input shapes), planned with %s", type(self._pp_model).__name__,
                 "train" if self._pp_model.training else "eval", self._config)
        trace = trace_export(self._pp_model, args, kwargs)
        return self._add_run(trace, None if self._config is None else pp.plan(trace.traced.graph, self._config))

    @property
    def original_model(self) -> torch.nn.Module:
        """The model this module runs (its parameters, buffers and submodules are this module's)."""
        return self._pp_model

    def captured(self) -> ExportedPrecision:
        """The program the first capture recorded, run as it is (no casts): the reference the
        applied module's ops are compared with (run it under ``torch.autocast``)."""
        return next(iter(self._runs.values()))[0].module()

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph of the first capture (for ``print(m.graph_module.code)``)."""
        return next(iter(self._runs.values()))[1]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = next(iter(self._runs.values()))[0]
        kwargs = {**first.defaults, **kwargs}
        if kwargs.keys() == first.kwargs.keys():
            kwargs = {k: kwargs[k] for k in first.kwargs}  # the captured order: the same pytree spec
        leaves, spec = tree_flatten((args, kwargs))
        run = self._runs.get(self._key((leaves, spec), _flags(self._pp_model)))
        if run is None:
            run = self._capture(args, kwargs)
        trace, gm = run
        outs = gm(*leaves)
        k = len(trace.mutated)
        if k:
            with torch.no_grad():
                for name, value in zip(trace.mutated, outs[:k]):
                    trace.root[name].copy_(value)
        return tree_unflatten(list(outs[k:]), trace.out_spec)


def _flags(model: torch.nn.Module) -> tuple[bool, ...]:
    """Every module's training flag: what a capture is specialised on."""
    return tuple(m.training for m in model.modules())
