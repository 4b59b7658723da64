"""precision_policy: Ascend-style precision modes for TensorFlow and PyTorch.

Example:
    >>> import precision_policy as pp
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910")
    >>> plan = pp.plan("examples/graphs/conv2d_bias_relu.json", cfg)
    >>> plan.summary()
    'Converted 4/8 nodes to float16 precision using 0 cast(s) to float16 (excluding Const and Variable casts)'
"""

from importlib import metadata as _metadata

from precision_policy import backends, dtypes, modes  # noqa: F401  (backends: imported to register the model formats they read)
from precision_policy.api import plan
from precision_policy.config import RunConfig
from precision_policy.errors import (
    ConfigError,
    DTypeError,
    GraphError,
    OpInfoError,
    OverrideError,
    PlanFormatError,
    PrecisionError,
    PrecisionPolicyError,
    TuneError,
)
from precision_policy.graph import Node, OpGraph, load_graph
from precision_policy.opinfo import Library, OpInfo, load_library
from precision_policy.plan import CastPlan, NodeDecision, PlanDiff
from precision_policy.tune import tune  # the function (the package imports no framework; backends load per model)

try:  # the version lives in pyproject.toml only
    __version__ = _metadata.version("precision-policy")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CastPlan",
    "ConfigError",
    "DTypeError",
    "GraphError",
    "Library",
    "Node",
    "NodeDecision",
    "OpGraph",
    "OpInfo",
    "OpInfoError",
    "OverrideError",
    "PlanDiff",
    "PlanFormatError",
    "PrecisionError",
    "PrecisionPolicyError",
    "RunConfig",
    "TuneError",
    "dtypes",
    "load_graph",
    "load_library",
    "modes",
    "plan",
    "tune",
]
