"""TensorFlow backend: GraphDef/SavedModel rewrite, TF1 sessions, Keras models.

Public as ``precision_policy.tensorflow`` (and ``precision_policy.keras`` for Keras).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter drowns our own output

from precision_policy.backends.tensorflow.convert import convert, load_graph_def, rewrite  # noqa: E402
from precision_policy.backends.tensorflow.graphdef import apply_plan, to_opgraph  # noqa: E402
from precision_policy.backends.tensorflow.loss_scale import TF1LossScaleOptimizer  # noqa: E402
from precision_policy.backends.tensorflow.session import Session  # noqa: E402

LossScaleOptimizer = TF1LossScaleOptimizer  # for session training; Keras: precision_policy.keras.LossScaleOptimizer

__all__ = ["LossScaleOptimizer", "Session", "TF1LossScaleOptimizer", "apply_plan", "convert", "load_graph_def",
           "rewrite", "to_opgraph"]
