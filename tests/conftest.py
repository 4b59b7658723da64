"""Shared helpers: small op-info libraries and graphs written to real files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import precision_policy as pp

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "graphs"


def op_entry(dtypes: str, flag: str | None = None, heavy: bool = False, n_in: int = 1, n_out: int = 1) -> dict[str, Any]:
    """An Ascend-style entry whose inputs and outputs all take the parallel list ``dtypes``."""
    entry: dict[str, Any] = {"op": {"pattern": "formatAgnostic"}}
    fmt = ",".join(["ND"] * len(dtypes.split(",")))
    for k in range(n_in):
        entry[f"input{k}"] = {"name": f"x{k}", "dtype": dtypes, "format": fmt, "paramType": "required"}
    for k in range(n_out):
        entry[f"output{k}"] = {"name": f"y{k}", "dtype": dtypes, "format": fmt, "paramType": "required"}
    if flag is not None:
        entry["precision_reduce"] = {"flag": flag}
    if heavy:
        entry["heavyOp"] = {"flag": "true"}
    return entry


#: A small library covering every row of the mode table.
SMALL_LIB = {
    "Conv2D": op_entry("float16,float16", "true", heavy=True, n_in=2),  # cube op, no float32 kernel
    "MatMulV2": op_entry("float16,float", "true", heavy=True, n_in=2),  # cube op with both
    "Relu": op_entry("float16,float"),  # gray vector op
    "Add": op_entry("float16,float", n_in=2),  # gray
    "Cast": op_entry("float16,float,int32", n_in=1),  # gray
    "Softmax": op_entry("float16,float", "true"),  # white vector op
    "ReduceSum": op_entry("float16,float", "false"),  # black
    "Exp32": op_entry("float,float", "true"),  # white but float32 only
    "LogOnly16": op_entry("float16,float16", "false"),  # black with no float32 kernel
    "Sqrt32": op_entry("float,float"),  # gray, float32 only
    "BF": op_entry("bfloat16,float", "true"),  # white with a bf16 kernel
}


@pytest.fixture
def small_lib(tmp_path: Path) -> Path:
    path = tmp_path / "aic-test-ops-info.json"
    path.write_text(json.dumps(SMALL_LIB, indent=4, sort_keys=True))
    return path


def graph(nodes: list[tuple], outputs: list[str], name: str = "g") -> pp.OpGraph:
    """Build an OpGraph from (name, op, inputs[, outputs]) tuples; outputs default to one float32."""
    g = pp.OpGraph(name)
    for spec in nodes:
        nname, op, ins = spec[:3]
        outs = spec[3] if len(spec) > 3 else ["float32"]
        g.add_node(nname, op, ins, outs)
    g.set_outputs(outputs)
    return g


def json_entry_span(text: str, key: str) -> tuple[int, int]:
    """(start of the top-level ``key``, one past the end of its value) in a JSON object's text."""
    dec = json.JSONDecoder()
    i = text.index("{") + 1
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        key_start = i
        found, i = json.decoder.scanstring(text, i + 1)
        while text[i] in " \t\r\n:":
            i += 1
        _, end = dec.raw_decode(text, i)
        if found == key:
            return key_start, end
        i = end


def plan(g: pp.OpGraph, mode: str, lib: Path | str, **kw: Any) -> pp.CastPlan:
    kw.setdefault("use_env_lists", False)
    return pp.plan(g, pp.RunConfig(precision_mode=mode, op_info=lib, **kw))


def casts(p: pp.CastPlan) -> set[tuple[str, str]]:
    return {(c.tensor, c.to) for c in p.casts}
