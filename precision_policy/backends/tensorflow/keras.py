"""Keras 3 models under a precision mode: each layer gets the DTypePolicy its plan gives it.

The model is read as a graph of layers (op types from ``opinfo_db/aliases/keras.json``:
``Dense`` -> ``MatMul``, ``Conv2D`` -> ``Conv2D``, an ``Activation("relu")`` -> ``Relu``),
planned like any graph (gray layers follow their upstream layer), and every layer whose
plan dtype is low gets ``mixed_bfloat16`` / ``mixed_float16`` (float32 variables, low
compute); the others ``float32``. Train it with ``model.fit`` as usual.

Example:
    >>> import keras, precision_policy as pp
    >>> from precision_policy.keras import apply
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"),
    ...                           keras.layers.Dense(3, name="logits"), keras.layers.Softmax(name="probs")])
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16")
    >>> model = apply(model, cfg)
    >>> [layer.dtype_policy.name for layer in model.layers]
    ['mixed_bfloat16', 'mixed_bfloat16', 'mixed_bfloat16']
    >>> model.precision_plan["probs"].reason
    'gray: follows logits'
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import keras

from precision_policy.api import plan as make_plan
from precision_policy.config import RunConfig
from precision_policy.graph import OpGraph
from precision_policy.opinfo.library import shipped_root
from precision_policy.plan import CastPlan

_POLICY = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16", "float32": "float32", "float64": "float64"}


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, str]]:
    return json.loads((shipped_root() / "aliases" / "keras.json").read_text(encoding="utf-8"))


def layer_op_type(layer: Any) -> str:
    """Canonical op type of a Keras layer; ``keras:<Class>`` when the table does not know it."""
    table = _table()
    name = type(layer).__name__
    if name == "Activation":
        act = getattr(layer.activation, "__name__", str(layer.activation))
        return table["activations"].get(act, f"keras:activation.{act}")
    for cls in type(layer).__mro__:
        op = table["layers"].get(cls.__name__)
        if op is not None:
            return op
    return f"keras:{name}"


def layer_graph(model: keras.Model) -> OpGraph:
    """The model as a graph of layers (one node per layer, edges from its inbound calls)."""
    g = OpGraph(model.name, lookahead=False)
    seen: set[str] = set()
    layers = list(model.layers)
    inputs = []
    for layer in layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for parent in node.parent_nodes:
                op = parent.operation
                if op.name not in {l.name for l in layers} and op.name not in {i.name for i in inputs}:
                    inputs.append(op)
    for layer in inputs + layers:
        if layer.name in seen:
            continue
        seen.add(layer.name)
        parents: list[str] = []
        for node in getattr(layer, "_inbound_nodes", []):
            for parent in node.parent_nodes:
                ref = f"{parent.operation.name}:0"
                if ref not in parents:
                    parents.append(ref)
        dtype = getattr(layer, "compute_dtype", None) or "float32"
        op = layer_op_type(layer)
        g.add_node(layer.name, op, parents if op != "Placeholder" else [], [dtype if dtype != "string" else "float32"])
    outs = []
    for out in getattr(model, "outputs", None) or []:
        hist = getattr(out, "_keras_history", None)
        if hist is not None:
            outs.append(f"{hist.operation.name}:0")
    g.set_outputs([o for o in outs if o.split(":")[0] in seen])
    g.resolve()
    return g


def apply(model: keras.Model, config: RunConfig) -> keras.Model:
    """Give every layer of ``model`` the DTypePolicy of its plan (in place); returns the model.

    Variables stay float32 (the policies are Keras' mixed ones), so training with
    ``model.fit`` keeps float32 master weights. The plan is kept as ``model.precision_plan``.
    """
    plan = make_plan(layer_graph(model), config.model_copy(update={"keep_output_dtype": False}))
    for layer in model.layers:
        if layer.name not in plan.names:
            continue
        d = plan[layer.name].dtype
        policy = _POLICY.get(d or "", None)
        if policy is not None and d != "float32" or (policy == "float32" and layer.compute_dtype != "float32"):
            layer.dtype_policy = keras.DTypePolicy(policy)
    model.precision_plan = plan
    return model


def plan_of(model: keras.Model) -> CastPlan | None:
    return getattr(model, "precision_plan", None)
