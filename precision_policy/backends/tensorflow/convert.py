"""Reading and writing TensorFlow models: frozen/plain GraphDefs (.pb, .pbtxt) and SavedModels.

``rewrite`` plans a GraphDef and applies the plan; ``convert`` does it file to file, as the
seeds' ``gen_bf16_pb.py`` does with TF's own pass, writing atomically.

Example (the seeds' flow):
    precision-policy convert ./model ./model_bf16 --mode allow_mix_precision_bf16 --op-info tf_amp_bf16
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from google.protobuf import message, text_format
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

from precision_policy.api import plan as make_plan
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph
from precision_policy.config import RunConfig
from precision_policy.errors import GraphError, WriteError
from precision_policy.graph import GRAPH_LOADERS, OpGraph
from precision_policy.opinfo.edit import atomic_write_text
from precision_policy.plan import CastPlan


@dataclass
class LoadedModel:
    """A GraphDef with what a rewrite must preserve: its fetches and, for a SavedModel, the rest of it."""

    graph_def: graph_pb2.GraphDef
    fetches: list[str]
    path: Path
    saved_model: saved_model_pb2.SavedModel | None = None
    meta_index: int = 0
    inputs: dict[str, str] = field(default_factory=dict)


def _read_pb(path: Path) -> graph_pb2.GraphDef:
    gd = graph_pb2.GraphDef()
    data = path.read_bytes()
    try:
        if path.suffix == ".pbtxt":
            text_format.Parse(data.decode("utf-8"), gd)
        else:
            gd.ParseFromString(data)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        raise GraphError(f"not a TensorFlow GraphDef: {exc}", file=path) from None
    return gd


def _default_fetches(gd: graph_pb2.GraphDef) -> list[str]:
    """Nodes nobody reads: what a frozen inference graph is run for."""
    read = set()
    for n in gd.node:
        for ref in n.input:
            read.add(ref.lstrip("^").split(":")[0])
    return [n.name for n in gd.node if n.name not in read and n.op not in ("NoOp", "Assert", "SaveV2", "RestoreV2")]


def load_model(path: str | Path, tags: Sequence[str] | None = None) -> LoadedModel:
    """Load a .pb/.pbtxt GraphDef or a SavedModel directory (TF1 graphs; TF2 ones are frozen first)."""
    p = Path(path)
    if p.is_dir():
        pb = p / "saved_model.pb"
        if not pb.exists():
            raise GraphError("a directory must be a SavedModel (holding saved_model.pb)", file=p)
        sm = saved_model_pb2.SavedModel()
        try:
            sm.ParseFromString(pb.read_bytes())
        except message.DecodeError as exc:
            raise GraphError(f"saved_model.pb does not parse: {exc}", file=pb) from None
        index = 0
        if tags:
            wanted = set(tags)
            for k, mg in enumerate(sm.meta_graphs):
                if set(mg.meta_info_def.tags) == wanted:
                    index = k
                    break
            else:
                have = [sorted(mg.meta_info_def.tags) for mg in sm.meta_graphs]
                raise GraphError(f"no meta graph with tags {sorted(wanted)}; it has {have}", file=p)
        mg = sm.meta_graphs[index]
        if mg.graph_def.library.function and any(n.op in ("StatefulPartitionedCall", "PartitionedCall")
                                                 for n in mg.graph_def.node):
            return _load_tf2_saved_model(p)
        fetches: list[str] = []
        inputs: dict[str, str] = {}
        for sig in mg.signature_def.values():
            fetches += [t.name for t in sig.outputs.values()]
            inputs.update({k: t.name for k, t in sig.inputs.items()})
        return LoadedModel(mg.graph_def, sorted(set(fetches)), p, sm, index, inputs)
    if not p.exists():
        raise GraphError("file not found", file=p)
    gd = _read_pb(p)
    return LoadedModel(gd, _default_fetches(gd), p)


def _load_tf2_saved_model(p: Path) -> LoadedModel:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    loaded = tf.saved_model.load(str(p))
    sigs = dict(loaded.signatures)
    if not sigs:
        raise GraphError("TF2 SavedModel has no signatures to convert", file=p)
    fn = sigs.get("serving_default") or next(iter(sigs.values()))
    frozen = convert_variables_to_constants_v2(fn)
    gd = frozen.graph.as_graph_def()
    fetches = [t.name for t in frozen.outputs]
    inputs = {t.name: t.name for t in frozen.inputs}
    return LoadedModel(gd, fetches, p, None, 0, inputs)


def load_graph_def(path: str | Path) -> tuple[graph_pb2.GraphDef, list[str]]:
    m = load_model(path)
    return m.graph_def, m.fetches


def _opgraph_loader(path: Path) -> OpGraph:
    m = load_model(path)
    return to_opgraph(m.graph_def, m.fetches, name=path.stem or path.name, source=str(path))[0]


GRAPH_LOADERS["tensorflow"] = _opgraph_loader


def rewrite_with_plan(graph_def: graph_pb2.GraphDef, config: RunConfig, fetches: Sequence[str] | None = None,
                      name: str = "graph") -> tuple[graph_pb2.GraphDef, CastPlan]:
    og, info = to_opgraph(graph_def, fetches, name=name)
    plan = make_plan(og, config)
    return apply_plan(info, plan), plan


def rewrite(graph_def: graph_pb2.GraphDef, config: RunConfig, fetches: Sequence[str] | None = None) -> graph_pb2.GraphDef:
    """``graph_def`` with ``config``'s precision mode applied (fetches keep their names and dtypes)."""
    return rewrite_with_plan(graph_def, config, fetches)[0]


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", file=path) from None


def convert(src: str | Path, dst: str | Path, config: RunConfig, *, tags: Sequence[str] | None = None) -> CastPlan:
    """Convert a model file to ``config``'s precision: .pb/.pbtxt -> .pb/.pbtxt, SavedModel -> SavedModel or .pb.

    The output appears whole or not at all (temporary file/folder, then rename).
    """
    model = load_model(src, tags)
    gd, plan = rewrite_with_plan(model.graph_def, config, model.fetches, name=Path(src).name)
    out = Path(dst)
    if out.suffix in (".pb", ".pbtxt"):
        if out.suffix == ".pbtxt":
            atomic_write_text(out, text_format.MessageToString(gd))
        else:
            _write_bytes_atomic(out, gd.SerializeToString())
        return plan
    if model.saved_model is None:
        raise GraphError("a GraphDef converts to a .pb or .pbtxt file; a SavedModel output needs a SavedModel input",
                         file=out)
    sm = saved_model_pb2.SavedModel()
    sm.CopyFrom(model.saved_model)
    sm.meta_graphs[model.meta_index].graph_def.CopyFrom(gd)
    if out.exists():
        raise WriteError("already exists; choose a new folder (nothing was written)", file=out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
        for item in Path(src).iterdir():
            if item.name == "saved_model.pb":
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        (tmp / "saved_model.pb").write_bytes(sm.SerializeToString())
        os.replace(tmp, out)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", file=out) from None
    return plan
