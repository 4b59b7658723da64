"""Overflow localization and value-range statistics for PyTorch models.

:func:`find_overflow` runs a float32 copy and a planned copy of the model side by side on the
same inputs (same RNG), records every op's output in execution order (forward, then, with a
``loss_fn``, every autograd node of the backward) and names the *first* op whose values are
non-finite under the plan while float32 kept them finite. :func:`range_stats` measures each op's
output range over batches against the mode's low dtype and suggests ``keep_dtype`` lines.

Op names are the eager route's module-path names (what ``keep_dtype`` lines take), see
:mod:`precision_policy.backends.torch.audit`.

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.torch import find_overflow, range_stats
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(1e5)
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu")
    >>> report = find_overflow(model, (torch.ones(2, 4),), cfg)
    >>> report.name, report.phase, report.reference.max_abs > 65504, report.output.nonfinite
    ('0', 'forward', True, 8)
    >>> range_stats(model, [(torch.full((2, 4), 2.0),)], cfg).keep_dtype_lines()
    '0\\n'
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from precision_policy.audit import OverflowReport, RangeResult, RangeRow, TensorStats
from precision_policy.backends.torch.audit import OpNames, Unit, _call, float_tensors, recording, unprepared
from precision_policy.config import RunConfig
from precision_policy.rules import Rule

log = logging.getLogger(__name__)


def _low(config: RunConfig) -> str:
    low = config.mode.low
    return low if low in ("float16", "bfloat16") else "float16"


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    with unprepared(model):
        return copy.deepcopy(model)


@contextlib.contextmanager
def _same_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _Run:
    """One run (float32 or planned): its forward units and its backward events in order."""

    def __init__(self) -> None:
        self.units: list[Unit] = []
        self.backward: list[tuple[Unit, str, TensorStats]] = []  # (unit, autograd node, stats of the grads it produced)

    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}


def _hook(run: _Run, unit: Unit, node: Any, dtype: str) -> Callable[..., None]:
    def fn(grad_inputs: Any, grad_outputs: Any) -> None:
        s = TensorStats(dtype)
        with torch.no_grad():
            for g in grad_inputs:
                if isinstance(g, torch.Tensor) and g.is_floating_point():
                    s.add(g.detach().float().cpu().numpy())
        run.backward.append((unit, node.name(), s))
    return fn


def _run(model: torch.nn.Module, inputs: Any, config: RunConfig | None, dtype: str, loss_fn: Callable[[Any], Any] | None,
         scale: float, seed: int) -> _Run:
    from precision_policy.backends.torch.prepare import _cast_outputs

    run = _Run()
    grads = loss_fn is not None
    names = OpNames(model)
    with _same_rng(seed), contextlib.ExitStack() as stack:
        if not grads:
            stack.enter_context(torch.no_grad())
        with recording(model, config, stats_dtype=dtype, grads=grads, aten=False, names=names) as tape:
            out = _call(model, inputs)
        run.units = tape.units
        if config is not None and config.keep_output_dtype:
            low = {torch.float16, torch.bfloat16}
            cast = _cast_outputs(out, low, torch.get_default_dtype())
            if grads and cast is not out:  # the cast back to float32: its backward is the first float16 gradient
                unit = Unit(len(run.units), "(model output cast to float32)", "Tensor.to", "Cast", "")
                unit.grad_nodes = [t.grad_fn for t in float_tensors(cast) if t.grad_fn is not None]
                run.units = [*run.units, unit]
            out = cast
        if grads:
            assert loss_fn is not None
            handles = [node.register_hook(_hook(run, u, node, dtype)) for u in run.units for node in u.grad_nodes]
            try:
                loss = loss_fn(out)
                (loss.float() * scale).backward()
            finally:
                for h in handles:
                    h.remove()
    return run


def find_overflow(model: torch.nn.Module, inputs: Any, config: RunConfig, loss_fn: Callable[[Any], Any] | None = None, *,
                  scale: float = 1.0, seed: int = 0, context: int = 3) -> OverflowReport:
    """The first op, forward then backward, whose values are non-finite under ``config`` but finite in float32.

    ``inputs``: positional arguments (a tuple), keyword arguments (a dict) or one tensor.
    With ``loss_fn`` (called on the model's output, as in training: outputs back in float32),
    ``(loss_fn(output) * scale).backward()`` runs too (``scale``: the loss scale in use) and the
    backward's autograd nodes are checked, in the order they run, after the forward's ops. The
    model is not touched: both runs use deep copies, with the same RNG seed. Returns an
    :class:`~precision_policy.audit.OverflowReport` (``found`` False when there is no such op).
    """
    dtype = _low(config)
    ref = _run(_copy(model), inputs, None, dtype, loss_fn, scale, seed)
    low = _run(_copy(model), inputs, config, dtype, loss_fn, scale, seed)
    ref_units = ref.by_name()
    both_bad = []
    for k, unit in enumerate(low.units):
        s = unit.out_stats
        if s is None or s.finite:
            continue
        twin = ref_units.get(unit.name)
        if twin is None or twin.out_stats is None or not twin.out_stats.finite:
            both_bad.append(unit.name)
            continue
        return OverflowReport(True, "forward", unit.name, unit.op_type, k, unit.planned, dtype, unit.in_max_abs, s,
                              twin.out_stats, context=[u.name for u in low.units[max(0, k - context):k]])
    ref_bad: dict[str, bool] = {}
    ref_grads: dict[str, TensorStats] = {}
    for unit, _, s in ref.backward:
        ref_bad[unit.name] = ref_bad.get(unit.name, False) or not s.finite
        ref_grads.setdefault(unit.name, TensorStats(dtype)).merge(s)
    for k, (unit, node, s) in enumerate(low.backward):
        if s.finite:
            continue
        if unit.name not in ref_grads or ref_bad.get(unit.name, False):
            both_bad.append(unit.name)
            continue
        before = []
        for u, _, _ in reversed(low.backward[:k]):
            if u.name != unit.name and u.name not in before:
                before.append(u.name)
            if len(before) == context:
                break
        return OverflowReport(True, "backward", unit.name, unit.op_type, k, unit.planned, dtype, None, s,
                              ref_grads[unit.name], grad_fn=node, context=before[::-1])
    if both_bad:
        reason = (f"non-finite values in float32 too (first: {both_bad[0]}): the model itself overflows, "
                  f"not the precision plan")
    else:
        reason = "every op's values stayed finite under the plan" + (" (forward and backward)" if loss_fn else " (forward)")
    return OverflowReport(False, dtype=dtype, reason=reason)


def _batches(batches: Any) -> Iterable[Any]:
    if isinstance(batches, (torch.Tensor, dict)):
        return [batches]
    return batches


def range_stats(model: torch.nn.Module, batches: Any, config: RunConfig) -> RangeResult:
    """Every op's output range in float32 over ``batches`` against ``config``'s low dtype.

    ``batches``: an iterable of model inputs (each a tuple of arguments, a dict of keyword
    arguments or one tensor). Values come from a float32 copy of the model (what the op *would*
    compute); the planned dtype of each op from one planned run on the first batch. Ops the plan
    lowers whose values exceed the low dtype's range get a ``keep_dtype: NAME`` suggestion
    (:meth:`~precision_policy.audit.RangeResult.keep_dtype_lines` gives the file).
    """
    dtype = _low(config)
    items = list(_batches(batches))
    if not items:
        raise ValueError("range_stats needs at least one batch")
    planned_model, ref_model = _copy(model), _copy(model)
    with torch.no_grad(), recording(planned_model, config, aten=False) as tape:
        _call(planned_model, items[0])
    planned = {u.name: u.planned for u in tape.units}
    follows = {u.name for u in tape.units if u.record is not None and u.record.rule is Rule.GRAY_FOLLOWS}
    rows: dict[str, RangeRow] = {}
    for batch in items:
        with torch.no_grad(), recording(ref_model, None, stats_dtype=dtype, aten=False) as tape:
            _call(ref_model, batch)
        for u in tape.units:
            if u.out_stats is None or not u.outputs:
                continue
            row = rows.get(u.name)
            if row is None:
                rows[u.name] = RangeRow(u.name, u.op_type, planned.get(u.name), dtype, u.out_stats, u.in_max_abs,
                                        u.name in follows)
            else:
                row.stats.merge(u.out_stats)
                if u.in_max_abs is not None:
                    row.input_max_abs = max(row.input_max_abs or 0.0, u.in_max_abs)
    return RangeResult(list(rows.values()), dtype, len(items), f"torch {torch.__version__}, {type(model).__name__}")


__all__ = ["find_overflow", "range_stats"]
