"""Files are the user's: special files, shipped libraries and path look-ups (each case runs the CLI as a
subprocess and checks the exit code, the message and what is on disk afterwards)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import precision_policy as pp
from precision_policy.errors import ConfigError, GraphError
from precision_policy.opinfo.library import shipped_root

from conftest import refused

REPO = Path(__file__).resolve().parent.parent
GRAPH = REPO / "examples" / "graphs" / "conv2d_bias_relu.json"
NOBODY = 65534


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


#: Run by a child started as root, which drops to ``user`` after importing what the CLI needs (the
#: interpreter may live where that user cannot reach, e.g. under /root), then runs the CLI.
_AS_USER = """
import os, sys, difflib, json, argparse, logging, tempfile, secrets
import precision_policy, precision_policy.cli, precision_policy.api, precision_policy.opinfo.edit
import precision_policy.opinfo.overrides, precision_policy.modes.planner, precision_policy.modes.standard
import precision_policy.plan, precision_policy.reasons, precision_policy.fileio
import encodings.idna, encodings.utf_8
user = int(sys.argv[1])
os.setgroups([]); os.setgid(user); os.setuid(user)
sys.exit(precision_policy.cli.main(sys.argv[2:]))
"""


def cli(*args: object, cwd: Path | None = None, user: int | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "precision_policy"] if user is None else [sys.executable, "-c", _AS_USER, str(user)]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO, env=_env(),
                          timeout=timeout)


@pytest.fixture
def public_dir():
    """A folder everyone may enter (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="pp-files-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


# ---------------------------------------------------------------------- 1. special outputs
def test_device_and_fifo_outputs_are_written_in_place_and_sockets_refused(tmp_path):
    proc = cli("plan", GRAPH, "-o", "/dev/null", "--json")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not any(n.startswith(".null") for n in os.listdir("/dev"))  # no lock or temp file beside it
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    proc = cli("plan", GRAPH, "-o", fifo)
    got = reader.communicate(timeout=30)[0]
    assert proc.returncode == 0, proc.stderr
    assert json.loads(got)["format"] == "precision_policy.cast_plan" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        refused(cli("plan", GRAPH, "-o", sock_path), "s.sock")
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["out.fifo", "s.sock"]


# ---------------------------------------------------------------------- 2. special and huge inputs
def test_fifo_and_device_inputs_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    keep = tmp_path / "keep.txt"
    keep.write_text("myConv\n")
    for args in (("plan", fifo), ("validate", fifo), ("plan", GRAPH, "--op-info", fifo), ("plan", GRAPH, "--keep-dtype", fifo),
                 ("validate", "/dev/zero"), ("plan", "/dev/zero")):
        refused(cli(*args, timeout=30), "not a regular file")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"nodes": [], "pad": "x" * 5000}))
    refused(cli("--max-input-bytes", "4K", "plan", big), "big.json", "limit", "--max-input-bytes")


# ---------------------------------------------------------------------- 3. permissions
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not hasattr(os, "setuid"),
                                reason="permission cases run the CLI as another user, which needs root")


@needs_root
def test_unreadable_folders_and_read_only_targets_are_named(public_dir):
    locked = public_dir / "locked"
    locked.mkdir()
    shutil.copy(GRAPH, locked / "g.json")
    lib = locked / "lib.json"
    shutil.copy(next((shipped_root() / "ascend910").glob("*.json")), lib)
    locked.chmod(0o700)  # nobody may not enter it
    ro = public_dir / "ro"
    ro.mkdir()
    shutil.copy(next((shipped_root() / "ascend910").glob("*.json")), ro / "lib.json")
    (ro / "lib.json").chmod(0o666)
    ro.chmod(0o555)  # nobody may not create files in it
    blocked = f"folder {locked} cannot be entered"
    for args in (("validate", lib), ("plan", locked / "g.json"), ("pin", "Relu", "--op-info", lib),
                 ("plan", GRAPH, "--op-info", lib)):
        refused(cli(*args, user=NOBODY), blocked)
    before = (ro / "lib.json").read_bytes()
    refused(cli("pin", "Relu", "--op-info", ro / "lib.json", user=NOBODY), f"folder {ro} is read-only")
    refused(cli("plan", GRAPH, "-o", ro / "plan.json", user=NOBODY), f"folder {ro} is read-only")
    assert (ro / "lib.json").read_bytes() == before and sorted(os.listdir(ro)) == ["lib.json"]


# ---------------------------------------------------------------------- 4, 5. shipped libraries and look-ups
def test_shipped_libraries_are_read_only_to_the_editor_and_copy_library_copies_one_out(tmp_path):
    shipped = next((shipped_root() / "ascend910").glob("*.json"))
    before = shipped.read_bytes()
    err = refused(cli("pin", "Softmax", "--op-info", "ascend910"), "shipped", "copy-library ascend910")
    refused(cli("pin", "Softmax", "--op-info", shipped), "shipped")
    assert shipped.read_bytes() == before
    assert "precision-policy copy-library ascend910 my-ops/" in err
    proc = cli("copy-library", "ascend910", tmp_path / "my-ops")
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "my-ops" / shipped.name
    assert copy.read_bytes() == before
    assert cli("pin", "Softmax", "--op-info", tmp_path / "my-ops").returncode == 0
    assert json.loads(copy.read_text())["Softmax"]["precision_reduce"] == {"flag": "false"}
    refused(cli("copy-library", "ascend910", tmp_path / "my-ops"), "would overwrite")
    refused(cli("copy-library", "ascend9", tmp_path / "x"), "did you mean 'ascend910'")
    assert shipped.read_bytes() == before


def test_paths_are_paths_and_names_are_shipped_libraries(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rel = os.path.relpath(shipped_root() / "ascend910", work)  # e.g. ../../work/main/opinfo_db/ascend910: real, works
    assert cli("plan", GRAPH, "--op-info", rel, cwd=work).returncode == 0
    for spec in ("../opinfo_db/ascend910", "opinfo_db/ascend910", "sub/ascend910", "./ascend910"):
        refused(cli("plan", GRAPH, "--op-info", spec, cwd=work), "no such file or folder")
    assert cli("plan", GRAPH, "--op-info", "ascend910", cwd=work).returncode == 0  # a name: the shipped library
    refused(cli("plan", GRAPH, "--op-info", "", cwd=work), "op_info: is empty")
    with pytest.raises(ConfigError):
        pp.RunConfig(op_info="")


# ---------------------------------------------------------------------- 6. truncated graphs
def test_a_truncated_pb_is_refused_as_truncated(tmp_path):
    tf = pytest.importorskip("tensorflow")
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 4), name="x")
        w = tf.constant([[1.0] * 4] * 4, name="w")
        tf.nn.softmax(tf.nn.relu(tf.matmul(x, w)), name="y")
    gd = g.as_graph_def()
    prefix = type(gd)()
    prefix.node.extend(gd.node[:3])  # what protobuf parses from a file cut between two nodes
    cut = tmp_path / "cut.pb"
    cut.write_bytes(prefix.SerializeToString())
    refused(cli("plan", cut), "cut.pb", "looks truncated")
    whole = tmp_path / "whole.pb"
    whole.write_bytes(gd.SerializeToString())
    assert cli("plan", whole).returncode == 0


# ---------------------------------------------------------------------- 7. explain on long chains
def test_explain_abbreviates_long_gray_chains(tmp_path):
    nodes = [{"name": "x", "op": "Placeholder", "outputs": ["float32"]},
             {"name": "w", "op": "Const", "outputs": ["float32"]},
             {"name": "mm", "op": "MatMulV2", "inputs": ["x:0", "w:0"], "outputs": ["float32"]}]
    prev = "mm"
    for k in range(300):
        nodes.append({"name": f"relu_{k}", "op": "Relu", "inputs": [f"{prev}:0"], "outputs": ["float32"]})
        prev = f"relu_{k}"
    g = tmp_path / "chain.json"
    g.write_text(json.dumps({"format": "precision_policy.graph", "version": 1, "nodes": nodes, "outputs": [f"{prev}:0"]}))
    proc = cli("explain", g, prev, "--mode", "allow_mix_precision", "--op-info", "ascend910")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "gray chain" in ln)
    assert "... 281 more ..." in line and line.rstrip().endswith("mm (white-list)") and len(line) < 400


# ---------------------------------------------------------------------- 8. API misuse
def test_public_api_misuse_gets_typed_errors():
    g = pp.OpGraph("g")
    with pytest.raises(GraphError, match=r"'inputs' must be a list of strings, not str 'x:0' \(write \['x:0'\]\)"):
        g.add_node("r", "Relu", inputs="x:0")
    with pytest.raises(GraphError, match="'outputs' must be a list"):
        g.add_node("r", "Relu", outputs="float32")
    with pytest.raises(GraphError, match="'attrs' must be a dict"):
        g.add_node("r", "Relu", attrs=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(GraphError, match="fetches must be a list"):
        g.set_outputs("r:0")
    assert len(g) == 0
    with pytest.raises(GraphError, match="graph must be an OpGraph or a path"):
        pp.plan(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config must be a RunConfig"):
        pp.plan(GRAPH, {"precision_mode": "force_fp16"})  # type: ignore[arg-type]


# ---------------------------------------------------------------------- 9. TF's start-up messages
def test_tf_commands_keep_tensorflow_start_up_messages_off_stderr_and_the_library_leaves_the_env_alone(tmp_path):
    pytest.importorskip("tensorflow")
    g = tmp_path / "g.pbtxt"
    g.write_text('node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }\n'
                 'node { name: "y" op: "Relu" input: "x" attr { key: "T" value { type: DT_FLOAT } } }\n')
    proc = cli("plan", g)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no oneDNN notice, no absl pre-init line (TF prints both twice)
    code = ("import os; before = dict(os.environ); import precision_policy.tensorflow; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = _env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120).returncode == 0
