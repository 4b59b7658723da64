"""User overrides on top of an op-info library.

In increasing priority (see DESIGN.md):

1. ``modify_mixlist`` JSON — move op types between the black, white and gray lists
   (valid only with the mixed modes), checked against Ascend's rules.
2. ``keep_dtype`` text file — op names, or ``OpType::Relu``, that keep their origin dtype.
3. ``customize_dtypes`` text file — exact dtypes per op name or ``OpType::``.
4. TensorFlow's environment lists
   ``TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_{ALLOW,DENY,INFER,CLEAR}LIST_{ADD,REMOVE}``
   (allow -> white, deny -> black, infer/clear -> gray), applied to flags after the mixlist.
   By default only on TensorFlow routes: see ``RunConfig.use_env_lists`` and ``RunConfig.env_lists_apply``.

Example:
    >>> from precision_policy.opinfo import load_library
    >>> from precision_policy.opinfo.overrides import env_flag_changes
    >>> lib = load_library("ascend910")
    >>> changes, warnings = env_flag_changes({"TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_DENYLIST_ADD": "Conv2D"}, lib)
    >>> changes["Conv2D"]
    ('black', 'env TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_DENYLIST_ADD')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from precision_policy import dtypes
from precision_policy._jsonio import load_json_file
from precision_policy.errors import DTypeError, OverrideError
from precision_policy.opinfo.library import BLACK, GRAY, WHITE, Library, shipped_root

MIXLIST_KEYS = {"black-list": BLACK, "white-list": WHITE, "gray-list": GRAY}
MIXLIST_ACTIONS = ("to-add", "to-remove")
ENV_PREFIX = "TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_"
ENV_LISTS = {"ALLOWLIST": WHITE, "DENYLIST": BLACK, "INFERLIST": GRAY, "CLEARLIST": GRAY}


@dataclass(frozen=True)
class DtypeSpec:
    """Exact dtypes from a customize_dtypes line; None leaves that side to the mode."""

    inputs: tuple[str, ...] | None
    outputs: tuple[str, ...] | None
    where: str  # "file:line", for reasons and errors


@dataclass
class Overrides:
    """Everything a user layered on top of the library, ready for a mode to consult."""

    flags: dict[str, tuple[str, str]] = field(default_factory=dict)  # op type -> (list, reason)
    keep_names: dict[str, str] = field(default_factory=dict)  # node name -> "file:line"
    keep_types: dict[str, str] = field(default_factory=dict)  # op type -> "file:line"
    custom_names: dict[str, DtypeSpec] = field(default_factory=dict)
    custom_types: dict[str, DtypeSpec] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.flags or self.keep_names or self.keep_types or self.custom_names or self.custom_types)


# ---------------------------------------------------------------------- modify_mixlist
def load_mixlist(path: str | Path, library: Library) -> dict[str, tuple[str, str]]:
    """Read a modify_mixlist file and return op type -> (new list, reason).

    Ascend's rules, each an :class:`OverrideError` naming the file and op:
    ``to-remove`` needs the op to be on that list now (it then becomes gray); one op may
    not be in ``to-add`` of two lists, nor in ``to-add`` and ``to-remove`` of the same list;
    ``gray-list.to-remove`` alone does not say where an op goes; an op type must be in the library.
    """
    p = Path(path)
    data = load_json_file(p, OverrideError)
    if not isinstance(data, dict):
        raise OverrideError('must be a JSON object like {"black-list": {"to-add": ["Op"]}}', file=p)
    adds: dict[str, str] = {}
    removes: dict[str, list[str]] = {}
    for key, body in data.items():
        if key not in MIXLIST_KEYS:
            raise OverrideError(f"unknown key {key!r}; valid keys: {', '.join(MIXLIST_KEYS)}", file=p)
        if not isinstance(body, dict):
            raise OverrideError(f'{key!r} must be an object with "to-add" and/or "to-remove" lists', file=p)
        for action, ops in body.items():
            if action not in MIXLIST_ACTIONS:
                raise OverrideError(f"{key}: unknown key {action!r}; valid keys: to-add, to-remove", file=p)
            if not isinstance(ops, list) or not all(isinstance(o, str) and o for o in ops):
                raise OverrideError(f"{key}.{action} must be a list of op type names", file=p)
            for op in ops:
                if op not in library:
                    close = library.closest(op)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise OverrideError(
                        f"{key}.{action}: op type {op!r} is not in library {library.name!r}.{hint} "
                        "Op types must be the library's own (canonical) names.",
                        file=p,
                    )
                target = MIXLIST_KEYS[key]
                if action == "to-add":
                    if op in adds and adds[op] != target:
                        raise OverrideError(
                            f"op {op!r} is in to-add of both {adds[op]}-list and {target}-list; "
                            "an op can be moved to one list only",
                            file=p,
                        )
                    adds[op] = target
                else:
                    removes.setdefault(op, []).append(target)
    changes: dict[str, tuple[str, str]] = {}
    for op, lists in removes.items():
        for lst in lists:
            if adds.get(op) == lst:
                raise OverrideError(
                    f"op {op!r} is in both to-add and to-remove of {lst}-list; keep one of them", file=p
                )
            current = library[op].flag
            if current != lst:
                raise OverrideError(
                    f"{lst}-list.to-remove: op {op!r} is not on the {lst}-list (library {library.name!r} has it "
                    f"{current}); to-remove only takes ops already on that list",
                    file=p,
                )
            if lst == GRAY and op not in adds:
                raise OverrideError(
                    f"gray-list.to-remove: op {op!r} needs a destination; put it in black-list.to-add or "
                    "white-list.to-add instead",
                    file=p,
                )
            if op not in adds:
                changes[op] = (GRAY, f"modify_mixlist {p.name}: removed from {lst}-list")
    for op, target in adds.items():
        changes[op] = (target, f"modify_mixlist {p.name}: added to {target}-list")
    return changes


# ---------------------------------------------------------------------- keep_dtype
def _lines(path: Path) -> list[tuple[int, str]]:
    from precision_policy.fileio import read_input_text  # regular files only, size-capped

    text = read_input_text(path, OverrideError)
    out = []
    for no, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((no, line))
    return out


def load_keep_dtype(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Read a keep_dtype file: one op name or ``OpType::Name`` per line; ``#`` starts a comment."""
    p = Path(path)
    names: dict[str, str] = {}
    types: dict[str, str] = {}
    for no, line in _lines(p):
        where = f"{p.name}:{no}"
        if line.startswith("OpType::"):
            op = line[len("OpType::"):].strip()
            if not op:
                raise OverrideError("'OpType::' needs an op type after it, e.g. OpType::Relu", file=p, line=no)
            types[op] = where
        elif "::" in line:
            raise OverrideError(
                f"{line!r}: a line is an op name or 'OpType::<type>'; the only prefix is 'OpType::'", file=p, line=no
            )
        else:
            names[line] = where
    return names, types


# ---------------------------------------------------------------------- customize_dtypes
def _parse_dtype_spec(spec: str, p: Path, no: int) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    section: str | None = None
    ins: list[str] = []
    outs: list[str] = []
    seen: set[str] = set()
    for token in spec.split(","):
        token = token.strip()
        for head in ("InputDtype:", "OutputDtype:"):
            if token.startswith(head):
                section = head[:-1]
                if section in seen:
                    raise OverrideError(f"{head} appears twice", file=p, line=no)
                seen.add(section)
                token = token[len(head):].strip()
                break
        if section is None:
            raise OverrideError(
                f"{spec!r}: expected 'InputDtype:<dtype>,...,OutputDtype:<dtype>,...'", file=p, line=no
            )
        if not token:
            raise OverrideError(f"empty dtype in {section} list", file=p, line=no)
        try:
            canon = dtypes.canonical(token)
        except DTypeError as exc:
            raise OverrideError(str(exc), file=p, line=no) from None
        (ins if section == "InputDtype" else outs).append(canon)
    return (tuple(ins) if "InputDtype" in seen else None, tuple(outs) if "OutputDtype" in seen else None)


def load_customize_dtypes(path: str | Path) -> tuple[dict[str, DtypeSpec], dict[str, DtypeSpec]]:
    """Read a customize_dtypes file.

    Lines are ``OpName::InputDtype:float16,float16,OutputDtype:float16`` or
    ``OpType::Conv2D:InputDtype:float16,float16,OutputDtype:float16``.
    """
    p = Path(path)
    names: dict[str, DtypeSpec] = {}
    types: dict[str, DtypeSpec] = {}
    for no, line in _lines(p):
        target, sep, spec = line.partition("::")
        if not sep or not target:
            raise OverrideError(
                f"{line!r}: expected 'OpName::InputDtype:...,OutputDtype:...' or 'OpType::<type>:InputDtype:...'",
                file=p,
                line=no,
            )
        where = f"{p.name}:{no}"
        if target == "OpType":
            op, sep2, spec = spec.partition(":")
            if not sep2 or not op:
                raise OverrideError(f"{line!r}: expected 'OpType::<type>:InputDtype:...'", file=p, line=no)
            ins, outs = _parse_dtype_spec(spec, p, no)
            types[op.strip()] = DtypeSpec(ins, outs, where)
        else:
            ins, outs = _parse_dtype_spec(spec, p, no)
            names[target] = DtypeSpec(ins, outs, where)
    return names, types


# ---------------------------------------------------------------------- TF environment lists
@lru_cache(maxsize=1)
def tensorflow_aliases() -> dict[str, str]:
    """TF op name -> canonical op type, from ``opinfo_db/aliases/tensorflow.json`` (empty if absent)."""
    path = shipped_root() / "aliases" / "tensorflow.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return dict(data.get("ops", {}))


def env_flag_changes(
    env: Mapping[str, str],
    library: Library,
    base: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Flag changes from TF's AMP environment lists; TF op names are mapped to canonical types.

    ``*_ADD`` puts an op on that list; ``*_REMOVE`` takes it off (it becomes gray) when it is
    on it. An op added to two different lists is an error; unknown op types are reported as
    warnings, as TF ignores them too.
    """
    aliases = tensorflow_aliases()
    changes: dict[str, tuple[str, str]] = {}
    added: dict[str, tuple[str, str]] = {}
    warnings: list[str] = []
    removals: list[tuple[str, str, str]] = []
    for lst, target in ENV_LISTS.items():
        for action in ("ADD", "REMOVE"):
            var = f"{ENV_PREFIX}{lst}_{action}"
            value = env.get(var)
            if not value:
                continue
            for raw_op in value.split(","):
                raw_op = raw_op.strip()
                if not raw_op:
                    continue
                op = aliases.get(raw_op, raw_op)
                if op not in library:
                    close = library.closest(op)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    warnings.append(f"{var}: op type {raw_op!r} is not in library {library.name!r}{hint}; ignored")
                    continue
                if action == "ADD":
                    if op in added and added[op][0] != target:
                        raise OverrideError(
                            f"op {raw_op!r} is added to two lists ({added[op][1]} and {var}); "
                            "an op can be on one list only",
                            file="environment",
                        )
                    added[op] = (target, var)
                else:
                    removals.append((op, target, var))
    for op, target, var in removals:
        if op in added:
            continue  # moved explicitly by an ADD elsewhere
        current = base[op][0] if base and op in base else library[op].flag
        if current == target:
            changes[op] = (GRAY, f"env {var}")
    for op, (target, var) in added.items():
        changes[op] = (target, f"env {var}")
    return changes, warnings
