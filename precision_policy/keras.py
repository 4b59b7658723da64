"""``precision_policy.keras``: Keras 3 models under a precision mode (needs TensorFlow / Keras 3)."""

from precision_policy.backends.tensorflow.keras import apply, layer_graph, layer_op_type, plan_of
from precision_policy.backends.tensorflow.loss_scale import LossScaleOptimizer

__all__ = ["LossScaleOptimizer", "apply", "layer_graph", "layer_op_type", "plan_of"]
