"""Real Keras architectures (random weights, nothing downloaded), frozen as users freeze them.

Used by the model-zoo test and ``benchmarks/tf_vs_grappler.py``: every graph here is one a
user brings — ``keras.applications`` CNNs, a transformer encoder, an LSTM+GRU text model —
frozen with ``convert_variables_to_constants_v2``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402


@dataclass
class Frozen:
    name: str
    graph_def: tf.compat.v1.GraphDef
    inputs: list[str]  # tensor names
    outputs: list[str]  # tensor names
    example: np.ndarray

    @property
    def fetch_nodes(self) -> list[str]:
        return [t.split(":")[0] for t in self.outputs]


def calibrate_batch_norm(model: keras.Model, shape: tuple[int, ...]) -> None:
    """Give random-weight BatchNorm layers the statistics of real activations.

    With ``weights=None`` every moving mean/variance is 0/1, which matches nothing the layer
    sees; deep networks then collapse to outputs of 1e-11 where no precision question is
    meaningful. One training-mode call with momentum 0 sets the moving statistics to the
    batch's, as a short fine-tune would.
    """
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    for layer in norms:
        layer.momentum = 0.0
    x = np.random.RandomState(1).rand(8, *shape[1:]).astype(np.float32)
    model(x, training=True)


def freeze(name: str, model: keras.Model, spec: tf.TensorSpec) -> Frozen:
    if spec.dtype == tf.float32:
        calibrate_batch_norm(model, tuple(spec.shape))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(fn)
    rng = np.random.RandomState(0)
    if spec.dtype == tf.int32:
        example = rng.randint(0, 100, spec.shape).astype(np.int32)
    else:
        example = rng.rand(*spec.shape).astype(np.float32)
    return Frozen(name, frozen.graph.as_graph_def(), [t.name for t in frozen.inputs],
                  [t.name for t in frozen.outputs], example)


def transformer_encoder(vocab: int = 200, seq: int = 16, d: int = 64, heads: int = 4) -> keras.Model:
    """Embedding + MultiHeadAttention + LayerNorm + Dense(gelu) feed-forward, two residuals."""
    x = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, d)(x)
    a = keras.layers.MultiHeadAttention(heads, d // heads)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    f = keras.layers.Dense(2 * d, activation="gelu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(d)(f))
    return keras.Model(x, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling1D()(h)))


def lstm_gru_text(vocab: int = 100, seq: int = 12) -> keras.Model:
    x = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, 16)(x)
    h = keras.layers.LSTM(16, return_sequences=True)(h)
    h = keras.layers.GRU(16)(h)
    return keras.Model(x, keras.layers.Dense(3)(h))


def _app(factory: Callable, size: int) -> Callable[[], tuple[keras.Model, tf.TensorSpec]]:
    def build() -> tuple[keras.Model, tf.TensorSpec]:
        model = factory(weights=None, input_shape=(size, size, 3), classifier_activation=None)
        return model, tf.TensorSpec([2, size, size, 3], tf.float32)

    return build


A = keras.applications
ZOO: dict[str, Callable[[], tuple[keras.Model, tf.TensorSpec]]] = {
    "ResNet50": _app(A.ResNet50, 64),
    "MobileNetV2": _app(A.MobileNetV2, 64),
    "MobileNetV3Small": _app(A.MobileNetV3Small, 64),
    "DenseNet121": _app(A.DenseNet121, 64),
    "EfficientNetB0": _app(A.EfficientNetB0, 64),
    "EfficientNetV2B0": _app(A.EfficientNetV2B0, 64),
    "ConvNeXtTiny": _app(A.ConvNeXtTiny, 64),
    "Xception": _app(A.Xception, 96),
    "transformer": lambda: (transformer_encoder(), tf.TensorSpec([2, 16], tf.int32)),
    "lstm_gru": lambda: (lstm_gru_text(), tf.TensorSpec([2, 12], tf.int32)),
}


def build(name: str, seed: int = 0) -> Frozen:
    keras.utils.set_random_seed(seed)
    model, spec = ZOO[name]()
    return freeze(name, model, spec)
