"""Loss-scale state machines, framework-neutral: fixed and dynamic, with named presets.

A loss scale multiplies the loss before backward, so small low-precision gradients don't
underflow, and divides the gradients after. A dynamic scale backs off when gradients
overflow (that step is skipped) and grows after a run of good steps. One class does every
published variant; the presets set its parameters:

==============  ============  ======  =======  ========  ===========  =========
preset          init_scale    growth  backoff  interval  decr_every_n  min_scale
==============  ============  ======  =======  ========  ===========  =========
``torch``       2**16         2.0     0.5      2000      1            none
``keras``       2**15         2.0     0.5      2000      1            none
``ascend``      2**32         2.0     0.8      1000      2 (counted)  1 (kept)
``mindspore``   2**24         2.0     0.5      2000      1            1
==============  ============  ======  =======  ========  ===========  =========

``ascend`` is npu_bridge's ExponentialUpdateLossScaleManager: bad steps accumulate (a good
step does not reset them) and the scale drops after ``decr_every_n_nan_or_inf`` of them;
both counters clear whenever the scale changes; an update that would go below 1 or past
float32's range is not applied.

Example:
    >>> from precision_policy.loss_scale import DynamicLossScale
    >>> s = DynamicLossScale.preset("ascend")
    >>> s.update(found_inf=True), s.scale          # first bad step: counted, scale kept
    (False, 4294967296.0)
    >>> s.update(found_inf=True), s.scale          # second: backs off by 0.8
    (False, 3435973836.8)
    >>> s.update(found_inf=False)                  # a good step: the update is applied
    True
"""

from __future__ import annotations

import logging
import math
from typing import Any

from precision_policy.errors import ConfigError

log = logging.getLogger(__name__)

FLOAT32_MAX = 3.4028234663852886e38


class FixedLossScale:
    """A constant scale. Steps with non-finite gradients are still skipped."""

    def __init__(self, scale: float) -> None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"a fixed loss scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        self.steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> bool:
        """Record one step; returns whether its update is applied (False: skip it)."""
        self.steps += 1
        if found_inf:
            self.skipped_steps += 1
        return not found_inf

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "scale": self.scale, "steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "fixed":
            raise ConfigError(f"state is for a {state.get('kind')!r} loss scale, not a fixed one")
        self.scale = float(state["scale"])
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])

    def __repr__(self) -> str:
        return f"FixedLossScale({self.scale:g})"


class DynamicLossScale:
    """A dynamic scale: back off on overflow, grow after ``growth_interval`` good steps in a row."""

    PRESETS: dict[str, dict[str, Any]] = {
        "torch": dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000),
        "keras": dict(init_scale=2.0**15, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000),
        "ascend": dict(init_scale=2.0**32, growth_factor=2.0, backoff_factor=0.8, growth_interval=1000,
                       decr_every_n_nan_or_inf=2, min_scale=1.0, below_min="keep"),
        "mindspore": dict(init_scale=2.0**24, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                          min_scale=1.0, below_min="clamp"),
    }
    ALIASES = {
        "gradscaler": "torch", "pytorch": "torch", "lossscaleoptimizer": "keras", "tensorflow": "keras",
        "exponentialupdatelossscalemanager": "ascend", "npu": "ascend", "dynamiclossscalemanager": "mindspore",
    }

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        decr_every_n_nan_or_inf: int = 1,
        min_scale: float = 0.0,
        max_scale: float = FLOAT32_MAX,
        below_min: str = "clamp",
    ) -> None:
        checks = [
            (math.isfinite(init_scale) and init_scale > 0, "init_scale must be a positive finite number"),
            (growth_factor > 1, "growth_factor must be > 1"),
            (0 < backoff_factor < 1, "backoff_factor must be in (0, 1)"),
            (isinstance(growth_interval, int) and growth_interval >= 1, "growth_interval must be an integer >= 1"),
            (isinstance(decr_every_n_nan_or_inf, int) and decr_every_n_nan_or_inf >= 1,
             "decr_every_n_nan_or_inf must be an integer >= 1"),
            (0 <= min_scale <= init_scale <= max_scale, "need 0 <= min_scale <= init_scale <= max_scale"),
            (below_min in ("clamp", "keep"), "below_min must be 'clamp' or 'keep'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"DynamicLossScale: {message}")
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.decr_every_n_nan_or_inf = decr_every_n_nan_or_inf
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.below_min = below_min
        self.scale = float(init_scale)
        self.good_steps = 0
        self.bad_steps = 0
        self.steps = 0
        self.skipped_steps = 0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DynamicLossScale:
        """One of :attr:`PRESETS` (or an alias such as ``"GradScaler"``), optionally adjusted."""
        key = cls.ALIASES.get(name.lower(), name.lower())
        if key not in cls.PRESETS:
            raise ConfigError(f"unknown loss-scale preset {name!r}; presets: {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[key], **overrides})

    def update(self, found_inf: bool) -> bool:
        """Record one step's overflow check; returns whether its update is applied (False: skip)."""
        old = self.scale
        self.scale, self.good_steps, self.bad_steps = transition(
            PythonOps, self, self.scale, self.good_steps, self.bad_steps, bool(found_inf))
        self.steps += 1
        self.skipped_steps += int(bool(found_inf))
        if self.scale != old:
            log.info("loss scale %s: %g -> %g", "backs off" if found_inf else "grows", old, self.scale)
        return not found_inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "dynamic",
            "scale": self.scale,
            "good_steps": self.good_steps,
            "bad_steps": self.bad_steps,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "init_scale": self.init_scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "decr_every_n_nan_or_inf": self.decr_every_n_nan_or_inf,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "below_min": self.below_min,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "dynamic":
            raise ConfigError(f"state is for a {state.get('kind')!r} loss scale, not a dynamic one")
        for key in ("init_scale", "growth_factor", "backoff_factor", "min_scale", "max_scale", "scale"):
            setattr(self, key, float(state[key]))
        for key in ("growth_interval", "decr_every_n_nan_or_inf", "good_steps", "bad_steps", "steps", "skipped_steps"):
            setattr(self, key, int(state[key]))
        self.below_min = str(state["below_min"])

    def __repr__(self) -> str:
        return (f"DynamicLossScale(scale={self.scale:g}, growth {self.growth_factor:g} every {self.growth_interval}, "
                f"backoff {self.backoff_factor:g} every {self.decr_every_n_nan_or_inf} bad step(s))")


class PythonOps:
    """The operations :func:`transition` needs, on Python numbers (a TF backend passes TF ones)."""

    @staticmethod
    def where(cond, a, b):
        return a if cond else b

    @staticmethod
    def logical_and(a, b):
        return a and b

    @staticmethod
    def logical_not(a):
        return not a

    @staticmethod
    def logical_or(a, b):
        return a or b


def transition(ops: Any, p: DynamicLossScale, scale: Any, good: Any, bad: Any, found_inf: Any) -> tuple[Any, Any, Any]:
    """One step of the dynamic loss-scale state machine: ``(scale, good, bad)`` after a step.

    Written once over ``ops`` (``where``/``logical_and``/``logical_not``) so the same rule runs
    on Python numbers here and on TensorFlow variables inside a compiled training step.
    """
    bad1 = ops.where(found_inf, bad + 1, bad)
    good1 = ops.where(found_inf, good * 0, good + 1)
    back = ops.logical_and(found_inf, bad1 >= p.decr_every_n_nan_or_inf)
    backed = scale * p.backoff_factor
    floor = p.min_scale if p.below_min == "clamp" else scale
    backed = ops.where(backed < p.min_scale, floor, backed)
    grow = ops.logical_and(ops.logical_not(found_inf), good1 >= p.growth_interval)
    grown = scale * p.growth_factor
    grow_ok = ops.logical_and(grow, grown <= p.max_scale)
    new_scale = ops.where(back, backed, ops.where(grow_ok, grown, scale))
    new_bad = ops.where(ops.logical_or(back, grow_ok), bad1 * 0, bad1)
    new_good = ops.where(grow, good1 * 0, good1)
    return new_scale, new_good, new_bad


LossScale = FixedLossScale | DynamicLossScale


def from_config(value: Any) -> LossScale | None:
    """``None``/``False`` -> no scaling; ``"dynamic"`` -> torch's defaults; a number -> fixed;
    a preset name; or a dict of DynamicLossScale parameters (``{"preset": "ascend", ...}`` adjusts one)."""
    if value is None or value is False:
        return None
    if isinstance(value, bool):
        return DynamicLossScale()
    if isinstance(value, (int, float)):
        return FixedLossScale(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("dynamic", "true", "on"):
            return DynamicLossScale()
        try:
            return FixedLossScale(float(text))
        except ValueError:
            return DynamicLossScale.preset(text)
    if isinstance(value, dict):
        params = dict(value)
        preset = params.pop("preset", None)
        try:
            return DynamicLossScale.preset(preset, **params) if preset else DynamicLossScale(**params)
        except TypeError as exc:
            raise ConfigError(f"loss_scale: {exc}") from None
    raise ConfigError(f"loss_scale must be None, 'dynamic', a number, a preset name or a dict, got {value!r}")
