"""The op-info library: Ascend-format loading and merging, user overrides, safe editing."""

from precision_policy.opinfo.library import (
    BLACK,
    GRAY,
    WHITE,
    Library,
    OpInfo,
    TensorInfo,
    load_library,
    resolve_library_path,
    shipped_libraries,
    shipped_root,
)
from precision_policy.opinfo.overrides import (
    DtypeSpec,
    Overrides,
    env_flag_changes,
    load_customize_dtypes,
    load_keep_dtype,
    load_mixlist,
)
from precision_policy.opinfo.schema import json_schema

__all__ = [
    "BLACK",
    "GRAY",
    "WHITE",
    "DtypeSpec",
    "Library",
    "OpInfo",
    "Overrides",
    "TensorInfo",
    "env_flag_changes",
    "json_schema",
    "load_customize_dtypes",
    "load_keep_dtype",
    "load_library",
    "load_mixlist",
    "resolve_library_path",
    "shipped_libraries",
    "shipped_root",
]
