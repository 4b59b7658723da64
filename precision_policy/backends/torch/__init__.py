"""PyTorch backend: trace models to OpGraphs, apply cast plans, run precision modes eagerly.

Public as ``precision_policy.torch``.
"""

from precision_policy.backends.torch.eager import PrecisionFunctionMode, precision

__all__ = ["PrecisionFunctionMode", "precision"]
