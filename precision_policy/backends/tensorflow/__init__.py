"""TensorFlow backend: GraphDef/SavedModel rewrite, TF1 sessions, Keras models.

Public as ``precision_policy.tensorflow`` (and ``precision_policy.keras`` for Keras).
"""

# (Importing this package does not touch the environment: TF's start-up messages are TF's to print. The
# CLI, whose output is for people, imports TensorFlow quietly itself: precision_policy.cli.)

from precision_policy.backends.tensorflow.audit import audit
from precision_policy.backends.tensorflow.convert import (
    ConversionResult,
    convert,
    convert_model,
    inline_functions,
    load_graph_def,
    load_model,
    rewrite,
    verify_graph_def,
)
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph
from precision_policy.backends.tensorflow.loss_scale import TF1LossScaleOptimizer
from precision_policy.backends.tensorflow.overflow import find_overflow, range_stats
from precision_policy.backends.tensorflow.session import Session
from precision_policy.backends.tensorflow.tune import GraphModel

LossScaleOptimizer = TF1LossScaleOptimizer  # for session training; Keras: precision_policy.keras.LossScaleOptimizer

__all__ = ["ConversionResult", "GraphModel", "LossScaleOptimizer", "Session", "TF1LossScaleOptimizer", "apply_plan", "audit", "convert",
           "convert_model", "find_overflow", "inline_functions", "load_graph_def", "load_model", "range_stats", "rewrite",
           "to_opgraph", "verify_graph_def"]
