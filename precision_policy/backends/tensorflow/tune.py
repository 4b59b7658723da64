"""The Keras and TensorFlow-graph adapters of the accuracy-aware tuner (:func:`precision_policy.tune`).

Two adapters, one per way a TensorFlow user holds a model:

- **Keras** (:class:`KerasTuneAdapter`, a Keras 3 ``Functional``/``Sequential`` model, or a path to a
  ``.keras`` file): candidates are the layers the full conversion puts in low precision, named as
  by-name ``keep_dtype`` lines name them (``logits``; nested models by path, ``backbone/block_1_expand``).
  Each trial is a fresh copy of the model (``keras.models.clone_model`` plus its weights, compiled
  like the original when the original was compiled) with :func:`~precision_policy.keras.apply` run on
  it: ``eval_fn`` receives that Keras model, and the user's own model is never changed.
- **TensorFlow graphs** (:class:`GraphTuneAdapter`: a ``GraphDef``, a ``tf.Graph``, a
  :class:`GraphModel`, or a path to a ``.pb``/``.pbtxt`` file or a SavedModel directory, read with
  :func:`~precision_policy.backends.tensorflow.convert.load_model`): candidates are the GraphDef nodes
  the full plan converts, by node name. Each trial is the GraphDef
  :func:`~precision_policy.backends.tensorflow.convert.rewrite` makes under the trial's config,
  wrapped in a :class:`GraphModel` that ``eval_fn`` calls like a function::

      def accuracy(model: GraphModel) -> float:
          logits = model(x_test)              # or model({"x:0": x_test}); one fetch: one array
          return float((logits.argmax(1) == y_test).mean())

Fetches (what a :class:`GraphModel` returns) are, in order: a :class:`GraphModel`'s own, a SavedModel
signature's outputs, else the nodes nobody reads (as ``convert`` finds them). Inputs are a SavedModel
signature's, else the graph's ``Placeholder`` nodes in graph order. To name them yourself, pass
``GraphModel(graph_def, fetches=[...], inputs=[...])`` as the model.

Calibration (the sensitivity ranking): ``example_inputs``, a numpy array (one input), a list of arrays
(the inputs in order) or a dict (Keras input names; graph tensor/node names or SavedModel signature
keys). Without it, the first batch ``eval_fn`` feeds the baseline model is recorded (a ``GraphModel``
call; a Keras model's eager call, ``predict`` or ``evaluate``, at most 256 rows) and used. The
float32 model and the full conversion run that batch once each, and every candidate's output is
compared between them: relative error ``rms(low - fp32) / rms(fp32 - mean(fp32))`` over the finite
values (the spread of the reference, so that a large common offset, as in logits plus a bias of
2**14, does not hide a rounding that destroys the differences between them), and the count of
values that became inf/NaN. A candidate is ranked by the error it *adds*: its output's figures less
the worst of its inputs' (those produced by other candidates), clamped at 0. The accumulated
figure would rank every op after a sensitive one (a ``Reshape``, the fetched ``Identity``) level
with it and cost the bisection trials; ``Sensitivity.rel_error`` holds the added error.

The result of ``pp.tune`` holds the winner as ``result.model`` (the Keras model with its policies
set, or the :class:`GraphModel` of the rewritten GraphDef, ``result.model.graph_def``);
``result.save(folder)`` writes ``keep_dtype.txt``, and ``RunConfig(keep_dtype="folder/keep_dtype.txt")``
reproduces the winner with :func:`~precision_policy.keras.apply` or
:func:`~precision_policy.backends.tensorflow.convert.rewrite` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from precision_policy.backends.tensorflow.convert import (
    LoadedModel,
    _calls_already_reported,
    _default_fetches,
    function_calls,
    inline_functions,
    load_model,
    rewrite_with_plan,
)
from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, GraphError
from precision_policy.plan import CastPlan
from precision_policy.rules import Rule
from precision_policy.tune.adapter import Candidate, Sensitivity, Skipped, TuneAdapter, config_with_keep

log = logging.getLogger(__name__)

__all__ = ["GraphModel", "GraphTuneAdapter", "KerasTuneAdapter", "adapter_for"]

_LOW = ("float16", "bfloat16")
_NOT_OPS = (Rule.SOURCE, Rule.READS_SOURCE)  # graph inputs, constants and reads of them: consumers cast them
_MAX_CALIBRATION_ROWS = 256


# ---------------------------------------------------------------------- comparing outputs
def _compare(low: Any, ref: Any) -> tuple[float, int]:
    """(relative error, non-finite count) of ``low`` against ``ref`` (see the module docstring)."""
    low = np.asarray(low).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    if low.shape != ref.shape:
        return math.nan, 0
    fin_ref = np.isfinite(ref)
    fin_low = np.isfinite(low)
    nonfinite = int(np.count_nonzero(fin_ref & ~fin_low))
    both = fin_ref & fin_low
    if not both.any():
        return 0.0, nonfinite
    r = ref[both]
    err = float(np.sqrt(np.mean((low[both] - r) ** 2)))
    scale = float(np.sqrt(np.mean((r - r.mean()) ** 2)))
    if scale == 0.0:
        scale = float(np.sqrt(np.mean(r**2)))
    if scale == 0.0:
        return (0.0 if err == 0.0 else math.inf), nonfinite
    return err / scale, nonfinite


def _own_error(name: str, out: tuple[Any, Any] | None, ins: Sequence[tuple[Any, Any]]) -> Sensitivity:
    """The error ``name`` adds: its output's (low, fp32) comparison less the worst of its inputs' (clamped at 0).

    The full plan's error accumulates along the graph; ranking by the accumulated figure would put
    every op after a sensitive one (a fetched ``Identity``, a ``Reshape``) level with it. What an op
    adds to the error it was given is what keeping it in float32 can remove.
    """
    if out is None:
        return Sensitivity(name, math.nan, 0, measured=False)
    err, nonfinite = _compare(*out)
    if math.isnan(err):
        return Sensitivity(name, math.nan, 0, measured=False)
    given, given_nf = 0.0, 0
    for pair in ins:
        e, nf = _compare(*pair)
        if not math.isnan(e):
            given = max(given, e)
        given_nf = max(given_nf, nf)
    own = err - given if math.isfinite(err) and math.isfinite(given) else (err if not math.isfinite(err) else 0.0)
    return Sensitivity(name, max(own, 0.0), max(nonfinite - given_nf, 0))


def _digest(facts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rows(value: Any, limit: int = _MAX_CALIBRATION_ROWS) -> Any:
    """The first ``limit`` rows of each array in ``value`` (arrays, lists/tuples and dicts of them)."""
    if isinstance(value, Mapping):
        return {k: _rows(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, limit) for v in value)
    arr = np.asarray(value)
    return arr[:limit] if arr.ndim > 0 else arr


# ====================================================================== TensorFlow graphs
class GraphModel:
    """A GraphDef ready to run: what ``eval_fn`` receives for a TensorFlow graph (and ``TuneResult.model``).

    Attributes:
        graph_def: the GraphDef (for the winner: the rewritten one; write it with ``SerializeToString``).
        graph: a ``tf.Graph`` with ``graph_def`` imported (names unchanged, no prefix); built on first use.
        fetches: the output tensor names (``"Identity:0"``) a call returns, in order.
        inputs: the input tensor names (``"x:0"``) positional arrays are fed to, in order.
        input_keys: other names for the inputs (SavedModel signature keys) -> tensor names.

    Calling it runs ``fetches`` in a ``tf.compat.v1.Session`` kept for the object's life (``close()``
    ends it): ``model(x)`` (one input), ``model(x1, x2)`` (inputs in order) or ``model({name: array})``
    (tensor names, node names or signature keys). It returns one numpy array when there is one
    fetch, else a list. :meth:`run` fetches any other tensors.

    Example:
        >>> import numpy as np, tensorflow as tf
        >>> g = tf.Graph()
        >>> with g.as_default():
        ...     x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        ...     y = tf.identity(2.0 * x, name="y")
        >>> model = GraphModel(g.as_graph_def(), fetches=["y"])
        >>> model.inputs, model.fetches
        (['x:0'], ['y:0'])
        >>> model(np.ones((1, 2), np.float32)).tolist()
        [[2.0, 2.0]]
        >>> model.close()
    """

    def __init__(self, graph_def: graph_pb2.GraphDef, fetches: Sequence[str] | None = None,
                 inputs: Sequence[str] | None = None, *, input_keys: Mapping[str, str] | None = None,
                 session_config: Any = None) -> None:
        self.graph_def = graph_def
        self.fetches = [_tensor_name(f) for f in (fetches if fetches is not None else _default_fetches(graph_def))
                        if not f.startswith("^")]
        if inputs is None:
            inputs = [n.name for n in graph_def.node if n.op in ("Placeholder", "PlaceholderV2")]
        self.inputs = [_tensor_name(i) for i in inputs]
        self.input_keys = dict(input_keys or {})
        self.session_config = session_config
        self._graph: Any = None
        self._session: Any = None
        self._on_feed: Callable[[dict[str, Any]], None] | None = None

    def __repr__(self) -> str:
        return (f"GraphModel({len(self.graph_def.node)} nodes, inputs={self.inputs}, fetches={self.fetches})")

    @property
    def graph(self) -> Any:
        if self._graph is None:
            import tensorflow as tf

            g = tf.Graph()
            with g.as_default():
                tf.graph_util.import_graph_def(self.graph_def, name="")
            self._graph = g
        return self._graph

    @property
    def session(self) -> Any:
        """The ``tf.compat.v1.Session`` calls run in (created on first use)."""
        if self._session is None:
            import tensorflow as tf

            self._session = tf.compat.v1.Session(graph=self.graph, config=self.session_config)
        return self._session

    def feed_dict(self, *args: Any) -> dict[str, Any]:
        """The feed dict (tensor name -> value) for ``model(*args)``."""
        if len(args) == 1 and isinstance(args[0], Mapping):
            feed: dict[str, Any] = {}
            for key, value in args[0].items():
                name = key if isinstance(key, str) else getattr(key, "name", str(key))
                name = self.input_keys.get(name, name)
                feed[_tensor_name(name)] = value
            return feed
        if len(args) == 1 and isinstance(args[0], (list, tuple)) and len(self.inputs) > 1:
            args = tuple(args[0])
        if len(args) != len(self.inputs):
            raise ConfigError(f"GraphModel: {len(args)} input(s) given, the graph has {len(self.inputs)} "
                              f"({', '.join(self.inputs) or 'none'}); pass a dict {{tensor name: array}} to name them")
        return dict(zip(self.inputs, args))

    def run(self, fetches: Sequence[str] | str, *args: Any) -> Any:
        """Run any tensors (names) with the inputs given as for a call; numpy values, shaped like ``fetches``."""
        feed = self.feed_dict(*args)
        if self._on_feed is not None:
            self._on_feed(feed)
        if isinstance(fetches, str):
            return self.session.run(_tensor_name(fetches), feed)
        return self.session.run([_tensor_name(f) for f in fetches], feed)

    def __call__(self, *args: Any) -> Any:
        out = self.run(self.fetches, *args)
        return out[0] if len(self.fetches) == 1 else out

    def close(self) -> None:
        """End the session (a later call starts a new one)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001,S110 - interpreter shutdown: TF may already be gone
            pass


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _node_name(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


class GraphTuneAdapter(TuneAdapter):
    """:class:`~precision_policy.tune.adapter.TuneAdapter` for a TensorFlow GraphDef or SavedModel (see the module docstring).

    Example:
        >>> import tensorflow as tf, precision_policy as pp
        >>> g = tf.Graph()
        >>> with g.as_default():
        ...     x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        ...     h = tf.nn.relu(tf.matmul(x, tf.ones([4, 4])), name="h")
        ...     y = tf.identity(tf.matmul(h, tf.ones([4, 2])), name="y")
        >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
        >>> adapter = GraphTuneAdapter(g.as_graph_def(), cfg, fetches=["y"])
        >>> [(c.name, c.op_type) for c in adapter.candidates()]
        [('MatMul', 'MatMul'), ('h', 'Relu'), ('MatMul_1', 'MatMul'), ('y', 'Identity')]
    """

    framework = "tensorflow"

    def __init__(self, model: Any, config: RunConfig, example_inputs: Any = None, *,
                 fetches: Sequence[str] | None = None, inputs: Sequence[str] | None = None,
                 tags: Sequence[str] | None = None, session_config: Any = None) -> None:
        self.config = config
        self.source = "GraphDef"
        input_keys: dict[str, str] = {}
        if isinstance(model, GraphModel):
            gd = model.graph_def
            fetches = fetches if fetches is not None else model.fetches
            inputs = inputs if inputs is not None else model.inputs
            input_keys = dict(model.input_keys)
            session_config = session_config if session_config is not None else model.session_config
        elif isinstance(model, (str, Path)):
            self.source = str(model)
            loaded = load_model(model, tags, all_signatures=False)
            gd, found, found_inputs, input_keys = _loaded_parts(loaded)
            fetches = fetches if fetches is not None else found
            inputs = inputs if inputs is not None else found_inputs
        elif isinstance(model, LoadedModel):
            self.source = str(model.path)
            gd, found, found_inputs, input_keys = _loaded_parts(model)
            fetches = fetches if fetches is not None else found
            inputs = inputs if inputs is not None else found_inputs
        elif isinstance(model, graph_pb2.GraphDef):
            gd = model
        elif hasattr(model, "as_graph_def"):  # a tf.Graph
            gd = model.as_graph_def()
        else:
            raise ConfigError(f"tune: a TensorFlow graph is a GraphDef, tf.Graph, GraphModel or a path, "
                              f"not {type(model).__name__}")
        if fetches is None:
            fetches = _default_fetches(gd)
        fetches = [f for f in fetches if not f.startswith("^")]
        if not fetches:
            raise ConfigError("tune: the graph has no fetches (outputs); pass GraphModel(graph_def, fetches=[...])")
        if function_calls(gd):  # plan function bodies too, as convert() does
            keep = [_node_name(f) for f in fetches] + [_node_name(i) for i in (inputs or [])]
            gd = inline_functions(gd, keep)
        self.graph_def = gd
        self.fetches = [_tensor_name(f) for f in fetches]
        self.session_config = session_config
        self._base = GraphModel(gd, self.fetches, inputs, input_keys=input_keys, session_config=session_config)
        self.inputs = self._base.inputs
        self.input_keys = input_keys
        self._feed: dict[str, Any] | None = None
        if example_inputs is not None:
            self._feed = self._base.feed_dict(*(example_inputs if isinstance(example_inputs, tuple) else
                                               (example_inputs,)))
        self._plans: dict[frozenset[str], tuple[graph_pb2.GraphDef, CastPlan]] = {}

    def describe(self) -> str:
        return f"tensorflow ({self.source})"

    # ------------------------------------------------------------------ baseline and calibration
    def baseline(self) -> GraphModel:
        if self._feed is None:
            def grab(feed: dict[str, Any]) -> None:
                if self._feed is None:
                    self._feed = {k: np.array(v) for k, v in feed.items()}
            self._base._on_feed = grab
        return self._base

    def baseline_done(self) -> None:
        self._base._on_feed = None
        if self._feed is None:
            log.info("tune: no calibration batch (example_inputs, or a call of the baseline GraphModel): "
                     "candidates are ranked by graph position, last first")

    # ------------------------------------------------------------------ the protocol
    def _rewrite(self, keep: frozenset[str]) -> tuple[graph_pb2.GraphDef, CastPlan]:
        hit = self._plans.get(keep)
        if hit is None:
            with _calls_already_reported():
                hit = rewrite_with_plan(self.graph_def, config_with_keep(self.config, keep), self.fetches)
            self._plans[keep] = hit
        return hit

    def candidates(self) -> list[Candidate]:
        _, plan = self._rewrite(frozenset())
        return [Candidate(d.name, d.op_type, d.origin or "float32", d.dtype or "")
                for d in plan if d.converted and not d.identity and d.rule not in _NOT_OPS]

    def skipped(self) -> list[Skipped]:
        _, plan = self._rewrite(frozenset())
        names = {c.name for c in self.candidates()}
        return [Skipped(d.name, d.op_type, d.reason) for d in plan
                if d.name not in names and not d.identity and d.rule not in _NOT_OPS and d.rule is not None
                and d.origin in ("float32", "float64")]

    def build(self, keep: frozenset[str]) -> tuple[GraphModel, CastPlan]:
        gd, plan = self._rewrite(keep)
        if keep:  # only the full plan is asked for again (candidates, sensitivity)
            self._plans.pop(keep, None)
        model = GraphModel(gd, self.fetches, self.inputs, input_keys=self.input_keys, session_config=self.session_config)
        return model, plan

    def plan(self, keep: frozenset[str]) -> CastPlan:
        return self._rewrite(keep)[1]

    def sensitivity(self) -> Mapping[str, Sensitivity]:
        if self._feed is None:
            return {}
        cands = [c.name for c in self.candidates()]
        names = set(cands)
        node_inputs = {n.name: n.input for n in self.graph_def.node}
        outs = {c: f"{c}:0" for c in cands}
        ins = {c: [_tensor_name(r) for r in node_inputs.get(c, ()) if not r.startswith("^") and _node_name(r) in names]
               for c in cands}
        tensors = sorted(set(outs.values()).union(*ins.values()))
        full, _ = self._rewrite(frozenset())
        low = _fetch(GraphModel(full, self.fetches, self.inputs, session_config=self.session_config), tensors, self._feed)
        ref = _fetch(GraphModel(self.graph_def, self.fetches, self.inputs, session_config=self.session_config), tensors,
                     self._feed)

        def pair(t: str) -> tuple[Any, Any] | None:
            return (low[t], ref[t]) if t in low and t in ref else None

        out: dict[str, Sensitivity] = {}
        for c in cands:
            given = [p for p in (pair(t) for t in ins[c]) if p is not None]
            out[c] = _own_error(c, pair(outs[c]), given)
        return out

    def fingerprint(self) -> str:
        facts = {
            "framework": "tensorflow",
            "nodes": sorted([n.name, n.op] for n in self.graph_def.node),
            "fetches": self.fetches,
            "config": self.config.summary(),
        }
        return _digest(facts)


def _loaded_parts(m: LoadedModel) -> tuple[graph_pb2.GraphDef, list[str], list[str] | None, dict[str, str]]:
    """GraphDef, fetches, inputs (None: the Placeholders) and signature keys of a loaded file/SavedModel."""
    if m.signatures:
        sig = next(iter(m.signatures.values()))
        keys = {key: name for key, name, _ in sig.inputs}
        return sig.graph_def, list(sig.fetches), [name for _, name, _ in sig.inputs], keys
    if m.inputs:
        return m.graph_def, list(m.fetches), list(m.inputs.values()), dict(m.inputs)
    return m.graph_def, list(m.fetches), None, {}


def _fetch(model: GraphModel, tensors: Sequence[str], feed: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``tensors`` (names) on ``feed``, as numpy; tensors that cannot be fetched are left out."""
    graph = model.graph
    wanted: list[str] = []
    for name in tensors:
        try:
            graph.get_tensor_by_name(name)
        except (KeyError, ValueError):
            continue
        wanted.append(name)
    out: dict[str, Any] = {}
    try:
        try:
            out = dict(zip(wanted, model.session.run(wanted, dict(feed))))
        except Exception:  # noqa: BLE001 - a tensor inside a loop frame cannot be fetched: one at a time
            for t in wanted:
                try:
                    out[t] = model.session.run(t, dict(feed))
                except Exception:  # noqa: BLE001,PERF203
                    log.debug("tune: cannot fetch %s for the sensitivity ranking", t)
    finally:
        model.close()
    return out


# ====================================================================== Keras
class KerasTuneAdapter(TuneAdapter):
    """:class:`~precision_policy.tune.adapter.TuneAdapter` for a Keras 3 model (see the module docstring).

    Example:
        >>> import keras, numpy as np, precision_policy as pp
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="fc1"),
        ...                           keras.layers.Dense(2, name="fc2")])
        >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
        >>> adapter = KerasTuneAdapter(model, cfg, np.ones((3, 4), np.float32))
        >>> [(c.name, c.op_type) for c in adapter.candidates()]
        [('fc1', 'MatMul'), ('fc2', 'MatMul')]
        >>> copy, plan = adapter.build(frozenset({"fc2"}))
        >>> copy is model, copy.get_layer("fc2").dtype_policy.name, model.get_layer("fc1").dtype_policy.name
        (False, 'float32', 'float32')
    """

    framework = "keras"

    def __init__(self, model: Any, config: RunConfig, example_inputs: Any = None) -> None:
        from precision_policy.backends.tensorflow.keras import _build

        self.model = model
        self.config = config
        self._inputs: Any = None if example_inputs is None else example_inputs
        self._built = _build(model)  # GraphError for a subclassed model, before any trial
        self._full: CastPlan | None = None
        self._spare: Any = None  # a fully converted copy not handed out yet
        self._saved: list[tuple[str, Any]] = []

    def describe(self) -> str:
        return f"keras ({self.model.name})"

    # ------------------------------------------------------------------ copies
    def _copy(self) -> Any:
        import keras

        try:
            copy = keras.models.clone_model(self.model)
        except Exception as exc:
            raise ConfigError(f"tune: keras.models.clone_model cannot copy model {self.model.name!r} "
                              f"({type(exc).__name__}: {exc}); each trial runs on a copy. Give its custom layers "
                              "get_config/from_config") from exc
        copy.set_weights(self.model.get_weights())
        compile_config = None
        if getattr(self.model, "compiled", False):
            try:
                compile_config = self.model.get_compile_config()
            except Exception:  # noqa: BLE001 - a compile argument Keras cannot serialize
                compile_config = None
        if compile_config:
            try:
                copy.compile_from_config(compile_config)
            except Exception as exc:  # noqa: BLE001
                log.info("tune: the copies of %s are not compiled (%s): eval_fn should call them or predict()",
                         self.model.name, exc)
        return copy

    # ------------------------------------------------------------------ baseline and calibration
    def baseline(self) -> Any:
        if self._inputs is None:
            self._capture_first_batch()
        return self.model

    def _capture_first_batch(self) -> None:
        import tensorflow as tf

        model = self.model

        def grab(value: Any) -> None:
            if self._inputs is not None or value is None:
                return
            if isinstance(value, tf.data.Dataset):
                try:
                    first = next(iter(value.take(1)))
                except Exception:  # noqa: BLE001
                    return
                value = first[0] if isinstance(first, tuple) else first
            try:
                self._inputs = _rows(tree_to_numpy(value))
            except Exception:  # noqa: BLE001 - not array-like (a generator, a PyDataset)
                return

        def wrap(attr: str, pick: Callable[..., Any]) -> None:
            had = attr in model.__dict__
            prev = model.__dict__.get(attr)
            orig = getattr(model, attr)

            def method(*args: Any, **kwargs: Any) -> Any:
                if attr != "call" or tf.executing_eagerly():
                    grab(pick(*args, **kwargs))
                return orig(*args, **kwargs)

            self._saved.append((attr, prev if had else _MISSING))
            model.__dict__[attr] = method

        for attr in ("predict", "evaluate", "predict_on_batch", "test_on_batch"):
            wrap(attr, lambda x=None, *a, **kw: x)
        wrap("call", lambda inputs=None, *a, **kw: inputs)

    def baseline_done(self) -> None:
        for attr, prev in reversed(self._saved):
            if prev is _MISSING:
                self.model.__dict__.pop(attr, None)
            else:
                self.model.__dict__[attr] = prev
        self._saved = []
        if self._inputs is None:
            log.info("tune: no calibration batch (example_inputs, or an eager call / predict / evaluate of the "
                     "baseline model with arrays): candidates are ranked by graph position, last first")

    # ------------------------------------------------------------------ the protocol
    def _full_plan(self) -> CastPlan:
        if self._full is None:
            copy, self._full = self.build(frozenset())
            self._spare = copy
        return self._full

    def candidates(self) -> list[Candidate]:
        plan = self._full_plan()
        return [Candidate(d.name, d.op_type, d.origin or "float32", d.dtype or "") for d in plan
                if d.converted and d.dtype in _LOW and d.rule not in _NOT_OPS and d.name not in self._built.keras_ops]

    def skipped(self) -> list[Skipped]:
        plan = self._full_plan()
        names = {c.name for c in self.candidates()}
        return [Skipped(d.name, d.op_type, d.reason) for d in plan
                if d.name not in names and d.rule not in _NOT_OPS and d.name not in self._built.keras_ops
                and d.origin in ("float32", "float64")]

    def build(self, keep: frozenset[str]) -> tuple[Any, CastPlan]:
        from precision_policy.backends.tensorflow.keras import apply

        if not keep and self._spare is not None:  # the copy candidates() made: handed out once
            copy, self._spare = self._spare, None
            return copy, copy.precision_plan
        copy = apply(self._copy(), config_with_keep(self.config, keep))
        return copy, copy.precision_plan

    def sensitivity(self) -> Mapping[str, Sensitivity]:
        if self._inputs is None:
            return {}
        from precision_policy.backends.tensorflow.keras import _build

        names = [c.name for c in self.candidates()]
        ref_model = self._copy()
        low_model, _ = self.build(frozenset())
        ref = _layer_values(ref_model, _build(ref_model), names, self._inputs)
        low = _layer_values(low_model, _build(low_model), names, self._inputs)
        graph = self._built.graph

        def pair(name: str) -> tuple[Any, Any] | None:
            return (low[name], ref[name]) if name in low and name in ref else None

        out: dict[str, Sensitivity] = {}
        for name in names:
            upstream = [r.rpartition(":")[0] for r in graph.node(name).inputs if r.endswith(":0")]
            given = [p for p in (pair(u) for u in upstream) if p is not None]
            out[name] = _own_error(name, pair(name), given)
        return out

    def fingerprint(self) -> str:
        built = self._built
        facts = {
            "framework": "keras",
            "model": type(self.model).__qualname__,
            "nodes": [[d.name, d.op_type] for d in (built.graph.node(n) for n in built.graph.node_names)],
            "weights": [[w.path if hasattr(w, "path") else w.name, list(w.shape), str(w.dtype)]
                        for w in self.model.weights],
            "config": self.config.summary(),
        }
        return _digest(facts)


_MISSING = object()


def tree_to_numpy(value: Any) -> Any:
    """Arrays, tensors and lists/tuples/dicts of them as numpy arrays."""
    if isinstance(value, Mapping):
        return {k: tree_to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tree_to_numpy(v) for v in value)
    numpy = getattr(value, "numpy", None)
    return np.asarray(numpy() if callable(numpy) else value)


def _layer_values(model: Any, built: Any, names: Sequence[str], inputs: Any) -> dict[str, Any]:
    """The first float output of each named layer (node) of ``model`` when it runs ``inputs`` eagerly.

    Values are numpy float32 arrays, from each layer's first call. A composite layer's own ops (nodes
    ``mha``, ``mha/ops2``...) are measured by the composite's output, on its first node only.
    """
    import keras
    from keras import tree

    layer_of: dict[str, Any] = {}
    for name in names:
        if name in built.owners:
            layer_of[name] = built.owners[name]
    for comp in built.composites:
        if comp.segments and comp.segments[0] in names:
            layer_of[comp.segments[0]] = comp.layer
    recorded: dict[int, Any] = {}
    saved: list[tuple[Any, Any]] = []

    def hook(layer: Any, orig: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            if id(layer) not in recorded:
                for leaf in tree.flatten(out):
                    if keras.ops.is_tensor(leaf) and keras.backend.is_float_dtype(leaf.dtype):
                        recorded[id(layer)] = keras.ops.convert_to_numpy(keras.ops.cast(leaf, "float32"))
                        break
            return out

        return call

    try:
        for layer in {id(lay): lay for lay in layer_of.values()}.values():
            saved.append((layer, layer.__dict__.get("call", _MISSING)))
            layer.__dict__["call"] = hook(layer, layer.call)
        model(inputs, training=False)
    finally:
        for layer, prev in reversed(saved):
            if prev is _MISSING:
                layer.__dict__.pop("call", None)
            else:
                layer.__dict__["call"] = prev
    return {name: recorded[id(layer)] for name, layer in layer_of.items() if id(layer) in recorded}


# ====================================================================== dispatch
def _is_keras_model(model: Any) -> bool:
    import sys

    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


def _graph_path(model: Any) -> bool:
    if not isinstance(model, (str, Path)):
        return False
    p = Path(model)
    return (p.is_dir() and (p / "saved_model.pb").exists()) or p.suffix in (".pb", ".pbtxt")


def adapter_for(model: Any, config: RunConfig, example_inputs: Any = None, *, route: str = "eager",
                **options: Any) -> TuneAdapter | None:
    """The adapter for a Keras model (or ``.keras`` file) or a TensorFlow graph (GraphDef, ``tf.Graph``,
    :class:`GraphModel`, ``.pb``/``.pbtxt`` file, SavedModel directory); None for anything else.

    Options (graphs only): ``fetches``, ``inputs`` (tensor or node names), ``tags`` (a SavedModel's
    meta graph), ``session_config`` (a ``tf.compat.v1.ConfigProto`` for the sessions).
    """
    if route != "eager":
        raise ConfigError(f"tune: route={route!r} is for torch models; Keras models and TensorFlow graphs have one route")
    if isinstance(model, (str, Path)) and Path(model).suffix == ".keras":
        import keras

        model = keras.saving.load_model(model)
    if _is_keras_model(model):
        if options:
            raise ConfigError(f"tune: unknown option(s) for a Keras model: {', '.join(sorted(options))}")
        try:
            return KerasTuneAdapter(model, config, example_inputs)
        except GraphError as exc:
            raise ConfigError(f"tune: {exc}") from exc
    if isinstance(model, (graph_pb2.GraphDef, GraphModel, LoadedModel)) or _graph_path(model) or (
            type(model).__name__ == "Graph" and hasattr(model, "as_graph_def")):
        unknown = set(options) - {"fetches", "inputs", "tags", "session_config"}
        if unknown:
            raise ConfigError(f"tune: unknown option(s) for a TensorFlow graph: {', '.join(sorted(unknown))}")
        return GraphTuneAdapter(model, config, example_inputs, **options)
    return None
