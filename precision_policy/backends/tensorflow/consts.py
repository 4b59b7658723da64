"""Converting a ``Const`` node's tensor to another float dtype, safely.

A ``TensorProto`` may hold its values packed in ``tensor_content`` or in a typed field
(``float_val``, ``half_val``, ...). In the typed form TensorFlow repeats the last value to fill
the shape, so a 300-byte file can declare a billion-element constant (a *splat*). Converting
keeps that form: only the values written are cast, and the shape stays as declared. Packed
constants are materialised, but only after checking that their bytes match their shape and
that the converted size stays under a limit (``max_bytes``; the CLI's ``--max-const-bytes``).

Example:
    >>> from tensorflow.core.framework import tensor_pb2, types_pb2
    >>> t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.5])
    >>> t.tensor_shape.dim.add().size = 1_000_000_000  # a splat: one value for a billion elements
    >>> out = convert_tensor(t, "float16", node="big")
    >>> out.dtype == types_pb2.DT_HALF, len(out.half_val), out.tensor_shape.dim[0].size
    (True, 1, 1000000000)
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from precision_policy import dtypes
from precision_policy.errors import GraphError

#: The largest converted constant (in bytes) materialised without ``--max-const-bytes``.
DEFAULT_MAX_CONST_BYTES = 1 << 30

_ENUM = {"float32": types_pb2.DT_FLOAT, "float16": types_pb2.DT_HALF, "float64": types_pb2.DT_DOUBLE,
         "bfloat16": types_pb2.DT_BFLOAT16}
_NAME = {v: k for k, v in _ENUM.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "bfloat16": 2}


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(dtypes.to_numpy(name))


def _typed_values(t: tensor_pb2.TensorProto, name: str) -> np.ndarray:
    """The values written in the typed field of a float tensor (not its packed content)."""
    if name == "float32":
        return np.asarray(t.float_val, dtype=np.float32)
    if name == "float64":
        return np.asarray(t.double_val, dtype=np.float64)
    bits = np.asarray(t.half_val, dtype=np.int64).astype(np.uint16)  # float16/bfloat16 bit patterns
    return bits.view(_numpy_dtype(name))


def _write_typed(t: tensor_pb2.TensorProto, name: str, values: np.ndarray) -> None:
    if name == "float32":
        t.float_val.extend(values.astype(np.float32).tolist())
    elif name == "float64":
        t.double_val.extend(values.astype(np.float64).tolist())
    else:
        t.half_val.extend(values.astype(_numpy_dtype(name)).view(np.uint16).astype(np.int64).tolist())


def convert_tensor(t: tensor_pb2.TensorProto, to: str, *, node: str, max_bytes: int | None = None) -> tensor_pb2.TensorProto:
    """``t`` (a float tensor) as a ``to`` tensor of the same shape; splats stay splats.

    Raises GraphError naming ``node`` for a tensor whose packed bytes do not match its shape, an
    unknown shape, more typed values than elements, or a converted size over ``max_bytes``.
    """
    have = _NAME.get(t.dtype)
    if have is None or to not in _ENUM:
        raise GraphError(f"constant of dtype {t.dtype} cannot be converted to {to}", node=node)
    if t.tensor_shape.unknown_rank or any(d.size < 0 for d in t.tensor_shape.dim):
        raise GraphError("constant with an unknown shape; a Const must declare its full shape", node=node)
    n = math.prod(d.size for d in t.tensor_shape.dim)
    out = tensor_pb2.TensorProto(dtype=_ENUM[to])
    out.tensor_shape.CopyFrom(t.tensor_shape)
    if t.tensor_content:
        expected = n * _ITEMSIZE[have]
        if len(t.tensor_content) != expected:
            raise GraphError(f"constant's packed content is {len(t.tensor_content)} bytes but its shape "
                             f"{[d.size for d in t.tensor_shape.dim]} of {have} needs {expected}: the file is corrupt",
                             node=node)
        limit = DEFAULT_MAX_CONST_BYTES if max_bytes is None else max_bytes
        size = n * _ITEMSIZE[to]
        if size > limit:
            raise GraphError(f"converting this constant would allocate {size:,} bytes, over the limit of {limit:,} "
                             "(raise it with --max-const-bytes / max_const_bytes=)", node=node)
        values = np.frombuffer(t.tensor_content, dtype=_numpy_dtype(have))
        out.tensor_content = values.astype(_numpy_dtype(to)).tobytes()
        return out
    values = _typed_values(t, have)
    if values.size > max(n, 1):
        raise GraphError(f"constant holds {values.size} values for a shape of {n} elements: the file is corrupt",
                         node=node)
    _write_typed(out, to, values)  # fewer values than elements: TensorFlow repeats the last (a splat)
    return out


__all__ = ["DEFAULT_MAX_CONST_BYTES", "convert_tensor"]
