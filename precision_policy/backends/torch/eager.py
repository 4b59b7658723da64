"""Eager application: a TorchFunctionMode that applies a precision mode op by op.

It sits above autograd, so ``loss.backward()`` differentiates through the casts it
inserts, and works on any module, traceable or not. Every decision comes from the
core's :class:`~precision_policy.modes.decider.NodeDecider` (white -> low, black ->
origin, gray -> the dtype of its computed inputs); this module only casts.

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.torch import precision
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
    >>> with precision(cfg):
    ...     y = model(torch.randn(4, 8))
    >>> y.dtype
    torch.bfloat16
"""

from __future__ import annotations

import difflib
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from precision_policy.backends.torch.ops import func_label, op_type_of, writes_in_place
from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, OverrideError, PrecisionError
from precision_policy.modes.decider import VARIABLE, NodeDecider
from precision_policy.opinfo.library import Library
from precision_policy.opinfo.overrides import ENV_PREFIX
from precision_policy.reasons import render
from precision_policy.rules import Rule, Why

_state = threading.local()

TO_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
FROM_TORCH = {v: k for k, v in TO_TORCH.items()}
_FLOATS = frozenset(TO_TORCH.values())


def _busy() -> bool:
    return getattr(_state, "busy", False)


class _OpRecord:
    """One intercepted call, for tests and reports."""

    __slots__ = ("label", "op_type", "dtype", "why", "out_dtypes", "name")

    def __init__(self, label: str, op_type: str, dtype: str, why: Why, out_dtypes: tuple, name: str = "") -> None:
        self.label = label
        self.why = why  # the decider's structured reason: what tests and tools read
        self.name = name or label  # the module path naming the op when by-name overrides are in force
        self.op_type = op_type
        self.dtype = dtype
        self.out_dtypes = out_dtypes

    @property
    def rule(self) -> Rule:
        return self.why.rule

    @property
    def reason(self) -> str:
        """The decision in words (for people)."""
        return render(self.why, self.dtype)

    def __repr__(self) -> str:
        return f"{self.label}[{self.op_type}] {self.dtype} -> {self.out_dtypes}  ({self.reason})"


class PrecisionFunctionMode(TorchFunctionMode):
    """Casts the float inputs of every mapped torch call to the dtypes the decider chooses.

    ``native_fp16=False`` (the default on CPU) emulates float16: tensors are stored as
    float16, so values are rounded at every op boundary, but the op computes in float32.
    """

    def __init__(
        self,
        decider: NodeDecider | None,
        *,
        native_fp16: bool = False,
        origin: str = "float32",
        record: list | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.decider = decider
        self.native_fp16 = native_fp16
        self.origin = origin
        self.record = record
        self._ops: dict[Any, str | None] = {}
        self._weights: dict[tuple[int, torch.dtype], tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._torch_dtypes = dict(TO_TORCH)
        # (func, origin, input dtypes, voters) -> decision; shared by the contexts of one RunConfig
        # (see _shared_decisions), and keys whose decision warned or named an unknown op, which
        # are decided afresh in every context so that each context's decider reports them
        self._decisions: dict[tuple, tuple] = {}
        self._noisy: set[tuple] = set()
        # With the model known, every tensor but its parameters and buffers votes for gray ops
        # (graph inputs included), and parameters and buffers vote as variables (where torch's
        # type promotion counts them), exactly as in a traced graph. Without it, tensors that a
        # computation produced vote, and leaves that want grad vote as variables.
        self._state_ids: dict[int, Any] | None = None  # id -> its vote (parameters and buffers)
        if model is not None:
            self._state_ids = _model_facts(model)[0]
        # by-name overrides (keep_dtype / customize_dtypes naming module paths) need to know which
        # module is running: only then are module hooks installed (see ModulePaths)
        self._names: ModulePaths | None = None
        if decider is not None and decider.by_name:
            if model is None:
                raise ConfigError(
                    "keep_dtype/customize_dtypes name ops by module path (e.g. 'layer1.0.conv1'), so the eager "
                    "route must know the model: use precision(config, model=model) or prepare(model, ...)")
            self._names = ModulePaths(model, decider)
        self.model = model

    def clear_cache(self) -> None:
        """Forget the low-precision copies of parameters (done when the context exits)."""
        self._weights.clear()

    def raise_problems(self) -> None:
        """Raise PrecisionError for what the decider could not honour (and forget it)."""
        decider = self.decider
        assert decider is not None  # called only after a decision, which needs the decider
        problems = list(decider.problems)
        decider.problems.clear()
        raise PrecisionError(
            "precision mode cannot be honoured: " + "; ".join(f"{n} ({o}): {detail}" for n, o, detail in problems),
            problems,
        )

    def _cast(self, t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        if t.is_leaf and t.requires_grad:
            # parameters stay float32 masters; their copies are reused until they change
            key = (id(t), dt)
            hit = self._weights.get(key)
            if hit is not None and hit[0] == t._version and hit[1] is t:
                return hit[2]
            out = t.to(dt)
            self._weights[key] = (t._version, t, out)
            return out
        return t.to(dt)

    def _fast(self, func, op, args, kwargs, found):
        """__torch_function__ for calls whose float tensors are arguments or elements of list/tuple
        arguments (see :func:`_float_leaves`), when decisions do not depend on module paths."""
        if not found:
            return func(*args, **kwargs)
        origin = self.origin
        state_ids = self._state_ids
        in_dtypes = []
        voters = []
        for _, _, leaf in found:
            dt = leaf.dtype
            in_dtypes.append(dt)
            if state_ids is not None:
                voters.append(state_ids.get(id(leaf), True))
            elif leaf.grad_fn is not None or getattr(leaf, "_pp_computed", False):
                voters.append(True)
            else:  # a parameter (a leaf that wants grad) votes as a variable, as in a trace
                voters.append(VARIABLE if leaf.requires_grad and leaf.dim() > 0 else False)
            if dt is torch.float64:
                origin = "float64"
        key = (func, origin, tuple(in_dtypes), tuple(voters))
        hit = self._decisions.get(key)
        if hit is None:
            hit = self._decide(func, op, origin, in_dtypes, voters)
        label, d, why, want, emulate = hit
        if want is not None:
            args, kwargs = self._cast_inputs(args, kwargs, found, want, in_dtypes)
        out = self._run(func, args, kwargs, emulate)
        if self.record is not None:
            self.record.append(_OpRecord(label, op, d, why, _out_dtypes(out), label))
        return out

    def _run(self, func: Any, args: Any, kwargs: dict, emulate: bool) -> Any:
        """Call ``func`` on its cast inputs, shielded from this mode; store emulated float16 outputs
        as float16; without the model, mark outputs as computed (they vote for gray ops)."""
        _state.busy = True
        try:
            out = func(*args, **kwargs)
        finally:
            _state.busy = False
        if emulate:
            out = _to_dtype(out, torch.float32, torch.float16)
        if self._state_ids is None and not torch.is_grad_enabled():
            _mark_computed(out)
        return out

    def _decide(self, func, op, origin, in_dtypes, voters):
        label = func_label(func)
        names = tuple(FROM_TORCH[dt] for dt in in_dtypes)
        decider = self.decider
        assert decider is not None  # __torch_function__ passes calls through when there is none
        n_warnings = len(decider.warnings)
        choice = decider.decide_node(
            label, op, origin, names, tuple(voters), (origin,), producers=("its input",) * len(names))
        d, why, want_in = choice.dtype, choice.why, choice.inputs
        if decider.problems:
            self.raise_problems()  # not cached: raised on every call, as the general path does
        key = (func, origin, tuple(in_dtypes), tuple(voters))
        if len(decider.warnings) != n_warnings or op not in decider._known:
            self._noisy.add(key)
        emulate = d == "float16" and not self.native_fp16
        want = tuple("emulated" if emulate and w == "float16" else (self._torch_dtypes[w] if w != have else None)
                     for w, have in zip(want_in, names))
        hit = (label, d, why, want if any(w is not None for w in want) else None, emulate)
        if key not in self._noisy:
            try:
                self._decisions[key] = hit
            except TypeError:  # an unhashable callable
                pass
        return hit

    def _cast_inputs(self, args, kwargs, found, want, in_dtypes):
        """Replace the float inputs that ``want`` casts: one cast per (tensor, dtype) per call, as
        autocast's cast cache (mha(x, x, x) keeps ``query is key``)."""
        casts: dict[tuple[int, Any], torch.Tensor] = {}  # (id(tensor), dtype or "emulated") -> the cast copy
        args = list(args)
        kwargs = dict(kwargs)
        nested = {}
        for (where, j, leaf), w, have in zip(found, want, in_dtypes):
            if w is None:
                continue
            key = (id(leaf), w)
            new = casts.get(key)
            if new is None:
                if w == "emulated":
                    low = leaf if have is torch.float16 else self._cast(leaf, torch.float16)
                    new = low.to(torch.float32)
                else:
                    new = self._cast(leaf, w)
                casts[key] = new
            if j is not None:  # an element of a list/tuple argument (torch.cat([a, b]))
                if where not in nested:
                    src = args[where] if isinstance(where, int) else kwargs[where]
                    nested[where] = (type(src), list(src))
                nested[where][1][j] = new
            elif isinstance(where, int):
                args[where] = new
            else:
                kwargs[where] = new
        for where, (typ, items) in nested.items():
            if isinstance(where, int):
                args[where] = typ(items)
            else:
                kwargs[where] = typ(items)
        return tuple(args), kwargs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901 - the hot path, kept flat
        kwargs = kwargs or {}
        if _busy():
            return func(*args, **kwargs)
        if self.decider is None:  # precision(enabled=False): shield the call from outer contexts
            _state.busy = True
            try:
                return func(*args, **kwargs)
            finally:
                _state.busy = False
        try:
            op = self._ops[func]
        except (KeyError, TypeError):
            op = op_type_of(func)
            try:
                self._ops[func] = op
            except TypeError:
                pass
        if op is None or op == "Cast" or writes_in_place(kwargs):
            # in-place and ``out=`` calls keep the dtype of the tensor they write into, as under
            # autocast: type promotion computes them in the wider dtype, and casting the target
            # would write into a copy
            return func(*args, **kwargs)
        if self._names is None:
            found = _float_leaves(args, kwargs)
            if found is not None:  # flat arguments (all but a few calls): no pytree, decisions cached per call shape
                return self._fast(func, op, args, kwargs, found)
        flat, spec = tree_flatten((args, kwargs))
        pos: list[int] = []
        in_dtypes: list[str] = []
        voters: list[bool | str] = []  # True, False or VARIABLE (see NodeDecider.decide_node)
        origin = self.origin
        for k, leaf in enumerate(flat):
            if isinstance(leaf, torch.Tensor) and leaf.dtype in _FLOATS:
                name = FROM_TORCH[leaf.dtype]
                pos.append(k)
                in_dtypes.append(name)
                if self._state_ids is not None:
                    if id(leaf) not in self._state_ids:
                        voters.append(True)
                    else:  # parameters and buffers vote as torch's type promotion counts them
                        voters.append(VARIABLE if leaf.dim() > 0 else False)
                elif leaf.grad_fn is not None or getattr(leaf, "_pp_computed", False):
                    voters.append(True)
                else:  # a parameter (a leaf that wants grad) votes as a variable, as in a trace
                    voters.append(VARIABLE if leaf.requires_grad and leaf.dim() > 0 else False)
                if name == "float64":
                    origin = "float64"
        if not pos:
            return func(*args, **kwargs)
        label = func_label(func)
        name = label if self._names is None else self._names.op_name(label)
        choice = self.decider.decide_node(
            name, op, origin, tuple(in_dtypes), tuple(voters), (origin,), producers=("its input",) * len(pos)
        )
        d, want_in = choice.dtype, choice.inputs
        if self.decider.problems:
            self.raise_problems()
        emulate = d == "float16" and not self.native_fp16
        changed = False
        tdt = self._torch_dtypes
        # one cast per (tensor, dtype) per call, as autocast's cast cache: mha(x, x, x) keeps
        # ``query is key`` and takes the packed self-attention projection
        casts: dict[tuple[int, str], torch.Tensor] = {}
        for m, k in enumerate(pos):
            want = want_in[m]
            leaf = flat[k]
            if emulate and want == "float16":
                key = (id(leaf), "emulated")
                if key not in casts:
                    low = leaf if in_dtypes[m] == "float16" else self._cast(leaf, torch.float16)
                    casts[key] = low.to(torch.float32)
                flat[k] = casts[key]
                changed = True
            elif want != in_dtypes[m]:
                key = (id(leaf), want)
                if key not in casts:
                    casts[key] = self._cast(leaf, tdt[want])
                flat[k] = casts[key]
                changed = True
        if changed:
            args, kwargs = tree_unflatten(flat, spec)
        out = self._run(func, args, kwargs, emulate)
        if self.record is not None:
            self.record.append(_OpRecord(label, op, d, choice.why, _out_dtypes(out), name))
        return out


_Tensor = torch.Tensor
_SEQ = (list, tuple, torch.Size)


def _float_leaves(args: tuple, kwargs: dict) -> list | None:
    """The float tensors of a call as ``(arg index or kwarg name, index in a list/tuple argument or
    None, tensor)``, in ``tree_flatten`` order; None when a tensor sits deeper (the general path)."""
    found: list[tuple[int, int | None, torch.Tensor]] = []
    i = -1
    for a in args:
        i += 1
        ta = type(a)
        if ta is int or ta is float or ta is bool or a is None:
            continue
        if isinstance(a, _Tensor):
            if a.dtype in _FLOATS:
                found.append((i, None, a))
        elif ta in _SEQ:
            for j, e in enumerate(a):
                if isinstance(e, _Tensor):
                    if e.dtype in _FLOATS:
                        found.append((i, j, e))
                elif isinstance(e, (list, tuple, dict)):
                    return None
        elif isinstance(a, (list, tuple, dict)):  # a namedtuple, a dict...
            return None
    for k, a in kwargs.items():
        if isinstance(a, _Tensor):
            if a.dtype in _FLOATS:
                found.append((k, None, a))
        elif isinstance(a, (list, tuple, dict)):
            return None
    return found


def _to_dtype(out: Any, src: torch.dtype, dst: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dst) if out.dtype == src else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_dtype(o, src, dst) for o in out) if not hasattr(out, "_fields") else type(out)(
            *(_to_dtype(o, src, dst) for o in out)
        )
    return out


def _mark_computed(out: Any) -> None:
    if isinstance(out, torch.Tensor):
        try:
            out._pp_computed = True  # type: ignore[attr-defined]  # a marker set on the tensor object
        except (AttributeError, RuntimeError):
            pass
    elif isinstance(out, (tuple, list)):
        for o in out:
            _mark_computed(o)


def _out_dtypes(out: Any) -> tuple:
    if isinstance(out, torch.Tensor):
        return (FROM_TORCH.get(out.dtype, str(out.dtype).replace("torch.", "")),)
    if isinstance(out, (tuple, list)):
        return tuple(d for o in out for d in _out_dtypes(o))
    return ()


class ModulePaths:
    """Names the eager route's ops by module path, as the FX route names its nodes.

    The first op that runs directly in a module (not in one of its submodules) in a forward is
    named by the module's path (``layer1.0.conv1``), as the FX node of that op is; later ops of
    the same module get ``path/op_k`` names. The names are what ``keep_dtype`` and
    ``customize_dtypes`` lines match. While installed, process-wide module hooks keep a stack of
    the running modules (only this thread's calls of this model's modules count; per-module hooks
    would switch off the fused fast paths of ``nn.TransformerEncoderLayer``).

    Names that are no module path of the model raise :class:`OverrideError` at once; names that
    matched no op once a forward has run raise it then (:meth:`check_matched`), naming the closest.
    """

    #: model -> override names matched by an op in any forward so far (a name only some forwards reach)
    _matched: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module, decider: NodeDecider) -> None:
        self.model = model
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.thread = threading.get_ident()
        self.stack: list[str] = []
        self.first: set[str] = set()
        self.count: dict[str, int] = {}
        self.seen: set[str] = set()
        ov = decider.overrides
        self.wanted: dict[str, str] = dict(ov.keep_names)
        self.wanted.update({name: spec.where for name, spec in ov.custom_names.items()})
        modules = set(self.paths.values())
        for name, where in self.wanted.items():
            if name.partition("/")[0] not in modules:
                raise _unmatched(name, where, model, sorted(p for p in modules if p),
                                 "is no module path")
        self._handles: list[Any] = []

    def install(self) -> None:
        from torch.nn.modules import module as nn_module

        self._handles = [nn_module.register_module_forward_pre_hook(self._enter),
                         nn_module.register_module_forward_hook(self._leave, always_call=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        path = self.paths.get(id(module))
        if path is None or threading.get_ident() != self.thread:
            return
        if not self.stack and path == "":  # a new forward of the model: first ops are named afresh
            self.first.clear()
            self.count.clear()
        self.stack.append(path)

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        path = self.paths.get(id(module))
        if path is None or threading.get_ident() != self.thread or not self.stack:
            return
        if self.stack[-1] == path:
            self.stack.pop()

    def op_name(self, label: str) -> str:
        """The name of the op ``label`` now running (see the class docstring)."""
        path = self.stack[-1] if self.stack else ""
        if path and path not in self.first:
            self.first.add(path)
            name = path
        else:
            short = label.rpartition(".")[2]
            key = f"{path}/{short}" if path else short
            k = self.count.get(key, 0)
            self.count[key] = k + 1
            name = key if k == 0 else f"{key}_{k}"
        self.seen.add(name)
        return name

    def check_matched(self) -> None:
        """After a forward: every by-name override must have matched an op of some forward."""
        matched = self._matched.setdefault(self.model, set())
        matched.update(n for n in self.wanted if n in self.seen)
        for name, where in self.wanted.items():
            if name in matched:
                continue
            below = sorted(n for n in self.seen if n.startswith(name + "."))
            if name in set(self.paths.values()) and below:
                why = ("is a module that runs no op of its own (its ops run in submodules); name those, e.g. "
                       + ", ".join(repr(n) for n in below[:3]))
                raise _unmatched(name, where, self.model, [], why)
            raise _unmatched(name, where, self.model, sorted(self.seen), "matches no op that ran in the forward")


def _unmatched(name: str, where: str, model: torch.nn.Module, candidates: list[str], why: str) -> OverrideError:
    file, _, line = where.rpartition(":")
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
        "; names are module paths such as 'layer1.0.conv1' (the FX route's node names)" if candidates else "")
    return OverrideError(f"{name!r} {why} of {type(model).__name__}{hint}",
                         file=file or where, line=int(line) if line.isdigit() else None)


#: Modules with a fused inference fast path (eval, no grad) that torch takes only when no
#: TorchFunctionMode is active. The eager route decides the fused call as one op and runs it
#: with torch function handling off: in the origin dtype, or under ``torch.autocast`` with the
#: low dtype (the fused kernel lowers its inner ops by autocast's lists, exactly as autocast).
FAST_PATH_OPS: dict[type, tuple[str, str]] = {
    torch.nn.TransformerEncoderLayer: ("TransformerEncoderLayer", "torch._transformer_encoder_layer_fwd"),
    torch.nn.MultiheadAttention: ("MultiHeadAttention", "torch._native_multi_head_attention"),
}


def _no_grad_needed(tensors: Sequence[Any]) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _fast_path_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input tensor when torch 2.13 will surely take ``module``'s fused fast path, else None.

    Conservative: calls with masks, non-self attention or anything unusual take the slow path,
    where the eager route sees every op.
    """
    if module.training or not torch.backends.mha.get_fastpath_enabled():
        return None
    if isinstance(module, torch.nn.TransformerEncoderLayer):
        if len(args) != 1 or any(v is not None and v is not False for v in kwargs.values()):
            return None
        src, attn = args[0], module.self_attn
        if not (isinstance(src, torch.Tensor) and src.dim() == 3 and not src.is_nested) or not module.activation_relu_or_gelu:
            return None
        if module.norm1.eps != module.norm2.eps:
            return None
        tensors = [src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                   module.norm1.weight, module.norm1.bias, module.norm2.weight, module.norm2.bias,
                   module.linear1.weight, module.linear1.bias, module.linear2.weight, module.linear2.bias]
        if any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()):
            return None
    elif isinstance(module, torch.nn.MultiheadAttention):  # (query, key, value, key_padding_mask, need_weights, attn_mask, ...)
        if len(args) != 3 or args[0] is not args[1] or args[1] is not args[2]:
            return None
        if kwargs.get("key_padding_mask") is not None or kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            return None
        if set(kwargs) - {"need_weights", "average_attn_weights", "key_padding_mask", "attn_mask", "is_causal"}:
            return None
        src, attn = args[0], module
        if not (isinstance(src, torch.Tensor) and src.dim() == 3 and not src.is_nested):
            return None
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
            return None
        tensors = [src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias]
        if attn.in_proj_weight.dtype != src.dtype or (attn.in_proj_bias is not None
                                                      and attn.in_proj_bias.dtype != src.dtype):
            return None  # MultiheadAttention checks its input's dtype; the encoder layer does not
    else:  # not a module FAST_PATH_OPS lists
        return None
    if attn.in_proj_bias is None or not attn.batch_first or not attn._qkv_same_embed_dim or attn.num_heads % 2:
        return None
    if any(t is not None and t.device.type not in ("cpu", "cuda", "xpu") for t in tensors):
        return None
    return src if _no_grad_needed(tensors) else None


class _FastPathForward:
    """An instance ``forward`` for a fast-path module while a precision context runs (see FAST_PATH_OPS)."""

    def __init__(self, module: torch.nn.Module, mode: PrecisionFunctionMode) -> None:
        self.module = module
        self.mode = mode
        self.thread = threading.get_ident()
        self.op, self.label = FAST_PATH_OPS[type(module)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, mode = self.module, self.mode
        forward = type(module).forward
        src = _fast_path_input(module, args, kwargs) if threading.get_ident() == self.thread else None
        if src is None or src.dtype not in FROM_TORCH or _busy() or mode.decider is None:
            return forward(module, *args, **kwargs)
        attn = module if isinstance(module, torch.nn.MultiheadAttention) else module.self_attn
        assert isinstance(attn, torch.nn.MultiheadAttention)  # FAST_PATH_OPS: MultiheadAttention or an encoder layer
        weight = attn.in_proj_weight
        origin = FROM_TORCH.get(weight.dtype)
        if origin is None:
            return forward(module, *args, **kwargs)
        have = FROM_TORCH[src.dtype]
        name = self.label if mode._names is None else mode._names.op_name(self.label)
        choice = mode.decider.decide_node(name, self.op, origin, (have,), (True,), (origin,),
                                          producers=("its input",))
        d = choice.dtype
        if mode.decider.problems:
            mode.raise_problems()
        if d not in TO_TORCH or (d == "float16" and not mode.native_fp16 and d != origin):
            return forward(module, *args, **kwargs)  # emulated float16: the slow path, op by op
        if d == origin and have != origin:  # the layer runs in its parameters' dtype: its input too
            args = (src.to(weight.dtype),) + args[1:]
        with torch._C.DisableTorchFunction(), torch.autocast(src.device.type, dtype=TO_TORCH[d], enabled=d != origin):
            out = forward(module, *args, **kwargs)
        if mode.record is not None:
            mode.record.append(_OpRecord(self.label, self.op, d, choice.why, _out_dtypes(out), name))
        return out


@contextmanager
def _fast_paths(model: torch.nn.Module | None, mode: PrecisionFunctionMode) -> Iterator[None]:
    """Route the fused fast paths of ``model``'s attention modules through the mode (FAST_PATH_OPS)."""
    patched = []
    if model is not None and mode.decider is not None:
        for m in _model_facts(model)[1]:
            if "forward" not in m.__dict__:
                m.forward = _FastPathForward(m, mode)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


#: Bumped whenever any module anywhere registers a parameter, buffer or submodule (torch's global
#: registration hooks), which invalidates the per-model facts below.
_GENERATION = [0]


def _bump(*_: Any) -> None:
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)

_FACTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, dict[int, Any], list[torch.nn.Module]]] = (
    weakref.WeakKeyDictionary())


def _model_facts(model: torch.nn.Module) -> tuple[dict[int, Any], list[torch.nn.Module]]:
    """ids of the model's parameters and buffers, and its fast-path modules, walked once per
    change of any module's registrations (not once per step)."""
    hit = _FACTS.get(model)
    if hit is not None and hit[0] == _GENERATION[0]:
        return hit[1], hit[2]
    gen = _GENERATION[0]
    # parameters and buffers vote as torch's type promotion counts them: as variables unless 0-dim
    ids = {id(t): (VARIABLE if t.dim() > 0 else False) for t in (*model.parameters(), *model.buffers())}
    fast = [m for m in model.modules() if type(m) in FAST_PATH_OPS]
    try:
        _FACTS[model] = (gen, ids, fast)
    except TypeError:
        pass
    return ids, fast


#: RunConfig (by identity; the entry holds it) -> the decisions its contexts share. A RunConfig is
#: frozen; its override files are read once per RunConfig object (make a new one to re-read them).
_SHARED: dict[tuple, tuple[RunConfig, dict, set]] = {}


def _shared_decisions(config: RunConfig, native_fp16: bool, origin: str) -> tuple[dict, set]:
    """The decision cache the contexts of ``config`` share (see PrecisionFunctionMode._decide)."""
    env: tuple[tuple[str, str], ...] = ()
    if config.env_lists_apply(default=False) and config.env is None:  # torch: off unless use_env_lists=True
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    key = (id(config), native_fp16, origin, env)
    hit = _SHARED.get(key)
    if hit is None or hit[0] is not config:
        if len(_SHARED) >= 64:
            _SHARED.clear()
        hit = _SHARED[key] = (config, {}, set())
    return hit[1], hit[2]


_LIBRARIES: dict[int, tuple[RunConfig, Any]] = {}


def _decider_for_cached(config: RunConfig) -> NodeDecider:
    """decider_for, with the library loaded (and its files checked) once per RunConfig object."""
    hit = _LIBRARIES.get(id(config))
    if hit is None or hit[0] is not config:
        if len(_LIBRARIES) >= 64:
            _LIBRARIES.clear()
        hit = _LIBRARIES[id(config)] = (config, config.library())
    return decider_for(config, hit[1])


def decider_for(config: RunConfig, library: Library | None = None) -> NodeDecider:
    """The core decider for a config (its library, loaded here unless given, and its overrides)."""
    if library is None:
        library = config.library()
    return NodeDecider(config.mode, library, config.overrides(library, env_lists_default=False), dedupe=True,
                       gray_disagreement=config.gray_disagreement)


@contextmanager
def precision(
    config: RunConfig | None = None,
    *,
    enabled: bool = True,
    native_fp16: bool | None = None,
    record: list | None = None,
    model: torch.nn.Module | None = None,
    **settings: Any,
) -> Iterator[PrecisionFunctionMode]:
    """Run the enclosed torch code under a precision mode, op by op.

    ``config`` (or keyword settings for one) chooses the mode and library. Contexts nest (the
    innermost decides), ``enabled=False`` runs the enclosed code in the model's own dtypes
    even inside another context, the state is per thread, and nothing is left behind when
    the block raises. ``record`` collects one entry per intercepted op (label, op type,
    dtype, reason). float16 is emulated on the CPU unless ``native_fp16`` (default: the config's). Pass ``model``
    so that its inputs count as graph inputs and its parameters and buffers as variables,
    exactly as in :func:`~precision_policy.torch.trace`.
    """
    if config is None:
        config = RunConfig(**settings)
    elif settings:
        config = RunConfig(**{**config.model_dump(), **settings})
    decider = _decider_for_cached(config) if enabled else None
    if native_fp16 is None:
        native_fp16 = config.native_fp16
    origin = FROM_TORCH.get(torch.get_default_dtype(), "float32")
    mode = PrecisionFunctionMode(decider, native_fp16=native_fp16, record=record, model=model, origin=origin)
    if decider is not None and not decider.by_name:
        mode._decisions, mode._noisy = _shared_decisions(config, native_fp16, origin)
    saved = _busy()
    _state.busy = False
    names = mode._names
    if names is not None:
        names.install()
    try:
        with _fast_paths(model, mode), mode:
            yield mode
        if names is not None:
            names.check_matched()
    finally:
        if names is not None:
            names.remove()
        mode.clear_cache()
        _state.busy = saved
