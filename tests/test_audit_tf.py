"""Runtime audit, overflow localization and range statistics for TensorFlow graphs, and the `audit` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import precision_policy as pp  # noqa: E402
from precision_policy.backends.tensorflow.audit import parse_onednn, random_feeds  # noqa: E402
from precision_policy.backends.tensorflow.convert import rewrite_with_plan  # noqa: E402
from precision_policy.report.schema import load_audit, load_ranges  # noqa: E402
from precision_policy.tensorflow import audit, find_overflow, range_stats  # noqa: E402

from conftest import REPO  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
FP16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="tf_amp_fp16")
FP16_ASCEND = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910")


def mlp(big: float = 1.0, first: float = 0.3) -> tf.compat.v1.GraphDef:
    """x -> mm (+ bias, relu) -> mm2 (planted: weights * big) -> tanh -> out."""
    rng = np.random.RandomState(0)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        w = tf.constant(rng.randn(8, 16).astype(np.float32) * first, name="w")
        b = tf.constant(rng.randn(16).astype(np.float32), name="b")
        h = tf.nn.relu(tf.nn.bias_add(tf.matmul(x, w, name="mm"), b, name="ba"), name="relu")
        w2 = tf.constant(rng.randn(16, 4).astype(np.float32) * big, name="w2")
        tf.identity(tf.tanh(tf.matmul(h, w2, name="mm2"), name="tanh"), name="out")
    return g.as_graph_def()


FEEDS = {"x": np.random.RandomState(1).randn(4, 8).astype(np.float32)}


def _force_fp32(gd: tf.compat.v1.GraphDef, name: str) -> tf.compat.v1.GraphDef:
    """A converted graph with node ``name`` made to compute in float32 (casts around it), against its plan."""
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(gd)
    node = next(n for n in out.node if n.name == name)
    low = node.attr["T"].type
    for k, ref in enumerate(list(node.input)):
        cast = out.node.add(name=f"{name}/in{k}", op="Cast", input=[ref])
        cast.attr["SrcT"].type, cast.attr["DstT"].type = low, tf.float32.as_datatype_enum
        node.input[k] = cast.name
    node.attr["T"].type = tf.float32.as_datatype_enum
    back = out.node.add(name=f"{name}/back", op="Cast", input=[name])
    back.attr["SrcT"].type, back.attr["DstT"].type = tf.float32.as_datatype_enum, low
    for n in out.node:
        if n is not back:
            for k, ref in enumerate(n.input):
                if ref in (name, f"{name}:0") and n.name != back.name:
                    n.input[k] = back.name
    return out


def test_clean_bf16_audit_has_no_mismatch():
    result = audit(mlp(), FEEDS, BF16, fetches=["out"])
    assert result.mismatches() == [], result.table()
    assert result["mm2"].executed == "bfloat16" and result["tanh"].executed == "bfloat16"
    assert {r.name for r in result.rows} >= {"mm", "relu", "mm2", "tanh"}


def test_planted_float32_node_is_named_and_only_it(tmp_path):
    converted, plan = rewrite_with_plan(mlp(), BF16, ["out"])
    tampered = _force_fp32(converted, "mm2")
    result = audit(tampered, FEEDS, plan=plan, fetches=["out"])
    bad = result.mismatches()
    assert [r.name for r in bad] == ["mm2"], result.table()
    assert bad[0].mismatch.startswith("planned bfloat16, ran float32")
    out = tmp_path / "audit.json"
    result.to_json(out)
    assert [e.node for e in load_audit(out).mismatches()] == ["mm2"]


def test_emulated_float16_is_expected():
    result = audit(mlp(), FEEDS, FP16, fetches=["out"])
    assert result.mismatches() == []
    assert result["mm2"].planned == "float16" and result["mm2"].note.startswith("emulated")


@pytest.mark.parametrize("config", [FP16, FP16_ASCEND], ids=["tf_amp_fp16", "ascend910"])
def test_forward_overflow_names_the_planted_matmul(config):
    report = find_overflow(mlp(big=2e4), FEEDS, config, fetches=["out"])
    assert report.found and report.phase == "forward", report.message
    assert (report.name, report.op_type, report.planned) == ("mm2", "MatMul", "float16")
    assert report.reference.max_abs > 65504 and report.output.nonfinite > 0
    assert report.input_max_abs is not None and report.input_max_abs < 65504
    assert "mm2" in report.message
    assert not find_overflow(mlp(), FEEDS, config, fetches=["out"]).found


def test_backward_overflow_in_a_training_graph():
    rng = np.random.RandomState(0)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        w = tf.constant(rng.randn(8, 4).astype(np.float32) * 0.1, name="w")
        y = tf.tanh(tf.matmul(x, w, name="mm"), name="tanh")
        loss = tf.reduce_sum(y, name="loss")
        # a loss scale of 1e5: the forward stays in range, d(loss)/dy = 1e5 > 65504
        (grad,) = tf.gradients(loss, [x], grad_ys=tf.constant(1e5, name="scale"), name="gradients")
        tf.identity(grad, name="dx")
    report = find_overflow(g.as_graph_def(), FEEDS, FP16, fetches=["dx", "loss"])
    assert report.found and report.phase == "backward", report.message
    assert report.name.startswith("gradients/")


def test_range_stats_flag_the_node(tmp_path):
    result = range_stats(mlp(big=2e4), [FEEDS, {"x": FEEDS["x"] * 2}], FP16, fetches=["out"])
    row = result["mm2"]
    assert row.suggestion == "keep_dtype: mm2" and "> float16 max 65504" in row.message
    assert [r.name for r in result.flagged()] == ["mm2"]
    assert result.keep_dtype_lines() == "mm2\n"
    out = tmp_path / "ranges.json"
    result.to_json(out)
    assert load_ranges(out).batches == 2
    keep = tmp_path / "keep.txt"
    keep.write_text(result.keep_dtype_lines())
    fixed = pp.RunConfig(precision_mode="allow_mix_precision", op_info="tf_amp_fp16", keep_dtype=keep)
    assert not find_overflow(mlp(big=2e4), FEEDS, fixed, fetches=["out"]).found


def test_random_feeds_are_seeded():
    a, b = random_feeds(mlp(), seed=3), random_feeds(mlp(), seed=3)
    assert a["x"].shape == (2, 8) and np.array_equal(a["x"], b["x"])


def test_parse_onednn_lines():
    text = "\n".join([
        "onednn_verbose,v1,info,oneDNN v3.7.3",
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ab::f0 "
        "wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,2x8:8x16,0.02",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,ref:any,forward_training,src_f32::blocked:abcd:f0 "
        "wei_f32::blocked:abcd:f0 dst_f32::blocked:abcd:f0,,alg:convolution_direct,mb1_ic3oc8_ih8oh6kh3,0.5",
        "onednn_verbose,v1,primitive,create:cache_miss,cpu,matmul,gemm:jit,undef,src_f32,,,2x8:8x16,0.1",
    ])
    kernels = parse_onednn(text)
    assert [(k.kind, k.compute, k.reference) for k in kernels] == [("matmul", "bfloat16", False),
                                                                     ("convolution", "float32", True)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "precision_policy", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300, check=False)


def test_cli_audit_in_process(tmp_path, capsys):
    from precision_policy.cli import main

    pb = tmp_path / "frozen.pb"
    pb.write_bytes(mlp().SerializeToString())
    mode = ["--mode", "allow_mix_precision_bf16", "--op-info", "tf_amp_bf16"]
    assert main(["audit", str(pb), *mode, "-o", str(tmp_path / "a.json")]) == 0
    assert "0 mismatch(es)" in capsys.readouterr().out
    assert load_audit(tmp_path / "a.json").nodes
    big = tmp_path / "big.pb"
    big.write_bytes(mlp(big=2e4, first=3.0).SerializeToString())
    assert main(["audit", str(big), "--mode", "allow_mix_precision", "--op-info", "tf_amp_fp16", "--overflow"]) == 0
    assert "first overflow (forward): MatMul `mm2`" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "nope.pb"), *mode]) == 2
    assert main(["audit", str(pb), *mode, "--feed", "y=2,8"]) == 2
    assert "no placeholder of that name" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_audit_on_a_frozen_pb(tmp_path):
    pb = tmp_path / "frozen.pb"
    pb.write_bytes(mlp().SerializeToString())
    out, ranges = tmp_path / "audit.json", tmp_path / "ranges.json"
    proc = _cli("audit", str(pb), "--mode", "allow_mix_precision_bf16", "--op-info", "tf_amp_bf16", "--feed", "x=3,8",
                "-o", str(out), "--ranges", str(ranges), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "precision_policy.audit" and not [n for n in doc["nodes"] if n["mismatch"]]
    assert load_audit(out).nodes and load_ranges(ranges).nodes
    bad = _cli("audit", str(tmp_path / "missing.pb"), "--mode", "allow_mix_precision_bf16", "--op-info", "tf_amp_bf16")
    assert bad.returncode == 2 and "missing.pb" in bad.stderr
    bad_feed = _cli("audit", str(pb), "--mode", "allow_mix_precision_bf16", "--op-info", "tf_amp_bf16", "--feed", "x=two")
    assert bad_feed.returncode == 2 and "--feed" in bad_feed.stderr


@pytest.mark.slow
def test_onednn_kernels_are_reported():
    result = audit(mlp(), FEEDS, BF16, fetches=["out"], onednn=True)
    if not result.kernels:
        pytest.skip("; ".join(result.notes) or "no oneDNN kernels ran")
    matmuls = [k for k in result.kernels if k.kind in ("matmul", "inner_product")]
    assert matmuls and all(k.compute == "bfloat16" for k in matmuls)
    assert "onednn" in (result["mm2"].kernel or "")
    assert result.mismatches() == []
    assert "oneDNN kernels:" in result.table()
