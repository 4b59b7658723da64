"""TF1 training under a precision mode: a drop-in for ``tf.compat.v1.Session``.

A script built with ``optimizer.minimize(loss)`` changes one line::

    sess = tf.compat.v1.Session()                                   # before
    sess = precision_policy.tensorflow.Session(pp.RunConfig(        # after
        precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16"))

On the first ``run`` the whole graph (forward, gradients, ``Apply*`` updates, initialisers)
is planned and rewritten once, imported into a graph of its own with the same node
names, and every ``run`` executes there. Fetches and feeds are the user's tensors, ops or
names; fetched values come back in their original dtypes. Variables stay float32.

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
    >>> type(value).__name__, str(value.dtype)
    ('float32', 'float32')
    >>> sess.plan.summary().startswith("Converted")
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from precision_policy.api import plan as make_plan
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph
from precision_policy.config import RunConfig
from precision_policy.errors import GraphError
from precision_policy.plan import CastPlan


def _name(item: Any) -> str:
    if isinstance(item, str):
        return item
    as_element = getattr(item, "_as_graph_element", None)
    if as_element is not None and not isinstance(item, (tf.Tensor, tf.Operation)):
        element = as_element()  # a variable fetches its value, as in tf.compat.v1.Session
        if element is not None:
            item = element
    name = getattr(item, "name", None)
    if name is None:
        raise TypeError(f"cannot fetch or feed {item!r}: expected a tf.Tensor, tf.Operation or a name")
    return name


class Session:
    """``tf.compat.v1.Session`` that runs ``graph`` (default: the default graph) under ``precision``."""

    def __init__(self, precision: RunConfig, target: str = "", graph: tf.Graph | None = None,
                 config: Any = None) -> None:
        self.precision = precision.model_copy(update={"keep_output_dtype": False})
        self.graph = graph if graph is not None else tf.compat.v1.get_default_graph()
        self._target = target
        self._tf_config = config
        self._session: tf.compat.v1.Session | None = None
        self._version: int | None = None
        self.plan: CastPlan | None = None
        self.rewritten: tf.Graph | None = None

    def _build(self) -> None:
        version = self.graph.version
        if self._session is not None:
            if version != self._version:
                raise GraphError("the graph changed after the session first ran; build the whole graph "
                                 "(training ops, savers, initialisers) before the first run")
            return
        gd = self.graph.as_graph_def()
        og, info = to_opgraph(gd, None, name="session")
        self.plan = make_plan(og, self.precision)
        new = apply_plan(info, self.plan)
        rewritten = tf.Graph()
        with rewritten.as_default():
            tf.graph_util.import_graph_def(new, name="")
        self.rewritten = rewritten
        self._session = tf.compat.v1.Session(self._target, graph=rewritten, config=self._tf_config)
        self._version = version

    def run(self, fetches: Any, feed_dict: dict | None = None, options: Any = None, run_metadata: Any = None) -> Any:
        self._build()
        assert self._session is not None and self.rewritten is not None
        origin: dict[str, np.dtype] = {}

        def to_new(item: Any) -> Any:
            name = _name(item)
            if ":" in name:
                t = self.graph.get_tensor_by_name(name)
                if t.dtype.is_floating:
                    origin[name] = t.dtype.as_numpy_dtype
            return name

        new_fetches = tf.nest.map_structure(to_new, fetches)
        feeds = {_name(k): v for k, v in (feed_dict or {}).items()}
        out = self._session.run(new_fetches, feeds, options=options, run_metadata=run_metadata)

        def back(name: str, value: Any) -> Any:
            want = origin.get(name)
            if want is not None and isinstance(value, np.ndarray) and value.dtype != want:
                return value.astype(want)
            if want is not None and isinstance(value, np.generic) and value.dtype != want:
                return np.asarray(value).astype(want)[()]
            return value

        return tf.nest.map_structure(back, new_fetches, out)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
