"""Safe, byte-preserving edits of op-info JSON files.

``pin`` sets ``precision_reduce.flag`` to ``"false"`` (black), ``set_flag`` to any
value, ``unpin`` removes the ``precision_reduce`` field (gray). Only the edited
field's bytes change: key order, formatting and every other field are kept. A
file that does not parse (or defines an op twice) is refused and left untouched.
Edits of one file are serialised between processes (an advisory lock beside it;
the file is read under the lock, so concurrent edits of different ops all land),
and the new text is written atomically, keeping the file's mode, owner and
symlinks (:mod:`precision_policy.fileio`): a crash mid-write leaves the old file
intact, and its temporary file is removed by the next edit.

Example:
    >>> import json, pathlib, tempfile
    >>> from precision_policy.opinfo import edit
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "ops.json"
    >>> _ = f.write_text('{\\n  "Relu": {"op": {"pattern": "elemwise"}}\\n}\\n')
    >>> edit.pin(f, "Relu").new_flag
    'false'
    >>> json.loads(f.read_text())["Relu"]["precision_reduce"]
    {'flag': 'false'}
    >>> edit.unpin(f, "Relu").new_flag is None
    True
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # public at runtime, absent from typeshed
from pathlib import Path

from precision_policy.errors import OpInfoError
from precision_policy.fileio import atomic_write, locked_edit, read_input_text
from precision_policy.opinfo.library import (
    is_shipped,
    library_files,
    parse_library_json,
    parse_library_text,
    resolve_library_path,
    shipped_libraries,
    shipped_root,
)
from precision_policy.opinfo.schema import OP_NAME

_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    """Index of the first non-whitespace character at or after ``i`` (``_WS`` matches the empty string too)."""
    m = _WS.match(text, i)
    return m.end() if m is not None else i


_DECODER = json.JSONDecoder()
FIELD = "precision_reduce"


@dataclass(frozen=True)
class EditResult:
    """What an edit did: the file, the op, the flag before and after (None = no flag, gray)."""

    file: Path
    op: str
    old_flag: str | None
    new_flag: str | None
    created_op: bool = False

    @property
    def changed(self) -> bool:
        return self.old_flag != self.new_flag or self.created_op


# ---------------------------------------------------------------------- atomic writing
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, keeping mode, owner and symlinks (see :mod:`precision_policy.fileio`)."""
    atomic_write(path, text)


# ---------------------------------------------------------------------- span scanning
@dataclass(frozen=True)
class _Member:
    key: str
    key_start: int  # index of the opening quote of the key
    value_start: int
    value_end: int  # one past the value's last character


def _members(text: str, brace: int) -> tuple[list[_Member], int]:
    """Members of the JSON object whose '{' is at ``brace``; returns them and the index of its '}'."""
    assert text[brace] == "{"
    out: list[_Member] = []
    i = _skip_ws(text, brace + 1)
    if text[i] == "}":
        return out, i
    while True:
        key_start = i
        key, i = scanstring(text, i + 1)
        i = _skip_ws(text, i)
        i = _skip_ws(text, i + 1)  # skip ':'
        value_start = i
        _, i = _DECODER.raw_decode(text, i)
        out.append(_Member(key, key_start, value_start, i))
        i = _skip_ws(text, i)
        if text[i] == "}":
            return out, i
        i = _skip_ws(text, i + 1)  # skip ','


def _lead(text: str, members: list[_Member], brace: int) -> str:
    """Whitespace that precedes the members' keys (newline + indent), or '' for one-line objects."""
    if not members:
        return ""
    m = members[-1] if len(members) > 1 else members[0]
    j = m.key_start
    while j > 0 and text[j - 1] in " \t\n\r":
        j -= 1
    return text[j : m.key_start]


def _colon(text: str, m: _Member) -> str:
    """The exact text between a key and its value (':' or ': ')."""
    _, after_key = scanstring(text, m.key_start + 1)
    return text[after_key : m.value_start]


def _insert_member(text: str, brace: int, key: str, value_text: str) -> str:
    """Insert ``"key": value`` into the object at ``brace``: in sorted position if its keys are sorted, else last."""
    members, close = _members(text, brace)
    key_json = json.dumps(key)
    if not members:
        return text[: brace + 1] + f"{key_json}: {value_text}" + text[close:]
    colon = _colon(text, members[0])
    new = f"{key_json}{colon}{value_text}"
    keys = [m.key for m in members]
    if keys == sorted(keys):
        for m in members:
            if m.key > key:
                j = m.key_start
                while j > 0 and text[j - 1] in " \t\n\r":
                    j -= 1
                ws = text[j : m.key_start]
                return text[: m.key_start] + new + "," + ws + text[m.key_start :]
    last = members[-1]
    return text[: last.value_end] + "," + _lead(text, members, brace) + new + text[last.value_end :]


def _remove_member(text: str, brace: int, key: str) -> str:
    members, close = _members(text, brace)
    for k, m in enumerate(members):
        if m.key != key:
            continue
        if len(members) == 1:
            return text[: brace + 1] + text[close:]
        if k == 0:
            return text[: m.key_start] + text[members[1].key_start :]
        prev = members[k - 1]
        return text[: prev.value_end] + text[m.value_end :]
    return text


# ---------------------------------------------------------------------- the edits
def _target_file(spec: str | Path, op: str, creating: bool) -> Path:
    path = resolve_library_path(spec)
    files = library_files(path)
    if len(files) == 1:
        return files[0]
    for f in files:
        data = _parse(f, _read(f))
        if op in data:
            return f
    if creating:
        raise OpInfoError(
            f"op {op!r} is in none of this folder's {len(files)} files; name the file to add it to with --op-info FILE",
            file=path,
        )
    raise OpInfoError(f"op {op!r} is not in this library", file=path)


def _read(path: Path) -> str:
    """The file's text with its line endings as they are (CRLF files stay CRLF)."""
    return read_input_text(path, OpInfoError)


def _parse(path: Path, text: str) -> dict:
    data = parse_library_json(text, path)  # a key defined twice is refused: which copy would we edit?
    if not isinstance(data, dict):
        raise OpInfoError("the top level must be a JSON object of op type -> entry; refusing to edit", file=path)
    return data


def set_flag(spec: str | Path, op: str, flag: str | bool | None, *, add: bool = False) -> EditResult:
    """Set ``precision_reduce.flag`` of ``op`` to ``"true"``/``"false"``, or remove it (None).

    ``spec`` is an op-info file, a folder (the file defining ``op`` is edited) or a shipped
    library name. An op the library does not have is an error naming the closest op types
    (``relu`` -> ``Relu``), unless ``add=True`` (the CLI's ``--add``): then it is added with
    just the flag. Op type names must match the library schema's pattern either way.
    """
    if not isinstance(op, str) or not OP_NAME.match(op):
        raise OpInfoError(f"{op!r} is not a valid op type name (letters, digits, '_' and '.', starting with a letter "
                          "or '_'; no spaces or line breaks)", file=str(spec))
    if flag is True or flag == "true":
        new_flag: str | None = "true"
    elif flag is False or flag == "false":
        new_flag = "false"
    elif flag is None:
        new_flag = None
    else:
        raise OpInfoError(f"flag must be 'true', 'false' or None (remove), got {flag!r}", op=op, field=FIELD)
    _refuse_shipped(spec)
    path = _target_file(spec, op, creating=new_flag is not None)
    with locked_edit(path) as target:  # read under the lock: a concurrent edit's change is in what we read
        text = _read(path)
        data = _parse(path, text)  # refuses a file that does not parse, before anything is written
        if not os.access(path, os.W_OK):
            raise OpInfoError(f"file is read-only; grant write permission first (chmod u+w {path})", file=path)
        if op not in data and new_flag is not None and not add:
            raise OpInfoError(_not_in_library(path, op, data), file=path)
        result, new_text = _edit_text(path, text, data, op, new_flag)
        if new_text != text:
            # the edited file must still be a valid library, with the flag we meant
            parsed = parse_library_text(new_text, str(path))
            expect = {"true": "white", "false": "black", None: "gray"}[new_flag]
            if parsed[op].flag != expect:  # pragma: no cover - guards the span logic
                raise OpInfoError(f"internal edit check failed (flag is {parsed[op].flag}, expected {expect}); "
                                  "file untouched", file=path, op=op)
            target.write(new_text)
    return result


def _flag_text(path: Path, op: str, value: object) -> str | None:
    """The flag as the edit reports it; a value no edit can report (an object, a list, NaN) is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        shown = str(value).replace("inf", "Infinity").replace("nan", "NaN")
    else:
        shown = json.dumps(value)
    kinds: dict[type, str] = {dict: "a JSON object", list: "a JSON list"}
    kind = kinds.get(type(value), "a number" if isinstance(value, (int, float)) else "not text")
    raise OpInfoError(
        f"is {kind} ({shown[:60]}), not \"true\" or \"false\"; refusing to edit a value it would discard: "
        f"fix it by hand (\"flag\": \"true\" or \"false\", or remove {FIELD})",
        file=path, op=op, field=f"{FIELD}.flag",
    )


def _edit_text(path: Path, text: str, data: dict, op: str, new_flag: str | None) -> tuple[EditResult, str]:
    top = _skip_ws(text, 0)
    created = False
    if op not in data:
        if new_flag is None:
            raise OpInfoError("op is not in this file; nothing to unpin", file=path, op=op)
        entry = json.dumps({FIELD: {"flag": new_flag}})
        new_text = _insert_member(text, top, op, entry)
        old_flag = None
        created = True
    else:
        entry_raw = data[op]
        if not isinstance(entry_raw, dict):
            raise OpInfoError("entry is not a JSON object; refusing to edit", file=path, op=op)
        old = entry_raw.get(FIELD)
        old_flag = _flag_text(path, op, old.get("flag")) if isinstance(old, dict) else None
        op_member = next(m for m in _members(text, top)[0] if m.key == op)
        op_brace = op_member.value_start
        if new_flag is None:
            new_text = _remove_member(text, op_brace, FIELD) if FIELD in entry_raw else text
        elif FIELD in entry_raw and isinstance(old, dict):
            field_member = next(m for m in _members(text, op_brace)[0] if m.key == FIELD)
            flag_members = [m for m in _members(text, field_member.value_start)[0] if m.key == "flag"]
            if flag_members:
                fm = flag_members[-1]
                new_text = text[: fm.value_start] + json.dumps(new_flag) + text[fm.value_end :]
            else:
                new_text = _insert_member(text, field_member.value_start, "flag", json.dumps(new_flag))
        elif FIELD in entry_raw:
            field_member = next(m for m in _members(text, op_brace)[0] if m.key == FIELD)
            new_text = text[: field_member.value_start] + json.dumps({"flag": new_flag}) + text[field_member.value_end :]
        else:
            new_text = _insert_member(text, op_brace, FIELD, json.dumps({"flag": new_flag}))
    return EditResult(path, op, old_flag, new_flag, created), new_text


def _refuse_shipped(spec: str | Path) -> None:
    path = resolve_library_path(spec)
    if is_shipped(path):
        root = Path(os.path.realpath(shipped_root()))
        name = Path(os.path.realpath(path)).relative_to(root).parts[0] if Path(os.path.realpath(path)) != root else "NAME"
        raise OpInfoError(f"is a library shipped with precision_policy, read-only to editors (an upgrade would undo "
                          f"the edit, and every user of this installation would get it): copy it out with "
                          f"`precision-policy copy-library {name} my-ops/` and edit the copy (--op-info my-ops/)",
                          file=path)


def copy_library(name: str, dest: str | Path) -> list[Path]:
    """Copy the shipped library ``name`` into the folder ``dest`` (created if missing), to edit it there.

    Existing files in ``dest`` are never overwritten (an error names them). Returns the files written.

    Example:
        >>> import pathlib, tempfile
        >>> from precision_policy.opinfo.edit import copy_library
        >>> files = copy_library("ascend910", pathlib.Path(tempfile.mkdtemp()) / "my-ops")
        >>> [f.suffix for f in files][:1]
        ['.json']
    """
    from precision_policy import fileio

    names = shipped_libraries()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OpInfoError(f"no shipped library {name!r}{hint} (shipped: {', '.join(names)})", file=str(name))
    src_files = library_files(shipped_root() / name)
    out = Path(dest)
    if out.exists() and not out.is_dir():
        raise OpInfoError("exists and is not a folder; name a folder to copy the library into", file=out)
    clash = [out / f.name for f in src_files if os.path.lexists(out / f.name)]
    if clash:
        raise OpInfoError(f"would overwrite {', '.join(str(c) for c in clash[:5])}; choose an empty or new folder",
                          file=out)
    written = []
    if not out.exists():
        with fileio.new_folder(out) as tmp:
            for f in src_files:
                fileio.atomic_write(tmp / f.name, fileio.read_input(f, OpInfoError))
        written = [out / f.name for f in src_files]
    else:
        for f in src_files:
            fileio.atomic_write(out / f.name, fileio.read_input(f, OpInfoError))
            written.append(out / f.name)
    return written


def _not_in_library(path: Path, op: str, data: dict) -> str:
    import difflib

    by_case = [k for k in data if k.lower() == op.lower()]
    close = by_case or difflib.get_close_matches(op, list(data), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"op type {op!r} is not in this library{hint} (to add a new entry, pass --add / add=True)"


def pin(spec: str | Path, op: str, *, add: bool = False) -> EditResult:
    """Pin ``op`` to its origin precision: ``precision_reduce.flag = "false"`` (black list)."""
    return set_flag(spec, op, "false", add=add)


def unpin(spec: str | Path, op: str) -> EditResult:
    """Remove ``op``'s ``precision_reduce`` field, so it is gray (follows its producer)."""
    return set_flag(spec, op, None)
