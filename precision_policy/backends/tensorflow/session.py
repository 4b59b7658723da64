"""TF1 training under a precision mode: a drop-in for ``tf.compat.v1.Session``.

A script built with ``optimizer.minimize(loss)`` changes one line::

    sess = tf.compat.v1.Session()                                   # before
    sess = precision_policy.tensorflow.Session(pp.RunConfig(        # after
        precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16"))

On the first ``run`` the whole graph (forward, gradients, ``Apply*`` updates, initialisers,
savers) is planned and rewritten once, imported into a graph of its own with the same node
names, and every ``run`` executes there. Fetches and feeds are the user's tensors, ops or
names; fetched values come back in their original dtypes. Variables stay float32.

The object is a real TF session (a ``SessionInterface``): ``tf.compat.v1.train.Saver`` saves
and restores through it, ``with sess.as_default():`` makes ``tensor.eval()`` and ``op.run()``
use it, and ``sess.graph`` is the user's graph. When the user's graph grows after the first
run (a ``Saver`` or an extra op built later), the next ``run`` plans the whole graph again
and carries every initialised variable's value over into the new rewritten graph; other
session state (queues, tables, iterators, ``TensorArray``s) starts afresh, as it would in a
new session. ``Session(..., rebuild=False)`` raises :class:`~precision_policy.errors.GraphError`
instead.

Example:
    >>> import tensorflow as tf, precision_policy as pp
    >>> from precision_policy.tensorflow import Session
    >>> g = tf.Graph()
    >>> with g.as_default():
    ...     x = tf.compat.v1.placeholder(tf.float32, [4, 3])
    ...     w = tf.compat.v1.get_variable("w", [3, 2])
    ...     loss = tf.reduce_mean(tf.square(tf.matmul(x, w)))
    ...     train = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
    ...     init = tf.compat.v1.global_variables_initializer()
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
    >>> with Session(cfg, graph=g) as sess:
    ...     _ = sess.run(init)
    ...     value, _ = sess.run([loss, train], {x: [[1.0, 2.0, 3.0]] * 4})
    ...     lower = bool(loss.eval({x: [[1.0, 2.0, 3.0]] * 4}) < value)  # eval() uses this session
    >>> type(value).__name__, str(value.dtype), lower, sess.graph is g
    ('float32', 'float32', True, True)
    >>> sess.plan.summary().startswith("Converted")
    True
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.client.session import SessionInterface
from tensorflow.python.framework import stack as tf_stack

from precision_policy.api import plan as make_plan
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph
from precision_policy.config import RunConfig
from precision_policy.errors import GraphError
from precision_policy.plan import CastPlan

log = logging.getLogger(__name__)

_REF_VARIABLES = frozenset({"VariableV2", "Variable"})
_RESOURCE_VARIABLES = frozenset({"VarHandleOp"})
#: Stateful resources whose contents a rebuild cannot carry over (only variables are carried).
_UNCARRIED_STATE = ("Queue", "Table", "Iterator", "Reader", "Barrier", "Accumulator", "Stack", "TensorArray")
#: After this many builds, a rebuild is logged as a warning (ops created inside the training loop?).
_REBUILD_WARNING = 10


def _element(item: Any) -> Any:
    """What fetching ``item`` fetches: a variable fetches its value, as in ``tf.compat.v1.Session``."""
    as_element = getattr(item, "_as_graph_element", None)
    if as_element is not None and not isinstance(item, (tf.Tensor, tf.Operation, str)):
        element = as_element()
        if element is not None:
            return element
    return item


def _name(item: Any, graph: tf.Graph) -> str:
    """The name under which ``item`` (a tensor, op, variable or name of ``graph``) is fetched or fed."""
    if isinstance(item, str):
        return item
    item = _element(item)
    name = getattr(item, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"cannot fetch or feed {item!r}: expected a tf.Tensor, tf.Operation, variable or a name")
    if getattr(item, "graph", graph) is not graph:
        raise ValueError(f"{item!r} is not an element of this session's graph")
    return name


def _components(item: Any, graph: tf.Graph) -> tuple[str, ...] | None:
    """The component tensors' names of a SparseTensor or IndexedSlices (``None`` for anything else)."""
    if isinstance(item, tf.SparseTensor):
        parts = (item.indices, item.values, item.dense_shape)
    elif isinstance(item, tf.IndexedSlices):
        parts = (item.values, item.indices) + ((item.dense_shape,) if item.dense_shape is not None else ())
    else:
        return None
    return tuple(_name(t, graph) for t in parts)


class Session(SessionInterface):
    """``tf.compat.v1.Session`` that runs ``graph`` (default: the default graph) under ``precision``.

    ``target`` and ``config`` go to the ``tf.compat.v1.Session`` that runs the rewritten graph.
    ``rebuild=False`` makes a graph grown after the first run an error instead of a re-plan.
    ``plan`` is the last :class:`~precision_policy.plan.CastPlan`, ``rewritten`` the graph that
    runs, ``builds`` how many times the graph has been planned.
    """

    def __init__(self, precision: RunConfig, target: str = "", graph: tf.Graph | None = None,
                 config: Any = None, *, rebuild: bool = True) -> None:
        self.precision = precision.model_copy(update={"keep_output_dtype": False})
        self._graph = graph if graph is not None else tf.compat.v1.get_default_graph()
        self._target = target
        self._tf_config = config
        self._rebuild = rebuild
        self._session: tf.compat.v1.Session | None = None
        self._version: int | None = None
        self._closed = False
        self._lock = threading.RLock()
        self._graph_context: Any = None
        self._session_context: Any = None
        self.plan: CastPlan | None = None
        self.rewritten: tf.Graph | None = None
        self.builds = 0

    # ------------------------------------------------------------------ SessionInterface
    @property
    def graph(self) -> tf.Graph:
        """The user's graph (the one fetches, feeds, ``eval()`` and savers live in)."""
        return self._graph

    @property
    def graph_def(self) -> Any:
        """The user's graph as a GraphDef (``rewritten.as_graph_def()`` is the one that runs)."""
        add_shapes = bool(self._tf_config is not None and self._tf_config.graph_options.infer_shapes)
        return self._graph.as_graph_def(add_shapes=add_shapes)

    @property
    def sess_str(self) -> str:
        return self._target

    def run(self, fetches: Any, feed_dict: dict | None = None, options: Any = None, run_metadata: Any = None) -> Any:
        """``tf.compat.v1.Session.run``: fetches and feeds of the user's graph, values in their original dtypes."""
        session = self._build()
        names, unpack = self._map_fetches(fetches)
        out = session.run(names, self._map_feeds(feed_dict), options=options, run_metadata=run_metadata)
        return unpack(out)

    def partial_run_setup(self, fetches: Any, feeds: Any = None) -> Any:
        """``tf.compat.v1.Session.partial_run_setup`` on the rewritten graph."""
        session = self._build()
        names, _ = self._map_fetches(fetches)
        g = self._graph
        feed_names = [n for f in (feeds or []) for n in (_components(f, g) or (_name(f, g),))]
        return session.partial_run_setup(names, feed_names)

    def partial_run(self, handle: Any, fetches: Any, feed_dict: dict | None = None) -> Any:
        """``tf.compat.v1.Session.partial_run`` on the rewritten graph (a handle from :meth:`partial_run_setup`)."""
        session = self._build()
        names, unpack = self._map_fetches(fetches)
        return unpack(session.partial_run(handle, names, self._map_feeds(feed_dict)))

    # ------------------------------------------------------------------ the rest of tf.compat.v1.Session
    def make_callable(self, fetches: Any, feed_list: list | tuple | None = None,
                      accept_options: bool = False) -> Callable[..., Any]:
        """A function running ``fetches`` with one positional argument per ``feed_list`` entry.

        Like ``tf.compat.v1.Session.make_callable``; with ``accept_options`` it also takes
        ``options=`` and ``run_metadata=``.
        """
        if feed_list is not None and not isinstance(feed_list, (list, tuple)):
            raise TypeError(f"feed_list must be a list or tuple, got {feed_list!r}")
        self._map_fetches(fetches)  # bad fetches fail here, as in TF
        keys = list(feed_list or [])

        def call(*args: Any, **kwargs: Any) -> Any:
            if len(args) != len(keys):
                raise TypeError(f"expected {len(keys)} feed value(s), got {len(args)}")
            extra = set(kwargs) - ({"options", "run_metadata"} if accept_options else set())
            if extra:
                raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(extra))}")
            return self.run(fetches, dict(zip(keys, args)), **kwargs)

        return call

    def list_devices(self) -> list:
        """The devices this session runs on (``tf.compat.v1.Session.list_devices``)."""
        with self._lock:
            if self._session is not None:
                return self._session.list_devices()
        with tf.compat.v1.Session(self._target, graph=tf.Graph(), config=self._tf_config) as probe:
            return probe.list_devices()

    def as_default(self) -> Any:
        """A context manager making this the default session (for ``tensor.eval()`` and ``op.run()``)."""
        return tf_stack.default_session(self)

    def close(self) -> None:
        """Closes the session; closing again does nothing, running again raises ``RuntimeError``."""
        with self._lock:
            self._closed = True
            if self._session is not None:
                self._session.close()

    def __enter__(self) -> Session:
        if self._graph_context is not None:
            raise RuntimeError("Session context managers are not re-entrant; use Session.as_default() to "
                               "enter a session more than once")
        self._graph_context = self._graph.as_default()
        self._session_context = self.as_default()
        self._graph_context.__enter__()
        return self._session_context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            self._session_context.__exit__(*exc)
            self._graph_context.__exit__(*exc)
        finally:
            self._graph_context = self._session_context = None
            self.close()

    # ------------------------------------------------------------------ planning and rewriting
    def _build(self) -> tf.compat.v1.Session:
        with self._lock:
            if self._closed:
                raise RuntimeError("Attempted to use a closed Session.")
            version = self._graph.version
            if self._session is not None and version == self._version:
                return self._session
            if self._session is not None and not self._rebuild:
                raise GraphError("the graph changed after the session first ran; build the whole graph "
                                 "(training ops, savers, initialisers) before the first run, or create the "
                                 "Session with rebuild=True")
            gd = self._graph.as_graph_def()
            og, info = to_opgraph(gd, None, name="session")
            plan = make_plan(og, self.precision)
            new = apply_plan(info, plan)
            rewritten = tf.Graph()
            with rewritten.as_default():
                tf.graph_util.import_graph_def(new, name="")
            _restore_missing(rewritten, gd)
            session = tf.compat.v1.Session(self._target, graph=rewritten, config=self._tf_config)
            old, old_graph = self._session, self.rewritten
            if old is not None and old_graph is not None:
                try:
                    _carry_variables(old, old_graph, session, rewritten)
                finally:
                    old.close()
            self._session, self.rewritten, self.plan, self._version = session, rewritten, plan, version
            self.builds += 1
            if self.builds > 1:
                level = logging.WARNING if self.builds == _REBUILD_WARNING else logging.INFO
                log.log(level, "the graph grew after the first run: planned again (build %d)%s", self.builds,
                        "; are ops being created inside the training loop?" if level == logging.WARNING else "")
            return session

    def _map_fetches(self, fetches: Any) -> tuple[list[str], Callable[[list[Any]], Any]]:
        """Fetches as a flat list of names, and the function putting the results back in their shape."""
        leaves = tf.nest.flatten(fetches)
        names: list[str] = []
        spans: list[tuple[Any, int, int]] = []
        for leaf in leaves:
            parts = _components(leaf, self._graph)
            start = len(names)
            names.extend(parts if parts is not None else (_name(leaf, self._graph),))
            spans.append((leaf, start, len(names)))
        origin: dict[int, Any] = {}
        for k, name in enumerate(names):
            if ":" in name:
                dtype = self._graph.get_tensor_by_name(name).dtype.base_dtype
                if dtype.is_floating:
                    origin[k] = dtype.as_numpy_dtype

        def unpack(values: list[Any]) -> Any:
            values = [_as_dtype(v, origin.get(k)) for k, v in enumerate(values)]
            out = []
            for leaf, start, stop in spans:
                part = values[start:stop]
                if isinstance(leaf, tf.SparseTensor):
                    out.append(tf.compat.v1.SparseTensorValue(*part))
                elif isinstance(leaf, tf.IndexedSlices):
                    out.append(tf.compat.v1.IndexedSlicesValue(part[0], part[1], part[2] if len(part) > 2 else None))
                else:
                    out.append(part[0])
            return tf.nest.pack_sequence_as(fetches, out)

        return names, unpack

    def _map_feeds(self, feed_dict: dict | None) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        for key, value in (feed_dict or {}).items():
            parts = _components(key, self._graph)
            if parts is None:
                feeds[_name(key, self._graph)] = value
                continue
            if isinstance(key, tf.SparseTensor) and not isinstance(value, tf.compat.v1.SparseTensorValue):
                value = tf.compat.v1.SparseTensorValue(*value)
            fields = (value.indices, value.values, value.dense_shape) if isinstance(key, tf.SparseTensor) else \
                (value.values, value.indices, value.dense_shape)
            feeds.update(zip(parts, fields))
        return feeds


def _as_dtype(value: Any, want: Any) -> Any:
    if want is None:
        return value
    if isinstance(value, np.ndarray) and value.dtype != want:
        return value.astype(want)
    if isinstance(value, np.generic) and value.dtype != want:
        return np.asarray(value).astype(want)[()]
    return value


def _restore_missing(rewritten: tf.Graph, original: Any) -> None:
    """Put back user nodes the rewrite dropped (unread Consts, Casts that became identities).

    Nothing in the rewritten graph reads them, but the user may still fetch or feed them by name.
    """
    have = {op.name for op in rewritten.get_operations()}
    missing = [n for n in original.node if n.name not in have]
    if not missing:
        return
    with rewritten.as_default():
        for node in missing:
            if node.op in ("Const", "HostConst"):
                value = tf.make_ndarray(node.attr["value"].tensor)
                made = tf.constant(value, dtype=tf.as_dtype(node.attr["dtype"].type), name=node.name)
            elif node.op == "Cast" and node.input and not node.input[0].startswith("^"):
                source = rewritten.get_tensor_by_name(node.input[0] if ":" in node.input[0] else node.input[0] + ":0")
                dst = tf.as_dtype(node.attr["DstT"].type)
                made = tf.identity(source, name=node.name) if source.dtype == dst else \
                    tf.cast(source, dst, name=node.name)
            else:
                log.debug("node %s (%s) is not in the rewritten graph", node.name, node.op)
                continue
            if made.op.name != node.name:
                log.debug("could not restore node %s under its own name (got %s)", node.name, made.op.name)


def _variables(graph: tf.Graph) -> dict[str, tf.Operation]:
    return {op.name: op for op in graph.get_operations() if op.type in _REF_VARIABLES | _RESOURCE_VARIABLES}


def _carry_variables(old: tf.compat.v1.Session, old_graph: tf.Graph, new: tf.compat.v1.Session,
                     new_graph: tf.Graph) -> None:
    """Copy every initialised variable of ``old`` into the variable of the same name in ``new``."""
    old_vars, new_vars = _variables(old_graph), _variables(new_graph)
    shared = [name for name in old_vars if name in new_vars and new_vars[name].type == old_vars[name].type]
    lost = sorted({op.type for op in old_graph.get_operations() if any(s in op.type for s in _UNCARRIED_STATE)})
    if lost:
        log.warning("the graph was planned again: the state of %s ops is not carried over (variables are)",
                    ", ".join(lost))
    if not shared:
        return
    inits, reads = {}, {}
    with old_graph.as_default(), tf.name_scope("pp_carry_over"):
        for name in shared:
            op = old_vars[name]
            with old_graph.colocate_with(op):
                if op.type in _REF_VARIABLES:
                    inits[name] = tf.raw_ops.IsVariableInitialized(ref=op.outputs[0])
                    reads[name] = op.outputs[0]
                else:
                    inits[name] = tf.raw_ops.VarIsInitializedOp(resource=op.outputs[0])
                    reads[name] = tf.raw_ops.ReadVariableOp(resource=op.outputs[0], dtype=op.get_attr("dtype"))
    initialised = old.run(inits)
    values = old.run({name: reads[name] for name in shared if initialised[name]})
    if not values:
        return
    feeds, assigns = {}, []
    with new_graph.as_default(), tf.name_scope("pp_carry_over"):
        for name, value in values.items():
            op = new_vars[name]
            dtype = tf.as_dtype(op.get_attr("dtype"))
            holder = tf.compat.v1.placeholder(dtype, np.shape(value))
            feeds[holder] = np.asarray(value).astype(dtype.as_numpy_dtype)
            with new_graph.colocate_with(op):
                if op.type in _REF_VARIABLES:
                    assigns.append(tf.raw_ops.Assign(ref=op.outputs[0], value=holder).op)
                else:
                    assigns.append(tf.raw_ops.AssignVariableOp(resource=op.outputs[0], value=holder))
    new.run(assigns, feeds)
    log.info("carried %d variable value(s) over into the re-planned graph", len(values))
