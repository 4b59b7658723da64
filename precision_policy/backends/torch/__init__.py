"""PyTorch backend: trace models to OpGraphs, apply cast plans, run precision modes eagerly.

Public as ``precision_policy.torch``.
"""

from precision_policy.backends.torch.audit import audit
from precision_policy.backends.torch.eager import PrecisionFunctionMode, precision
from precision_policy.backends.torch.export import ExportedPrecision, trace_export
from precision_policy.backends.torch.fx import TracedModel, apply, trace, trace_fx
from precision_policy.backends.torch.inference import convert_for_inference
from precision_policy.backends.torch.overflow import find_overflow, range_stats
from precision_policy.backends.torch.prepare import check_modules, prepare
from precision_policy.backends.torch.scaler import LossScaler

__all__ = ["ExportedPrecision", "LossScaler", "PrecisionFunctionMode", "TracedModel", "apply", "audit", "check_modules",
           "convert_for_inference", "find_overflow", "precision", "prepare", "range_stats", "trace", "trace_export",
           "trace_fx"]
