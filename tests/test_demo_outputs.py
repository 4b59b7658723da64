"""`make demo`'s scripts run, say what they should, and write their files: PNG plots written by matplotlib,
plan reports, the tuning result (real subprocesses).

The demos run with ``PP_DEMO_EPOCHS=1`` (one epoch per mode instead of the demo's default) and
``PP_DEMO_OUT`` pointing at a temporary folder, so the check is quick and leaves demo_out/ alone.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(script: str, out: Path) -> str:
    env = {**os.environ, "PP_DEMO_EPOCHS": "1", "PP_DEMO_OUT": str(out)}
    r = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def png_chunks(path: Path) -> dict[bytes, list[bytes]]:
    """The chunks of a PNG file, every CRC checked (a truncated or corrupt file fails here)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path}: not a PNG"
    chunks: dict[bytes, list[bytes]] = {}
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        chunks.setdefault(kind, []).append(body)
        pos += 12 + length
    assert b"IEND" in chunks, f"{path}: no IEND chunk"
    return chunks


def check_png(path: Path) -> None:
    chunks = png_chunks(path)
    width, height = struct.unpack(">II", chunks[b"IHDR"][0][:8])
    assert 300 <= width <= 2000 and 200 <= height <= 2000, (path, width, height)
    software = [t for t in chunks.get(b"tEXt", []) if t.startswith(b"Software\x00")]
    assert software and b"Matplotlib" in software[0], f"{path}: not written by matplotlib"
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(path) as img:
        img.load()
        assert img.size == (width, height)
        assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 5  # a plot, not a blank image


def check_report(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith("<!doctype html") and "</html>" in text, path


def files_listed(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.split("files written:", 1)[1].splitlines() if line.strip()]


def test_core_demo_plans_every_mode_on_both_libraries_and_writes_plan_reports(tmp_path):
    out = run("demo_core.py", tmp_path)
    assert out.count("conv2d_bias_relu") >= 16 and "op-info library ascend910b" in out
    assert "precision error: myConv (Conv2D): no float32 kernel" in out  # must_keep_origin_dtype on ascend910
    assert "explain myConv" in out and "cube op (heavyOp)" in out
    reports = sorted((tmp_path / "core").glob("report_*.html"))
    assert len(reports) == 4
    for path in reports:
        check_report(path)
    assert len(files_listed(out)) == 4


@pytest.mark.slow
def test_tune_demo_shows_the_table_and_saves_the_result(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    env = {**os.environ, "PP_DEMO_OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, str(EXAMPLES / "demo_tune.py")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr  # the tuner logs its table (logging) and draws its bar (tqdm) on stderr
    assert "| ops low" in log and "failed" in log and "passed" in log and "op type" in log
    assert "tune:" in log  # the progress bar
    folder = tmp_path / "tuned"
    kept = [line for line in (folder / "keep_dtype.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert kept == ["8"]  # the bf16-sensitive last Linear
    trials = json.loads((folder / "trials.json").read_text())
    assert trials["trials"] and not trials["trials"][0]["passed"]
    check_report(folder / "report.html")
    assert "kept in float32: 8" in r.stdout


@pytest.mark.slow
def test_tensorflow_demo_converts_serves_trains_and_writes_plan_reports(tmp_path):
    pytest.importorskip("tensorflow")
    out = run("demo_tf.py", tmp_path)
    assert "Converted 4/68 nodes to bfloat16" in out and "served: float32 (1, 28, 28, 32)" in out
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.strip().startswith("step")]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.01
    for name in ("savedmodel_bf16", "tf1_session"):
        check_report(tmp_path / "tf" / f"report_{name}.html")
    assert len(files_listed(out)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("framework, script, needs", [("torch", "demo_torch.py", "torch"),
                                                      ("keras", "demo_keras.py", "tensorflow")])
def test_training_demo_writes_plots_and_reports(tmp_path, framework, script, needs):
    pytest.importorskip(needs)
    out = run(script, tmp_path)
    folder = tmp_path / framework
    for name in ("loss.png", "loss_scale.png", "accuracy.png"):
        check_png(folder / name)
    for mode in ("allow_mix_precision_bf16", "allow_mix_precision", "force_fp16", "allow_fp32_to_fp16"):
        check_report(folder / f"report_{mode}.html")
    assert "step(s) skipped by the loss scaler" in out  # the float16 runs start at 2**24: early steps overflow
    assert any(line.endswith("loss_scale.png") for line in files_listed(out))
