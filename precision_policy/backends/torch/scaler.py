"""Loss scaling for PyTorch training loops, with torch.amp.GradScaler's shape.

Wraps one of the core's loss-scale state machines (any preset: torch, keras, ascend,
mindspore). ``step`` returns whether the optimizer step was applied; a skipped step logs
which parameters had non-finite gradients (also in :attr:`LossScaler.last_overflow`). Under
``torch.distributed`` the overflow flag is all-reduced, so every rank skips the same steps.
Sharded gradients (``DTensor``, as FSDP2's ``fully_shard`` makes) are checked and unscaled
through each rank's local shard; an overflow in any rank's shard skips the step on every rank.

Example:
    >>> import torch
    >>> from precision_policy.torch import LossScaler
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler = LossScaler("dynamic", model=model)
    >>> loss = model(torch.ones(2, 4)).sum()
    >>> scaler.scale(loss).backward()
    >>> scaler.step(opt), scaler.update(), scaler.get_scale()
    (True, None, 65536.0)
    >>> model.weight.grad[0, 0] = float("inf")          # an overflow
    >>> scaler.step(opt), scaler.last_overflow, scaler.get_scale() == 65536.0
    (False, ['weight'], True)
    >>> scaler.update(); scaler.get_scale()
    32768.0
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from precision_policy.loss_scale import DynamicLossScale, FixedLossScale, from_config

log = logging.getLogger(__name__)

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``grad``: the local shard of a DTensor (sharing its storage), else ``grad``.

    The fused check-and-unscale and ``isfinite`` then run on plain tensors: no DTensor dispatch,
    no implicit replication of the 1-element overflow flag (which warns on every step), and the
    flag stays a plain tensor for the all-reduce. ``torch.distributed.tensor`` is looked up in
    ``sys.modules`` only: a DTensor gradient cannot exist before that module was imported.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(grad, dtensor.DTensor):
        with torch.no_grad():
            return grad.to_local()
    return grad


class LossScaler:
    """Scale the loss, unscale and check the gradients, skip overflowing steps, update the scale.

    Args:
        loss_scale: a state machine, or what ``RunConfig.loss_scale`` accepts ("dynamic", a
            number, a preset name such as "ascend", a dict of parameters).
        model: optional; names parameters in overflow reports (``model.named_parameters()``).
        enabled: False makes every method a pass-through (scale 1, steps always applied).
    """

    def __init__(self, loss_scale: Any = "dynamic", *, model: torch.nn.Module | None = None,
                 enabled: bool = True) -> None:
        state = loss_scale if isinstance(loss_scale, (DynamicLossScale, FixedLossScale)) else from_config(loss_scale)
        self.enabled = enabled and state is not None
        self.state = state if state is not None else FixedLossScale(1.0)
        self._model = weakref.ref(model) if model is not None else None
        self._names: dict[int, str] = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        self.last_overflow: list[str] = []
        self.last_overflow_op: Any = None  # the OverflowReport of the last locate_overflow()
        self._skipped_scale: float | None = None  # the scale of the last skipped step
        self._warned = False  # a skipped step was already logged at WARNING at the current scale

    # ------------------------------------------------------------------ GradScaler's shape
    def get_scale(self) -> float:
        return self.state.scale if self.enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (float32, so a large scale cannot overflow the loss itself)."""
        if not self.enabled:
            return loss
        return loss.float() * self.state.scale

    def _params(self, optimizer: torch.optim.Optimizer) -> Iterable[tuple[int, int, torch.nn.Parameter]]:
        for g, group in enumerate(optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                yield g, k, p

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale, in place, and look for inf/nan (once per step).

        One fused check-and-unscale per (device, dtype) group of gradients and one host sync for
        the whole optimizer; the names of the parameters with non-finite gradients are worked out
        only when an overflow was found.
        """
        if not self.enabled:
            return
        info = self._per_optimizer.setdefault(id(optimizer), {"stage": _READY})
        if info["stage"] != _READY:
            raise RuntimeError("unscale_() was already called on this optimizer since the last update()")
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        checked: list[tuple[int, int, torch.nn.Parameter, torch.Tensor]] = []
        for g, k, p in self._params(optimizer):
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                if grad.dtype == torch.float16:  # duplicates may sum past float16's range: coalesce first
                    p.grad = grad = grad.coalesce()
                grad = grad._values()
            else:
                grad = _local(grad)  # a DTensor (FSDP2, tensor parallel): this rank's shard, in place
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
            checked.append((g, k, p, grad))
        found_per_device: dict[torch.device, torch.Tensor] = {}
        inv_per_device: dict[torch.device, torch.Tensor] = {}
        inv = 1.0 / self.state.scale
        for (device, _), grads in groups.items():
            if device not in found_per_device:
                found_per_device[device] = torch.zeros(1, dtype=torch.float32, device=device)
                inv_per_device[device] = torch.full((1,), inv, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_per_device[device], inv_per_device[device])
        flags = list(found_per_device.values())
        found = flags[0] if flags else torch.zeros(1)
        for other in flags[1:]:
            found = found + other.to(found.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        found_inf = bool(found.item())  # the one host sync of this optimizer's step
        bad: list[str] = []
        if found_inf and checked:  # rare: name the culprits (one more sync, on overflow steps only)
            finite = torch.stack([torch.isfinite(t).all().to(found.device) for *_, t in checked]).tolist()
            self._refresh_names()
            bad = [self._names.get(id(p), f"param_groups[{g}][{k}]")
                   for (g, k, p, _), ok in zip(checked, finite) if not ok]
        info.update(stage=_UNSCALED, found_inf=found_inf, bad=bad)

    def _refresh_names(self) -> None:
        """Re-read the model's parameter names (on overflow steps only): its parameters may have been
        replaced since this scaler was made (FSDP2's ``fully_shard`` swaps them for sharded DTensor
        parameters; ``load_state_dict(assign=True)``, ``to_empty`` and ``.to()`` can too)."""
        model = self._model() if self._model is not None else None
        if model is not None:
            self._names = {id(p): n for n, p in model.named_parameters()}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None  # a weak reference cannot be pickled; the names read so far are kept
        return state

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """Unscale if needed, then step ``optimizer`` unless a gradient overflowed; returns whether it stepped.

        A skipped step is logged at WARNING once per loss scale (until the scale next changes);
        further skips at the same scale are logged at DEBUG.
        """
        if not self.enabled:
            optimizer.step(*args, **kwargs)
            return True
        info = self._per_optimizer.get(id(optimizer))
        if info is None or info["stage"] == _READY:
            self.unscale_(optimizer)
            info = self._per_optimizer[id(optimizer)]
        if info["stage"] == _STEPPED:
            raise RuntimeError("step() was already called on this optimizer since the last update()")
        info["stage"] = _STEPPED
        if info["found_inf"]:
            self.last_overflow = list(info["bad"])
            self._skipped_scale = self.state.scale
            where = ", ".join(info["bad"][:8]) or "another rank"
            more = f" and {len(info['bad']) - 8} more" if len(info["bad"]) > 8 else ""
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "loss scale %g: non-finite gradients in %s%s; optimizer step skipped",
                    self.state.scale, where, more)
            return False
        optimizer.step(*args, **kwargs)
        return True

    def update(self, new_scale: float | None = None) -> None:
        """Feed this iteration's overflow result to the state machine (call once per iteration)."""
        if not self.enabled:
            return
        found = any(info.get("found_inf", False) for info in self._per_optimizer.values())
        if not self._per_optimizer:
            raise RuntimeError("update() needs a step() or unscale_() first in this iteration")
        before = self.state.scale
        self.state.update(found)
        if new_scale is not None:
            self.state.scale = float(new_scale)
        if self.state.scale != before:
            self._warned = False  # the next skipped step at the new scale warns again
        self._per_optimizer.clear()

    def locate_overflow(self, model: torch.nn.Module, inputs: Any, loss_fn: Any, config: Any = None, *,
                        scale: float | None = None) -> Any:
        """Which op produced the first inf/nan: run :func:`~precision_policy.torch.find_overflow` on demand.

        Call it after :meth:`step` skipped a step, with the batch's inputs and the loss function
        (``loss_fn(model(*inputs))``). ``config``: the precision config (default: the one
        ``prepare()`` gave ``model``); ``scale``: the loss scale to replay (default: the scale of
        the last skipped step, else the current one). The float32 and planned runs use copies of
        the model, so its parameters and gradients are untouched. Returns the
        :class:`~precision_policy.audit.OverflowReport` (also in :attr:`last_overflow_op`) and logs it.
        """
        from precision_policy.backends.torch.overflow import find_overflow
        from precision_policy.errors import ConfigError

        if config is None:
            config = getattr(model, "_pp_config", None)
            if config is None:
                raise ConfigError("locate_overflow needs the precision config: pass config=... (or prepare() the model)")
        if scale is None:
            scale = self._skipped_scale if self._skipped_scale is not None else self.get_scale()
        report = find_overflow(model, inputs, config, loss_fn, scale=scale)
        self.last_overflow_op = report
        log.warning("loss scale %g: %s", scale, report.message)
        return report

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "loss_scale": self.state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        inner = state["loss_scale"]
        if inner.get("kind") == "fixed" and not isinstance(self.state, FixedLossScale):
            self.state = FixedLossScale(inner["scale"])
        elif inner.get("kind") == "dynamic" and not isinstance(self.state, DynamicLossScale):
            self.state = DynamicLossScale()
        self.state.load_state_dict(inner)
        self._warned = False

    def __repr__(self) -> str:
        return f"LossScaler({self.state!r}, enabled={self.enabled})"
