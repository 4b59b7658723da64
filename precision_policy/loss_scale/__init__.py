"""Framework-neutral loss scaling: fixed and dynamic state machines with named presets."""

from precision_policy.loss_scale.state import (
    FLOAT32_MAX,
    DynamicLossScale,
    FixedLossScale,
    LossScale,
    PythonOps,
    from_config,
    transition,
)

__all__ = ["FLOAT32_MAX", "DynamicLossScale", "FixedLossScale", "LossScale", "PythonOps", "from_config", "transition"]
