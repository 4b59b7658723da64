"""Long work shows a progress bar: converting a graph of more than 10,000 nodes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

REPO = Path(__file__).resolve().parent.parent


def _chain_graph(path: Path, n: int) -> None:
    lines = ['node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }',
             'node { name: "w" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } attr { key: "value" value { tensor '
             '{ dtype: DT_FLOAT tensor_shape { dim { size: 4 } dim { size: 4 } } float_val: 0.5 } } } }',
             'node { name: "m0" op: "MatMul" input: "x" input: "w" attr { key: "T" value { type: DT_FLOAT } } }']
    prev = "m0"
    for k in range(n):
        lines.append(f'node {{ name: "r{k}" op: "Relu" input: "{prev}" attr {{ key: "T" value {{ type: DT_FLOAT }} }} }}')
        prev = f"r{k}"
    path.write_text("\n".join(lines))


@pytest.mark.slow
def test_converting_a_big_graph_shows_its_stages(tmp_path):
    src = tmp_path / "big.pbtxt"
    _chain_graph(src, 10_050)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = [sys.executable, "-m", "precision_policy", "convert", str(src)]
    mode = ["--mode", "allow_mix_precision", "--op-info", "ascend910"]
    shown = subprocess.run([*run, str(tmp_path / "a.pb"), *mode, "--progress"], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "convert big.pbtxt" in shown.stderr and "4/4" in shown.stderr and "loaded 10,053 nodes" in shown.stderr
    # (without --progress, a bar shows only on a terminal: convert_model(progress=None) checks stderr.isatty())
    x = np.random.RandomState(0).rand(3, 4).astype("float32")
    want, got = _run(src, x, "r10049:0"), _run(tmp_path / "a.pb", x, "r10049:0")
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def _run(path: Path, x: np.ndarray, fetch: str) -> np.ndarray:
    import tensorflow as tf
    from google.protobuf import text_format

    gd = tf.compat.v1.GraphDef()
    if path.suffix == ".pbtxt":
        text_format.Parse(path.read_text(), gd)
    else:
        gd.ParseFromString(path.read_bytes())
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=graph) as sess:
            return sess.run(fetch, {"x:0": x})

