"""Edits never lose data: concurrent writers and ``kill -9``, with real processes and real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precision_policy import fileio

REPO = Path(__file__).resolve().parent.parent
SHIPPED_910 = REPO / "opinfo_db" / "ascend910" / "aic-ascend910-ops-info.json"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# Each writer adds its own ops (a lost update is an op missing at the end) and flips its own
# op back and forth: every read-modify-write races with the other writers' on the same file.
_WRITER = """
import sys
from precision_policy.opinfo import edit
lib, w, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()  # start together
for j in range(n):
    edit.pin(lib, f"W{w}_{j}", add=True)
    edit.set_flag(lib, f"Own{w}", "true" if j % 2 else "false", add=True)
"""


def _start_together(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def test_eight_concurrent_writers_lose_no_update(tmp_path: Path):
    """8 processes x 25 read-modify-write cycles of one file: every change lands (126 of 800 were lost before)."""
    writers, edits = 8, 25
    lib = tmp_path / "aic-ops-info.json"
    lib.write_text(json.dumps({f"Own{w}": {"op": {"pattern": "x"}} for w in range(writers)}, indent=4) + "\n")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(lib), str(w), str(edits)], cwd=REPO, env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    _start_together(procs)
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, errors
    data = json.loads(lib.read_text())
    lost = [f"W{w}_{j}" for w in range(writers) for j in range(edits) if f"W{w}_{j}" not in data]
    assert lost == [], f"{len(lost)} of {writers * edits} added ops lost: {lost[:10]}"
    last = "true" if (edits - 1) % 2 else "false"
    assert {data[f"Own{w}"]["precision_reduce"]["flag"] for w in range(writers)} == {last}
    assert sorted(os.listdir(tmp_path)) == [lib.name]  # no lock or temp file left behind


def test_concurrent_cli_pin_unpin_on_the_shipped_library(tmp_path: Path):
    """4 shells running the real CLI on different ops of one (700 KB) library at once."""
    lib = tmp_path / SHIPPED_910.name
    shutil.copyfile(SHIPPED_910, lib)
    ops = ["BiasAdd", "Relu", "Add", "Mul"]
    assert not any("precision_reduce" in json.loads(lib.read_text())[op] for op in ops)
    rounds = 3  # pin, unpin, pin: the last edit of each op is a pin
    script = " && ".join(
        f'"{sys.executable}" -m precision_policy {"pin" if k % 2 == 0 else "unpin"} "$1" --op-info "$2" >/dev/null'
        for k in range(rounds))
    procs = [subprocess.Popen(["sh", "-c", script, "sh", op, str(lib)], cwd=REPO, env=_env(),
                              stderr=subprocess.PIPE, text=True) for op in ops]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(ops), errors
    data = json.loads(lib.read_text())
    assert {op: data[op].get("precision_reduce") for op in ops} == {op: {"flag": "false"} for op in ops}
    # and nothing else changed: unpin of the same ops gives back the shipped bytes
    for op in ops:
        subprocess.run([sys.executable, "-m", "precision_policy", "unpin", op, "--op-info", str(lib)],
                       cwd=REPO, env=_env(), check=True, capture_output=True)
    assert lib.read_bytes() == SHIPPED_910.read_bytes()


_EDIT_FOREVER = """
import sys
from precision_policy.opinfo import edit
lib = sys.argv[1]
j = 0
while True:
    edit.set_flag(lib, "Relu", "true" if j % 2 else "false")
    j += 1
"""


def _big_library(path: Path, megabytes: int) -> None:
    """An op-info file of ``megabytes`` MB: the shipped entries and one op carrying a long note."""
    data = json.loads(SHIPPED_910.read_text())
    data["ZBigDoc"] = {"op": {"pattern": "x"}, "note": "n" * (megabytes << 20)}
    path.write_text(json.dumps(data, indent=4) + "\n")


def test_kill_9_mid_write_keeps_a_whole_file_and_the_next_edit_leaves_no_temp(tmp_path: Path):
    """``kill -9`` while a 29 MB library is being written: old or new file survives; the next edit cleans up."""
    lib = tmp_path / "aic-big-ops-info.json"
    _big_library(lib, 29)
    size = lib.stat().st_size
    caught = False
    for _attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _EDIT_FOREVER, str(lib)], cwd=REPO, env=_env(),
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                temps = [n for n in os.listdir(tmp_path) if n.startswith(f".{lib.name}.") and not n.endswith(".lock")]
                if temps:  # a temp file exists: the write is under way
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.0005)
        finally:
            proc.kill()
            proc.wait(30)
        data = json.loads(lib.read_text())  # old or new, whole
        assert data["Relu"].get("precision_reduce", {}).get("flag") in (None, "true", "false")
        assert abs(lib.stat().st_size - size) < 100
        leftovers = [n for n in os.listdir(tmp_path) if n.endswith((fileio.TEMP_SUFFIX, ".tmp"))]
        if leftovers:
            caught = True
            break
    assert caught, "the kill never landed during a write"
    # the next edit of the file removes what the crash left (the temp file and the stale lock file)
    subprocess.run([sys.executable, "-m", "precision_policy", "unpin", "Relu", "--op-info", str(lib)],
                   cwd=REPO, env=_env(), check=True, capture_output=True)
    assert sorted(os.listdir(tmp_path)) == [lib.name]
    assert "precision_reduce" not in json.loads(lib.read_text())["Relu"]


# ---------------------------------------------------------------------- settings are never silently dropped
CONV = REPO / "examples" / "graphs" / "conv2d_bias_relu.json"


def test_misspelt_setting_beside_a_config_is_an_error_naming_the_setting():
    """Before: ``plan(g, config, precison_mode=...)`` planned with the config unchanged."""
    import precision_policy as pp
    from precision_policy.errors import ConfigError

    config = pp.RunConfig(precision_mode="allow_mix_precision")
    with pytest.raises(ConfigError, match=r"RunConfig\.precison_mode: unknown setting; did you mean 'precision_mode'\?"):
        pp.plan(CONV, config, precison_mode="force_fp32")
    with pytest.raises(ConfigError, match="did you mean 'op_info'"):
        pp.plan(CONV, opinfo="ascend910")
    # a correct keyword overrides the config, a mode given here replacing the config's mode
    fp32 = pp.RunConfig(precision_mode="force_fp32", use_env_lists=False)
    assert pp.plan(CONV, fp32, precision_mode_v2="mixed_float16").mode_name == "allow_mix_precision"


def test_empty_op_info_is_an_error_not_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Before: ``RunConfig(op_info="")`` planned with the current directory as the library."""
    import precision_policy as pp
    from precision_policy.errors import ConfigError, OpInfoError

    (tmp_path / "ops.json").write_text('{"Conv2D": {"precision_reduce": {"flag": "false"}}}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"RunConfig\.op_info: is empty.*'ascend910'"):
        pp.RunConfig(op_info="")
    with pytest.raises(ConfigError, match="op_info: is empty"):
        pp.plan(CONV, pp.RunConfig(), op_info=" ")
    with pytest.raises(OpInfoError, match="empty string"):
        pp.load_library("")
