"""The torch adapter of the accuracy-aware tuner (:func:`precision_policy.tune`).

Both routes: ``route="eager"`` (the default) gives ``eval_fn`` the model itself, prepared with
:func:`~precision_policy.torch.prepare` (its ``forward`` wrapped; parameters untouched);
``route="fx"`` gives it the FX rewrite :func:`~precision_policy.torch.apply` makes from the
model's trace. Candidates are named by module path (``features.0``, ``fc2``), the names by-name
``keep_dtype`` lines use on both routes.

Calibration: ``example_inputs`` (a tensor, a tuple of positional inputs, or a dict of keyword
inputs). Without them, the first forward that ``eval_fn`` runs during the baseline evaluation is
recorded and used. Sensitivity runs that batch once with every candidate kept and once under the
full plan, op by op in the eager route, and compares each candidate's output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from precision_policy.backends.torch import eager
from precision_policy.backends.torch.eager import ModulePaths, PrecisionFunctionMode, decider_for
from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, GraphError
from precision_policy.plan import CastPlan
from precision_policy.rules import Rule
from precision_policy.tune.adapter import Candidate, Sensitivity, Skipped, TuneAdapter, config_with_keep

log = logging.getLogger(__name__)

__all__ = ["TorchTuneAdapter", "adapter_for"]

_LOW = ("float16", "bfloat16")


class _CaptureMode(PrecisionFunctionMode):
    """The eager precision mode, naming every op by module path and keeping its first float output."""

    def __init__(self, decider: Any, *, native_fp16: bool, model: torch.nn.Module) -> None:
        super().__init__(decider, native_fp16=native_fp16, record=[], model=model, origin="float32")
        if self._names is None:
            self._names = ModulePaths(model, decider)
        self.outputs: dict[str, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        record = self.record
        assert record is not None
        n = len(record)
        out = super().__torch_function__(func, types, args, kwargs)
        if len(record) > n:
            name = record[-1].name
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                    self.outputs.setdefault(name, leaf.detach().to(torch.float32).clone())
                    break
        return out


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    raise ConfigError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                      f"not {type(example_inputs).__name__}")


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _compare(low: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(relative error, non-finite count) of ``low`` against ``ref`` (see :class:`Sensitivity`)."""
    if low.shape != ref.shape:
        return math.nan, 0
    low = low.double()
    ref = ref.double()
    fin_ref = torch.isfinite(ref)
    fin_low = torch.isfinite(low)
    nonfinite = int((fin_ref & ~fin_low).sum())
    both = fin_ref & fin_low
    if not bool(both.any()):
        return 0.0, nonfinite
    r = ref[both]
    d = (low[both] - r)
    err = float(d.pow(2).mean().sqrt())
    scale = float((r - r.mean()).pow(2).mean().sqrt())
    if scale == 0.0:
        scale = float(r.pow(2).mean().sqrt())
    if scale == 0.0:
        return (0.0 if err == 0.0 else math.inf), nonfinite
    return err / scale, nonfinite


class TorchTuneAdapter(TuneAdapter):
    """:class:`~precision_policy.tune.adapter.TuneAdapter` for a ``torch.nn.Module`` (see the module docstring).

    Example:
        >>> import torch, precision_policy as pp
        >>> from precision_policy.backends.torch.tune import TorchTuneAdapter
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
        >>> a = TorchTuneAdapter(model, cfg, torch.randn(16, 4))
        >>> [(c.name, c.op_type) for c in a.candidates()]
        [('0', 'MatMulV2'), ('1', 'Relu'), ('2', 'MatMulV2')]
    """

    framework = "torch"

    def __init__(self, model: torch.nn.Module, config: RunConfig, example_inputs: Any = None, *,
                 route: str = "eager") -> None:
        if route not in ("eager", "fx"):
            raise ConfigError(f"route must be 'eager' or 'fx' for a torch model, not {route!r}")
        self.model = model
        self.config = config
        self.route = route
        original = getattr(model, "_pp_original_forward", None)
        if original is not None:  # a prepared model: tune its own forward
            model.forward = original
            del model._pp_original_forward
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = (
            None if example_inputs is None else _split_inputs(example_inputs))
        self._hook: Any = None
        self._full: _CaptureMode | None = None
        self._graph: Any = None
        self._plans: dict[frozenset[str], CastPlan] = {}

    def describe(self) -> str:
        return f"torch ({self.route} route)"

    # ------------------------------------------------------------------ baseline and calibration
    def baseline(self) -> Any:
        if self._inputs is None:
            def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                if self._inputs is None:
                    self._inputs = (_detached(tuple(args)), _detached(dict(kwargs)))
            self._hook = self.model.register_forward_pre_hook(grab, with_kwargs=True)
        return self.model

    def baseline_done(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._inputs is None:
            raise ConfigError("tune: no calibration batch: pass example_inputs=..., or make eval_fn call the model "
                              "(its first forward is used)")

    def _calibration(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._inputs is None:
            raise ConfigError("tune: no calibration batch (example_inputs); the baseline must run first")
        return self._inputs

    def _capture(self, config: RunConfig) -> _CaptureMode:
        args, kwargs = self._calibration()
        mode = _CaptureMode(decider_for(config), native_fp16=config.native_fp16, model=self.model)
        names = mode._names
        assert names is not None
        saved = eager._busy()
        eager._state.busy = False
        wrapped = self.model.__dict__.get("forward") if hasattr(self.model, "_pp_original_forward") else None
        if wrapped is not None:  # a trial prepared the model: run its own forward under this mode
            original: Any = self.model.__dict__["_pp_original_forward"]
            self.model.forward = original
        names.install()
        try:
            with torch.no_grad(), eager._fast_paths(self.model, mode), mode:
                self.model(*args, **kwargs)
            if mode.decider is not None and mode.decider.problems:
                mode.raise_problems()
        finally:
            if wrapped is not None:
                self.model.forward = wrapped
            names.remove()
            mode.clear_cache()
            eager._state.busy = saved
        return mode

    def _trace(self) -> Any:
        if self._graph is None:
            from precision_policy.backends.torch.fx import trace

            args, kwargs = self._calibration()
            self._graph = trace(self.model, args, kwargs or None, route="fx")
        return self._graph

    # ------------------------------------------------------------------ the protocol
    def candidates(self) -> list[Candidate]:
        if self.route == "fx":
            plan = self.plan(frozenset())
            assert plan is not None
            return [Candidate(d.name, d.op_type, d.origin or "float32", d.dtype or "")
                    for d in plan if d.converted and not d.identity]
        if self._full is None:
            self._full = self._capture(self.config)
        assert self._full.record is not None
        out: list[Candidate] = []
        seen: set[str] = set()
        for rec in self._full.record:
            if rec.dtype in _LOW and rec.rule is not Rule.SOURCE and rec.name not in seen:
                seen.add(rec.name)
                out.append(Candidate(rec.name, rec.op_type, "float32", rec.dtype))
        return out

    def skipped(self) -> list[Skipped]:
        names = {c.name for c in self.candidates()}
        out: list[Skipped] = []
        seen: set[str] = set()
        if self.route == "fx":
            plan = self.plan(frozenset())
            assert plan is not None
            for d in plan:
                if d.name in names or d.identity or d.rule is Rule.SOURCE or d.origin not in ("float32", "float64"):
                    continue
                out.append(Skipped(d.name, d.op_type, d.reason))
            return out
        assert self._full is not None and self._full.record is not None
        for rec in self._full.record:
            if rec.name in names or rec.name in seen or rec.rule is Rule.SOURCE:
                continue
            seen.add(rec.name)
            out.append(Skipped(rec.name, rec.op_type, rec.reason))
        return out

    def build(self, keep: frozenset[str]) -> tuple[Any, CastPlan | None]:
        config = config_with_keep(self.config, keep)
        if self.route == "fx":
            from precision_policy.backends.torch.fx import apply

            plan = self.plan(keep)
            assert plan is not None
            return apply(self.model, plan), plan
        from precision_policy.backends.torch.prepare import prepare

        model, _ = prepare(self.model, None, config, loss_scale=None)
        return model, None

    def plan(self, keep: frozenset[str]) -> CastPlan | None:
        hit = self._plans.get(keep)
        if hit is not None:
            return hit
        from precision_policy.api import plan as make_plan

        try:
            graph = self._trace()
        except GraphError as exc:
            if self.route == "fx":
                raise
            log.info("tune: %s cannot be traced, so the eager route has no static plan: %s", type(self.model).__name__, exc)
            return None
        plan = make_plan(graph, config_with_keep(self.config, keep))
        self._plans[keep] = plan
        return plan

    def sensitivity(self) -> Mapping[str, Sensitivity]:
        cands = self.candidates()
        if self._full is None:
            self._full = self._capture(self.config)
        ref = self._capture(config_with_keep(self.config, [c.name for c in cands]))
        out: dict[str, Sensitivity] = {}
        for c in cands:
            low = self._full.outputs.get(c.name)
            base = ref.outputs.get(c.name)
            if low is None or base is None:
                out[c.name] = Sensitivity(c.name, math.nan, 0, measured=False)
                continue
            err, nonfinite = _compare(low, base)
            out[c.name] = Sensitivity(c.name, err, nonfinite, measured=not math.isnan(err))
        return out

    def fingerprint(self) -> str:
        facts = {
            "framework": "torch",
            "model": type(self.model).__qualname__,
            "route": self.route,
            "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in self.model.named_parameters()],
            "modules": [n for n, _ in self.model.named_modules()],
            "config": self.config.summary(),
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_for(model: Any, config: RunConfig, example_inputs: Any = None, *, route: str = "eager",
                **options: Any) -> TorchTuneAdapter | None:
    """A :class:`TorchTuneAdapter` for a ``torch.nn.Module``; None for anything else."""
    if not isinstance(model, torch.nn.Module):
        return None
    if options:
        raise ConfigError(f"tune: unknown option(s) for a torch model: {', '.join(sorted(options))}")
    return TorchTuneAdapter(model, config, example_inputs, route=route)
