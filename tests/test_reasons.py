"""Reason prose is rendered from structured decisions in one place (precision_policy.reasons)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import precision_policy as pp
from precision_policy.reasons import render
from precision_policy.rules import DETAILS, Rule, Why

from conftest import EXAMPLES

PACKAGE = Path(pp.__file__).resolve().parent


@pytest.mark.parametrize("rule", list(Rule))
def test_every_rule_has_words(rule):
    text = render(Why(rule, followed="prod", detail="input", wanted=("float16",)), "float16", ("float32",), ("float16",))
    assert text and text != f"rule {rule.value}", f"{rule} has no sentence in precision_policy.reasons"


def test_composite_decisions_render_their_inner_decision():
    white = Why(Rule.WHITE, inner=Why(Rule.FALLBACK_KERNEL, wanted=("float16",)), where="mix.json: added to white-list")
    assert render(white, "float32") == "white-list, but no float16 kernel (mix.json: added to white-list)"
    gray = Why(Rule.GRAY_FOLLOWS, followed="b", wanted=("bfloat16",),
               inner=Why(Rule.FALLBACK_KERNEL, wanted=("bfloat16",), inner=Why(Rule.MODE, detail="keeps_origin")))
    assert render(gray, "float32") == "gray: follows b (bfloat16), but no bfloat16 kernel, keeps its origin dtype"
    kept_cast = Why(Rule.KEEP_DTYPE, where="keep.txt:3", inner=Why(Rule.EXISTING_CAST))
    assert render(kept_cast, "float32", ("float16",), ("float32",)) == \
        "Cast: reads its input as produced (float16), writes float32; keep_dtype (keep.txt:3)"


def test_details_used_by_real_plans_are_in_the_vocabulary():
    modes = {m.name for m in pp.modes.all_modes()}
    for mode in ("allow_mix_precision", "allow_fp32_to_fp16", "force_fp32", "allow_mix_precision_bf16"):
        p = pp.plan(EXAMPLES / "transformer_encoder_block.json", precision_mode=mode, op_info="ascend910", use_env_lists=False)
        for w in p.whys:
            while w is not None:
                assert not w.detail or w.detail in DETAILS or w.detail in modes or w.detail in ("input", "const", "variable")
                w = w.inner


def test_planner_and_graph_rewriters_never_touch_reason_text():
    """The planner, decider and modes produce Why records, and the TF rewriter reads dtypes: none reads reason text."""
    tf = PACKAGE / "backends" / "tensorflow"
    files = [*(PACKAGE / "modes").glob("*.py"), tf / "graphdef.py", tf / "convert.py", tf / "session.py", tf / "keras.py"]
    assert len(files) > 8 and all(f.is_file() for f in files)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("reason", "reasons"):
                pytest.fail(f"{path.name}:{node.lineno} uses .{node.attr}: decide on Why fields, render in CastPlan")
