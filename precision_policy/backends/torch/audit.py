"""Runtime audit for PyTorch: which dtype every op *actually* ran in, against the plan.

:func:`audit` runs the model once on the eager route (``precision(config, model=model)``, what
``prepare()`` does) under two recorders: a TorchFunctionMode inside the precision mode that
brackets every torch call the eager route decides (so it knows the decision: the plan), and a
TorchDispatchMode below autograd that records every ATen op with the dtypes it executed with.
ATen ops that run while no torch call is open ran *outside* the precision mode (fused fast
paths, custom kernels, code under ``DisableTorchFunction``); they are grouped per module and
checked against what the policy would have decided for them.

Ops are named by module path as the eager route names them for ``keep_dtype`` lines (and as
the FX route names its nodes): the first op that runs directly in a module takes the module's
path (``encoder.0.fc2``), later ones ``path/op``, ``path/op_1``...

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.torch import audit
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
    >>> result = audit(model, (torch.randn(4, 8),), cfg)
    >>> [(r.name, r.planned, r.executed) for r in result.rows]
    [('0', 'bfloat16', 'bfloat16'), ('1', 'bfloat16', 'bfloat16'), ('2', 'bfloat16', 'bfloat16')]
    >>> result.mismatches()
    []
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from precision_policy import dtypes
from precision_policy.audit import EMULATED_NOTE, AuditResult, AuditRow, TensorStats
from precision_policy.backends.torch.eager import FAST_PATH_OPS, FROM_TORCH, decider_for, precision
from precision_policy.backends.torch.ops import aten_is_inplace, aten_op_type, func_label, op_type_of, writes_in_place
from precision_policy.config import RunConfig
from precision_policy.modes.decider import VARIABLE

_FLOATS = frozenset(FROM_TORCH)
#: ATen ops that convert or move data: the casts the precision route inserts, never compute.
CAST_OPS = frozenset({"_to_copy", "to", "copy", "copy_", "clone", "_to_dtype", "lift_fresh", "lift_fresh_copy",
                      "contiguous", "_copy_from", "_copy_from_and_resize", "alias", "empty_like", "zeros_like",
                      "ones_like", "resize_", "set_", "_unsafe_view", "_reshape_alias", "expand", "as_strided"})
FAST_PATH_TYPES = frozenset(op for op, _ in FAST_PATH_OPS.values())


def _aten_short(func: Any) -> str:
    schema = getattr(func, "_schema", None)
    name = str(schema.name) if schema is not None else str(func)
    return name.split("::", 1)[-1]


def _float_dtypes(values: Any) -> tuple[str, ...]:
    return tuple(FROM_TORCH[t.dtype] for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor) and t.dtype in _FLOATS)


def float_tensors(values: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor) and t.dtype in _FLOATS]


class OpNames:
    """Module-path names for the ops of one model, as the eager route gives them (see ``ModulePaths``).

    Process-wide module hooks keep the stack of this thread's running modules of ``model``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.thread = threading.get_ident()
        self.stack: list[str] = []
        self.first: set[str] = set()
        self.count: dict[str, int] = {}
        self._handles: list[Any] = []

    @property
    def path(self) -> str:
        return self.stack[-1] if self.stack else ""

    def name(self, label: str, path: str | None = None) -> str:
        path = self.path if path is None else path
        if path and path not in self.first:
            self.first.add(path)
            return path
        short = label.rpartition(".")[2]
        key = f"{path}/{short}" if path else short
        k = self.count.get(key, 0)
        self.count[key] = k + 1
        return key if k == 0 else f"{key}_{k}"

    def reset(self) -> None:
        self.first.clear()
        self.count.clear()

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None and threading.get_ident() == self.thread:
            if not self.stack and path == "":
                self.reset()
            self.stack.append(path)

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None and threading.get_ident() == self.thread and self.stack and self.stack[-1] == path:
            self.stack.pop()

    @contextlib.contextmanager
    def installed(self) -> Iterator[OpNames]:
        from torch.nn.modules import module as nn_module

        self._handles = [nn_module.register_module_forward_pre_hook(self._enter),
                         nn_module.register_module_forward_hook(self._leave, always_call=True)]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            self.stack.clear()


@dataclass
class AtenCall:
    """One ATen op as it executed: its float input and output dtypes."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    view: bool
    op_type: str | None

    @property
    def compute(self) -> str | None:
        """The dtype it computed in (its first float output, else its first float input); None for casts and views."""
        if self.view or self.name.split(".")[0] in CAST_OPS or self.op_type is None:
            return None
        if self.outputs:
            return self.outputs[0]
        return self.inputs[0] if self.inputs else None

    def __str__(self) -> str:
        return f"aten.{self.name}({', '.join(self.inputs)}) -> {', '.join(self.outputs) or '-'}"


@dataclass
class Unit:
    """One op of a run: a torch call the eager route decided, or ATen ops that ran outside it."""

    index: int
    name: str
    label: str
    op_type: str
    path: str
    record: Any = None  # the eager route's _OpRecord (its decision) when it decided this call
    escaped: bool = False  # ATen ops that ran with no torch call open: the precision mode never saw them
    aten: list[AtenCall] = field(default_factory=list)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    in_max_abs: float | None = None  # max |x| of its float inputs that are not the model's parameters or buffers
    out_stats: TensorStats | None = None
    grad_nodes: list[Any] = field(default_factory=list)
    voters: tuple[Any, ...] = ()  # escaped ops: how each input votes (as in a traced graph)
    fused: bool = False  # a fused fast path the eager route decided as one op
    plan_dtype: str | None = None  # the static route: the plan's compute dtype for this node

    @property
    def planned(self) -> str | None:
        if self.plan_dtype is not None:
            return self.plan_dtype
        return self.record.dtype if self.record is not None else None

    def executed(self) -> tuple[str | None, list[AtenCall]]:
        """The dtype the op computed in (the widest if its kernels disagree) and the kernels that computed."""
        calls = [a for a in self.aten if a.compute is not None]
        if not calls:
            return (self.outputs[0] if self.outputs else None), []
        kinds = {a.compute for a in calls if a.compute}
        if len(kinds) == 1:
            return next(iter(kinds)), calls
        widest = max((k for k in kinds if k), key=lambda d: dtypes.rank(d) if dtypes.is_known(d) else 0)
        return widest, calls


class _Records(list):
    """The eager route's record list: notes which unit (or none: a fused fast path) each decision belongs to."""

    def __init__(self, tape: Tape) -> None:
        super().__init__()
        self.tape = tape

    def append(self, rec: Any) -> None:
        super().append(rec)
        self.tape._decided(rec)


class _AtenTape(TorchDispatchMode):
    """Records every ATen op with its dtypes, for the tape's open unit (or as escaped)."""

    def __init__(self, tape: Tape) -> None:
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tape = self.tape
        if tape.quiet or threading.get_ident() != tape.thread:
            return out
        name = _aten_short(func)
        if name.split(".")[0] in ("sym_size", "sym_stride", "sym_numel", "_local_scalar_dense", "detach", "alias"):
            return out
        ins = _float_dtypes((args, kwargs))
        if not ins:
            return out  # factories, integer ops: nothing a precision mode acts on
        try:
            op_type = aten_op_type(func)
        except Exception:  # noqa: BLE001 - an op the alias table cannot name: recorded, not typed
            op_type = None
        view = bool(getattr(func, "is_view", False))
        call = AtenCall(name, ins, _float_dtypes(out), view, op_type)
        if tape.current is not None:
            tape.current.aten.append(call)
        elif not view and name.split(".")[0] not in CAST_OPS and op_type is not None and not aten_is_inplace(func):
            tape._escaped(call, args, kwargs)
        return out


class Tape(TorchFunctionMode):
    """Records the ops of a run in execution order (see the module docstring).

    Enter it *inside* ``precision(...)`` so that it sees each call before the precision mode
    casts it and gets the mode's decision back. ``stats_dtype``: also count each op's output
    values against that dtype (for overflow localization and range statistics); ``grads``:
    collect each op's autograd nodes (for backward localization).
    """

    def __init__(self, names: OpNames, *, stats_dtype: str | None = None, grads: bool = False,
                 model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.names = names
        self.stats_dtype = stats_dtype
        self.grads = grads
        self.units: list[Unit] = []
        self.current: Unit | None = None
        self.quiet = False
        self.thread = threading.get_ident()
        self.records = _Records(self)
        self._state_ids = {id(t) for t in (*model.parameters(), *model.buffers())} if model is not None else set()
        self._pending: list[Unit] = []  # escaped units since the last decision (a fast path claims them)

    # -- the eager route's decisions
    def _decided(self, rec: Any) -> None:
        unit = self.current
        if unit is not None:
            if unit.record is None:
                unit.record = rec
            return
        if rec.op_type in FAST_PATH_TYPES:  # a fused fast path: its ATen ops ran with no torch call open
            path = self.names.path
            mine = [u for u in self._pending if u.path == path or u.path.startswith(path + ".") or not path]
            name = mine[0].name if mine else self.names.name(rec.label)  # the module's path, as its first op
            unit = Unit(len(self.units), name, rec.label, rec.op_type, path, rec, fused=True)
            for u in mine:
                unit.aten += u.aten
                self.units.remove(u)
            unit.outputs = tuple(rec.out_dtypes)
            self.units.append(unit)
            for i, u in enumerate(self.units):
                u.index = i
        self._pending.clear()

    def _escaped(self, call: AtenCall, args: Any, kwargs: Any) -> None:
        path = self.names.path
        last = self._pending[-1] if self._pending else None
        if last is not None and self.units and self.units[-1] is last and last.path == path:
            last.aten.append(call)  # one escaped op per run of ATen ops in one module
            return
        unit = Unit(len(self.units), self.names.name(call.name.split(".")[0], path), f"aten.{call.name}",
                    call.op_type or f"torch:aten.{call.name}", path, escaped=True)
        unit.aten.append(call)
        leaves = float_tensors((args, kwargs))
        unit.inputs = call.inputs
        unit.outputs = call.outputs
        unit.voters = tuple(VARIABLE if id(t) in self._state_ids and t.dim() > 0 else (id(t) not in self._state_ids)
                            for t in leaves)
        self.units.append(unit)
        self._pending.append(unit)

    # -- statistics (computed with this tape and every torch function mode out of the way)
    @contextlib.contextmanager
    def _silent(self) -> Iterator[None]:
        self.quiet = True
        try:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                yield
        finally:
            self.quiet = False

    def _stats(self, unit: Unit, leaves: list[torch.Tensor], out: Any) -> None:
        assert self.stats_dtype is not None
        with self._silent():
            acts = [t for t in leaves if id(t) not in self._state_ids] or leaves  # activations, not weights
            if acts:
                unit.in_max_abs = max(float(t.detach().abs().float().nan_to_num(0.0, 0.0, 0.0).max()) if t.numel() else 0.0
                                      for t in acts)
            s = TensorStats(self.stats_dtype)
            for t in float_tensors(out):
                s.add(t.detach().float().cpu().numpy())
            unit.out_stats = s

    def _grad_nodes(self, unit: Unit, leaves: list[torch.Tensor], out: Any) -> None:
        stop = {t.grad_fn for t in leaves if t.grad_fn is not None}
        todo: list[Any] = [t.grad_fn for t in float_tensors(out) if t.grad_fn is not None]
        seen: set[Any] = set()
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in stop or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(node)
            unit.grad_nodes.append(node)
            todo += [n for n, _ in node.next_functions]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.quiet or threading.get_ident() != self.thread:
            return func(*args, **kwargs)
        op = op_type_of(func)
        if op is None or op == "Cast" or writes_in_place(kwargs):
            return func(*args, **kwargs)
        leaves = float_tensors((args, kwargs))
        if not leaves:
            return func(*args, **kwargs)
        label = func_label(func)
        unit = Unit(len(self.units), self.names.name(label), label, op, self.names.path)
        unit.inputs = tuple(FROM_TORCH[t.dtype] for t in leaves)
        self._pending.clear()
        outer, self.current = self.current, unit
        try:
            out = func(*args, **kwargs)
        finally:
            self.current = outer
        unit.outputs = _float_dtypes(out)
        if self.stats_dtype is not None:
            self._stats(unit, leaves, out)
        if self.grads and torch.is_grad_enabled():
            self._grad_nodes(unit, leaves, out)
        self.units.append(unit)
        return out


@contextlib.contextmanager
def recording(model: torch.nn.Module, config: RunConfig | None, *, stats_dtype: str | None = None, grads: bool = False,
              aten: bool = True, names: OpNames | None = None) -> Iterator[Tape]:
    """Run the enclosed code under ``config``'s precision mode (None: as the model is) with a :class:`Tape`."""
    names = names or OpNames(model)
    tape = Tape(names, stats_dtype=stats_dtype, grads=grads, model=model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(names.installed())
        if config is not None:
            stack.enter_context(precision(config, model=model, record=tape.records))
        stack.enter_context(tape)
        if aten:
            stack.enter_context(_AtenTape(tape))
        yield tape


@contextlib.contextmanager
def unprepared(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with a ``prepare()``'d forward taken off for the block (the audit applies the config itself)."""
    original = model.__dict__.get("_pp_original_forward")
    prepared = model.__dict__.get("forward")
    if original is None or prepared is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = prepared


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)


def _compare(unit: Unit, config: RunConfig, decider: Any) -> AuditRow:
    executed, calls = unit.executed()
    detail = [str(a) for a in unit.aten]
    kernels = ", ".join(sorted({f"aten.{a.name.split('.')[0]}" for a in calls})) or None
    native = config.native_fp16
    if unit.escaped:
        choice = decider.decide_node(unit.name, unit.op_type, "float32", unit.inputs, unit.voters or (True,) * len(unit.inputs),
                                     ("float32",))
        planned = choice.dtype
        row = AuditRow(unit.name, unit.op_type, planned, executed, kernel=kernels, detail=detail,
                       note="ran outside the precision mode")
        if executed is not None and executed != planned:
            row.mismatch = (f"planned {planned}, ran {executed}: ran outside the precision mode ({kernels}: a fused or "
                            f"custom kernel, or code under DisableTorchFunction, that the eager route never saw)")
        return row
    planned = unit.planned
    row = AuditRow(unit.name, unit.op_type, planned, executed, kernel=kernels, detail=detail)
    if planned is None or executed is None:
        row.note = "not decided by the precision mode" if planned is None else "no float computation"
        return row
    fast = unit.fused
    if planned == "float16" and not native:
        row.note = EMULATED_NOTE
        if unit.plan_dtype is None and unit.outputs and "float16" not in unit.outputs and executed != "float16":
            row.mismatch = (f"planned float16 (emulated), but the outputs ({', '.join(unit.outputs)}) were not "
                            f"rounded to float16")
        elif executed not in ("float32", "float16"):
            row.mismatch = f"planned float16 (emulated: float32 compute), ran {executed} ({kernels})"
        return row
    if executed != planned:
        culprits = ", ".join(sorted({f"aten.{a.name.split('.')[0]}" for a in calls if a.compute == executed}))
        rest = sorted({a.compute for a in calls if a.compute and a.compute != executed})
        part = f" in part ({culprits}; the rest in {', '.join(rest)})" if rest else f" ({culprits})"
        if fast:
            row.mismatch = f"planned {planned}, ran {executed}: fused fast path ran in {executed}{part}"
        else:
            row.mismatch = f"planned {planned}, ran {executed}: the kernel computed in {executed}{part}"
    elif fast:
        row.note = "fused fast path"
    return row


def _audit_fx(model: torch.nn.Module, inputs: Any, config: RunConfig) -> tuple[list[Unit], str]:
    """The static route: trace, plan, rewrite with torch.fx, and run the rewritten module node by node."""
    import torch.fx as fx

    from precision_policy.api import plan as make_plan
    from precision_policy.backends.torch.fx import _TRACES, apply, trace
    from precision_policy.errors import GraphError

    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (
        ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)), None)
    graph = trace(model, args, kwargs, route="fx")
    plan = make_plan(graph, config)
    gm = apply(model, plan)
    if not isinstance(gm, fx.GraphModule):  # pragma: no cover - route="fx" gives a GraphModule
        raise GraphError("the static audit needs a model torch.fx traces")
    names = {n.name: op for n, op in _TRACES[graph].op_node.items()}
    tape = Tape(OpNames(model), model=model)

    class _Run(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            op = names.get(n.name)
            if op is None:
                return super().run_node(n)
            d = plan[op]
            unit = Unit(len(tape.units), op, str(n.target), d.op_type, "", plan_dtype=d.dtype)
            tape.current = unit
            try:
                out = super().run_node(n)
            finally:
                tape.current = None
            unit.outputs = _float_dtypes(out)
            tape.units.append(unit)
            return out

    with _AtenTape(tape):
        _Run(gm).run(*args, *(kwargs or {}).values())
    return tape.units, plan.summary()


def audit(model: torch.nn.Module, inputs: Any, config: RunConfig, *, route: str = "eager", source: str = "") -> AuditResult:
    """Run ``model`` once on ``inputs`` under ``config`` and compare every op's executed dtypes with its decision.

    ``inputs``: a tuple of positional arguments, a dict of keyword arguments or one tensor. The
    model runs on the eager route as ``prepare()`` runs it (a model already prepared runs with
    ``config`` instead of its own); ``route="fx"`` audits the static route instead: the model is
    traced with torch.fx, planned and rewritten (:func:`~precision_policy.torch.apply`), and each
    FX node's ATen ops are compared with the plan's node. Returns an :class:`~precision_policy.audit.AuditResult`: one row
    per op (planned dtype, executed dtype, mismatch in words or None, note), ``table()`` for
    people and ``to_json(path)`` for the report (AUDIT.json). Emulated float16 (float16 storage,
    float32 compute) is expected, not a mismatch: its note says so. The model's state is not
    changed except as one forward changes it (BatchNorm statistics in train mode).
    """
    if route not in ("eager", "fx"):
        raise ValueError(f"route must be 'eager' or 'fx', not {route!r}")
    decider = decider_for(config)
    notes = []
    with unprepared(model):
        if route == "fx":
            units, summary = _audit_fx(model, inputs, config)
            notes.append(f"static route (torch.fx): {summary}")
        else:
            with recording(model, config) as tape:
                _call(model, inputs)
            units = tape.units
    rows = [_compare(u, config, decider) for u in units]
    src = source or f"torch {torch.__version__}, {type(model).__name__}, {config.mode.name}, {route} route"
    if any(u.escaped for u in units):
        notes.append("ops marked 'ran outside the precision mode' are checked against what the mode would decide for them")
    return AuditResult(rows, src, notes=notes)


__all__ = ["OpNames", "Tape", "Unit", "audit", "recording", "unprepared"]
