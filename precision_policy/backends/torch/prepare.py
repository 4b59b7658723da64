"""``prepare``: the one-liner that puts a training script under a precision mode.

Example:
    >>> import torch, precision_policy as pp
    >>> from precision_policy.torch import prepare
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
    >>> model, scaler = prepare(model, opt, cfg)
    >>> loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0]))
    >>> loss.backward(); opt.step()
    >>> model[0].weight.dtype, scaler is None
    (torch.float32, True)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from precision_policy.backends.torch.eager import FROM_TORCH, TO_TORCH, decider_for, precision
from precision_policy.backends.torch.ops import module_op_type
from precision_policy.backends.torch.scaler import LossScaler
from precision_policy.config import RunConfig
from precision_policy.errors import PrecisionError
from precision_policy.modes.base import _problem_message


def check_modules(model: torch.nn.Module, config: RunConfig) -> None:
    """Raise PrecisionError, naming every module path and op type, for modules the mode cannot run."""
    decider = decider_for(config)
    for path, module in model.named_modules():
        op = module_op_type(module)
        if op is None:
            continue
        floats = [FROM_TORCH[p.dtype] for p in module.parameters(recurse=False) if p.dtype in FROM_TORCH]
        origin = floats[0] if floats else FROM_TORCH.get(torch.get_default_dtype(), "float32")
        ins = (origin,) * (1 + len(floats))
        decider.decide_node(path or type(module).__name__, op, origin, ins, (True,) + (False,) * len(floats), (origin,))
    if decider.problems:
        raise PrecisionError(_problem_message(config.mode.name, decider.library, decider.problems), decider.problems)


def _cast_outputs(out: Any, low: set[torch.dtype], to: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(to) if out.dtype in low else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_cast_outputs(o, low, to) for o in out)
    if isinstance(out, list):
        return [_cast_outputs(o, low, to) for o in out]
    if isinstance(out, dict):
        return {k: _cast_outputs(v, low, to) for k, v in out.items()}
    return out


def prepare(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    config: RunConfig | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
    native_fp16: bool | None = None,
    **settings: Any,
) -> tuple[torch.nn.Module, Any]:
    """Make ``model``'s forward run under ``config``'s precision mode; return it and a loss scaler.

    The model object is kept (its state_dict and parameters are unchanged; parameters stay
    float32 masters); only its ``forward`` is wrapped. Problems the mode cannot honour (e.g.
    must_keep_origin_dtype meeting a Conv2d whose library kernel is float16-only) are raised
    here, naming each module path and op type, not in the middle of training. With
    ``example_inputs`` the model is also traced and planned, catching function-level ops too.
    Graph outputs are cast back to float32 when ``config.keep_output_dtype`` (the default).
    The scaler is None without ``config.loss_scale``.
    """
    if config is None:
        config = RunConfig(**settings)
    elif settings:
        config = RunConfig(**{**config.model_dump(), **settings})
    check_modules(model, config)
    if example_inputs is not None:
        from precision_policy.api import plan as make_plan
        from precision_policy.backends.torch.fx import trace_fx
        from precision_policy.errors import GraphError

        try:
            graph = trace_fx(model, example_inputs).graph
        except GraphError:
            graph = None  # untraceable: the eager route still works, checked op by op
        if graph is not None:
            make_plan(graph, config)
    if getattr(model, "_pp_original_forward", None) is not None:
        model.forward = model._pp_original_forward  # re-preparing replaces the earlier config
    original = model.forward
    origin = torch.get_default_dtype()
    low = {TO_TORCH["float16"], TO_TORCH["bfloat16"]}

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with precision(config, model=model, native_fp16=native_fp16):
            out = original(*args, **kwargs)
        return _cast_outputs(out, low, origin) if config.keep_output_dtype else out

    model._pp_original_forward = original
    model._pp_config = config
    model.forward = forward
    state = config.make_loss_scale()
    return model, (LossScaler(state, model=model) if state is not None else None)
