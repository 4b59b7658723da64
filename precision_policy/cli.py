"""The ``precision-policy`` command.

Exit codes: 0 ok, 1 a precision error (the mode cannot be honoured), 2 bad usage or bad input.
Every command prints for people; ``--json`` prints for machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precision_policy import modes as modes_mod
from precision_policy.errors import PrecisionError, PrecisionPolicyError

EXIT_OK, EXIT_PRECISION, EXIT_USAGE = 0, 1, 2


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- commands
def cmd_modes(args: argparse.Namespace) -> int:
    rows = [(m.name, ", ".join(m.aliases) or "-", m.low, m.description) for m in modes_mod.all_modes()]
    if args.json:
        _print_json(
            {
                "modes": [
                    {"name": n, "aliases": a.split(", ") if a != "-" else [], "low_dtype": lo, "description": d}
                    for n, a, lo, d in rows
                ],
                "precision_mode_v2": modes_mod.V2_NAMES,
                "default": modes_mod.DEFAULT_MODE,
            }
        )
        return EXIT_OK
    print(_table(rows, ("mode", "aliases", "low", "what it does")))
    print(f"\ndefault: {modes_mod.DEFAULT_MODE}; precision_mode_v2 values: "
          + ", ".join(f"{k} -> {v}" for k, v in sorted(modes_mod.V2_NAMES.items())))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from precision_policy.opinfo import load_library

    lib = load_library(args.library)
    counts = lib.counts()
    floats: dict[str, int] = {}
    heavy = 0
    for info in lib.values():
        heavy += info.heavy
        for d in info.float_dtypes:
            floats[d] = floats.get(d, 0) + 1
    result = {
        "library": lib.name,
        "files": [str(f) for f in lib.sources],
        "ops": len(lib),
        "white": counts["white"],
        "black": counts["black"],
        "gray": counts["gray"],
        "heavy": heavy,
        "ops_with_float_kernel": dict(sorted(floats.items())),
    }
    if args.json:
        _print_json({"valid": True, **result})
        return EXIT_OK
    print(f"OK: {lib.name}: {len(lib)} op types in {len(lib.sources)} file(s)")
    print(f"  white {counts['white']}, black {counts['black']}, gray {counts['gray']}; cube (heavyOp) {heavy}")
    print("  ops with a kernel in: " + ", ".join(f"{d} {n}" for d, n in sorted(floats.items())))
    return EXIT_OK


def _config(args: argparse.Namespace):
    from precision_policy.config import RunConfig

    settings: dict[str, Any] = {"op_info": args.op_info}
    if args.mode_v2:
        settings["precision_mode_v2"] = args.mode_v2
    if args.mode:
        settings["precision_mode"] = args.mode
    for key in ("modify_mixlist", "keep_dtype", "customize_dtypes"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = Path(value)
    if args.fetch_low:
        settings["keep_output_dtype"] = False
    if args.native_fp16:
        settings["native_fp16"] = True
    if getattr(args, "gray_disagreement", None):
        settings["gray_disagreement"] = args.gray_disagreement
    if getattr(args, "env_lists", None):
        settings["use_env_lists"] = args.env_lists == "on"
    return RunConfig(**settings)


#: Loggers whose warnings describe the model being read (function calls left unconverted, ...).
_MODEL_LOGGERS = ("precision_policy.backends.tensorflow",)
#: Loggers whose warnings describe a file being written (a hard link broken, an owner not kept).
_WRITE_LOGGERS = ("precision_policy.fileio",)


class _Collect(logging.Handler):
    """Collects the model warnings the TensorFlow backend logs, so the command can print them for people."""

    def __init__(self, verbose: bool, loggers: Sequence[str] = _MODEL_LOGGERS) -> None:
        super().__init__(logging.WARNING)
        self.verbose = verbose
        self.loggers = tuple(loggers)
        self.messages: list[str] = []
        self._saved: list[tuple[logging.Logger, int, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _Collect:
        for name in self.loggers:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(logging.WARNING)
            logger.propagate = self.verbose  # -v: stderr gets them too, as every library warning
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, level, propagate in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate

    def print_to_stderr(self) -> None:
        if not self.verbose:
            for m in self.messages:
                print(f"precision-policy: warning: {m}", file=sys.stderr)


def _plan(args: argparse.Namespace):
    from precision_policy.api import plan
    from precision_policy.graph import load_graph

    config = _config(args)
    with _Collect(args.verbose) as notes:
        graph = load_graph(args.graph)
    notes.print_to_stderr()
    return plan(graph, config)


def cmd_plan(args: argparse.Namespace) -> int:
    p = _plan(args)
    if args.output:
        with _Collect(args.verbose, _WRITE_LOGGERS) as notes:
            p.to_json(args.output)
        notes.print_to_stderr()
    if args.json:
        sys.stdout.write(p.to_json())
        return EXIT_OK
    print(p.summary())
    converted = p.converted()
    print(f"\nmode {p.mode_name}, op-info {p.library_name}: {len(converted)} op(s) converted, {len(p.casts)} cast(s) in all")
    if any(d.dtype == "float16" for d in converted):
        how = p.config.get("float16", "emulated")
        print("float16 execution: " + ("native float16 kernels" if how == "native" else
              "emulated on CPU (float16 storage, float32 compute; --native-fp16 for real kernels)"))
    if converted:
        rows = [(d.name, d.op_type, f"{d.origin} -> {d.dtype}", d.reason) for d in converted[: args.limit]]
        print(_table(rows, ("node", "op", "dtype", "why")))
        if len(converted) > args.limit:
            print(f"... {len(converted) - args.limit} more (use --json for all)")
    if p.casts:
        rows = [(c.tensor, f"{c.from_dtype} -> {c.to}", c.kind + (", fetch" if c.for_fetch else ""), str(len(c.consumers)))
                for c in p.casts[: args.limit]]
        print("\ncasts:")
        print(_table(rows, ("tensor", "dtype", "source", "consumers")))
        if len(p.casts) > args.limit:
            print(f"... {len(p.casts) - args.limit} more")
    if p.unknown:
        print("\nunknown op types (not in the op-info library; they keep their origin dtype — add them to decide):")
        for op, nodes in sorted(p.unknown.items()):
            print(f"  {op}: {len(nodes)} node(s), e.g. {nodes[0]}")
    if p.warnings:
        print("\nwarnings:")
        for w in p.warnings:
            print(f"  {w}")
    if args.output:
        print(f"\nplan written to {args.output}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    p = _plan(args)
    if args.json:
        doc = p.to_dict()
        _print_json({"summary": doc["summary"], "nodes": {n: doc["nodes"][p[n].name] for n in args.nodes},
                     "explain": {n: p.explain(n) for n in args.nodes}})
        return EXIT_OK
    print(p.summary())
    for name in args.nodes:
        print()
        print(p.explain(name))
    return EXIT_OK


def _edit(args: argparse.Namespace, flag: str | None) -> int:
    from precision_policy.opinfo.edit import set_flag

    with _Collect(args.verbose, _WRITE_LOGGERS) as notes:
        result = set_flag(args.op_info, args.op, flag, add=getattr(args, "add", False))
    notes.print_to_stderr()
    names = {"true": "white (true)", "false": "black (false)", None: "gray (no flag)"}
    if args.json:
        _print_json({"file": str(result.file), "op": result.op, "old_flag": result.old_flag, "new_flag": result.new_flag,
                     "changed": result.changed, "created_op": result.created_op})
        return EXIT_OK
    if not result.changed:
        print(f"{result.op}: already {names[result.new_flag]} in {result.file}; file unchanged")
    else:
        created = " (new entry)" if result.created_op else ""
        old = names.get(result.old_flag, f"invalid flag {result.old_flag!r}")
        print(f"{result.op}: {old} -> {names[result.new_flag]}{created} in {result.file}")
    return EXIT_OK


def cmd_copy_library(args: argparse.Namespace) -> int:
    from precision_policy.opinfo.edit import copy_library

    files = copy_library(args.name, args.dest)
    if args.json:
        _print_json({"library": args.name, "dest": str(args.dest), "files": [str(f) for f in files]})
        return EXIT_OK
    print(f"copied {len(files)} file(s) of library {args.name} to {args.dest}")
    print(f"edit the copy, e.g.: precision-policy pin Softmax --op-info {args.dest}")
    return EXIT_OK


def cmd_pin(args: argparse.Namespace) -> int:
    return _edit(args, "false")


def cmd_unpin(args: argparse.Namespace) -> int:
    return _edit(args, None)


def cmd_set_flag(args: argparse.Namespace) -> int:
    return _edit(args, args.flag)


def _byte_size(text: str) -> int:
    """``1073741824``, ``512M``, ``4G``: a size in bytes for a command-line flag."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1073741824, 512M, 4G)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1073741824, 512M, 4G)")
    return int(value)


def cmd_convert(args: argparse.Namespace) -> int:
    from precision_policy.fileio import refuse_output_over_input

    refuse_output_over_input(Path(args.src), Path(args.dst))  # before TensorFlow loads: refused in a moment
    _import_tensorflow_quietly()
    try:
        from precision_policy.backends.tensorflow import convert_model
    except ImportError:
        print("precision-policy: error: convert needs TensorFlow: pip install 'precision-policy[tensorflow]'",
              file=sys.stderr)
        return EXIT_USAGE
    config = _config(args)
    with _Collect(args.verbose, _MODEL_LOGGERS + _WRITE_LOGGERS) as notes:  # the backend may log more than the result carries
        result = convert_model(args.src, args.dst, config, tags=args.tags.split(",") if args.tags else None,
                               max_const_bytes=args.max_const_bytes, progress=args.progress)
    plan = result.plan
    warnings = list(result.warnings) + [m for m in notes.messages if m not in result.warnings]
    if args.json:
        doc: dict[str, Any] = {"src": args.src, "dst": args.dst, "summary": plan.summary(), "plan": plan.to_dict(),
                               "warnings": warnings}
        if result.per_signature:
            doc["signatures"] = {name: {"summary": p.summary(), "plan": p.to_dict()} for name, p in result.plans.items()}
        _print_json(doc)
        return EXIT_OK
    if result.per_signature:
        width = max(len(n) for n in result.plans)
        for name, p in result.plans.items():
            print(f"signature {name:<{width}}  {p.summary()}")
    else:
        print(plan.summary())
    print(f"wrote {args.dst}")
    unknown = sorted({op for p in result.plans.values() for op in p.unknown})
    if unknown:
        print("unknown op types (kept in their origin dtype): " + ", ".join(unknown))
    if warnings:
        print("warnings:")
        for w in warnings:
            print(f"  {w}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from precision_policy.opinfo.schema import json_schema

    _print_json(json_schema())
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from precision_policy.report import write_report

    with _Collect(args.verbose, _WRITE_LOGGERS) as notes:
        result = write_report(args.plan, args.output, audit=args.audit, ranges=args.ranges, graph=args.graph,
                              layout=args.layout)
    notes.print_to_stderr()
    if args.json:
        _print_json(result.to_dict())
        return EXIT_OK
    drawn = f" drawn as {result.drawn} boxes ({result.clusters} collapsed clusters)" if result.clusters else ""
    print(f"wrote {result.path}: {result.nodes} ops{drawn}, layout {result.engine} "
          f"({result.layout_seconds:.1f} s), {result.bytes / 1e6:.1f} MB")
    for note in result.notes:
        print(f"note: {note}")
    return EXIT_OK


def _feed_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    from precision_policy.errors import ConfigError

    shapes: dict[str, list[int]] = {}
    for item in items:
        name, eq, dims = item.partition("=")
        try:
            if not eq or not name:
                raise ValueError
            shapes[name.split(":")[0]] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise ConfigError(f"--feed {item!r}: expected NAME=SHAPE, e.g. x=2,8") from None
    return shapes


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        from precision_policy.backends.tensorflow.audit import audit, load, random_feeds
    except ImportError:
        print("precision-policy: error: audit needs TensorFlow: pip install 'precision-policy[tensorflow]'", file=sys.stderr)
        return EXIT_USAGE
    config = _config(args)
    shapes = _feed_shapes(args.feed)
    with _Collect(args.verbose, _MODEL_LOGGERS + _WRITE_LOGGERS) as notes:
        gd, fetches, _ = load(args.model, args.fetch)
        feeds = random_feeds(gd, seed=args.seed, shapes=shapes)
        result = audit(args.model, feeds, config, fetches=fetches, onednn=args.onednn)
        if args.output:
            result.to_json(args.output)
        ranges = None
        if args.ranges:
            from precision_policy.backends.tensorflow.overflow import range_stats

            ranges = range_stats(args.model, [feeds], config, fetches=fetches)
            ranges.to_json(args.ranges)
        overflow = None
        if args.overflow:
            from precision_policy.backends.tensorflow.overflow import find_overflow

            overflow = find_overflow(args.model, feeds, config, fetches=fetches)
    notes.print_to_stderr()
    if args.json:
        doc = result.to_dict()
        doc["kernels"] = [{"kind": k.kind, "impl": k.impl, "dtypes": k.dtypes, "shape": k.shape} for k in result.kernels]
        doc["notes"] = list(result.notes)
        if ranges is not None:
            doc["ranges"] = ranges.to_dict()
        if overflow is not None:
            doc["overflow"] = overflow.to_dict()
        _print_json(doc)
    else:
        print(result.table())
        if ranges is not None:
            print(ranges.table())
        if overflow is not None:
            print(overflow.message)
        for path in (args.output, args.ranges):
            if path:
                print(f"wrote {path}")
    return EXIT_PRECISION if args.strict and result.mismatches() else EXIT_OK


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precision-policy",
        description="Plan, explain and edit Ascend-style mixed precision for TensorFlow and PyTorch graphs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log library warnings to stderr")
    parser.add_argument("--max-input-bytes", type=_byte_size, default=None, metavar="SIZE",
                        help="largest input file read, e.g. 4G (default 2G); inputs must be regular files")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_json(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON for machines")

    p = sub.add_parser("modes", help="list the precision modes and their aliases")
    add_json(p)
    p.set_defaults(func=cmd_modes)

    p = sub.add_parser("validate", help="check an op-info library (file, folder or shipped name)")
    p.add_argument("library")
    add_json(p)
    p.set_defaults(func=cmd_validate)

    def add_mode_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mode", help="precision_mode (e.g. allow_mix_precision); default allow_fp32_to_fp16")
        p.add_argument("--mode-v2", help="precision_mode_v2 (e.g. mixed_float16); not with --mode")
        p.add_argument("--op-info", default="ascend910", help="op-info library file, folder or shipped name (default ascend910)")
        p.add_argument("--modify-mixlist", help="JSON moving op types between black/white/gray lists")
        p.add_argument("--keep-dtype", help="file of op names / OpType::X lines that keep their origin dtype")
        p.add_argument("--customize-dtypes", help="file of exact per-op dtypes")
        p.add_argument("--fetch-low", action="store_true", help="let graph outputs stay in low precision (no cast back)")
        p.add_argument("--native-fp16", action="store_true", help="plan for real float16 kernels (default: emulated on CPU)")
        p.add_argument("--gray-disagreement", choices=["widest", "low"],
                       help="a gray op whose inputs arrive in different dtypes follows the widest (default, as torch) "
                            "or the low one (as TensorFlow's AMP)")
        p.add_argument("--env-lists", choices=["on", "off"],
                       help="apply TF's TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_* lists (mixed modes); default: on for "
                            "TensorFlow graphs (.pb/.pbtxt/SavedModel), off for graph JSON")
        add_json(p)

    def add_plan_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("graph", help="graph JSON file (TF .pb/.pbtxt/SavedModel when TensorFlow is installed)")
        add_mode_args(p)

    p = sub.add_parser("plan", help="plan a graph under a mode: summary, converted ops, casts, unknown ops")
    add_plan_args(p)
    p.add_argument("-o", "--output", help="also write the plan JSON to this file")
    p.add_argument("--limit", type=int, default=50, help="rows to print per table (default 50)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("explain", help="why these nodes run in the precision they do")
    add_plan_args(p)
    p.add_argument("nodes", nargs="+", metavar="NODE")
    p.set_defaults(func=cmd_explain)

    for name, func, text in (
        ("pin", cmd_pin, 'pin an op type to its origin precision (precision_reduce.flag = "false")'),
        ("unpin", cmd_unpin, "remove an op type's precision_reduce flag (gray: follows its producer)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("op", metavar="OP", help="op type, e.g. Softmax")
        p.add_argument("--op-info", required=True, help="op-info JSON file (or folder) to edit in place")
        if name == "pin":
            p.add_argument("--add", action="store_true", help="add the op type when the library does not have it")
        add_json(p)
        p.set_defaults(func=func)

    p = sub.add_parser("copy-library", help="copy a shipped op-info library to a folder, to edit it there")
    p.add_argument("name", help="shipped library name, e.g. ascend910")
    p.add_argument("dest", help="folder to copy into (created if missing; existing files are never overwritten)")
    add_json(p)
    p.set_defaults(func=cmd_copy_library)

    p = sub.add_parser("set-flag", help="set an op type's precision_reduce flag to true (white) or false (black)")
    p.add_argument("op", metavar="OP")
    p.add_argument("flag", choices=["true", "false"])
    p.add_argument("--op-info", required=True, help="op-info JSON file (or folder) to edit in place")
    p.add_argument("--add", action="store_true", help="add the op type when the library does not have it")
    add_json(p)
    p.set_defaults(func=cmd_set_flag)

    p = sub.add_parser("convert", help="convert a TensorFlow model (.pb, .pbtxt, SavedModel) to a precision mode")
    p.add_argument("src", help="input: .pb / .pbtxt GraphDef or SavedModel folder (TF1 or TF2, every signature)")
    p.add_argument("dst", help="output: .pb / .pbtxt, or a new SavedModel folder (from a SavedModel only)")
    p.add_argument("--tags", help="SavedModel meta graph tags, comma-separated (default: the first meta graph)")
    p.add_argument("--max-const-bytes", type=_byte_size, default=None, metavar="SIZE",
                   help="largest constant to materialise while converting, e.g. 4G (default 1G; splat constants "
                        "are never materialised)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar over the conversion's stages (default: for graphs over 10,000 nodes on a terminal)")
    add_mode_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("report", help="write a self-contained HTML report of a plan JSON (graph, reasons, op types, audit, ranges)")
    p.add_argument("plan", help="plan JSON file (precision-policy plan ... -o PLAN.json)")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--graph", help="the graph the plan was made from (plan JSON does not record edges; without it only "
                                   "cast and followed-producer edges are drawn)")
    p.add_argument("--audit", help="AUDIT.json: planned vs executed dtypes per op (precision_policy.report.schema)")
    p.add_argument("--ranges", help="RANGES.json: value ranges per op (precision_policy.report.schema)")
    p.add_argument("--layout", choices=["auto", "dot", "simple"], default="auto",
                   help="auto (default): Graphviz dot if installed, else a built-in layout; dot: fail without Graphviz")
    add_json(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="run a TensorFlow graph once and compare the dtype each op executed with to the plan")
    p.add_argument("model", help=".pb / .pbtxt GraphDef (frozen) or SavedModel folder")
    p.add_argument("--feed", action="append", default=[], metavar="NAME=SHAPE",
                   help="a placeholder's shape, e.g. x=2,8 (values are seeded random numbers; default: the placeholder's "
                        "own shape, unknown dims 2)")
    p.add_argument("--fetch", action="append", metavar="NODE", help="node to run (default: the model's outputs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random feeds (default 0)")
    p.add_argument("--onednn", action="store_true",
                   help="also run once with ONEDNN_VERBOSE=1 (a subprocess) and report the oneDNN kernels, reference "
                        "fallbacks included")
    p.add_argument("-o", "--output", help="write AUDIT.json (precision_policy.report.schema) to this file")
    p.add_argument("--ranges", metavar="RANGES.json", help="also measure value ranges per op on the same feeds and write them here")
    p.add_argument("--overflow", action="store_true",
                   help="also run the float32 graph beside the converted one and name the first node that overflows")
    p.add_argument("--strict", action="store_true", help="exit 1 when an op ran in another dtype than planned")
    add_mode_args(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("schema", help="print the JSON Schema of the op-info format")
    p.set_defaults(func=cmd_schema)
    return parser


#: Commands that load TensorFlow (plan/explain only for TF model files; convert imports it itself, after the
#: checks that need no TensorFlow, so a mistyped command fails at once).
_TF_COMMANDS = frozenset({"audit"})
_TF_SUFFIXES = (".pb", ".pbtxt")


def _needs_tensorflow(args: argparse.Namespace) -> bool:
    if args.command in _TF_COMMANDS:
        return True
    graph = getattr(args, "graph", None)
    if args.command in ("plan", "explain") and isinstance(graph, str):
        return graph.endswith(_TF_SUFFIXES) or os.path.isdir(graph)
    return False


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up messages (oneDNN, CPU features, absl's pre-init notice, printed
    twice by TF 2.x) kept off stderr. Only the C-level stderr is redirected, only while the import runs, and
    the environment is left as it was (TF_CPP_MIN_LOG_LEVEL is set for the import and restored)."""
    import importlib.util

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    saved_env = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        try:
            import tensorflow  # noqa: F401
        except Exception:  # noqa: BLE001 - the command itself reports a broken TensorFlow
            pass
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if saved_env is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = saved_env


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    if getattr(args, "mode", None) and getattr(args, "mode_v2", None):
        parser.error("--mode and --mode-v2 are both set; give one (precision_mode and precision_mode_v2 exclude each other)")
    from precision_policy import fileio

    fileio.max_input_bytes = args.max_input_bytes
    if _needs_tensorflow(args):
        _import_tensorflow_quietly()
    try:
        return args.func(args)
    except PrecisionError as exc:
        print(f"precision-policy: precision error: {exc}", file=sys.stderr)
        return EXIT_PRECISION
    except PrecisionPolicyError as exc:
        print(f"precision-policy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # pragma: no cover - e.g. `| head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
