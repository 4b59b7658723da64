"""End-to-end tests of the ``precision-policy`` command.

Every command runs at least once as a real subprocess (``cli``, the console script, the crash scripts); the
tests whose point is a command's output, exit code or files call its ``main`` in this process (``cli_main``),
where a subprocess would add only its start-up (a second of TensorFlow import for ``convert``).
Every test works on copies in ``tmp_path``; the repository's shipped files are never edited.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Cli, cli_in_process, json_entry_span

REPO = Path(__file__).resolve().parent.parent
CONV = REPO / "examples" / "graphs" / "conv2d_bias_relu.json"
SHIPPED_910 = REPO / "opinfo_db" / "ascend910" / "aic-ascend910-ops-info.json"
CONSOLE_SCRIPT = Path(sys.executable).parent / ("precision-policy.exe" if os.name == "nt" else "precision-policy")

SUMMARY = (
    "Converted 4/8 nodes to float16 precision using 0 cast(s) to float16 "
    "(excluding Const and Variable casts)"
)

#: DESIGN.md's mode table: mode -> aliases it lists.
DESIGN_MODES = {
    "force_fp32": ["cube_fp16in_fp32out"],
    "must_keep_origin_dtype": ["origin"],
    "allow_fp32_to_fp16": ["default"],
    "force_fp16": ["fp16"],
    "allow_mix_precision": ["allow_mix_precision_fp16", "mixed_float16"],
    "allow_fp32_to_bf16": [],
    "allow_mix_precision_bf16": ["mixed_bfloat16"],
    "force_bf16": [],
}


def _env() -> dict[str, str]:
    """The environment without TF's AMP list variables (the CLI reads them in mixed modes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m precision_policy ARGS`` and return the completed process (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", "precision_policy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=_env(),
        timeout=120,
    )


def cli_bytes(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "precision_policy", *map(str, args)],
        capture_output=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def fails(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture
def lib_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped ascend910 op-info file."""
    dest = tmp_path / SHIPPED_910.name
    shutil.copyfile(SHIPPED_910, dest)
    return dest


def write_graph(path: Path, nodes: list[dict], outputs: list[str]) -> Path:
    path.write_text(json.dumps({"format": "precision_policy.graph", "version": 1, "nodes": nodes, "outputs": outputs}, indent=1))
    return path


# ---------------------------------------------------------------------- modes / help / console script
def test_help_exits_0(cli_main: Cli):
    proc = ok(cli_main("--help"))
    for command in ("modes", "validate", "plan", "explain", "pin", "unpin", "set-flag", "schema"):
        assert command in proc.stdout


def test_console_script_is_installed_and_runs():
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(CONSOLE_SCRIPT), "plan", str(CONV), "--mode", "allow_mix_precision"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    ok(proc)
    assert proc.stdout.splitlines()[0] == SUMMARY
    proc = subprocess.run([str(CONSOLE_SCRIPT), "modes", "--json"], capture_output=True, text=True, env=_env(), timeout=120)
    assert {m["name"] for m in json.loads(ok(proc).stdout)["modes"]} == set(DESIGN_MODES)


def test_modes_text_lists_every_mode_and_alias(cli_main: Cli):
    out = ok(cli_main("modes")).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for mode, aliases in DESIGN_MODES.items():
        assert mode in rows, f"{mode} missing from:\n{out}"
        for alias in aliases:
            assert alias in rows[mode], f"alias {alias} not on the row of {mode}: {rows[mode]!r}"
    assert "default: allow_fp32_to_fp16" in out


def test_modes_json_lists_every_mode_and_alias():
    doc = json.loads(ok(cli("modes", "--json")).stdout)
    by_name = {m["name"]: m for m in doc["modes"]}
    assert set(by_name) == set(DESIGN_MODES)
    assert [m["name"] for m in doc["modes"]] == list(DESIGN_MODES)  # the table's order
    for mode, aliases in DESIGN_MODES.items():
        assert set(aliases) <= set(by_name[mode]["aliases"])
        assert by_name[mode]["low_dtype"] == ("bfloat16" if "bf16" in mode else "float16")
    assert doc["default"] == "allow_fp32_to_fp16"
    assert doc["precision_mode_v2"]["mixed_float16"] == "allow_mix_precision"
    assert doc["precision_mode_v2"]["origin"] == "must_keep_origin_dtype"


# ---------------------------------------------------------------------- validate
def test_validate_shipped_name_folder_and_file(lib_copy: Path, cli_main: Cli):
    by_name = ok(cli_main("validate", "ascend910")).stdout
    assert by_name.startswith("OK: ascend910:") and "op types in 1 file(s)" in by_name
    ok(cli_main("validate", REPO / "opinfo_db" / "ascend910"))
    ok(cli_main("validate", "opinfo_db/ascend910b"))
    out = ok(cli_main("validate", lib_copy)).stdout
    assert out.startswith("OK: ")
    doc = json.loads(ok(cli_main("validate", lib_copy.parent, "--json")).stdout)
    assert doc["valid"] is True and doc["files"] == [str(lib_copy)]
    assert doc["ops"] >= 150 and doc["white"] + doc["black"] + doc["gray"] == doc["ops"]
    assert doc["ops_with_float_kernel"].get("bfloat16", 0) == 0  # ascend910 has no bf16 kernels


def test_validate_missing_library_is_usage_error(tmp_path: Path):
    err = fails(cli("validate", tmp_path / "nope.json"), 2)
    assert "nope.json" in err and "Shipped libraries" in err


def test_validate_malformed_json_names_file_line_and_column(tmp_path: Path, cli_main: Cli):
    bad = tmp_path / "aic-bad-ops-info.json"
    text = '{\n    "Relu": {\n        "op": {"pattern": "x"},,\n        "opFile": {"value": "relu"}\n    }\n}\n'
    bad.write_text(text)
    with pytest.raises(json.JSONDecodeError) as exc:
        json.loads(text)
    line, col = exc.value.lineno, exc.value.colno
    assert line == 3
    err = fails(cli_main("validate", bad), 2)
    assert f"{bad}:{line}:{col}" in err, err
    assert "malformed JSON" in err


def test_validate_wrong_flag_names_file_op_and_field(lib_copy: Path, cli_main: Cli):
    data = json.loads(lib_copy.read_text())
    data["Relu"]["precision_reduce"] = {"flag": "yes"}
    lib_copy.write_text(json.dumps(data, indent=4))
    err = fails(cli_main("validate", lib_copy), 2)
    assert str(lib_copy) in err and "'Relu'" in err and "precision_reduce" in err and "'yes'" in err, err


def test_validate_unknown_dtype_lists_valid_choices(tmp_path: Path, cli_main: Cli):
    bad = tmp_path / "ops.json"
    bad.write_text(json.dumps({"Relu": {"input0": {"name": "x", "dtype": "float16,flaot"}}}))
    err = fails(cli_main("validate", bad), 2)
    assert "'Relu'" in err and "input0" in err and "flaot" in err and "float32" in err and "bfloat16" in err, err


# ---------------------------------------------------------------------- plan
def test_plan_prints_summary_table_and_casts():
    out = ok(cli("plan", CONV, "--mode", "allow_mix_precision")).stdout
    lines = out.splitlines()
    assert lines[0] == SUMMARY
    table = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in ("myConv", "BiasAdd", "myOutput")}
    assert set(table) == {"myConv", "BiasAdd", "myOutput"}
    assert "Conv2D" in table["myConv"] and "float32 -> float16" in table["myConv"] and "white-list" in table["myConv"]
    assert "gray: follows myConv" in table["BiasAdd"]
    assert "gray: follows BiasAdd" in table["myOutput"]
    assert "casts:" in out and "myOutput:0" in out
    assert "unknown op types" not in out


def test_plan_mode_v2_alias_gives_the_same_plan(cli_main: Cli):
    a = ok(cli_main("plan", CONV, "--mode", "allow_mix_precision", "--json")).stdout
    b = ok(cli_main("plan", CONV, "--mode-v2", "mixed_float16", "--json")).stdout
    c = ok(cli_main("plan", CONV, "--mode", "allow_mix_precision_fp16", "--json")).stdout
    assert json.loads(a)["nodes"] == json.loads(b)["nodes"] == json.loads(c)["nodes"]


def test_plan_json_nodes_casts_and_output_file(tmp_path: Path, cli_main: Cli):
    out_file = tmp_path / "plan.json"
    proc = ok(cli_main("plan", CONV, "--mode", "allow_mix_precision", "--json", "-o", out_file))
    doc = json.loads(proc.stdout)
    graph = json.loads(CONV.read_text())
    assert set(doc["nodes"]) == {n["name"] for n in graph["nodes"]}
    for name, node in doc["nodes"].items():
        assert "dtype" in node and isinstance(node["reason"], str) and node["reason"], name
    assert doc["nodes"]["myConv"]["dtype"] == "float16"
    assert doc["nodes"]["BiasAdd"]["dtype"] == "float16"
    assert doc["nodes"]["myOutput"]["dtype"] == "float16"
    assert doc["summary"] == SUMMARY
    assert doc["casts"] and all({"tensor", "to"} <= set(c) for c in doc["casts"])
    assert ("myOutput:0", "float32") in {(c["tensor"], c["to"]) for c in doc["casts"]}  # fetch kept float32
    assert out_file.read_text() == proc.stdout
    # -o without --json writes the same document and prints the human form
    out2 = tmp_path / "plan2.json"
    proc2 = ok(cli_main("plan", CONV, "--mode", "allow_mix_precision", "-o", out2))
    assert proc2.stdout.startswith(SUMMARY) and str(out2) in proc2.stdout
    assert out2.read_bytes() == out_file.read_bytes()


def test_plan_json_is_byte_identical_across_runs():
    a = ok(cli_bytes("plan", CONV, "--mode", "allow_mix_precision", "--json"))
    b = ok(cli_bytes("plan", CONV, "--mode", "allow_mix_precision", "--json"))
    assert a.stdout == b.stdout and a.stdout.endswith(b"\n")


def test_plan_lists_unknown_op_types(tmp_path: Path, cli_main: Cli):
    g = write_graph(tmp_path / "custom.json", [
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
        {"name": "conv", "op": "Conv2D", "inputs": ["x:0", "x:0"], "outputs": ["float32"]},
        {"name": "mine", "op": "MyCustomOp", "inputs": ["conv:0"], "outputs": ["float32"]},
        {"name": "mine2", "op": "MyCustomOp", "inputs": ["mine:0"], "outputs": ["float32"]},
    ], ["mine2:0"])
    out = ok(cli_main("plan", g, "--mode", "allow_mix_precision")).stdout
    assert "unknown op types" in out and "MyCustomOp: 2 node(s), e.g. mine" in out
    doc = json.loads(ok(cli_main("plan", g, "--mode", "allow_mix_precision", "--json")).stdout)
    assert doc["unknown_ops"] == {"MyCustomOp": ["mine", "mine2"]}
    assert doc["nodes"]["mine"]["dtype"] == "float32" and doc["nodes"]["mine"]["rule"] == "unknown_op"
    # the unknown op keeps float32, so the float16 conv output is cast back for it
    assert ("conv:0", "float32") in {(c["tensor"], c["to"]) for c in doc["casts"]}


def test_plan_must_keep_origin_dtype_is_precision_error():
    err = fails(cli("plan", CONV, "--mode", "must_keep_origin_dtype"), 1)
    assert "myConv" in err and "Conv2D" in err and "float16" in err, err
    fails(cli("plan", CONV, "--mode-v2", "origin"), 1)


def test_unknown_mode_lists_valid_modes_and_closest(cli_main: Cli):
    err = fails(cli_main("plan", CONV, "--mode", "allow_mix_precison"), 2)
    assert "'allow_mix_precison'" in err and "Did you mean 'allow_mix_precision'" in err, err
    for mode in DESIGN_MODES:
        assert mode in err
    err = fails(cli_main("plan", CONV, "--mode-v2", "mixed_flaot16"), 2)
    assert "mixed_float16" in err


def test_mode_and_mode_v2_together_is_usage_error(cli_main: Cli):
    err = fails(cli_main("plan", CONV, "--mode", "allow_mix_precision", "--mode-v2", "mixed_float16"), 2)
    assert "--mode" in err and "--mode-v2" in err


def test_missing_graph_file_is_usage_error(tmp_path: Path, cli_main: Cli):
    missing = tmp_path / "no_such_graph.json"
    err = fails(cli_main("plan", missing, "--mode", "allow_mix_precision"), 2)
    assert str(missing) in err and "not found" in err


def test_graph_with_dangling_input_is_usage_error(tmp_path: Path, cli_main: Cli):
    g = write_graph(tmp_path / "dangling.json", [
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
        {"name": "relu", "op": "Relu", "inputs": ["ghost:0"], "outputs": ["float32"]},
    ], ["relu:0"])
    err = fails(cli_main("plan", g), 2)
    assert "relu" in err and "ghost:0" in err and str(g) in err, err


def test_malformed_graph_json_names_line_and_column(tmp_path: Path, cli_main: Cli):
    g = tmp_path / "broken.json"
    g.write_text('{"nodes": [\n  {"name": "x" "op": "Placeholder"}\n]}\n')
    err = fails(cli_main("plan", g), 2)
    assert f"{g}:2:" in err, err


def test_unknown_op_info_library_is_usage_error(cli_main: Cli):
    err = fails(cli_main("plan", CONV, "--op-info", "ascend91"), 2)
    assert "ascend910" in err


def test_unknown_flag_value_is_rejected_by_argparse(lib_copy: Path):
    before = lib_copy.read_bytes()
    fails(cli("set-flag", "Relu", "yes", "--op-info", lib_copy), 2)
    assert lib_copy.read_bytes() == before


# ---------------------------------------------------------------------- explain
def test_explain_prints_both_nodes_with_reasons():
    out = ok(cli("explain", CONV, "myConv", "BiasAdd", "--mode", "allow_mix_precision")).stdout
    assert out.splitlines()[0] == SUMMARY
    assert "myConv (Conv2D)" in out and "BiasAdd (BiasAdd)" in out
    conv_part, bias_part = out.split("BiasAdd (BiasAdd)")
    assert "white-list" in conv_part and "cube op (heavyOp)" in conv_part
    assert "gray: follows myConv" in bias_part and "float16" in bias_part


def test_explain_json(cli_main: Cli):
    doc = json.loads(ok(cli_main("explain", CONV, "myConv", "BiasAdd", "--mode", "allow_mix_precision", "--json")).stdout)
    assert doc["summary"] == SUMMARY
    assert set(doc["nodes"]) == {"myConv", "BiasAdd"} == set(doc["explain"])
    assert doc["nodes"]["myConv"]["rule"] == "white" and doc["nodes"]["myConv"]["dtype"] == "float16"
    assert (doc["nodes"]["BiasAdd"]["rule"], doc["nodes"]["BiasAdd"]["followed"]) == ("gray_follows", "myConv")
    assert "myConv (Conv2D)" in doc["explain"]["myConv"]


def test_explain_unknown_node_is_usage_error(cli_main: Cli):
    err = fails(cli_main("explain", CONV, "myConvv", "--mode", "allow_mix_precision"), 2)
    assert "myConvv" in err and "myConv" in err


# ---------------------------------------------------------------------- the pin -> plan round trip
def _plan_json(run: Cli, graph: Path, lib: Path, mode: str = "allow_mix_precision") -> dict:
    return json.loads(ok(run("plan", graph, "--mode", mode, "--op-info", lib, "--json")).stdout)


def test_pin_plan_unpin_round_trip(lib_copy: Path, cli_main: Cli):
    original = lib_copy.read_bytes()
    original_text = original.decode("utf-8")
    assert "precision_reduce" not in json.loads(original_text)["BiasAdd"], "BiasAdd must start gray for this test"

    before = _plan_json(cli_main, CONV, lib_copy)
    assert before["nodes"]["BiasAdd"]["dtype"] == "float16"
    assert (before["nodes"]["BiasAdd"]["rule"], before["nodes"]["BiasAdd"]["followed"]) == ("gray_follows", "myConv")

    proc = ok(cli_main("pin", "BiasAdd", "--op-info", lib_copy))
    assert "BiasAdd" in proc.stdout and "black" in proc.stdout
    edited_text = lib_copy.read_text(encoding="utf-8")

    # every byte outside the BiasAdd entry is unchanged
    s0, e0 = json_entry_span(original_text, "BiasAdd")
    s1, e1 = json_entry_span(edited_text, "BiasAdd")
    assert s0 == s1
    assert edited_text[:s1] == original_text[:s0]
    assert edited_text[e1:] == original_text[e0:]
    # inside it, only precision_reduce was added; key order of the whole file is kept
    a, b = json.loads(original_text), json.loads(edited_text)
    assert b["BiasAdd"]["precision_reduce"] == {"flag": "false"}
    assert list(a) == list(b)
    assert list(b["BiasAdd"])[: len(a["BiasAdd"])] == list(a["BiasAdd"])
    del b["BiasAdd"]["precision_reduce"]
    assert a == b

    after = _plan_json(cli_main, CONV, lib_copy)
    assert after["nodes"]["myConv"]["dtype"] == "float16"
    assert after["nodes"]["BiasAdd"]["dtype"] == "float32"
    assert after["nodes"]["BiasAdd"]["rule"] == "black"
    assert after["nodes"]["myOutput"]["dtype"] == "float32"
    assert (after["nodes"]["myOutput"]["rule"], after["nodes"]["myOutput"]["followed"]) == ("gray_follows", "BiasAdd")
    assert ("myConv:0", "float32") in {(c["tensor"], c["to"]) for c in after["casts"]}
    assert not any(c["tensor"] == "myOutput:0" for c in after["casts"])  # already float32
    summary = ok(cli_main("plan", CONV, "--mode", "allow_mix_precision", "--op-info", lib_copy)).stdout.splitlines()[0]
    assert summary.startswith("Converted 2/8 nodes to float16 precision")  # the Reshape feeding myConv, and myConv

    # pinning again changes nothing
    proc = ok(cli_main("pin", "BiasAdd", "--op-info", lib_copy, "--json"))
    assert json.loads(proc.stdout)["changed"] is False
    assert lib_copy.read_text(encoding="utf-8") == edited_text

    # unpin restores every byte
    proc = ok(cli_main("unpin", "BiasAdd", "--op-info", lib_copy, "--json"))
    res = json.loads(proc.stdout)
    assert res["old_flag"] == "false" and res["new_flag"] is None and res["changed"] is True
    assert lib_copy.read_bytes() == original
    assert _plan_json(cli_main, CONV, lib_copy)["nodes"] == before["nodes"]


def test_set_flag_existing_and_new_op(lib_copy: Path, tmp_path: Path, cli_main: Cli):
    original_text = lib_copy.read_text(encoding="utf-8")
    a = json.loads(original_text)
    assert "precision_reduce" not in a["Relu"] and "MyCustomOp" not in a

    res = json.loads(ok(cli_main("set-flag", "Relu", "true", "--op-info", lib_copy, "--json")).stdout)
    assert res == {"file": str(lib_copy), "op": "Relu", "old_flag": None, "new_flag": "true", "changed": True, "created_op": False}
    text = lib_copy.read_text(encoding="utf-8")
    s0, e0 = json_entry_span(original_text, "Relu")
    s1, e1 = json_entry_span(text, "Relu")
    assert text[:s1] == original_text[:s0] and text[e1:] == original_text[e0:]
    b = json.loads(text)
    assert b["Relu"]["precision_reduce"] == {"flag": "true"}
    # Relu white after a gray BiasAdd pinned black: runs float16 because of its own flag
    ok(cli_main("pin", "BiasAdd", "--op-info", lib_copy))
    plan = _plan_json(cli_main, CONV, lib_copy)
    assert plan["nodes"]["myOutput"]["dtype"] == "float16" and plan["nodes"]["myOutput"]["rule"] == "white"

    # flipping an existing flag edits just the value
    ok(cli_main("set-flag", "Relu", "false", "--op-info", lib_copy))
    assert json.loads(lib_copy.read_text())["Relu"]["precision_reduce"] == {"flag": "false"}

    # an op not in the file is an error naming the closest op types, and needs --add to be created
    r = cli_main("set-flag", "relu", "true", "--op-info", lib_copy)
    assert r.returncode == 2 and "did you mean 'Relu'" in r.stderr and "--add" in r.stderr
    # with --add it is added, with just the flag, at its sorted place
    g = write_graph(tmp_path / "custom.json", [
        {"name": "x", "op": "Placeholder", "outputs": ["float32"]},
        {"name": "mine", "op": "MyCustomOp", "inputs": ["x:0"], "outputs": ["float32"]},
    ], ["mine:0"])
    assert _plan_json(cli_main, g, lib_copy)["unknown_ops"] == {"MyCustomOp": ["mine"]}
    before_add = lib_copy.read_text(encoding="utf-8")
    res = json.loads(ok(cli_main("set-flag", "MyCustomOp", "true", "--add", "--op-info", lib_copy, "--json")).stdout)
    assert res["created_op"] is True and res["new_flag"] == "true"
    c = json.loads(lib_copy.read_text(encoding="utf-8"))
    assert c["MyCustomOp"] == {"precision_reduce": {"flag": "true"}}
    before_keys = list(json.loads(before_add))
    if before_keys == sorted(before_keys):
        assert list(c) == sorted(c)
    assert {k: v for k, v in c.items() if k != "MyCustomOp"} == json.loads(before_add)
    ok(cli_main("validate", lib_copy))
    plan = _plan_json(cli_main, g, lib_copy)
    assert plan["unknown_ops"] == {}
    assert plan["nodes"]["mine"]["rule"] == "white" and plan["nodes"]["mine"]["dtype"] == "float16"


def test_unpin_op_not_in_file_is_usage_error(lib_copy: Path, cli_main: Cli):
    before = lib_copy.read_bytes()
    err = fails(cli_main("unpin", "MyCustomOp", "--op-info", lib_copy), 2)
    assert "MyCustomOp" in err
    assert lib_copy.read_bytes() == before


def test_pin_refuses_file_that_does_not_parse(tmp_path: Path, cli_main: Cli):
    bad = tmp_path / "ops.json"
    text = SHIPPED_910.read_text(encoding="utf-8")
    cut = text.index('"BiasAdd": {') + len('"BiasAdd": {')
    broken = text[:cut] + ",," + text[cut:]  # a stray ",," at the start of the BiasAdd entry
    with pytest.raises(json.JSONDecodeError) as exc:
        json.loads(broken)
    bad.write_text(broken, encoding="utf-8")
    before = bad.read_bytes()
    err = fails(cli_main("pin", "BiasAdd", "--op-info", bad), 2)
    assert f"{bad}:{exc.value.lineno}:{exc.value.colno}" in err and "malformed JSON" in err, err
    fails(cli_main("unpin", "BiasAdd", "--op-info", bad), 2)
    fails(cli_main("set-flag", "Relu", "true", "--op-info", bad), 2)
    assert bad.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.json"]  # no temp files left behind


def test_pin_refuses_file_whose_top_level_is_not_an_object(tmp_path: Path, cli_main: Cli):
    bad = tmp_path / "ops.json"
    bad.write_text('[{"BiasAdd": {}}]\n')
    before = bad.read_bytes()
    fails(cli_main("pin", "BiasAdd", "--op-info", bad), 2)
    assert bad.read_bytes() == before


def test_pin_read_only_file(lib_copy: Path, cli_main: Cli):
    lib_copy.chmod(0o444)
    try:
        if os.access(lib_copy, os.W_OK):
            pytest.skip("running as a user (root) for whom a 0444 file is still writable")
        before = lib_copy.read_bytes()
        err = fails(cli_main("pin", "BiasAdd", "--op-info", lib_copy), 2)
        assert "chmod u+w" in err and str(lib_copy) in err
        assert lib_copy.read_bytes() == before
    finally:
        lib_copy.chmod(0o644)


def test_pin_read_only_file_message_when_access_is_denied(lib_copy: Path):
    """Same path as above, for runs as root: os.access is made to say 'not writable', as it does for users."""
    script = (
        "import os, sys\n"
        "from precision_policy.opinfo import edit\n"
        "real = os.access\n"
        "edit.os.access = lambda p, mode, *a, **k: False if mode == os.W_OK else real(p, mode, *a, **k)\n"
        "from precision_policy.cli import main\n"
        "sys.exit(main(['pin', 'BiasAdd', '--op-info', sys.argv[1]]))\n"
    )
    before = lib_copy.read_bytes()
    proc = subprocess.run([sys.executable, "-c", script, str(lib_copy)], capture_output=True, text=True, env=_env(), timeout=120)
    err = fails(proc, 2)
    assert "chmod u+w" in err and str(lib_copy) in err
    assert lib_copy.read_bytes() == before


def test_pin_keeps_file_mode(lib_copy: Path, cli_main: Cli):
    lib_copy.chmod(0o640)
    ok(cli_main("pin", "BiasAdd", "--op-info", lib_copy))
    assert stat.S_IMODE(lib_copy.stat().st_mode) == 0o640


def test_crash_mid_write_leaves_old_file_intact(lib_copy: Path, cli_main: Cli):
    """The process dies after the temp file is written and before the rename: the old file survives."""
    script = (
        "import os, sys\n"
        "from precision_policy.opinfo import edit\n"
        "edit.os.fsync = lambda fd: os._exit(9)\n"
        "edit.pin(sys.argv[1], 'BiasAdd')\n"
        "os._exit(0)\n"
    )
    before = lib_copy.read_bytes()
    proc = subprocess.run([sys.executable, "-c", script, str(lib_copy)], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert lib_copy.read_bytes() == before
    assert "precision_reduce" not in json.loads(lib_copy.read_text(encoding="utf-8"))["BiasAdd"]
    ok(cli_main("validate", lib_copy))
    # the crash really happened mid-edit: the abandoned temp file holds the new text (and the lock file stays)
    leftovers = sorted(p.name for p in lib_copy.parent.iterdir() if p.name != lib_copy.name)
    temps = [n for n in leftovers if n.endswith(".pp-tmp")]
    assert len(temps) == 1 and temps[0].startswith(f".{lib_copy.name}."), leftovers
    assert set(leftovers) - set(temps) <= {f".{lib_copy.name}.lock"}
    temp = lib_copy.parent / temps[0]
    assert json.loads(temp.read_text(encoding="utf-8"))["BiasAdd"]["precision_reduce"] == {"flag": "false"}
    # and the CLI still edits the intact file afterwards, removing what the crash left behind
    ok(cli_main("pin", "BiasAdd", "--op-info", lib_copy))
    assert json.loads(lib_copy.read_text())["BiasAdd"]["precision_reduce"] == {"flag": "false"}
    assert sorted(p.name for p in lib_copy.parent.iterdir()) == [lib_copy.name]


def test_plan_output_into_missing_folder_is_usage_error(tmp_path: Path, cli_main: Cli):
    target = tmp_path / "no_such_dir" / "plan.json"
    err = fails(cli_main("plan", CONV, "-o", target), 2)
    assert str(target.parent) in err


def test_pin_write_failure_is_usage_error(lib_copy: Path):
    script = (
        "import errno, os, sys\n"
        "from precision_policy.opinfo import edit\n"
        "def full(fd):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "edit.os.fsync = full\n"
        "from precision_policy.cli import main\n"
        "sys.exit(main(['pin', 'BiasAdd', '--op-info', sys.argv[1]]))\n"
    )
    before = lib_copy.read_bytes()
    proc = subprocess.run([sys.executable, "-c", script, str(lib_copy)], capture_output=True, text=True, env=_env(), timeout=120)
    assert lib_copy.read_bytes() == before  # this part holds: the old file is intact, the temp file removed
    assert sorted(p.name for p in lib_copy.parent.iterdir()) == [lib_copy.name]
    err = fails(proc, 2)
    assert "No space left" in err and str(lib_copy) in err


# ---------------------------------------------------------------------- schema
def test_schema_validates_shipped_file_and_catches_bad_flag():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(ok(cli("schema")).stdout)
    assert schema["$schema"].startswith("https://json-schema.org/draft/2020-12")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for lib in ("ascend910", "ascend910b"):
        for f in sorted((REPO / "opinfo_db" / lib).glob("*.json")):
            errors = list(validator.iter_errors(json.loads(f.read_text(encoding="utf-8"))))
            assert errors == [], f"{f}: {[e.message for e in errors[:5]]}"
    data = json.loads(SHIPPED_910.read_text(encoding="utf-8"))
    data["Relu"]["precision_reduce"] = {"flag": "yes"}
    errors = list(validator.iter_errors(data))
    assert errors and any("yes" in e.message for e in errors)
    assert any(list(e.absolute_path)[:2] == ["Relu", "precision_reduce"] for e in errors)
    data = json.loads(SHIPPED_910.read_text(encoding="utf-8"))
    data["Conv2D"]["input0"] = "float16"  # a tensor field must be an object
    assert list(validator.iter_errors(data))


def test_pin_over_an_invalid_flag_value_reports_cleanly(tmp_path: Path, cli_main: Cli):
    lib = tmp_path / "ops.json"
    lib.write_text('{\n    "Relu": {"precision_reduce": {"flag": "yes"}}\n}\n')
    proc = cli_main("pin", "Relu", "--op-info", lib)
    # whatever the CLI decides (repair the flag, or refuse), it must not crash half-way
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        assert json.loads(lib.read_text())["Relu"]["precision_reduce"] == {"flag": "false"}
    else:
        assert proc.returncode == 2
        assert "yes" in lib.read_text()


def test_pin_unpin_keeps_crlf_line_endings(tmp_path: Path):
    lib = tmp_path / "aic-crlf-ops-info.json"
    lib.write_bytes(SHIPPED_910.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    original = lib.read_bytes()
    ok(cli("pin", "BiasAdd", "--op-info", lib))
    edited = lib.read_bytes()
    assert edited.count(b"\r\n") == edited.count(b"\n"), "line endings were changed"
    ok(cli("unpin", "BiasAdd", "--op-info", lib))
    assert lib.read_bytes() == original


# ---------------------------------------------------------------------- convert (TensorFlow models)
def _tf_models():
    """The model builders of test_tf_convert (imported only when TensorFlow is there)."""
    pytest.importorskip("tensorflow")
    import test_tf_convert

    return test_tf_convert


def _gray_pb(path: Path) -> Path:
    """x -> MatMul (white, low) + y (a float32 graph input) -> Add (gray: its inputs disagree) -> out."""
    import numpy as np
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [4, 8], name="x")
        y = tf.compat.v1.placeholder(tf.float32, [4, 8], name="y")
        mm = tf.matmul(x, tf.constant(np.ones((8, 8), "float32")), name="mm")
        tf.identity(tf.add(mm, y, name="add"), name="out")
    path.write_bytes(g.as_graph_def().SerializeToString())
    return path


@pytest.mark.slow
def test_convert_tf2_savedmodel_reports_every_signature_in_text_and_json(tmp_path: Path, cli_main: Cli):
    models = _tf_models()
    src = tmp_path / "loop"
    models.save_loop_module(src)
    bf16 = ("--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16")
    out = ok(cli_main("convert", src, tmp_path / "a", *bf16)).stdout
    lines = out.splitlines()
    assert lines[0].startswith("signature serving_default  Converted ")
    assert lines[1].startswith("signature pair") and "Converted " in lines[1] and "to bfloat16" in lines[1]
    assert f"wrote {tmp_path / 'a'}" in out and "warnings:" not in out
    doc = json.loads(ok(cli_main("convert", src, tmp_path / "b", *bf16, "--json")).stdout)
    assert list(doc["signatures"]) == ["serving_default", "pair"]
    assert doc["summary"] == doc["signatures"]["serving_default"]["summary"] == lines[0].split("  ", 1)[1]
    assert doc["signatures"]["pair"]["plan"]["nodes"]
    assert doc["warnings"] == []
    # `plan` on the SavedModel plans its default signature: the same plan, node for node and in the same
    # order, although TF's freezing orders nodes differently from one process to the next (so a real process here)
    planned = json.loads(ok(cli("plan", src, *bf16, "--json")).stdout)
    assert list(planned["nodes"]) == list(doc["plan"]["nodes"])
    assert planned == doc["plan"]
    import tensorflow as tf

    for folder in ("a", "b"):
        assert set(tf.saved_model.load(str(tmp_path / folder)).signatures) == {"serving_default", "pair"}


@pytest.mark.slow
def test_gray_disagreement_option_reaches_plan_explain_and_convert(tmp_path: Path, cli_main: Cli):
    pytest.importorskip("tensorflow")
    pb = _gray_pb(tmp_path / "gray.pb")
    bf16 = ("--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16")
    widest = ok(cli_main("explain", pb, "add", *bf16)).stdout
    assert "follows the widest (y, float32)" in widest
    low = ok(cli_main("explain", pb, "add", *bf16, "--gray-disagreement", "low")).stdout
    assert "follows the lowest (mm, bfloat16)" in low
    doc = json.loads(ok(cli_main("convert", pb, tmp_path / "low.pb", *bf16, "--gray-disagreement", "low", "--json")).stdout)
    assert doc["plan"]["config"]["gray_disagreement"] == "low"
    assert doc["plan"]["nodes"]["add"]["dtype"] == "bfloat16"
    assert (tmp_path / "low.pb").stat().st_size > 0
    fails(cli_main("plan", pb, "--gray-disagreement", "lowest"), 2)


def test_convert_refuses_to_write_a_graph_that_would_not_load(tmp_path: Path, cli_main: Cli):
    models = _tf_models()
    lib = tmp_path / "aic-wrong-ops-info.json"
    lib.write_text(json.dumps(models.WRONG_LIB))
    src = tmp_path / "src"
    src.mkdir()
    paths = models.inverse_models(src)
    out = tmp_path / "out"
    out.mkdir()
    err = fails(cli_main("convert", paths["pb"], out / "inv_bf16.pb", "--mode", "mixed_bfloat16", "--op-info", lib), 2)
    assert "node 'inv'" in err and "does not load in TensorFlow" in err and "nothing was written" in err
    assert "--keep-dtype" in err
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_convert_and_plan_print_the_function_calls_tensorflow_kept(tmp_path: Path, cli_main: Cli):
    models = _tf_models()
    m = models.JitModule()
    pb = tmp_path / "jit.pb"
    models.frozen_pb(m.serve.get_concrete_function(), pb)
    proc = ok(cli_main("convert", pb, tmp_path / "jit_bf16.pb", "--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16"))
    text = proc.stdout.split("warnings:\n", 1)[1]
    assert "StatefulPartitionedCall (StatefulPartitionedCall)" in text and "_noinline" in text
    assert "Traceback" not in proc.stderr
    proc = ok(cli_main("plan", pb, "--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16", "--json"))
    json.loads(proc.stdout)  # stdout stays pure JSON
    assert "precision-policy: warning:" in proc.stderr and "_noinline" in proc.stderr


def test_convert_graphdef_to_a_folder_is_a_usage_error(tmp_path: Path, cli_main: Cli):
    pytest.importorskip("tensorflow")
    pb = _gray_pb(tmp_path / "gray.pb")
    err = fails(cli_main("convert", pb, tmp_path / "folder"), 2)
    assert "converts to a .pb or .pbtxt file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.pb"]


# ---------------------------------------------------------------------- issue 10: edits never lose data


_DUPLICATE_OP = (
    '{\n'
    '    "Relu": {"op": {"pattern": "x"}},\n'
    '    "Add": {"op": {"pattern": "x"}},\n'
    '    "Relu": {"precision_reduce": {"flag": "false"}}\n'
    '}\n'
)


def test_duplicate_op_in_one_file_is_an_error_naming_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Before: validate said OK, unpin reported a change it did not make, pin crashed with StopIteration."""
    lib = tmp_path / "ops.json"
    lib.write_text(_DUPLICATE_OP)
    for args in (("validate", lib), ("pin", "Relu", "--op-info", lib), ("unpin", "Relu", "--op-info", lib),
                 ("set-flag", "Relu", "true", "--op-info", lib), ("pin", "Add", "--op-info", lib),
                 ("pin", "Relu", "--op-info", lib, "--json")):
        proc = cli_in_process(capsys, *args)
        err = fails(proc, 2)
        assert f"{lib}:4:" in err and "'Relu'" in err and "lines 2 and 4" in err, err
        assert proc.stdout == ""
    assert lib.read_text() == _DUPLICATE_OP and sorted(os.listdir(tmp_path)) == ["ops.json"]


def test_duplicate_field_inside_an_entry_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    lib = tmp_path / "ops.json"
    lib.write_text('{"Relu": {"precision_reduce": {"flag": "false"},\n'
                   '          "precision_reduce": {"flag": "true"}}}\n')
    err = fails(cli_in_process(capsys, "validate", lib), 2)
    assert "op 'Relu'" in err and "precision_reduce" in err and "lines 1 and 2" in err
    fails(cli_in_process(capsys, "unpin", "Relu", "--op-info", lib), 2)
    plan_err = fails(cli_in_process(capsys, "plan", CONV, "--op-info", lib), 2)
    assert "lines 1 and 2" in plan_err


@pytest.mark.parametrize("flag_json", ['{"a": 1}', '["false"]', "NaN", "Infinity", "3"])
def test_pin_over_a_non_text_flag_is_a_typed_error(tmp_path: Path, flag_json: str, capsys: pytest.CaptureFixture):
    """Before: 'unhashable type: dict' traceback; --json printed NaN, which is not JSON."""
    lib = tmp_path / "ops.json"
    text = '{\n    "Relu": {"precision_reduce": {"flag": %s}},\n    "Add": {}\n}\n' % flag_json  # noqa: UP031  (JSON braces)
    lib.write_text(text)
    for args in (("pin", "Relu"), ("pin", "Relu", "--json"), ("unpin", "Relu", "--json"), ("set-flag", "Relu", "true")):
        proc = cli_in_process(capsys, *args, "--op-info", lib)
        err = fails(proc, 2)
        assert "op 'Relu'" in err and "precision_reduce.flag" in err and str(lib) in err, err
        assert proc.stdout == ""  # in particular no NaN pretending to be JSON
    assert lib.read_text() == text


def test_plan_with_an_empty_op_info_is_a_usage_error(capsys: pytest.CaptureFixture):
    """Before: an empty --op-info planned with the current folder as the library."""
    err = fails(cli_in_process(capsys, "plan", CONV, "--op-info", ""), 2)
    assert "op_info" in err and "empty" in err
    err = fails(cli_in_process(capsys, "validate", ""), 2)
    assert "empty" in err


def test_pin_through_a_symlink_edits_the_target_and_keeps_the_link(lib_copy: Path, tmp_path: Path, cli_main: Cli):
    lib_copy.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(lib_copy)
    ok(cli_main("pin", "BiasAdd", "--op-info", link))
    assert link.is_symlink()
    assert json.loads(lib_copy.read_text())["BiasAdd"]["precision_reduce"] == {"flag": "false"}
    assert stat.S_IMODE(lib_copy.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([lib_copy.name, "link.json"])


def test_plan_output_gets_the_umask_mode(tmp_path: Path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "precision_policy",
                           "plan", str(CONV), "-o", str(out)], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=120)
    ok(proc)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


@pytest.mark.slow
def test_convert_writes_through_symlinks_keeps_mode_and_cleans_crash_leftovers(tmp_path: Path, cli_main: Cli):
    """The TF converter writes through fileio: a .pb output over a symlink keeps the link and the target's
    mode; a SavedModel output removes the temporary folders a crashed conversion left beside it."""
    models = _tf_models()
    pb = _gray_pb(tmp_path / "gray.pb")
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.pb").write_bytes(b"old")
    (real / "model.pb").chmod(0o644)
    link = tmp_path / "model_bf16.pb"
    link.symlink_to(real / "model.pb")
    bf16 = ("--mode", "mixed_bfloat16", "--op-info", "tf_amp_bf16")
    ok(cli_main("convert", pb, link, *bf16))
    assert link.is_symlink() and (real / "model.pb").read_bytes() != b"old"
    assert stat.S_IMODE((real / "model.pb").stat().st_mode) == 0o644
    assert sorted(os.listdir(real)) == ["model.pb"]

    src = tmp_path / "src"
    src.mkdir()
    paths = models.inverse_models(src)
    out = tmp_path / "saved"
    for leftover in (".saved.0badc0de.pp-tmp", ".saved.k2j_x9zq.tmp"):  # ours, and tempfile.mkdtemp's (older versions)
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "saved_model.pb").write_bytes(b"x" * 100)
    ok(cli_main("convert", paths["tf1"], out, *bf16))
    assert (out / "saved_model.pb").is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_pin_on_a_hard_linked_library_warns_that_the_other_name_keeps_the_old_text(lib_copy: Path, tmp_path: Path, cli_main: Cli):
    other = tmp_path / "other-name.json"
    os.link(lib_copy, other)
    before = other.read_bytes()
    proc = ok(cli_main("pin", "BiasAdd", "--op-info", lib_copy))
    assert "warning" in proc.stderr and "2 hard links" in proc.stderr and str(lib_copy) in proc.stderr
    assert json.loads(lib_copy.read_text())["BiasAdd"]["precision_reduce"] == {"flag": "false"}
    assert other.read_bytes() == before
