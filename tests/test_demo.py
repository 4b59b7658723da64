"""`make demo`'s scripts run and say what they should (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_core_demo_plans_every_mode_on_both_libraries():
    out = run("demo_core.py")
    assert out.count("conv2d_bias_relu") >= 16 and "op-info library ascend910b" in out
    assert "precision error: myConv (Conv2D): no float32 kernel" in out  # must_keep_origin_dtype on ascend910
    assert "explain myConv" in out and "cube op (heavyOp)" in out


@pytest.mark.slow
def test_tensorflow_demo_converts_serves_and_trains():
    pytest.importorskip("tensorflow")
    out = run("demo_tf.py")
    assert "Converted 4/68 nodes to bfloat16" in out and "served: float32 (1, 28, 28, 32)" in out
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.strip().startswith("step")]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.01
