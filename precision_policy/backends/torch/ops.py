"""Which canonical op type a torch call is, from ``opinfo_db/aliases/torch.json``.

torch functions (``torch.relu``, ``F.linear``), Tensor methods (``x.add``; ``x + y``
dispatches as ``Tensor.add``), and the ``operator`` functions FX records for Python
operators all resolve to one op type. Calls that only read metadata (``x.shape``,
``x.size()``) and in-place updates are not ops for precision purposes.

Example:
    >>> import torch
    >>> from precision_policy.backends.torch.ops import op_type_of
    >>> op_type_of(torch.nn.functional.conv2d), op_type_of(torch.Tensor.add), op_type_of(torch.Tensor.size)
    ('Conv2D', 'Add', None)
    >>> op_type_of(torch.special.i0e)
    'torch:torch.special.special_i0e'

ATen ops, as ``torch.export`` records them, resolve to the same op types (see :func:`aten_op_type`):

    >>> from precision_policy.backends.torch.ops import aten_op_type
    >>> aten_op_type(torch.ops.aten.linear.default), aten_op_type(torch.ops.aten.add.Tensor)
    ('MatMulV2', 'Add')
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import torch

from precision_policy.opinfo.library import shipped_root

_TensorBase = torch._C.TensorBase

#: Python operators as FX records them (``x + y`` -> operator.add).
OPERATORS: dict[Callable, str] = {
    operator.add: "Add",
    operator.iadd: "Add",
    operator.sub: "Sub",
    operator.mul: "Mul",
    operator.truediv: "RealDiv",
    operator.floordiv: "FloorDiv",
    operator.matmul: "BatchMatMulV2",
    operator.neg: "Neg",
    operator.pow: "Pow",
    operator.getitem: "StridedSlice",
}

#: Calls that never compute on values (metadata, bookkeeping): never intercepted, never in a graph.
METADATA_METHODS: frozenset[str] = frozenset(
    {
        "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
        "element_size", "data_ptr", "get_device", "is_floating_point", "is_complex", "is_signed",
        "__len__", "__bool__", "__repr__", "__format__", "__hash__", "__iter__", "__contains__",
        "item", "tolist", "numpy", "requires_grad_", "retain_grad", "register_hook", "backward",
        "detach", "detach_", "__get__", "__set__", "__setstate__", "__reduce_ex__", "__deepcopy__",
        "type_as", "has_names", "untyped_storage", "_version", "__index__", "__int__", "__float__",
        "__setitem__", "__array__", "__dlpack__", "__dlpack_device__", "storage", "is_set_to", "pin_memory",
    }
)


@lru_cache(maxsize=1)
def alias_table() -> dict[str, dict[str, str]]:
    path = shipped_root() / "aliases" / "torch.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _resolve(path: str) -> Any:
    parts = path.split(".")
    if parts[0] == "Tensor":
        obj: Any = torch.Tensor
    elif parts[0] == "torch":
        obj = torch
    else:
        return None
    for part in parts[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[Any, str], dict[str, str], dict[type, str]]:
    table = alias_table()
    funcs: dict[Any, str] = dict(OPERATORS)
    for path, op in table.get("functions", {}).items():
        obj = _resolve(path)
        if obj is not None:
            try:
                funcs.setdefault(obj, op)
            except TypeError:  # unhashable
                pass
    methods: dict[str, str] = {}
    for path, op in table.get("methods", {}).items():
        name = path.split(".", 1)[1]
        methods[name] = op
        obj = _resolve(path)
        if obj is not None:
            try:
                funcs.setdefault(obj, op)
            except TypeError:
                pass
    modules: dict[type, str] = {}
    for path, op in table.get("modules", {}).items():
        cls = _resolve(path)
        if isinstance(cls, type):
            modules[cls] = op
    return funcs, methods, modules


#: Python's augmented assignments on tensors (``x += y`` dispatches as ``Tensor.__iadd__``).
INPLACE_DUNDERS: frozenset[str] = frozenset(
    {
        "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
        "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__idiv__",
    }
)


def is_inplace(name: str) -> bool:
    """Whether a call name writes into its first argument (``add_``, ``x += y``).

    Example:
        >>> is_inplace("add_"), is_inplace("__iadd__"), is_inplace("add"), is_inplace("__add__")
        (True, True, False, False)
    """
    return (name.endswith("_") and not name.endswith("__")) or name in INPLACE_DUNDERS


def writes_in_place(kwargs: dict[str, Any] | None) -> bool:
    """Whether a call writes into a tensor it was given (``out=``), which must then not be
    replaced by a cast copy. (``F.relu(x, inplace=True)`` stays an op, as in FX: its result
    is what the caller uses.)

    Example:
        >>> import torch
        >>> writes_in_place({"out": torch.empty(2)}), writes_in_place({"out": None}), writes_in_place(None)
        (True, False, False)
    """
    return kwargs is not None and kwargs.get("out") is not None


UNMAPPED_PREFIX = "torch:"


def method_op_type(name: str) -> str | None:
    """Op type of a Tensor method called by name (FX ``call_method``).

    None for metadata and in-place calls (not precision ops); ``"torch:Tensor.<name>"`` for a
    method the alias table does not map: an unknown op type, reported, never guessed.
    """
    if name in METADATA_METHODS or is_inplace(name):
        return None
    return _tables()[1].get(name) or f"{UNMAPPED_PREFIX}Tensor.{name}"


def op_type_of(func: Any) -> str | None:
    """Canonical op type of a torch function/method/operator (see :func:`method_op_type`)."""
    funcs, methods, _ = _tables()
    name = getattr(func, "__name__", "")
    if name in METADATA_METHODS or is_inplace(name):
        return None
    try:
        op = funcs.get(func)
    except TypeError:
        op = None
    if op is not None:
        return op
    if getattr(func, "__objclass__", None) is _TensorBase:
        op = methods.get(name)
        if op is not None:
            return op
    return f"{UNMAPPED_PREFIX}{func_label(func)}"


def module_op_type(module: torch.nn.Module) -> str | None:
    """Op type of an nn.Module class (walking its bases), or None."""
    modules = _tables()[2]
    for cls in type(module).__mro__:
        op = modules.get(cls)
        if op is not None:
            return op
    return None


_C_MODULES = {
    "torch._C._nn": "torch.nn.functional",
    "torch._C._special": "torch.special",
    "torch._C._linalg": "torch.linalg",
    "torch._C._fft": "torch.fft",
    "torch._C._VariableFunctions": "torch",
    "torch._C._VariableFunctionsClass": "torch",
}


def func_label(func: Any) -> str:
    """A readable name for a torch callable (``torch.nn.functional.linear``, ``Tensor.add``)."""
    if getattr(func, "__objclass__", None) is _TensorBase:
        return f"Tensor.{func.__name__}"
    mod = getattr(func, "__module__", None) or ""
    name = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func)))
    mod = _C_MODULES.get(mod, mod)
    return f"{mod}.{name}" if mod else name


#: ATen ops that only read or assert metadata, or alias their input: never ops, never in a graph.
ATEN_METADATA: frozenset[str] = frozenset(
    {
        "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata", "_assert_scalar",
        "_assert_async", "_local_scalar_dense", "detach", "detach_", "_functional_assert_async", "_print",
        "sym_constrain_range", "sym_constrain_range_for_size", "_make_dep_token",
    }
)

#: ATen ops whose name is not the torch function's name: the op type is that function's.
ATEN_FUNCTION_NAMES: dict[str, str] = {
    "cross_entropy_loss": "torch.nn.functional.cross_entropy",
    "nll_loss_nd": "torch.nn.functional.nll_loss",
    "native_dropout": "torch.nn.functional.dropout",
    "feature_dropout": "torch.nn.functional.dropout2d",
    "alpha_dropout": "torch.nn.functional.alpha_dropout",
    "feature_alpha_dropout": "torch.nn.functional.feature_alpha_dropout",
    "_unsafe_view": "Tensor.view",
}


def _aten_name(op: Any) -> str:
    """``aten.add.Tensor`` -> ``add`` (the overload packet's name, without namespace or overload)."""
    schema = getattr(op, "_schema", None)
    if schema is not None:
        return str(schema.name).split("::", 1)[-1]
    return str(getattr(op, "__name__", op)).split(".")[0]


def aten_is_inplace(op: Any) -> bool:
    """Whether an ATen op writes into one of its inputs (``aten.add_.Tensor``, ``aten.copy_``):
    as every in-place call, not an op; its result is the tensor it wrote.

    Example:
        >>> import torch
        >>> aten_is_inplace(torch.ops.aten.masked_fill_.Scalar), aten_is_inplace(torch.ops.aten.masked_fill.Scalar)
        (True, False)
    """
    schema = getattr(op, "_schema", None)
    return is_inplace(_aten_name(op)) or bool(schema is not None and schema.is_mutable)


@cache
def aten_op_type(op: Any) -> str | None:
    """Canonical op type of an ATen op (an ``OpOverload`` such as ``torch.ops.aten.linear.default``).

    Looked up, overload stripped, in the alias table's ``aten`` section (which covers every op of
    autocast's CPU lists), then as the torch function or Tensor method of the same name
    (``torch.nn.functional.<name>``, ``torch.<name>``, ``Tensor.<name>``: what the FX route and the
    eager route see, so an op is white, black or gray in every route alike). None for metadata
    and in-place ops; ``"torch:torch.<name>"`` (as :func:`op_type_of` names it) for an unmapped op.

    Example:
        >>> import torch
        >>> aten_op_type(torch.ops.aten.cross_entropy_loss.default), aten_op_type(torch.ops.aten.sym_size.int)
        ('CrossEntropyLoss', None)
        >>> aten_op_type(torch.ops.aten.arange.default) == op_type_of(torch.arange)
        True
    """
    name = _aten_name(op)
    if name in ATEN_METADATA or aten_is_inplace(op):
        return None
    table = alias_table()
    found = table.get("aten", {}).get(f"aten::{name}")
    if found is not None:
        return found
    funcs, methods = table.get("functions", {}), table.get("methods", {})
    alias = ATEN_FUNCTION_NAMES.get(name)
    for path in ([alias] if alias else []) + [f"torch.nn.functional.{name}", f"torch.{name}", f"Tensor.{name}"]:
        found = funcs.get(path) or methods.get(path)
        if found is not None:
            return found
    if hasattr(torch, name):
        return op_type_of(getattr(torch, name))
    if hasattr(torch.Tensor, name):
        return method_op_type(name)
    return f"{UNMAPPED_PREFIX}aten.{name}"


def aten_disagreements() -> list[tuple[str, str, str, str]]:
    """ATen names whose alias-table type differs from the type of the torch function or Tensor
    method of the same name, as (aten name, its type, function path, its type). Empty: an op is
    white, black or gray alike whether a route records it as a torch call or as an ATen op.

    Example:
        >>> aten_disagreements()
        []
    """
    table = alias_table()
    out = []
    for key, op in table.get("aten", {}).items():
        name = key.split("::", 1)[-1]
        for path in (f"torch.nn.functional.{name}", f"torch.{name}", f"Tensor.{name}"):
            other = table.get("functions", {}).get(path) or table.get("methods", {}).get(path)
            if other is not None and other != op:
                out.append((name, op, path, other))
    for name, path in ATEN_FUNCTION_NAMES.items():
        aten_op = aten_op_type(getattr(torch.ops.aten, name).default)
        other = table.get("functions", {}).get(path) or table.get("methods", {}).get(path)
        if other is not None and other != aten_op:
            out.append((name, str(aten_op), path, other))
    return out
