"""TensorFlow backend: GraphDef/SavedModel rewrite, TF1 sessions, Keras models.

Public as ``precision_policy.tensorflow`` (and ``precision_policy.keras`` for Keras).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter drowns our own output

from precision_policy.backends.tensorflow.audit import audit  # noqa: E402
from precision_policy.backends.tensorflow.convert import (  # noqa: E402
    ConversionResult,
    convert,
    convert_model,
    inline_functions,
    load_graph_def,
    load_model,
    rewrite,
    verify_graph_def,
)
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph  # noqa: E402
from precision_policy.backends.tensorflow.loss_scale import TF1LossScaleOptimizer  # noqa: E402
from precision_policy.backends.tensorflow.overflow import find_overflow, range_stats  # noqa: E402
from precision_policy.backends.tensorflow.session import Session  # noqa: E402
from precision_policy.backends.tensorflow.tune import GraphModel  # noqa: E402

LossScaleOptimizer = TF1LossScaleOptimizer  # for session training; Keras: precision_policy.keras.LossScaleOptimizer

__all__ = ["ConversionResult", "GraphModel", "LossScaleOptimizer", "Session", "TF1LossScaleOptimizer", "apply_plan", "audit", "convert",
           "convert_model", "find_overflow", "inline_functions", "load_graph_def", "load_model", "range_stats", "rewrite",
           "to_opgraph", "verify_graph_def"]
