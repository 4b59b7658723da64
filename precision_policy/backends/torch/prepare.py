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

import copy
import dataclasses
import functools
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, cast

import torch

from precision_policy.backends.torch.eager import FROM_TORCH, TO_TORCH, ModulePaths, decider_for, precision
from precision_policy.backends.torch.ops import module_op_type
from precision_policy.backends.torch.scaler import LossScaler
from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, PrecisionError
from precision_policy.loss_scale import DynamicLossScale
from precision_policy.modes.decider import problem_message

log = logging.getLogger(__name__)


def check_modules(model: torch.nn.Module, config: RunConfig) -> None:
    """Raise PrecisionError, naming every module path and op type, for modules the mode cannot run.

    keep_dtype/customize_dtypes lines naming no module path of ``model`` raise OverrideError.
    """
    decider = decider_for(config)
    if decider.by_name:
        ModulePaths(model, decider)  # keep_dtype/customize_dtypes names that are no module path: an error now
    for path, module in model.named_modules():
        op = module_op_type(module)
        if op is None:
            continue
        floats = [FROM_TORCH[p.dtype] for p in module.parameters(recurse=False) if p.dtype in FROM_TORCH]
        origin = floats[0] if floats else FROM_TORCH.get(torch.get_default_dtype(), "float32")
        ins = (origin,) * (1 + len(floats))
        decider.decide_node(path or type(module).__name__, op, origin, ins, (True,) + (False,) * len(floats), (origin,))
    if decider.problems:
        raise PrecisionError(problem_message(config.mode.name, decider.library, decider.problems), decider.problems)


_NOT_CHANGED = object()


def _cast_outputs(out: Any, low: set[torch.dtype], to: torch.dtype) -> Any:
    """``out`` with every ``low`` tensor in it cast to ``to``, keeping every container's type.

    Dicts, lists, tuples, namedtuples, dataclasses and dict-dataclasses such as Hugging Face's
    ``ModelOutput`` come back as the same type (attribute and key access both work); an output
    with nothing to cast comes back as the very same object.
    """
    new = _cast(out, low, to)
    return out if new is _NOT_CHANGED else new


def _cast(out: Any, low: set[torch.dtype], to: torch.dtype) -> Any:
    """The cast copy of ``out``, or ``_NOT_CHANGED`` when nothing in it needs a cast."""
    if isinstance(out, torch.Tensor):
        return out.to(to) if out.dtype in low else _NOT_CHANGED
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return _cast_dataclass(out, low, to)
    if isinstance(out, Mapping):
        changed = {k: v for k, v in ((k, _cast(v, low, to)) for k, v in out.items()) if v is not _NOT_CHANGED}
        if not changed:
            return _NOT_CHANGED
        if type(out) is dict:
            return {k: changed.get(k, v) for k, v in out.items()}
        # OrderedDict, defaultdict, other dict subclasses: same type, same extras
        new_map = cast(MutableMapping[Any, Any], copy.copy(out))
        for k, v in changed.items():
            new_map[k] = v
        return new_map
    if isinstance(out, (list, tuple)):
        items = [_cast(v, low, to) for v in out]
        if all(v is _NOT_CHANGED for v in items):
            return _NOT_CHANGED
        values = [o if v is _NOT_CHANGED else v for o, v in zip(out, items)]
        if type(out) in (list, tuple):
            return type(out)(values)
        if isinstance(out, tuple) and hasattr(out, "_make"):
            return out._make(values)  # namedtuple
        if isinstance(out, list):
            new = copy.copy(out)
            new[:] = values
            return new
        try:  # tuple subclasses built from an iterable: torch.return_types, structseqs
            return type(out)(values)
        except TypeError:
            log.debug("prepare: cannot rebuild a %s output; returning a plain tuple", type(out).__qualname__)
            return tuple(values)
    return _NOT_CHANGED


def _cast_dataclass(out: Any, low: set[torch.dtype], to: torch.dtype) -> Any:
    """A dataclass instance (a dict one too, like ModelOutput) with its fields and items cast."""
    fields = {f.name: f for f in dataclasses.fields(out)}
    changed = {}
    for name in fields:
        value = _cast(getattr(out, name, None), low, to)
        if value is not _NOT_CHANGED:
            changed[name] = value
    extra = {}  # keys of a dict-dataclass that are not fields (ModelOutput allows out["x"] = ...)
    if isinstance(out, Mapping):
        for k, v in out.items():
            if k not in fields:
                value = _cast(v, low, to)
                if value is not _NOT_CHANGED:
                    extra[k] = value
    if not changed and not extra:
        return _NOT_CHANGED
    init = {name: changed.get(name, getattr(out, name)) for name, f in fields.items() if f.init}
    try:
        new = type(out)(**init)  # the class's own constructor: ModelOutput fills its keys here
    except Exception:  # noqa: BLE001 - a constructor that validates or refuses: copy and patch instead
        new = copy.copy(out)
        for name in set(fields) & set(changed):
            object.__setattr__(new, name, changed[name])
    for name, f in fields.items():
        if not f.init and name in changed:
            object.__setattr__(new, name, changed[name])
    if isinstance(new, MutableMapping):
        for k in out.keys():
            value = changed.get(k, extra.get(k, _NOT_CHANGED))
            if value is _NOT_CHANGED:
                value = out[k]
            if k not in new or new[k] is not value:
                new[k] = value
    return new


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
    Graph outputs are cast back to float32 when ``config.keep_output_dtype`` (the default),
    inside whatever structure the forward returns: a dict, list, (named)tuple, dataclass or a
    Hugging Face ``ModelOutput`` comes back as the same type, so ``out.loss`` still works.

    The scaler: when ``config.loss_scale`` is not set, float16 modes (every mode whose low dtype
    is float16, emulated or native, except must_keep_origin_dtype, which never lowers) get a
    dynamic :class:`LossScaler` and the other modes get None. An explicit ``loss_scale`` wins:
    ``None`` or ``False`` turns scaling off, anything else is passed to :class:`LossScaler`.

    ``optimizer``, when given, must hold this model's parameters: a parameter of the optimizer
    that the model does not have (an optimizer built for another copy of the model, or before
    the model's parameters were replaced) raises :class:`~precision_policy.errors.ConfigError`
    naming it; trainable model parameters that no param_group holds are logged as a warning
    (several optimizers over one model are legitimate).

    Example (float16 training gets a dynamic loss scaler by default):
        >>> import torch, precision_policy as pp
        >>> from precision_policy.torch import prepare
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu")
        >>> _, scaler = prepare(model, opt, cfg)
        >>> scaler.get_scale()
        65536.0
        >>> prepare(model, opt, cfg, loss_scale=False)[1] is None
        True
    """
    explicit_loss_scale = "loss_scale" in settings or (config is not None and "loss_scale" in config.model_fields_set)
    if config is None:
        config = RunConfig(**settings)
    elif settings:
        config = RunConfig(**{**config.model_dump(exclude_unset=True), **settings})
    if optimizer is not None:
        check_optimizer(model, optimizer)
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
    previous = getattr(model, "_pp_original_forward", None)
    if previous is not None:
        model.forward = previous  # re-preparing replaces the earlier config
    original = model.forward
    origin = torch.get_default_dtype()
    low = {TO_TORCH["float16"], TO_TORCH["bfloat16"]}

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with precision(config, model=model, native_fp16=native_fp16):
            out = original(*args, **kwargs)
        return _cast_outputs(out, low, origin) if config.keep_output_dtype else out

    # Module.__setattr__'s stub admits tensors and modules only; plain attributes are stored as usual
    model._pp_original_forward = original  # type: ignore[assignment]
    model._pp_config = config  # type: ignore[assignment]
    model.forward = forward
    state = config.make_loss_scale() if explicit_loss_scale else _default_loss_scale(config)
    return model, (LossScaler(state, model=model) if state is not None else None)


def _default_loss_scale(config: RunConfig) -> DynamicLossScale | None:
    """Dynamic loss scaling for a float16 mode whose ``loss_scale`` was left unset; None otherwise."""
    mode = config.mode
    if mode.low != "float16" or mode.name == "must_keep_origin_dtype":
        return None
    log.info("prepare: %s runs float16, so gradients are loss-scaled dynamically "
             "(RunConfig(loss_scale=False) turns this off)", mode.name)
    return DynamicLossScale()


def check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Check that ``optimizer`` updates ``model``'s parameters.

    Raises ConfigError naming the first optimizer parameter that is not one of the model's (the
    optimizer was built for another copy of the model, or before the model's parameters were
    replaced, e.g. by ``.to()`` under ``torch.__future__.set_overwrite_module_params_on_conversion``).
    Logs a warning naming the trainable model parameters that no param_group holds.

    Example:
        >>> import copy, torch
        >>> model = torch.nn.Linear(4, 2)
        >>> check_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> other = copy.deepcopy(model)
        >>> check_optimizer(model, torch.optim.SGD(other.parameters(), lr=0.1))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        precision_policy.errors.ConfigError: optimizer param_groups[0]['params'][0] (shape (2, 4), ...
    """
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        raise ConfigError(f"prepare(optimizer=...) needs a torch.optim.Optimizer (with param_groups), "
                          f"got {type(optimizer).__qualname__}")
    named = list(model.named_parameters())
    in_model = {id(p) for _, p in named}
    held: set[int] = set()
    for g, group in enumerate(groups):
        for k, p in enumerate(group["params"]):
            held.add(id(p))
            if id(p) in in_model:
                continue
            shape = tuple(p.shape)
            twin = next((n for n, q in named if tuple(q.shape) == shape and id(q) not in held), None)
            hint = f" (it looks like the model's {twin!r})" if twin is not None else ""
            raise ConfigError(
                f"optimizer param_groups[{g}]['params'][{k}] (shape {shape}, {p.dtype}) is not a parameter of the "
                f"model{hint}: the optimizer was built for another copy of the model, or before the model's "
                f"parameters were replaced (a deepcopy, a reload, .to() creating new parameters). Build the "
                f"optimizer from this model's parameters() and pass it to prepare()")
    missing = [n for n, p in named if p.requires_grad and id(p) not in held]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        log.warning("prepare: %d trainable parameter(s) of the model are in no optimizer param_group and will not "
                    "be updated by this optimizer: %s%s", len(missing), ", ".join(missing[:8]), more)
