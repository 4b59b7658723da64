"""RunConfig: the one place a user states the precision policy.

Mirrors Ascend's run-config fields: ``precision_mode`` *or* ``precision_mode_v2``,
the op-info library, and the override files.

Example:
    >>> from precision_policy import RunConfig
    >>> cfg = RunConfig(precision_mode="allow_mix_precision", op_info="ascend910")
    >>> cfg.mode.name, cfg.mode.low
    ('allow_mix_precision', 'float16')
    >>> RunConfig(precision_mode_v2="mixed_bfloat16").mode.name
    'allow_mix_precision_bf16'
    >>> RunConfig(precison_mode="force_fp16")
    Traceback (most recent call last):
    ...
    precision_policy.errors.ConfigError: RunConfig.precison_mode: unknown setting; did you mean 'precision_mode'? ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from precision_policy import modes
from precision_policy.errors import ConfigError, OverrideError
from precision_policy.modes.base import PrecisionMode
from precision_policy.opinfo.library import Library, load_library
from precision_policy.opinfo.overrides import (
    Overrides,
    env_flag_changes,
    load_customize_dtypes,
    load_keep_dtype,
    load_mixlist,
)

DEFAULT_OP_INFO = "ascend910"


def unknown_setting_message(name: str) -> str:
    """'unknown setting; did you mean ...?' for a keyword RunConfig does not have."""
    import difflib

    valid = list(RunConfig.model_fields)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown setting; {hint}valid settings: {', '.join(valid)}"


def keep_entries_to_overrides(entries: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """(names, types) of a keep_dtype list, as :func:`load_keep_dtype` reads a file's lines.

    Each entry's "where" is ``RunConfig.keep_dtype[i]``, so errors name the entry.

    Example:
        >>> keep_entries_to_overrides(("fc", "OpType::Relu"))
        ({'fc': 'RunConfig.keep_dtype[0]'}, {'Relu': 'RunConfig.keep_dtype[1]'})
    """
    names: dict[str, str] = {}
    types: dict[str, str] = {}
    for i, line in enumerate(entries):
        where = f"RunConfig.keep_dtype[{i}]"
        if line.startswith("OpType::"):
            op = line[len("OpType::"):].strip()
            if not op:
                raise OverrideError("'OpType::' needs an op type after it, e.g. OpType::Relu", file=where)
            types[op] = where
        elif "::" in line:
            raise OverrideError(f"{line!r}: an entry is an op name or 'OpType::<type>'; the only prefix is 'OpType::'",
                                file=where)
        else:
            names[line] = where
    return names, types


class RunConfig(BaseModel):
    """Precision settings for one model, validated on construction.

    Attributes:
        precision_mode: an Ascend mode name or alias (``allow_mix_precision``, ``force_fp16``, ...).
        precision_mode_v2: the CANN v2 spelling (``mixed_float16``, ``origin``, ...). Not with precision_mode.
        op_info: op-info library file, folder or shipped name (default ``ascend910``).
        modify_mixlist: JSON moving op types between black/white/gray lists (mixed modes only).
        keep_dtype: text file of op names / ``OpType::X`` lines that keep their origin dtype, or (in
            Python) a list of such entries, ``["fc", "OpType::Softmax"]``; stored as a tuple. A name in
            the list that matches no op is an error, as a line of a file is.
        customize_dtypes: text file of exact per-op dtypes.
        loss_scale: ``None``, ``"dynamic"``, a number, a preset name or a dict of parameters.
        keep_output_dtype: graph outputs keep their origin dtype (a cast is added when needed).
        gray_disagreement: what a gray op follows when its inputs arrive in different dtypes:
            "widest" (as torch's type promotion: a float32 residual stream stays float32) or
            "low" (as TensorFlow's AMP: any low-precision input makes it low).
        native_fp16: run float16 ops on real float16 kernels. By default float16 is emulated on
            the CPU (float16 storage, so values round at every op boundary; float32 compute), as
            TensorFlow's auto_mixed_precision_cpu does: CPU float16 kernels are ~100x slower.
        use_env_lists: whether TensorFlow's ``TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_*`` lists (read
            from ``env``; mixed modes only) move op types between the lists. ``True`` or ``False``
            is obeyed on every route. ``None`` (the default) means "where TensorFlow users expect
            them": on for TensorFlow graphs (the TF backend's convert, Session and Keras routes;
            the CLI on ``.pb``/``.pbtxt``/SavedModel; graphs built in Python), off for torch
            (``precision``, ``prepare``, a ``trace`` planned with ``plan``, export, inference) and
            for graph JSON files. A graph says which with :attr:`OpGraph.env_lists
            <precision_policy.graph.OpGraph>`; see :meth:`env_lists_apply`.
        env: the environment to read them from; None means ``os.environ`` at planning time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    precision_mode: str | None = None
    precision_mode_v2: str | None = None
    op_info: str | Path = DEFAULT_OP_INFO
    modify_mixlist: Path | None = None
    keep_dtype: Path | tuple[str, ...] | None = None
    customize_dtypes: Path | None = None
    loss_scale: bool | float | int | str | dict | None = None
    keep_output_dtype: bool = True
    native_fp16: bool = False
    gray_disagreement: Literal["widest", "low"] = "widest"
    use_env_lists: bool | None = None
    env: dict[str, str] | None = Field(default=None, repr=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ())) or "RunConfig"
            msg = err.get("msg", "invalid value")
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err.get("type") == "extra_forbidden":
                msg = unknown_setting_message(where)
            raise ConfigError(f"RunConfig.{where}: {msg}") from None

    @field_validator("precision_mode")
    @classmethod
    def _known_mode(cls, value: str | None) -> str | None:
        if value is not None:
            modes.get(value)
        return value

    @field_validator("precision_mode_v2")
    @classmethod
    def _known_mode_v2(cls, value: str | None) -> str | None:
        if value is not None:
            modes.get_v2(value)
        return value

    @field_validator("op_info")
    @classmethod
    def _library_exists(cls, value: str | Path) -> str | Path:
        from precision_policy.opinfo.library import resolve_library_path

        if isinstance(value, str) and not value.strip():  # Path("") is the current folder: never what was meant
            raise ValueError(f"is empty; name an op-info file, folder or shipped library "
                             f"(the default is {DEFAULT_OP_INFO!r}; leave op_info out to use it)")
        resolve_library_path(value)  # a typo fails here, naming the shipped libraries
        return value

    @field_validator("keep_dtype", mode="before")
    @classmethod
    def _keep_dtype(cls, value: Any) -> Any:
        if value is None or isinstance(value, (str, Path)):
            return value
        if isinstance(value, (list, tuple, set, frozenset)):
            entries = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
            for i, entry in enumerate(entries):
                if not isinstance(entry, str) or not entry.strip():
                    raise ValueError(f"entry {i} ({entry!r}) must be a non-empty op name or 'OpType::<type>'")
            keep_entries_to_overrides(tuple(e.strip() for e in entries))  # a malformed entry fails here
            return tuple(e.strip() for e in entries)
        raise ValueError(f"must be a keep_dtype file path or a list of op names, not {type(value).__name__}")

    @field_validator("loss_scale")
    @classmethod
    def _loss_scale(cls, value: Any) -> Any:
        from precision_policy.loss_scale import from_config

        from_config(value)  # a bad value fails here, naming the presets or the parameter
        return value

    def make_loss_scale(self) -> Any:
        """A fresh loss-scale state machine for ``loss_scale`` (None when it is not set)."""
        from precision_policy.loss_scale import from_config

        return from_config(self.loss_scale)

    @model_validator(mode="after")
    def _one_mode(self) -> RunConfig:
        if self.precision_mode is not None and self.precision_mode_v2 is not None:
            raise ValueError(
                "precision_mode and precision_mode_v2 are both set; set one of them "
                f"(precision_mode={self.precision_mode!r}, precision_mode_v2={self.precision_mode_v2!r})"
            )
        if self.modify_mixlist is not None and not self.mode.mixed:
            raise ValueError(
                f"modify_mixlist only applies to the mixed modes (allow_mix_precision, allow_mix_precision_bf16, "
                f"mixed_float16, mixed_bfloat16), not {self.mode.name!r}"
            )
        return self

    @property
    def mode(self) -> PrecisionMode:
        """The precision mode object (default allow_fp32_to_fp16, as on Ascend)."""
        if self.precision_mode_v2 is not None:
            return modes.get_v2(self.precision_mode_v2)
        return modes.get(self.precision_mode or modes.DEFAULT_MODE)

    def library(self) -> Library:
        """Load (cached) the op-info library."""
        return load_library(self.op_info)

    def env_lists_apply(self, default: bool = True) -> bool:
        """Whether the env lists apply: ``use_env_lists`` when set, else the route's ``default``
        (True for TensorFlow graphs, False for torch and graph JSON), and only in mixed modes.

        Example:
            >>> cfg = RunConfig(precision_mode="allow_mix_precision")
            >>> cfg.env_lists_apply(default=True), cfg.env_lists_apply(default=False)
            (True, False)
            >>> RunConfig(precision_mode="allow_mix_precision", use_env_lists=True).env_lists_apply(default=False)
            True
            >>> RunConfig(precision_mode="force_fp16", use_env_lists=True).env_lists_apply()
            False
        """
        wanted = default if self.use_env_lists is None else self.use_env_lists
        return wanted and self.mode.mixed

    def overrides(self, library: Library | None = None, *, env_lists_default: bool = True) -> Overrides:
        """Load every override file and the env lists against ``library``.

        ``env_lists_default`` is what ``use_env_lists=None`` means on the caller's route
        (see :meth:`env_lists_apply`).
        """
        lib = library if library is not None else self.library()
        ov = Overrides()
        if self.modify_mixlist is not None:
            ov.flags.update(load_mixlist(self.modify_mixlist, lib))
        if self.env_lists_apply(env_lists_default):
            env: Mapping[str, str] = self.env if self.env is not None else os.environ
            changes, warnings = env_flag_changes(env, lib, ov.flags)
            ov.flags.update(changes)
            ov.warnings.extend(warnings)
        if isinstance(self.keep_dtype, tuple):
            ov.keep_names, ov.keep_types = keep_entries_to_overrides(self.keep_dtype)
        elif self.keep_dtype is not None:
            ov.keep_names, ov.keep_types = load_keep_dtype(self.keep_dtype)
            for op in ov.keep_types:
                if op not in lib:
                    ov.warnings.append(f"keep_dtype: OpType::{op} is not in library {lib.name!r}")
        if self.customize_dtypes is not None:
            ov.custom_names, ov.custom_types = load_customize_dtypes(self.customize_dtypes)
        return ov

    def summary(self) -> dict[str, Any]:
        """The settings that shaped a plan, for its JSON form (paths as given)."""
        out: dict[str, Any] = {"precision_mode": self.mode.name, "op_info": str(self.op_info)}
        for key in ("modify_mixlist", "keep_dtype", "customize_dtypes"):
            value = getattr(self, key)
            if isinstance(value, tuple):
                out[key] = list(value)
            elif value is not None:
                out[key] = str(value)
        if not self.keep_output_dtype:
            out["keep_output_dtype"] = False
        out["float16"] = "native" if self.native_fp16 else "emulated"
        if self.gray_disagreement != "widest":
            out["gray_disagreement"] = self.gray_disagreement
        return out
