"""Eager application: a TorchFunctionMode that applies a precision mode op by op.

It sits above autograd, so ``loss.backward()`` differentiates through the casts it
inserts, and works on any module, traceable or not. Every decision comes from the
core's :class:`~precision_policy.modes.base.NodeDecider` (white -> low, black ->
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

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from precision_policy.backends.torch.ops import func_label, op_type_of, writes_in_place
from precision_policy.config import RunConfig
from precision_policy.errors import PrecisionError
from precision_policy.modes.base import VARIABLE, NodeDecider

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

    __slots__ = ("label", "op_type", "dtype", "reason", "out_dtypes")

    def __init__(self, label: str, op_type: str, dtype: str, reason: str, out_dtypes: tuple) -> None:
        self.label = label
        self.op_type = op_type
        self.dtype = dtype
        self.reason = reason
        self.out_dtypes = out_dtypes

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
        # With the model known, every tensor but its parameters and buffers votes for gray ops
        # (graph inputs included), and parameters and buffers vote as variables (where torch's
        # type promotion counts them), exactly as in a traced graph. Without it, tensors that a
        # computation produced vote, and leaves that want grad vote as variables.
        self._state_ids: set[int] | None = None
        if model is not None:
            self._state_ids = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}

    def clear_cache(self) -> None:
        """Forget the low-precision copies of parameters (done when the context exits)."""
        self._weights.clear()

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
        flat, spec = tree_flatten((args, kwargs))
        pos: list[int] = []
        in_dtypes: list[str] = []
        voters: list[bool] = []
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
        d, why, want_in, _, _ = self.decider.decide_node(
            label, op, origin, tuple(in_dtypes), tuple(voters), (origin,), producers=("its input",) * len(pos)
        )
        if self.decider.problems:
            problems = list(self.decider.problems)
            self.decider.problems.clear()
            raise PrecisionError(
                "precision mode cannot be honoured: "
                + "; ".join(f"{n} ({o}): {detail}" for n, o, detail in problems),
                problems,
            )
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
        _state.busy = True
        try:
            out = func(*args, **kwargs)
        finally:
            _state.busy = False
        if emulate:
            out = _to_dtype(out, torch.float32, torch.float16)
        if self._state_ids is None and not torch.is_grad_enabled():
            _mark_computed(out)
        if self.record is not None:
            self.record.append(_OpRecord(label, op, d, why, _out_dtypes(out)))
        return out


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
            out._pp_computed = True
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


def decider_for(config: RunConfig) -> NodeDecider:
    """The core decider for a config (library and overrides loaded once)."""
    library = config.library()
    return NodeDecider(config.mode, library, config.overrides(library), dedupe=True,
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
    decider = decider_for(config) if enabled else None
    if native_fp16 is None:
        native_fp16 = config.native_fp16
    mode = PrecisionFunctionMode(decider, native_fp16=native_fp16, record=record, model=model,
                                 origin=FROM_TORCH.get(torch.get_default_dtype(), "float32"))
    saved = _busy()
    _state.busy = False
    try:
        with mode:
            yield mode
    finally:
        mode.clear_cache()
        _state.busy = saved
