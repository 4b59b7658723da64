"""Careless and hostile inputs to `convert` and `pin`: refused clearly, nothing garbage written, nothing leaked.

Each case runs the CLI as a real subprocess and checks the exit code, the message and what is on
disk afterwards. The mutation test feeds hundreds of corrupted models and libraries through
plan/convert/validate/pin in a child process and checks exit codes, tracebacks, leftovers and
the child's peak memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from google.protobuf import text_format  # noqa: E402
from tensorflow.core.framework import graph_pb2, types_pb2  # noqa: E402
from tensorflow.python.framework import convert_to_constants  # noqa: E402

from conftest import refused  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "opinfo_db" / "ascend910"
MODE = ("--mode", "allow_mix_precision", "--op-info", "ascend910")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **extra})
    return env


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precision_policy", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env or _env(), timeout=timeout)


def _frozen() -> graph_pb2.GraphDef:
    w = tf.Variable(tf.random.stateless_normal((8, 4), seed=(1, 2)))
    b = tf.Variable(tf.zeros((4,)))

    @tf.function(input_signature=[tf.TensorSpec((None, 8), tf.float32, name="x")])
    def f(x):
        return tf.nn.softmax(tf.nn.relu(tf.matmul(x, w) + b))

    return convert_to_constants.convert_variables_to_constants_v2(f.get_concrete_function()).graph.as_graph_def()


@pytest.fixture(scope="module")
def pb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "g.pb"
    path.write_bytes(_frozen().SerializeToString())
    return path


@pytest.fixture(scope="module")
def tf1_saved_model(tmp_path_factory) -> Path:
    """A TF1 SavedModel with a variable (so it needs its variables/ folder)."""
    folder = tmp_path_factory.mktemp("sm") / "model"
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 8), name="x")
        w = tf.compat.v1.get_variable("w", (8, 4), initializer=tf.compat.v1.ones_initializer())
        y = tf.identity(tf.nn.relu(tf.matmul(x, w)), name="y")
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.saved_model.simple_save(sess, str(folder), {"x": x}, {"y": y})
    return folder


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- convert 1: output over input
def test_output_that_is_the_input_is_refused(pb, tmp_path):
    src = tmp_path / "g.pb"
    shutil.copy(pb, src)
    before = src.read_bytes()
    refused(cli("convert", src, src, *MODE), "output is the input")
    hard, soft = tmp_path / "hard.pb", tmp_path / "soft.pb"
    os.link(src, hard)
    soft.symlink_to(src)
    refused(cli("convert", src, hard, *MODE), "output is the input")
    refused(cli("convert", src, soft, *MODE), "output is the input")
    assert src.read_bytes() == before and _listing(tmp_path) == ["g.pb", "hard.pb", "soft.pb"]


def test_output_inside_the_input_saved_model_is_refused(tf1_saved_model, tmp_path):
    sm = tmp_path / "sm"
    shutil.copytree(tf1_saved_model, sm)
    refused(cli("convert", sm, sm / "inner.pb", *MODE), "inside the input SavedModel")
    assert not (sm / "inner.pb").exists()


# ---------------------------------------------------------------------- convert 2: empty graph, missing fetches
def test_empty_graph_and_missing_fetches_are_errors(tf1_saved_model, tmp_path):
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    refused(cli("convert", empty, tmp_path / "out.pb", *MODE), "empty.pb", "no nodes")
    sm = tmp_path / "sm"
    shutil.copytree(tf1_saved_model, sm)
    from tensorflow.core.protobuf import saved_model_pb2

    doc = saved_model_pb2.SavedModel()
    doc.ParseFromString((sm / "saved_model.pb").read_bytes())
    doc.meta_graphs[0].signature_def["serving_default"].outputs["y"].name = "gone:0"
    (sm / "saved_model.pb").write_bytes(doc.SerializeToString())
    refused(cli("convert", sm, tmp_path / "out", *MODE), "gone", "saved_model.pb")
    assert _listing(tmp_path) == ["empty.pb", "sm"]


# ---------------------------------------------------------------------- convert 3, 4: constants
_SPLAT = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } }
       attr { key: "shape" value { shape { dim { size: 1000000000 } } } } }
node { name: "c" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } }
       attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape { dim { size: 1000000000 } } float_val: 3 } } } }
node { name: "y" op: "Mul" input: "x" input: "c" attr { key: "T" value { type: DT_FLOAT } } }
"""


# A child reports its own peak memory (``VmHWM``: the high-water mark since its exec). ``getrusage``'s
# ``ru_maxrss`` of a child also counts the image of the parent it was forked from (Linux carries the
# forked copy's high-water mark across exec), so a child of a pytest worker that holds TF and torch
# would read 3-4 GB before doing anything.
_MEASURED = """
import sys
from pathlib import Path
from precision_policy.cli import main
code = main(sys.argv[1:])
hwm = next((l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")), "0")
print(f"PP_PEAK_KB {hwm}", file=sys.stderr)
sys.exit(code)
"""


def cli_measured(*args: str | Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in a child that reports its own peak memory (MB) when it ends."""
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=300)
    peak = [float(ln.split()[1]) / 1024 for ln in proc.stderr.splitlines() if ln.startswith("PP_PEAK_KB ")]
    assert peak, proc.stderr
    return proc, peak[-1]


def test_a_splat_constant_is_converted_without_materialising_it(tmp_path):
    src = tmp_path / "splat.pbtxt"
    src.write_text(_SPLAT)
    assert len(src.read_bytes()) < 600
    out = tmp_path / "out.pbtxt"
    proc, peak_mb = cli_measured("convert", src, out, "--mode", "force_fp16", "--op-info", "ascend910")
    assert proc.returncode == 0, proc.stderr
    assert peak_mb < 2048  # (1e9 float32 values would be 4 GB)
    gd = graph_pb2.GraphDef()
    text_format.Parse(out.read_text(), gd)
    consts = [n for n in gd.node if n.op == "Const"]
    assert {n.attr["value"].tensor.dtype for n in consts} >= {types_pb2.DT_HALF}  # (and its emulation's float32 copy)
    for n in consts:  # still splats: one value, the declared shape, nothing packed
        t = n.attr["value"].tensor
        assert t.tensor_shape.dim[0].size == 1_000_000_000 and len(t.half_val) + len(t.float_val) == 1
        assert not t.tensor_content
    assert len(out.read_bytes()) < 4000
    # the same graph at a size that runs: a partial splat (two values for five elements) converts and runs
    small = tmp_path / "small.pbtxt"
    small.write_text(_SPLAT.replace("1000000000", "5").replace("float_val: 3", "float_val: 3 float_val: 0.1"))
    out_small = tmp_path / "small_out.pbtxt"
    assert cli("convert", small, out_small, "--mode", "force_fp16", "--op-info", "ascend910").returncode == 0
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    for path, tol in ((small, 0.0), (out_small, 1e-3)):
        g = graph_pb2.GraphDef()
        text_format.Parse(path.read_text(), g)
        with tf.Graph().as_default() as graph:
            tf.graph_util.import_graph_def(g, name="")
            with tf.compat.v1.Session(graph=graph) as sess:
                y = sess.run("y:0", {"x:0": x})
        assert y.dtype == "float32" and abs(y - [3.0, 0.2, 0.3, 0.4, 0.5]).max() <= tol + 1e-6, (path.name, y)


def _packed_const_graph(content: bytes, n: int) -> str:
    octal = "".join(f"\\{b:03o}" for b in content)
    return f"""
node {{ name: "x" op: "Placeholder" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }} }}
node {{ name: "weights" op: "Const" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }}
       attr {{ key: "value" value {{ tensor {{ dtype: DT_FLOAT tensor_shape {{ dim {{ size: {n} }} }}
       tensor_content: "{octal}" }} }} }} }}
node {{ name: "y" op: "Mul" input: "x" input: "weights" attr {{ key: "T" value {{ type: DT_FLOAT }} }} }}
"""


def test_constants_over_the_size_limit_and_with_wrong_content_length_are_typed_errors(tmp_path):
    big = tmp_path / "big.pbtxt"
    big.write_text(_packed_const_graph(bytes(4096), 1024))
    refused(cli("convert", big, tmp_path / "o.pbtxt", "--mode", "force_fp16", "--op-info", "ascend910",
                "--max-const-bytes", "1K"), "weights", "--max-const-bytes")
    proc = cli("convert", big, tmp_path / "o.pbtxt", "--mode", "force_fp16", "--op-info", "ascend910",
               "--max-const-bytes", "1M")
    assert proc.returncode == 0, proc.stderr
    bad = tmp_path / "bad.pbtxt"
    bad.write_text(_packed_const_graph(bytes(4095), 1024))  # one byte short of 1024 float32 values
    refused(cli("convert", bad, tmp_path / "o2.pbtxt", "--mode", "force_fp16", "--op-info", "ascend910"),
            "weights", "4095 bytes", "corrupt")
    assert _listing(tmp_path) == ["bad.pbtxt", "big.pbtxt", "o.pbtxt"]


# ---------------------------------------------------------------------- convert 5, 6, 8: SavedModel folders
def test_links_out_of_a_saved_model_are_refused_and_nothing_is_left(tf1_saved_model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    sm = tmp_path / "sm"
    shutil.copytree(tf1_saved_model, sm)
    (sm / "assets").mkdir()
    (sm / "assets" / "vocab.txt").symlink_to(secret)
    refused(cli("convert", sm, tmp_path / "out", *MODE), "vocab.txt", "outside the SavedModel")
    (sm / "assets" / "vocab.txt").unlink()
    (sm / "variables" / "dangling").symlink_to(tmp_path / "nowhere")
    refused(cli("convert", sm, tmp_path / "out", *MODE), "dangling", "does not exist")
    assert _listing(tmp_path) == ["secret.txt", "sm"]  # no output, no .out.* temp folder


def test_saved_model_without_variables_says_what_is_missing(tf1_saved_model, tmp_path):
    sm = tmp_path / "sm"
    shutil.copytree(tf1_saved_model, sm)
    shutil.rmtree(sm / "variables")
    refused(cli("convert", sm, tmp_path / "out", *MODE), "variables/ folder is missing", "VarHandleOp")
    assert _listing(tmp_path) == ["sm"]


# ---------------------------------------------------------------------- convert 7: deterministic bytes
def test_convert_output_is_byte_deterministic_across_hash_seeds_and_gets_the_umasks_modes(pb, tf1_saved_model, tmp_path):
    outs = []
    old_umask = os.umask(0o022)  # the children inherit it
    try:
        for seed in ("1", "2"):
            out = tmp_path / f"o{seed}.pb"
            sm = tmp_path / f"sm{seed}"
            for src, dst in ((pb, out), (tf1_saved_model, sm)):
                # float16 on the CPU is emulated: the rounding Casts it adds are placed in graph order, not set order
                proc = cli("convert", src, dst, "--mode", "force_fp16", "--op-info", "ascend910",
                           env=_env(PYTHONHASHSEED=seed))
                assert proc.returncode == 0, proc.stderr
            outs.append((out.read_bytes(), (sm / "saved_model.pb").read_bytes()))
    finally:
        os.umask(old_umask)
    assert outs[0] == outs[1]
    # like anything TF writes: the umask's modes, not a temporary file's 600 or folder's 700
    assert (tmp_path / "o1.pb").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "sm1").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "sm1" / "saved_model.pb").stat().st_mode & 0o777 == 0o644
    # and the outputs run: float16 results within float16's rounding of the float32 model's
    x = np.random.RandomState(0).rand(16, 8).astype("float32")
    want = _run_pb(pb, x)
    assert np.abs(_run_pb(tmp_path / "o1.pb", x) - want).max() < 1e-2
    assert np.abs(_run_saved_model(tmp_path / "sm1", x) - _run_saved_model(tf1_saved_model, x)).max() < 5e-2


def _run_pb(path: Path, x: np.ndarray) -> np.ndarray:
    gd = graph_pb2.GraphDef()
    gd.ParseFromString(path.read_bytes())
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=graph) as sess:
            out = sess.run("Identity:0", {"x:0": x})
    assert out.dtype == np.float32
    return out


def _run_saved_model(folder: Path, x: np.ndarray) -> np.ndarray:
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(folder))
        out = sess.run("y:0", {"x:0": x})
    assert out.dtype == np.float32
    return out


# ---------------------------------------------------------------------- pin 9: names
@pytest.fixture
def lib(tmp_path) -> Path:
    src = next(LIB.glob("*.json"))
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


@pytest.mark.parametrize("name, words", [
    ("relu", ["did you mean 'Relu'", "--add"]),
    ("Relu ", ["not a valid op type name"]),
    ("", ["not a valid op type name"]),
    ("Re\nlu", ["not a valid op type name"]),
])
def test_pin_refuses_names_the_library_does_not_have(lib, name, words):
    before = lib.read_bytes()
    refused(cli("pin", name, "--op-info", lib), *words)
    assert lib.read_bytes() == before
    assert cli("validate", lib).returncode == 0


def test_pin_add_creates_an_entry_and_validate_refuses_bad_names(lib, tmp_path):
    proc = cli("pin", "MyOp", "--add", "--op-info", lib)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(lib.read_text())["MyOp"] == {"precision_reduce": {"flag": "false"}}
    refused(cli("pin", "My Op", "--add", "--op-info", lib), "not a valid op type name")
    doc = json.loads(lib.read_text())
    doc["Relu "] = {"precision_reduce": {"flag": "false"}}
    lib.write_text(json.dumps(doc))
    refused(cli("validate", lib), "'Relu '", "not a valid op type name")


# ---------------------------------------------------------------------- 500 mutations
_DRIVER = r'''
import io, json, os, random, resource, shutil, sys, contextlib, traceback
from pathlib import Path
from precision_policy.cli import main

pb, lib, work, n, seed = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
pb_bytes, lib_text = pb.read_bytes(), lib.read_text()

def mutate_bytes(data):
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and data:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == 2:  # insert junk
        k = rng.randrange(len(data) + 1)
        data[k:k] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # duplicate a slice
        a = rng.randrange(len(data) + 1); b = min(len(data), a + rng.randint(1, 64))
        data[a:a] = data[a:b]
    return bytes(data)

def mutate_library(text):
    if rng.random() < 0.5:
        return mutate_bytes(text.encode()).decode("utf-8", "replace")
    doc = json.loads(text)
    op = rng.choice(list(doc))
    junk = rng.choice([None, 1, -1.5, "x", [], {}, [1, "a"], {"flag": {}}, {"flag": 3}, "\u0000", True])
    where = rng.randrange(4)
    if where == 0:
        doc[op] = junk
    elif where == 1:
        doc[op]["precision_reduce"] = junk
    elif where == 2 and isinstance(doc[op], dict) and doc[op]:
        doc[op][rng.choice(list(doc[op]))] = junk
    else:
        doc[rng.choice(["", " Relu", "a b", "\n", "Relu\t", "9x"])] = doc[op]
    return json.dumps(doc, indent=rng.choice([None, 1, 4]))

failures = []
codes = {}
def run(argv, out_dir):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            code = "traceback"
            err.write(traceback.format_exc())
    text = err.getvalue()
    codes.setdefault(argv[0], {}).setdefault(str(code), 0)
    codes[argv[0]][str(code)] += 1
    if code not in (0, 1, 2) or "Traceback" in text:
        failures.append((argv[0], code, text[-800:]))
    left = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("in."))
    allowed = {"out.pb", "plan.json"} if code == 0 else set()
    if set(left) - allowed:
        failures.append((argv[0], "left behind", left))
    for p in out_dir.iterdir():
        if not p.name.startswith("in."):
            shutil.rmtree(p) if p.is_dir() else p.unlink()

for k in range(n):
    d = work / f"m{k}"
    d.mkdir()
    g = d / "in.pb"; g.write_bytes(mutate_bytes(pb_bytes))
    run(["plan", g, "--mode", "allow_mix_precision", "--op-info", "ascend910", "-o", d / "plan.json"], d)
    run(["convert", g, d / "out.pb", "--mode", "allow_mix_precision", "--op-info", "ascend910"], d)
    l = d / "in.json"; l.write_text(mutate_library(lib_text))
    run(["validate", l], d)
    run(["pin", rng.choice(["Relu", "Softmax", "MatMulV2", "NoSuch"]), "--op-info", l], d)
    run(["plan", pb, "--mode", "allow_mix_precision", "--op-info", l], d)
    shutil.rmtree(d)
hwm = next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"failures": failures[:20], "count": len(failures), "codes": codes, "peak_mb": int(hwm) / 1024}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("half", [0, 1])
def test_500_mutations_never_crash_leak_or_blow_up(pb, lib, tmp_path, half):
    """500 mutations, in two halves of 250 with their own seeds (so the two test workers share them)."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(pb), str(lib), str(work), "250", str(20261123 + half)],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["count"] == 0, json.dumps(report["failures"], indent=1)
    # the mutations reach both outcomes of every command: some still work, some are refused
    for command in ("plan", "convert", "validate", "pin"):
        assert {"0", "2"} <= set(report["codes"][command]), report["codes"]
    assert report["peak_mb"] < 2048  # (the child's own peak, VmHWM: see the note above _MEASURED)
    assert list(work.iterdir()) == []
