"""Loading and merging Ascend-format op-info libraries.

A library is one ``*.json`` file or a folder of them, merged in file-name order.
Each top-level key is an op type; the fields read are ``precision_reduce.flag``
(white/black/gray), ``heavyOp.flag`` (cube op) and the parallel ``dtype`` lists of
``inputN``/``outputN``. Everything else is preserved for editing.

Shipped libraries live in ``opinfo_db/`` and can be named directly
(``"ascend910"``, ``"ascend910b"``, ``"tf_amp_bf16"``, ...).

Example:
    >>> from precision_policy.opinfo import load_library
    >>> lib = load_library("ascend910")
    >>> lib["Conv2D"].flag, sorted(lib["Conv2D"].float_dtypes), lib["Conv2D"].heavy
    ('white', ['float16'], True)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from precision_policy import dtypes
from precision_policy._jsonio import DuplicateKey, loads_json_text
from precision_policy.errors import DTypeError, OpInfoError
from precision_policy.fileio import read_input_text
from precision_policy.opinfo.schema import OP_NAME, TENSOR_KEY, OpEntry, TensorField

log = logging.getLogger(__name__)

WHITE = "white"
BLACK = "black"
GRAY = "gray"
_FLAG_TO_LIST = {"true": WHITE, "false": BLACK}


@dataclass(frozen=True)
class TensorInfo:
    """One declared input or output: its name and dtype per kernel variant (canonical)."""

    key: str
    name: str | None
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class OpInfo:
    """What a library says about one op type."""

    op_type: str
    flag: str  # "white" | "black" | "gray"
    heavy: bool
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    source: str
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        tensors = self.inputs + self.outputs
        declared = any(t.dtypes for t in tensors)
        floats = frozenset(d for t in tensors for d in t.dtypes if dtypes.is_float(d))
        object.__setattr__(self, "declares_dtypes", declared)
        object.__setattr__(self, "float_dtypes", floats)
        object.__setattr__(self, "variants", next((len(t.dtypes) for t in tensors if t.dtypes), 0))

    #: True when some input/output declares a dtype list (set in __post_init__).
    declares_dtypes: bool = field(init=False, repr=False, compare=False, default=False)
    #: Float dtypes some kernel variant accepts; empty when no dtype lists are declared.
    float_dtypes: frozenset = field(init=False, repr=False, compare=False, default=frozenset())
    #: Number of kernel variants (length of the parallel dtype lists); 0 if none declared.
    variants: int = field(init=False, repr=False, compare=False, default=0)

    def supports(self, dtype: str) -> bool:
        """True if some kernel variant has ``dtype``; an entry without dtype lists supports any dtype."""
        if not self.declares_dtypes:
            return True
        return dtype in self.float_dtypes or not dtypes.is_float(dtype)

    def describe_dtypes(self) -> str:
        if not self.declares_dtypes:
            return "no dtype lists declared (any dtype)"
        floats = sorted(self.float_dtypes, key=lambda d: (-dtypes.rank(d), d))  # float16 and bfloat16 tie on rank
        return ", ".join(floats) if floats else "no float kernels"


class Library(Mapping[str, OpInfo]):
    """An immutable, merged op-info library: op type -> :class:`OpInfo`."""

    def __init__(self, ops: dict[str, OpInfo], sources: list[Path], name: str) -> None:
        self._ops = ops
        self.sources = sources
        self.name = name

    def __getitem__(self, op_type: str) -> OpInfo:
        return self._ops[op_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ops)

    def get(self, op_type: str, default: OpInfo | None = None) -> OpInfo | None:  # type: ignore[override]
        return self._ops.get(op_type, default)

    def __contains__(self, op_type: object) -> bool:
        return op_type in self._ops

    def __len__(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        return f"Library({self.name!r}, {len(self)} ops from {len(self.sources)} file(s))"

    def closest(self, op_type: str, n: int = 3) -> list[str]:
        import difflib

        lower = {k.lower(): k for k in self._ops}
        if op_type.lower() in lower:
            return [lower[op_type.lower()]]
        return difflib.get_close_matches(op_type, list(self._ops), n=n)

    def counts(self) -> dict[str, int]:
        out = {WHITE: 0, BLACK: 0, GRAY: 0}
        for info in self._ops.values():
            out[info.flag] += 1
        return out


# ---------------------------------------------------------------------- parsing
def _pydantic_field(err: ErrorDetails) -> str:
    return ".".join(str(p) for p in err.get("loc", ()))


def parse_entry(op_type: str, raw: Any, source: str) -> OpInfo:
    """Validate one op entry; raise OpInfoError naming the file, op and field."""
    if not OP_NAME.match(op_type):
        raise OpInfoError(f"{op_type!r} is not a valid op type name (letters, digits, '_' and '.', starting with a "
                          "letter or '_', as the library's JSON Schema states): rename or remove the entry", file=source)
    if not isinstance(raw, dict):
        raise OpInfoError(f"an op entry must be a JSON object, got {type(raw).__name__}", file=source, op=op_type)
    try:
        entry = OpEntry.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise OpInfoError(_clean_msg(err), file=source, op=op_type, field=_pydantic_field(err) or None) from None
    tensors: dict[str, list[TensorInfo]] = {"input": [], "output": []}
    lengths: dict[str, int] = {}
    for key, value in raw.items():
        m = TENSOR_KEY.match(key)
        if not m:
            continue
        if not isinstance(value, dict):
            raise OpInfoError("must be an object with 'name', 'dtype', 'format'", file=source, op=op_type, field=key)
        try:
            t = TensorField.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            sub = _pydantic_field(err)
            raise OpInfoError(_clean_msg(err), file=source, op=op_type, field=f"{key}.{sub}" if sub else key) from None
        except DTypeError as exc:
            raise OpInfoError(str(exc), file=source, op=op_type, field=f"{key}.dtype") from None
        dts: tuple[str, ...] = ()
        if t.dtype is not None:
            dts = tuple(dtypes.canonical(w) for w in t.dtype.split(","))
            lengths[f"{key}.dtype"] = len(dts)
            if t.format is not None:
                n_fmt = len(t.format.split(","))
                if n_fmt != len(dts):
                    raise OpInfoError(
                        f"has {n_fmt} formats but {len(dts)} dtypes; the lists are parallel (one position per kernel variant)",
                        file=source,
                        op=op_type,
                        field=f"{key}.format",
                    )
        tensors[m.group(1)].append(TensorInfo(key, t.name, dts))
    if len(set(lengths.values())) > 1:
        parts = ", ".join(f"{k} has {v}" for k, v in sorted(lengths.items()))
        raise OpInfoError(
            f"dtype lists must be parallel (one position per kernel variant) but {parts}",
            file=source,
            op=op_type,
            field="dtype",
        )
    def order(t: TensorInfo) -> int:
        m = TENSOR_KEY.match(t.key)
        assert m is not None  # only keys TENSOR_KEY matched were collected
        return int(m.group(2))

    flag = _FLAG_TO_LIST[entry.precision_reduce.flag] if entry.precision_reduce is not None else GRAY
    heavy = entry.heavyOp is not None and entry.heavyOp.flag == "true"
    return OpInfo(
        op_type=op_type,
        flag=flag,
        heavy=heavy,
        inputs=tuple(sorted(tensors["input"], key=order)),
        outputs=tuple(sorted(tensors["output"], key=order)),
        source=source,
        raw=raw,
    )


def _clean_msg(err: ErrorDetails) -> str:
    msg = err.get("msg", "invalid value")
    if err.get("type") == "literal_error":
        return f"must be \"true\" or \"false\", got {err.get('input')!r}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "model_type":
        return f"must be an object, got {type(err.get('input')).__name__}"
    return msg


def duplicate_key_error(dup: DuplicateKey, source: str | Path) -> OpInfoError:
    """The error for a key repeated inside one op-info file (JSON would silently keep the last copy)."""
    lines = f"at lines {dup.first[0]} and {dup.second[0]}"
    if not dup.parents:
        return OpInfoError(
            f"defined twice in this file, {lines}; a library may define an op once "
            "(delete or merge one of the two entries)",
            file=source, op=dup.key, line=dup.second[0], column=dup.second[1],
        )
    field = ".".join(dup.parents[1:] + (dup.key,))
    return OpInfoError(f"appears twice in this entry, {lines}; keep one of them",
                       file=source, op=dup.parents[0], field=field, line=dup.second[0], column=dup.second[1])


def parse_library_json(text: str, source: str | Path) -> Any:
    """Parse an op-info file's text: JSON whose objects have no repeated keys (OpInfoError otherwise)."""
    return loads_json_text(text, source, OpInfoError, unique_keys=True,
                           duplicate=lambda dup: duplicate_key_error(dup, source))


def parse_library_text(text: str, source: str) -> dict[str, OpInfo]:
    data = parse_library_json(text, source)
    if not isinstance(data, dict):
        raise OpInfoError(
            f"the top level must be a JSON object of op type -> entry, got {type(data).__name__}", file=source
        )
    return {op_type: parse_entry(op_type, raw, source) for op_type, raw in data.items()}


# ---------------------------------------------------------------------- locating
def shipped_root() -> Path:
    """The ``opinfo_db`` folder: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "opinfo_db", here.parent / "opinfo_db"):
        if candidate.is_dir():
            return candidate
    return here.parent / "opinfo_db"


def shipped_libraries() -> list[str]:
    """Names of the shipped libraries (folders of ``opinfo_db`` holding JSON files, except aliases)."""
    root = shipped_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "aliases" and any(p.glob("*.json")))


_LIBRARY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def resolve_library_path(spec: str | Path) -> Path:
    """A library's file or folder: a path names a path; a bare name (``ascend910``) a shipped library.

    A spec containing a path separator, or ``.``/``..``, is only ever a path: it is never looked
    up inside the package (``../opinfo_db/x`` does not reach the shipped files by accident).
    A bare name that is also a file or folder in the working directory is that path.
    """
    text = str(spec)
    if not text.strip():  # Path("") would be the current folder
        raise OpInfoError("the op-info library is named by an empty string; name a file, folder or shipped library "
                          f"(shipped: {', '.join(shipped_libraries()) or '(none found)'})", file=repr(text))
    if "\x00" in text:
        raise OpInfoError("the op-info library path contains a NUL byte", file=repr(text))
    p = Path(text).expanduser()
    if os.path.lexists(p):
        return p
    from precision_policy.fileio import unreadable_folder

    blocked = unreadable_folder(p)
    if blocked is not None:
        raise OpInfoError(f"cannot read: folder {blocked} cannot be entered (no execute permission)", file=text)
    names = shipped_libraries()
    is_name = bool(_LIBRARY_NAME.match(text)) and text not in (".", "..")
    if is_name and text in names:
        return shipped_root() / text
    import difflib

    close = difflib.get_close_matches(text, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    what = "no such file or folder" if not is_name else "not a file or folder, and not a shipped library"
    raise OpInfoError(
        f"no such op-info library: {what}.{hint} Shipped libraries (by name): {', '.join(names) or '(none found)'}",
        file=text,
    )


def is_shipped(path: Path) -> bool:
    """Whether ``path`` (a file or folder) lies inside the shipped libraries (read-only to editors)."""
    root = Path(os.path.realpath(shipped_root()))
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def library_files(path: Path) -> list[Path]:
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise OpInfoError("cannot read: the folder's files cannot be listed (no read/execute permission)", file=path)
        files = sorted(f for f in path.glob("*.json") if f.is_file())
        if not files:
            raise OpInfoError("folder holds no *.json op-info files", file=path)
        return files
    return [path]


def _stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in library_files(path))


def load_library(spec: str | Path) -> Library:
    """Load a library file or folder (or shipped name). Results are cached until a file changes."""
    path = resolve_library_path(spec)
    return _load_cached(path.resolve(), _stamp(path))


@lru_cache(maxsize=16)
def _load_cached(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> Library:
    ops: dict[str, OpInfo] = {}
    files = [Path(f) for f, _, _ in stamp]
    for f in files:
        text = read_input_text(f, OpInfoError)
        for op_type, info in parse_library_text(text, str(f)).items():
            if op_type in ops:
                raise OpInfoError(
                    f"defined in both {ops[op_type].source} and {f}; a library may define an op once "
                    "(change flags with modify_mixlist / keep_dtype instead of a second definition)",
                    file=f,
                    op=op_type,
                )
            ops[op_type] = info
    name = path.name if path.is_dir() else path.stem
    log.debug("loaded op-info library %s: %d ops from %d file(s)", path, len(ops), len(files))
    return Library(ops, files, name)
