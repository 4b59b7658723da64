"""Pydantic schema of one op entry of an Ascend ops-info JSON file.

Only the fields precision_policy reads are typed; every other field is kept as
is (``extra="allow"``), because real files carry many. :func:`json_schema`
returns a JSON Schema editors can use to validate a user's edits.

Example:
    >>> from precision_policy.opinfo.schema import OpEntry
    >>> e = OpEntry.model_validate({"precision_reduce": {"flag": "true"}, "op": {"pattern": "x"}})
    >>> e.precision_reduce.flag
    'true'
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from precision_policy import dtypes

#: What an op type may be called (the library's top-level keys; the JSON Schema's ``propertyNames``).
OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
TENSOR_KEY = re.compile(r"^(input|output)(\d+)$")


class FlagField(BaseModel):
    """``{"flag": "true"}`` or ``{"flag": "false"}`` (JSON booleans are accepted too)."""

    model_config = ConfigDict(extra="allow")
    flag: Literal["true", "false"]

    @field_validator("flag", mode="before")
    @classmethod
    def _bool_to_text(cls, value: Any) -> Any:
        if value is True:
            return "true"
        if value is False:
            return "false"
        return value


class TensorField(BaseModel):
    """``inputN`` / ``outputN``: parallel comma-separated ``dtype`` and ``format`` lists."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    dtype: str | None = Field(
        default=None,
        description="Comma-separated dtypes, one per kernel variant; 'float' means float32.",
    )
    format: str | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtypes(cls, value: str | None) -> str | None:
        if value is None:
            return value
        for word in value.split(","):
            word = word.strip()
            if not word:
                raise ValueError("empty entry in the dtype list (two commas in a row, or a trailing comma)")
            if not dtypes.is_known(word):
                dtypes.canonical(word)  # raises DTypeError with the valid choices
        return value


class OpEntry(BaseModel):
    """One op type's entry. ``inputN``/``outputN`` are validated as :class:`TensorField`."""

    model_config = ConfigDict(extra="allow")
    precision_reduce: FlagField | None = Field(
        default=None,
        description="true: white (may run in low precision); false: black (keeps its precision); absent: gray (follows its producer).",
    )
    heavyOp: FlagField | None = Field(default=None, description="true marks a cube (matrix) op.")


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of an ops-info file: an object of op type -> entry."""
    entry = OpEntry.model_json_schema(ref_template="#/$defs/{model}")
    defs = entry.pop("$defs", {})
    defs["TensorField"] = TensorField.model_json_schema(ref_template="#/$defs/{model}")
    entry["patternProperties"] = {TENSOR_KEY.pattern: {"$ref": "#/$defs/TensorField"}}
    entry["additionalProperties"] = True
    defs["OpEntry"] = entry
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Ascend ops-info library (precision_policy)",
        "description": "Top-level keys are op types in canonical PascalCase; each value describes the op's kernels and precision flag.",
        "type": "object",
        "propertyNames": {"pattern": OP_NAME.pattern},
        "additionalProperties": {"$ref": "#/$defs/OpEntry"},
        "$defs": defs,
    }
