"""Shared helpers: small op-info libraries and graphs written to real files."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import precision_policy as pp

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "graphs"

# ---------------------------------------------------------------------- running under pytest-xdist (`make test`: -n 2)
#: Set in the workers pytest-xdist starts, before this file is imported (and so before torch or TensorFlow is).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # two workers on two cores: a second intra-op thread per worker only contends with the other worker.
    # The subprocesses the tests start inherit these. Inter-op threads are left alone (MirroredStrategy needs them).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_var, "1")

#: Tests that must not run at the same time as each other (several processes on local ports, or several replicas, on
#: the machine's two cores): one group, so one worker runs them one after the other. By node id, because the
#: controller that hands out the groups sees only node ids.
SERIAL_GROUP = "distributed"
SERIAL_TESTS = (
    "tests/test_tf_distributed.py::",  # MirroredStrategy, two replicas
    "tests/test_torch_fsdp.py::test_fsdp2_",  # two ranks over gloo
    "tests/test_torch_loss_scale.py::test_ddp_",  # two ranks over gloo
)
#: Modules whose tests are grouped by their parameter, not by module: the module-scoped fixture is parametrized
#: (one model per parameter), so each model is still built once, and the models spread over both workers.
SPLIT_BY_PARAM = ("tests/test_tf_zoo.py",)
#: The longest single tests (30 s and more on 2 cores): started first, so neither worker waits on one at the end.
HEAVY_TESTS = (
    "tests/test_hostile_inputs.py::test_500_mutations",
    "tests/test_demo_outputs.py::test_training_demo_writes_plots_and_reports[keras",
)
#: Modules of independent, subprocess-heavy tests with cheap fixtures: each test is its own group, so they spread
#: over both workers instead of queueing on one.
SPLIT_BY_TEST = ("tests/test_hostile_inputs.py", "tests/test_demo_outputs.py", "tests/test_files.py",
                 "tests/test_audit_tf.py")


def xdist_group(nodeid: str) -> str:
    """The group a test runs in under ``-n 2 --dist loadgroup``: one worker runs a group's tests in order."""
    if nodeid.rfind("@") > nodeid.rfind("]"):  # an older pytest, where xdist's own ``@group`` suffix still works
        nodeid = nodeid[: nodeid.rfind("@")]
    if nodeid.startswith(SERIAL_TESTS):
        return SERIAL_GROUP
    module = nodeid.split("::", 1)[0]
    if module in SPLIT_BY_TEST:
        return nodeid
    if module in SPLIT_BY_PARAM and nodeid.endswith("]"):
        return module + "[" + nodeid.rsplit("[", 1)[1]
    return module  # so a module's module-scoped fixtures (trained models, fp32 baselines) are built once


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pragma: no cover - pytest-xdist is in the dev extra
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class _GroupScheduling(LoadScopeScheduling):
        """``--dist loadgroup`` with the groups of :func:`xdist_group`.

        xdist's own loadgroup reads ``xdist_group`` marks by appending ``@group`` to ``item._nodeid``, which
        pytest 9 no longer reads (node ids live in ``item._id``): every test was its own group, and each
        worker rebuilt the models of module-scoped fixtures. This scheduler groups by node id instead.
        """

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") == "loadgroup":
            return _GroupScheduling(config, log)
        return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: the groups heaviest first (a ``slow`` test counts 20, any other 1), so the long ones start
    early and the two workers finish together (``--no-loadscope-reorder`` keeps this order)."""
    if not XDIST_WORKER:
        return
    weight: dict[str, int] = defaultdict(int)
    for item in items:
        heavy = item.nodeid.startswith(HEAVY_TESTS)
        weight[xdist_group(item.nodeid)] += 200 if heavy else 20 if item.get_closest_marker("slow") else 1
    items.sort(key=lambda item: -weight[xdist_group(item.nodeid)])  # stable: a group's order (fixture params) is kept


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


# ---------------------------------------------------------------------- the command, in this process
def cli_in_process(capsys: pytest.CaptureFixture, *args: str | Path) -> subprocess.CompletedProcess:
    """``main(ARGS)`` in this process (a subprocess adds nothing here); any exception it lets out fails the test,
    but the ``SystemExit`` of argparse (``--help``, a usage error), whose code is the exit code."""
    from precision_policy.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def cli_main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``python -m precision_policy ARGS`` in this process: ``main(ARGS)`` as test_cli's ``cli`` runs it in a
    child, from the repository folder and without TF's AMP list variables. For the tests whose point is a
    command's output, exit code or files; other tests run every command at least once as a real process."""
    for name in list(os.environ):
        if name.startswith("TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(REPO)
    return lambda *args: cli_in_process(capsys, *args)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI process exited 2 with a one-line error (no traceback) containing ``words``; its stderr."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, f"{w!r} not in: {proc.stderr}"
    return proc.stderr
