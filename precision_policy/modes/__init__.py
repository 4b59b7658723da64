"""Precision modes: one policy object per mode, found by name or alias.

Read top-down:

- :mod:`~precision_policy.modes.base`: :class:`PrecisionMode`, the policy object: one dtype for one op.
- :mod:`~precision_policy.modes.standard`: the modes of DESIGN.md's table.
- :mod:`~precision_policy.modes.decider`: :class:`~precision_policy.modes.decider.NodeDecider`, one node
  (overrides, then the mode, then the kernel variant's tensor dtypes), shared by every route.
- :mod:`~precision_policy.modes.planner`: :func:`~precision_policy.modes.planner.plan`, a whole graph
  in numbered passes, and :mod:`~precision_policy.modes.loops` for TF v1 loops and list handles.
- :mod:`precision_policy.rules` names the rule behind each decision; :mod:`precision_policy.optypes`
  the op taxonomy (sources, pass-through, control flow, data movement).

Example:
    >>> from precision_policy import modes
    >>> modes.get("allow_mix_precision_fp16").name
    'allow_mix_precision'
    >>> [m.name for m in modes.all_modes()][:2]
    ['force_fp32', 'must_keep_origin_dtype']
"""

from __future__ import annotations

import difflib

from precision_policy.errors import ConfigError
from precision_policy.modes.base import NoKernel, PrecisionMode
from precision_policy.modes.standard import ALL_MODES

_BY_NAME: dict[str, PrecisionMode] = {}
for _cls in ALL_MODES:
    _mode = _cls()
    _BY_NAME[_mode.name] = _mode
    for _alias in _mode.aliases:
        _BY_NAME[_alias] = _mode

#: precision_mode_v2 values (CANN) -> mode names.
V2_NAMES: dict[str, str] = {
    "fp16": "force_fp16",
    "origin": "must_keep_origin_dtype",
    "cube_fp16in_fp32out": "force_fp32",
    "mixed_float16": "allow_mix_precision",
    "mixed_bfloat16": "allow_mix_precision_bf16",
    "bf16": "force_bf16",
}

DEFAULT_MODE = "allow_fp32_to_fp16"


def names() -> list[str]:
    """Every accepted name: canonical names and aliases."""
    return sorted(_BY_NAME)


def all_modes() -> list[PrecisionMode]:
    """The modes in the order of DESIGN.md's table."""
    return [_BY_NAME[c.name] for c in ALL_MODES]


def get(name: str) -> PrecisionMode:
    """The mode called ``name`` (or an alias); unknown names list the valid ones and the closest."""
    if isinstance(name, PrecisionMode):
        return name
    key = str(name).strip()
    mode = _BY_NAME.get(key) or _BY_NAME.get(key.lower())
    if mode is not None:
        return mode
    close = difflib.get_close_matches(key.lower(), list(_BY_NAME), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown precision mode {name!r}.{hint} Valid modes: {', '.join(names())}")


def get_v2(name: str) -> PrecisionMode:
    """The mode for a ``precision_mode_v2`` value (``mixed_float16``, ``origin``, ``fp16``, ...)."""
    key = str(name).strip().lower()
    if key in V2_NAMES:
        return _BY_NAME[V2_NAMES[key]]
    close = difflib.get_close_matches(key, list(V2_NAMES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown precision_mode_v2 {name!r}.{hint} Valid values: {', '.join(sorted(V2_NAMES))}")


__all__ = ["DEFAULT_MODE", "NoKernel", "PrecisionMode", "V2_NAMES", "all_modes", "get", "get_v2", "names"]
