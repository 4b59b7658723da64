"""Reading JSON files with errors that name the file, line and column.

``unique_keys=True`` makes a key that appears twice in one object an error naming both lines
(Python's ``json`` silently keeps the last one, so a reader and an editor of the file could
each act on a different copy).

Example:
    >>> from precision_policy._jsonio import loads_json_text
    >>> from precision_policy.errors import OpInfoError
    >>> loads_json_text('{"Relu": {},\\n "Relu": {}}', "ops.json", OpInfoError, unique_keys=True)
    Traceback (most recent call last):
    ...
    precision_policy.errors.OpInfoError: ops.json:2:2: key 'Relu' appears twice in one object, at lines 1 and 2; ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.decoder import scanstring  # type: ignore[attr-defined]  # public at runtime, absent from typeshed
from pathlib import Path
from typing import Any

__all__ = ["DuplicateKey", "find_duplicate_key", "load_json_file", "loads_json_text"]


def load_json_file(path: str | Path, error: Callable[..., Exception], *, unique_keys: bool = False) -> Any:
    """Parse ``path`` as JSON; a missing file or bad JSON raises ``error(message, file=..., line=..., column=...)``."""
    from precision_policy.fileio import read_input_text  # (regular files only, size-capped: never a FIFO or /dev/zero)

    p = Path(path)
    text = read_input_text(p, error)
    return loads_json_text(text, p, error, unique_keys=unique_keys)


class _Duplicate(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate
    return out


def loads_json_text(text: str, path: str | Path, error: Callable[..., Exception], *, unique_keys: bool = False,
                    duplicate: Callable[[DuplicateKey], Exception] | None = None) -> Any:
    """Parse ``text`` (read from ``path``); with ``unique_keys`` a repeated key in an object is an error.

    ``duplicate`` builds that error from the :class:`DuplicateKey` (default: a generic ``error``).
    """
    try:
        if unique_keys:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _decode_error(exc, path, error) from None
    except RecursionError:
        raise error("JSON nested too deeply", file=path) from None
    except _Duplicate:
        dup = find_duplicate_key(text)
        if dup is None:  # pragma: no cover - the scanner agrees with json on valid text
            raise error("a key appears twice in one object", file=path) from None
        raise (duplicate(dup) if duplicate else _duplicate_error(dup, path, error)) from None


class DuplicateKey:
    """A key found twice in one JSON object: its path of keys above it, and both positions (1-based)."""

    def __init__(self, parents: tuple[str, ...], key: str, first: tuple[int, int], second: tuple[int, int]) -> None:
        self.parents, self.key, self.first, self.second = parents, key, first, second

    def __repr__(self) -> str:
        return f"DuplicateKey({self.parents!r}, {self.key!r}, line {self.first[0]} and line {self.second[0]})"


def _duplicate_error(dup: DuplicateKey, path: str | Path, error: Callable[..., Exception]) -> Exception:
    where = "".join(f"[{p!r}]" for p in dup.parents)
    inside = f" of {where}" if where else " in one object"
    msg = (f"key {dup.key!r} appears twice{inside}, at lines {dup.first[0]} and {dup.second[0]}; "
           "JSON readers keep only one of them: delete or merge the other")
    try:
        return error(msg, file=path, line=dup.second[0], column=dup.second[1])
    except TypeError:  # error type without line/column keywords
        return error(msg, file=path)


_WS = " \t\n\r"
_DECODER = json.JSONDecoder()


def find_duplicate_key(text: str) -> DuplicateKey | None:
    """The first key that appears twice in one object of the (valid) JSON ``text``, with its lines."""

    def position(i: int) -> tuple[int, int]:
        line = text.count("\n", 0, i) + 1
        return line, i - (text.rfind("\n", 0, i) + 1) + 1

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _WS:
            i += 1
        return i

    # an explicit stack: (kind, keys seen -> position, parents, key of the value being read)
    stack: list[tuple[str, dict[str, int], tuple[str, ...]]] = []
    i = skip(0)
    parents: tuple[str, ...] = ()
    while True:
        c = text[i]
        if c == "{":
            stack.append(("{", {}, parents))
            i = skip(i + 1)
            if text[i] == "}":
                stack.pop()
                i += 1
            else:
                key_at = i
                key, i = scanstring(text, i + 1)
                seen = stack[-1][1]
                if key in seen:
                    return DuplicateKey(stack[-1][2], key, position(seen[key]), position(key_at))
                seen[key] = key_at
                i = skip(skip(i) + 1)  # past ':'
                parents = stack[-1][2] + (key,)
                continue
        elif c == "[":
            stack.append(("[", {}, parents))
            i = skip(i + 1)
            if text[i] == "]":
                stack.pop()
                i += 1
            else:
                continue
        else:
            _, i = _DECODER.raw_decode(text, i)
        # after a value: close containers or move to the next member
        while True:
            i = skip(i)
            if not stack:
                return None
            kind, seen, above = stack[-1]
            if text[i] in "}]":
                stack.pop()
                i += 1
                continue
            i = skip(i + 1)  # past ','
            if kind == "{":
                key_at = i
                key, i = scanstring(text, i + 1)
                if key in seen:
                    return DuplicateKey(above, key, position(seen[key]), position(key_at))
                seen[key] = key_at
                i = skip(skip(i) + 1)
                parents = above + (key,)
            else:
                parents = above
            break


def _decode_error(exc: json.JSONDecodeError, path: str | Path, error: Callable[..., Exception]) -> Exception:
    try:
        return error(f"malformed JSON: {exc.msg}", file=path, line=exc.lineno, column=exc.colno)
    except TypeError:  # error type without line/column keywords
        return error(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", file=path)
