"""precision_policy.fileio: what a write keeps of the file it replaces (real files, links, FIFOs, processes)."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from precision_policy import fileio
from precision_policy.errors import WriteError

REPO = Path(__file__).resolve().parent.parent
CONV = REPO / "examples" / "graphs" / "conv2d_bias_relu.json"


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_existing_mode_is_kept(tmp_path: Path):
    for mode in (0o644, 0o640, 0o755, 0o600):
        f = tmp_path / f"out{mode:o}.json"
        f.write_text("old")
        f.chmod(mode)
        fileio.atomic_write(f, "new")
        assert f.read_text() == "new" and stat.S_IMODE(f.stat().st_mode) == mode
    assert all(not n.startswith(".") for n in names(tmp_path))


def test_new_file_gets_the_umask_mode(tmp_path: Path):
    for umask, want in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            f = tmp_path / f"new{umask:o}.json"
            fileio.atomic_write(f, "{}")
        finally:
            os.umask(old)
        assert stat.S_IMODE(f.stat().st_mode) == want, (oct(umask), oct(f.stat().st_mode))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_existing_owner_is_kept(tmp_path: Path):
    f = tmp_path / "ops.json"
    f.write_text("old")
    os.chown(f, 1234, 4321)
    fileio.atomic_write(f, "new")
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321) and f.read_text() == "new"


def test_symlink_is_written_through_and_stays_a_link(tmp_path: Path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "ops.json"
    target.write_text("old")
    target.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    fileio.atomic_write(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert names(tmp_path) == ["link.json", "real"] and names(real_dir) == ["ops.json"]


def test_dangling_symlink_gets_its_target_created(tmp_path: Path):
    link = tmp_path / "link.json"
    link.symlink_to("made.json")
    fileio.atomic_write(link, "x")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "x"


def test_hard_link_is_replaced_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The documented choice: atomicity over the link; the other name keeps the old text and a warning says so."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old")
    os.link(a, b)
    with caplog.at_level(logging.WARNING, logger="precision_policy.fileio"):
        fileio.atomic_write(a, "new")
    assert a.read_text() == "new" and b.read_text() == "old"
    assert any("2 hard links" in r.getMessage() and str(a) in r.getMessage() for r in caplog.records)


def test_fifo_is_written_into_not_replaced(tmp_path: Path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    fileio.atomic_write(fifo, b"plan\n")
    reader.join(10)
    assert got == [b"plan\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_folder_target_and_missing_folder_are_write_errors(tmp_path: Path):
    with pytest.raises(WriteError, match="is a folder"):
        fileio.atomic_write(tmp_path, "x")
    with pytest.raises(WriteError, match="does not exist") as exc:
        fileio.atomic_write(tmp_path / "nope" / "f.json", "x")
    assert str(tmp_path / "nope") in str(exc.value)


def test_plan_output_keeps_mode_owner_and_symlink(tmp_path: Path):
    """``CastPlan.to_json(path)`` (``plan -o``) writes through this module too."""
    import precision_policy as pp

    target = tmp_path / "plans" / "plan.json"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o644)
    link = tmp_path / "plan.json"
    link.symlink_to(target)
    pp.plan(CONV).to_json(link)
    assert link.is_symlink() and json.loads(target.read_text())["summary"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_leftover_temp_files_are_removed_by_the_next_write(tmp_path: Path):
    f = tmp_path / "ops.json"
    f.write_text("old")
    ours = tmp_path / ".ops.json.0123abcd.pp-tmp"
    legacy = tmp_path / ".ops.json.k2j_x9zq.tmp"  # tempfile.mkstemp's name, from earlier versions
    unrelated = tmp_path / ".ops.json.notes"
    for p in (ours, legacy, unrelated):
        p.write_text("x")
    fileio.atomic_write(f, "new")
    assert names(tmp_path) == [".ops.json.notes", "ops.json"]


_HOLD_FOLDER = """
import sys, time
from precision_policy import fileio
with fileio.new_folder(sys.argv[1]) as tmp:
    (tmp / "saved_model.pb").write_bytes(b"x" * 1000)
    print(tmp.name, flush=True)
    time.sleep(120)
"""


def test_new_folder_after_kill_9_leaves_nothing_after_the_next_build(tmp_path: Path):
    out = tmp_path / "model_bf16"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_FOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        tmp_name = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert tmp_name.endswith(fileio.TEMP_SUFFIX) and (tmp_path / tmp_name).is_dir()  # the crash's leftover
    assert not out.exists()
    with fileio.new_folder(out) as tmp:
        (tmp / "saved_model.pb").write_bytes(b"y")
    assert names(tmp_path) == ["model_bf16"] and names(out) == ["saved_model.pb"]
    with pytest.raises(WriteError, match="already exists"):
        with fileio.new_folder(out):
            pass


def test_new_folder_is_removed_when_the_build_fails(tmp_path: Path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with fileio.new_folder(out) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("TF could not save")
    assert names(tmp_path) == []


def test_file_system_without_locks_still_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture):
    import errno

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    f = tmp_path / "ops.json"
    f.write_text("old")
    with caplog.at_level(logging.WARNING, logger="precision_policy.fileio"):
        fileio.atomic_write(f, "new")
    assert f.read_text() == "new" and names(tmp_path) == ["ops.json"]
    assert any("does not support locks" in r.getMessage() for r in caplog.records)
