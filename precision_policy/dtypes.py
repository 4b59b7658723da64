"""Canonical dtype names, the aliases users write, precision ranks and numpy mapping.

Every dtype inside precision_policy is a canonical name string (``"float32"``,
``"float16"``, ``"bfloat16"``, ...). :func:`canonical` turns what users and
files write (``float``, ``fp16``, ``half``, ``bf16``, ``torch.float16``,
``DT_HALF``, ...) into that name.

Example:
    >>> from precision_policy import dtypes
    >>> dtypes.canonical("float"), dtypes.canonical("bf16"), dtypes.canonical("torch.half")
    ('float32', 'bfloat16', 'float16')
    >>> dtypes.is_float("bfloat16"), dtypes.rank("float16") < dtypes.rank("float32")
    (True, True)
    >>> dtypes.to_numpy("bfloat16").name
    'bfloat16'
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from precision_policy.errors import DTypeError

FLOAT64 = "float64"
FLOAT32 = "float32"
FLOAT16 = "float16"
BFLOAT16 = "bfloat16"

# canonical name -> (is_float, bits, precision rank). The rank orders float types by
# mantissa precision: a lower rank is a lower precision. float16 and bfloat16 share
# a rank (both "low"); neither is a refinement of the other.
_INFO: dict[str, tuple[bool, int, int]] = {
    "float64": (True, 64, 4),
    "float32": (True, 32, 3),
    "float16": (True, 16, 2),
    "bfloat16": (True, 16, 2),
    "float8_e4m3fn": (True, 8, 1),
    "float8_e5m2": (True, 8, 1),
    "complex64": (False, 64, 0),
    "complex128": (False, 128, 0),
    "int4": (False, 4, 0),
    "int8": (False, 8, 0),
    "int16": (False, 16, 0),
    "int32": (False, 32, 0),
    "int64": (False, 64, 0),
    "uint1": (False, 1, 0),
    "uint8": (False, 8, 0),
    "uint16": (False, 16, 0),
    "uint32": (False, 32, 0),
    "uint64": (False, 64, 0),
    "bool": (False, 8, 0),
    "qint8": (False, 8, 0),
    "quint8": (False, 8, 0),
    "qint16": (False, 16, 0),
    "quint16": (False, 16, 0),
    "qint32": (False, 32, 0),
    "uint4": (False, 4, 0),
    "float8_e4m3fnuz": (True, 8, 1),
    "float8_e5m2fnuz": (True, 8, 1),
    "float8_e4m3b11fnuz": (True, 8, 1),
    "string": (False, 0, 0),
    "resource": (False, 0, 0),
    "variant": (False, 0, 0),
}

CANONICAL: tuple[str, ...] = tuple(_INFO)
FLOAT_DTYPES: frozenset[str] = frozenset(n for n, (f, _, _) in _INFO.items() if f)
LOW_DTYPES: frozenset[str] = frozenset({FLOAT16, BFLOAT16})

_ALIASES: dict[str, str] = {
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "single": "float32",
    "dt_float": "float32",
    "double": "float64",
    "fp64": "float64",
    "f64": "float64",
    "dt_double": "float64",
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "dt_half": "float16",
    "bf16": "bfloat16",
    "dt_bfloat16": "bfloat16",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "int": "int32",
    "long": "int64",
    "short": "int16",
    "dt_int32": "int32",
    "dt_int64": "int64",
    "dt_int8": "int8",
    "dt_uint8": "uint8",
    "dt_bool": "bool",
    "dt_string": "string",
    "dt_resource": "resource",
    "dt_variant": "variant",
    "cfloat": "complex64",
    "cdouble": "complex128",
}


@lru_cache(maxsize=512)
def _lookup(name: str) -> str | None:
    key = name.strip().lower()
    for prefix in ("torch.", "tf.", "np.", "numpy.", "ml_dtypes."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key in _INFO:
        return key
    return _ALIASES.get(key)


def canonical(name: object) -> str:
    """Return the canonical name of a dtype written as a string or a framework/numpy dtype.

    Raises :class:`DTypeError` listing the valid names (and the closest one) when unknown.
    """
    if isinstance(name, str):
        text = name
    elif isinstance(name, np.dtype) or (isinstance(name, type) and issubclass(name, np.generic)):
        text = np.dtype(name).name
    else:
        # torch.float16 prints 'torch.float16'; tf.float16 has .name 'float16'
        text = getattr(name, "name", None) or str(name)
    found = _lookup(text)
    if found is None:
        raise DTypeError(_unknown_message(text))
    return found


def _unknown_message(text: str) -> str:
    choices = sorted(set(CANONICAL) | set(_ALIASES))
    close = difflib.get_close_matches(text.strip().lower(), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown dtype {text!r}.{hint} Valid dtypes: {', '.join(CANONICAL)} (aliases: float, fp32, half, fp16, bf16, double, ...)."


def is_known(name: str) -> bool:
    """True if ``name`` is a canonical dtype name or an alias of one."""
    return _lookup(name) is not None


def is_float(name: str) -> bool:
    """True for real floating-point dtypes (the ones precision modes act on)."""
    return name in FLOAT_DTYPES


def is_low(name: str) -> bool:
    """True for the 16-bit float types a mode may lower to (float16, bfloat16)."""
    return name in LOW_DTYPES


def bits(name: str) -> int:
    """Storage width of one element, in bits."""
    return _INFO[canonical(name)][1]


def rank(name: str) -> int:
    """Precision rank: higher means more mantissa bits. Non-float dtypes rank 0."""
    return _INFO[canonical(name)][2]


def to_numpy(name: str) -> np.dtype:
    """The numpy dtype for a canonical name; bfloat16 and float8 come from ml_dtypes."""
    canon = canonical(name)
    if canon == "bool":
        return np.dtype(np.bool_)
    if canon in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "int4"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, canon))
    if canon in ("string", "resource", "variant", "uint1"):
        raise DTypeError(f"dtype {canon!r} has no numpy equivalent")
    return np.dtype(canon)


def from_numpy(dtype: npt.DTypeLike) -> str:
    """Canonical name of a numpy (or ml_dtypes) dtype."""
    return canonical(np.dtype(dtype).name)


def ascend_name(name: str) -> str:
    """The word Ascend's ops-info files use for a canonical dtype (``float32`` -> ``float``)."""
    canon = canonical(name)
    return {"float32": "float", "float64": "double"}.get(canon, canon)


__all__ = [
    "BFLOAT16",
    "CANONICAL",
    "FLOAT16",
    "FLOAT32",
    "FLOAT64",
    "FLOAT_DTYPES",
    "LOW_DTYPES",
    "ascend_name",
    "bits",
    "canonical",
    "from_numpy",
    "is_float",
    "is_known",
    "is_low",
    "rank",
    "to_numpy",
]
