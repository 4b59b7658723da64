"""Keras 3: layer DTypePolicies from the plan, and a CNN on digits trained with model.fit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
datasets = pytest.importorskip("sklearn.datasets")

import precision_policy as pp  # noqa: E402
from precision_policy.keras import apply, layer_graph  # noqa: E402
from precision_policy.rules import Rule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo_keras import keras_cnn  # noqa: E402  (the model `make demo` trains)

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="tf_amp_bf16", use_env_lists=False)


def cnn() -> keras.Model:
    """The digits CNN `make demo` trains (examples/demo_keras.py)."""
    return keras_cnn()


def test_layer_graph_and_policies_follow_the_plan():
    model = cnn()
    g = layer_graph(model)
    assert g.node("residual").inputs == ["relu1:0", "relu2:0"]
    assert g.node("conv1").op_type == "Conv2D" and g.node("logits").op_type == "MatMul"
    apply(model, BF16)
    plan = model.precision_plan
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies["conv1"] == policies["conv2"] == policies["logits"] == "mixed_bfloat16"  # allow list
    assert (plan["relu1"].rule, plan["relu1"].followed) == (Rule.GRAY_FOLLOWS, "bn1") and policies["residual"] == "mixed_bfloat16"
    for layer in model.layers:
        if layer.name in plan.names and plan[layer.name].dtype:
            expect = "mixed_bfloat16" if plan[layer.name].dtype == "bfloat16" else "float32"
            assert policies[layer.name] == expect, layer.name
    # pinning an op type changes the policies: MaxPool to the deny list
    cfg = BF16.model_copy(update={"env": {"TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_DENYLIST_ADD": "MaxPool"},
                                  "use_env_lists": True})
    pinned = apply(cnn(), cfg)
    assert {layer.name: layer.dtype_policy.name for layer in pinned.layers}["maxpool"] == "float32"
    for layer in model.layers:
        for w in layer.weights:
            assert w.dtype == "float32"


@pytest.mark.slow
def test_keras_cnn_trains_on_digits_within_one_point_of_fp32():
    d = datasets.load_digits()
    x = (d.images[..., None] / 16.0).astype("float32")
    y = d.target
    perm = np.random.RandomState(0).permutation(len(y))
    n = int(0.8 * len(y))
    tr, te = perm[:n], perm[n:]

    def train(config):
        keras.utils.set_random_seed(0)
        model = cnn()
        if config is not None:
            apply(model, config)
        epochs = 25
        schedule = keras.optimizers.schedules.CosineDecay(3e-3, epochs * int(np.ceil(n / 64)))
        model.compile(keras.optimizers.Adam(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(x[tr], y[tr], batch_size=64, epochs=epochs, verbose=0, shuffle=True)
        return model.evaluate(x[te], y[te], verbose=0)[1] * 100

    fp32 = train(None)
    bf16 = train(BF16)
    assert fp32 > 95
    assert bf16 >= fp32 - 1.0, (bf16, fp32)
