"""Intel Neural Compressor 2.x compatibility: run an INC ``mix_precision`` script unchanged.

Change the imports only::

    # from neural_compressor import mix_precision
    # from neural_compressor.config import MixedPrecisionConfig, AccuracyCriterion, TuningCriterion
    from precision_policy.inc import mix_precision, MixedPrecisionConfig, AccuracyCriterion, TuningCriterion

    conf = MixedPrecisionConfig(precisions="bf16",
                                accuracy_criterion=AccuracyCriterion(tolerable_loss=0.01),
                                tuning_criterion=TuningCriterion(max_trials=20))
    converted_model = mix_precision.fit(model, config=conf, eval_func=evaluate)
    converted_model.save("./path/to/save/")

The mapping (see README, "INC compatibility"): ``precisions="bf16"`` -> ``allow_mix_precision_bf16``,
``"fp16"`` -> ``allow_mix_precision`` (library ``torch_autocast_cpu`` for torch models, ``tf_amp_bf16``/
``tf_amp_fp16`` otherwise); ``op_type_dict``/``op_name_dict`` entries whose dtype is fp32 only ->
``keep_dtype`` (types as ``OpType::X`` or, for torch module class names such as ``Linear``, the
paths of those modules; names as given); ``accuracy_criterion`` -> ``tolerable_loss``/``relative``/
``higher_is_better``; ``tuning_criterion`` -> ``max_trials``/``timeout`` (INC's ``timeout=0``: none).
With ``eval_func`` (or ``eval_dataloader`` + ``eval_metric``) the search is :func:`precision_policy.tune`;
without, the model is converted in full, as INC does. Unlike INC, nothing calls ``sys.exit``: bad
input raises :class:`~precision_policy.errors.ConfigError`, and a search that cannot reach the
tolerance raises :class:`~precision_policy.errors.TuneError`.

Example:
    >>> from precision_policy.inc import MixedPrecisionConfig, AccuracyCriterion
    >>> conf = MixedPrecisionConfig(precisions="bf16", accuracy_criterion=AccuracyCriterion(criterion="absolute"))
    >>> conf.run_config().mode.name, conf.accuracy_criterion.tolerable_loss
    ('allow_mix_precision_bf16', 0.01)
    >>> MixedPrecisionConfig(op_type_dict={"Lineer": {"activation": {"dtype": ["fp32"]}}}).keep_entries()
    Traceback (most recent call last):
    ...
    precision_policy.errors.ConfigError: MixedPrecisionConfig.op_type_dict: unknown op type 'Lineer'; did you mean 'Linear'...?...
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError
from precision_policy.fileio import atomic_write
from precision_policy.opinfo.library import shipped_root

log = logging.getLogger(__name__)

__all__ = ["AccuracyCriterion", "MixedPrecisionConfig", "MixedPrecisionModel", "TuningCriterion", "mix_precision"]

_PRECISIONS = {"bf16": "allow_mix_precision_bf16", "fp16": "allow_mix_precision"}
_LOW_NAMES = {"bf16", "bfloat16", "fp16", "float16", "half", "int8"}
_ORIGIN_NAMES = {"fp32", "float32", "float", "fp64", "float64"}


class _INCModel(BaseModel):
    """Pydantic base: INC's keyword names, unknown keywords are ConfigErrors naming the closest."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ())) or type(self).__name__
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                close = difflib.get_close_matches(where, list(type(self).model_fields), n=1, cutoff=0.6)
                msg = (f"unknown setting; {'did you mean ' + repr(close[0]) + '? ' if close else ''}"
                       f"valid settings: {', '.join(type(self).model_fields)}")
            raise ConfigError(f"{type(self).__name__}.{where}: {msg}") from None


class AccuracyCriterion(_INCModel):
    """INC's accuracy criterion: how much worse than the fp32 baseline the converted model may be.

    Example:
        >>> AccuracyCriterion(tolerable_loss=0.02, criterion="absolute").tolerable_loss
        0.02
    """

    higher_is_better: bool = True
    criterion: Literal["relative", "absolute"] = "relative"
    tolerable_loss: float = Field(default=0.01, ge=0)


class TuningCriterion(_INCModel):
    """INC's tuning criterion. ``timeout=0`` means no timeout (INC's convention); ``strategy`` is accepted
    for compatibility (the search is always precision_policy's sensitivity-ranked bisection)."""

    strategy: str = "basic"
    strategy_kwargs: dict[str, Any] | None = None
    timeout: float = Field(default=0, ge=0)
    max_trials: int = Field(default=100, ge=1)
    objective: str | list[str] = "performance"


class MixedPrecisionConfig(_INCModel):
    """INC 2.x ``MixedPrecisionConfig``, mapped onto :class:`~precision_policy.config.RunConfig`.

    Extra (not in INC): ``op_info`` to choose the op-info library, ``route`` (torch: ``eager``/``fx``).
    """

    device: str = "cpu"
    backend: str = "default"
    precisions: str | list[str] = "bf16"
    model_name: str = ""
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    quant_level: str | int = "auto"
    tuning_criterion: TuningCriterion = Field(default_factory=TuningCriterion)
    accuracy_criterion: AccuracyCriterion = Field(default_factory=AccuracyCriterion)
    excluded_precisions: list[str] = Field(default_factory=list)
    op_name_dict: dict[str, Any] | None = None
    op_type_dict: dict[str, Any] | None = None
    example_inputs: Any = None
    op_info: str | Path | None = None
    route: Literal["eager", "fx"] = "eager"

    @field_validator("precisions", "excluded_precisions", mode="before")
    @classmethod
    def _precision_names(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else list(value or [])
        for p in items:
            if p not in _PRECISIONS:
                raise ValueError(f"unknown precision {p!r}; valid: {', '.join(_PRECISIONS)}")
        return value

    @field_validator("op_type_dict", "op_name_dict")
    @classmethod
    def _entries(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, spec in (value or {}).items():
            _wants_origin(key, spec)  # a malformed entry fails here
        return value

    # ------------------------------------------------------------------ mapping
    def low(self) -> str:
        """The low precision left after ``excluded_precisions`` ("bf16" or "fp16")."""
        wanted = [self.precisions] if isinstance(self.precisions, str) else list(self.precisions)
        left = [p for p in wanted if p not in self.excluded_precisions]
        if not left:
            raise ConfigError(f"MixedPrecisionConfig: precisions {wanted} are all in excluded_precisions "
                              f"{self.excluded_precisions}; nothing to convert to")
        return "bf16" if "bf16" in left else left[0]

    def run_config(self, framework: str = "torch", keep_dtype: Iterable[str] = ()) -> RunConfig:
        """The RunConfig this configuration means for a model of ``framework`` ("torch", "keras", "tensorflow")."""
        low = self.low()
        op_info = self.op_info
        if op_info is None:
            op_info = "torch_autocast_cpu" if framework == "torch" else ("tf_amp_bf16" if low == "bf16" else "tf_amp_fp16")
        keep = list(keep_dtype)
        return RunConfig(precision_mode=_PRECISIONS[low], op_info=op_info, keep_dtype=keep or None)

    def keep_entries(self, model: Any = None) -> list[str]:
        """``keep_dtype`` entries from ``op_type_dict`` and ``op_name_dict`` (fp32-only entries).

        Op types may be canonical (``MatMulV2``, ``Conv2D``: become ``OpType::X``) or torch module class
        names (``Linear``, ``Conv2d``: become the paths of the model's modules of that class) or Keras
        layer class names (``Dense``: ``OpType::`` of the canonical type). Unknown types are errors naming the closest.
        """
        out: list[str] = []
        modules = _torch_modules(model)
        lib = self.run_config("torch" if modules is not None else "tensorflow").library()
        framework_names = _framework_type_names()
        for key, spec in (self.op_type_dict or {}).items():
            if not _wants_origin(key, spec):
                continue
            if modules is not None and any(cls == key for _, cls in modules):
                out += [path for path, cls in modules if cls == key and path]
            elif key in lib:
                out.append(f"OpType::{key}")
            elif key in framework_names:
                canonical = framework_names[key]
                if modules is not None and key in _torch_class_names():
                    log.info("op_type_dict: the model has no %s module; nothing to keep for it", key)
                else:
                    out.append(f"OpType::{canonical}")
            else:
                valid = sorted(set(lib) | set(framework_names)
                               | {cls for _, cls in modules or []})
                close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
                raise ConfigError(f"MixedPrecisionConfig.op_type_dict: unknown op type {key!r}; {hint}keys are torch "
                                  f"module classes (Linear, Conv2d), Keras layers (Dense) or the library's op types "
                                  f"(MatMulV2, Conv2D)")
        for key, spec in (self.op_name_dict or {}).items():
            if not _wants_origin(key, spec):
                continue
            paths = [p for p, _ in modules or []]
            if modules is not None and key not in paths and _is_pattern(key):
                matched = [p for p in paths if p and re.fullmatch(key, p)]
                if matched:
                    out += matched
                    continue
            out.append(key)  # checked against the model by the route (an OverrideError naming the closest)
        return list(dict.fromkeys(out))


def _is_pattern(key: str) -> bool:
    return any(ch in key for ch in "*+?[]()|\\^$")


def _wants_origin(key: str, spec: Any) -> bool:
    """Whether an INC op dict entry asks for fp32 only: ``{"activation": {"dtype": ["fp32"]}, "weight": ...}``."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"entry {key!r} must be a dict like {{'activation': {{'dtype': ['fp32']}}}}, not {spec!r}")
    wanted: set[str] = set()
    for part, body in spec.items():
        if part not in ("activation", "weight"):
            raise ValueError(f"entry {key!r}: unknown key {part!r}; valid keys: activation, weight")
        if not isinstance(body, Mapping) or "dtype" not in body:
            raise ValueError(f"entry {key!r}.{part} must be a dict with a 'dtype' list, e.g. {{'dtype': ['fp32']}}")
        dt = body["dtype"]
        items = [dt] if isinstance(dt, str) else list(dt)
        for d in items:
            if d not in _ORIGIN_NAMES | _LOW_NAMES:
                raise ValueError(f"entry {key!r}.{part}.dtype: unknown dtype {d!r}; valid: fp32, bf16, fp16")
        wanted.update(items)
    return bool(wanted) and wanted <= _ORIGIN_NAMES


def _torch_modules(model: Any) -> list[tuple[str, str]] | None:
    """(path, class name) of every module of a torch model; None for other models (torch is never imported here)."""
    named = getattr(model, "named_modules", None)
    if named is None or not type(model).__module__.startswith("torch") and not hasattr(model, "_parameters"):
        return None
    return [(path, type(m).__name__) for path, m in named()]


def _torch_class_names() -> set[str]:
    data = json.loads((shipped_root() / "aliases" / "torch.json").read_text(encoding="utf-8"))
    return {k.rpartition(".")[2] for k in data.get("modules", {})}


def _framework_type_names() -> dict[str, str]:
    """Framework class names (torch.nn modules, Keras layers) -> canonical op types."""
    out: dict[str, str] = {}
    root = shipped_root() / "aliases"
    torch_tab = json.loads((root / "torch.json").read_text(encoding="utf-8")).get("modules", {})
    keras_tab = json.loads((root / "keras.json").read_text(encoding="utf-8")).get("layers", {})
    for table in (keras_tab, {k.rpartition(".")[2]: v for k, v in torch_tab.items()}):
        for k, v in table.items():
            if isinstance(v, str):
                out[k] = v
    return out


class MixedPrecisionModel:
    """What :meth:`mix_precision.fit <_MixPrecision.fit>` returns: the converted model, INC-style.

    ``.model`` is the converted model (torch: the prepared module), ``.result`` the
    :class:`~precision_policy.tune.TuneResult` (None when no evaluation was given); calling it or
    reading its attributes reaches the model. ``.save(path)`` writes the tune files (keep_dtype.txt,
    plan.json, trials.json) and, for torch, ``best_model.pt`` (the state dict, as INC does).
    """

    def __init__(self, model: Any, result: Any, config: RunConfig) -> None:
        self.model = model
        self.result = result
        self.config = config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "result", "config"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def save(self, path: str | Path) -> Path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if self.result is not None:
            self.result.save(folder)
        else:
            from precision_policy.tune.adapter import keep_lines

            keep = keep_lines(self.config.keep_dtype)
            atomic_write(folder / "keep_dtype.txt", "# precision_policy.inc: converted in full (no evaluation)\n"
                         + "".join(f"{n}\n" for n in keep))
        state = getattr(self.model, "state_dict", None)
        if callable(state) and _torch_modules(self.model) is not None:
            import torch

            buf = io.BytesIO()
            torch.save(state(), buf)
            atomic_write(folder / "best_model.pt", buf.getvalue())
        return folder


def _framework(model: Any) -> str:
    if _torch_modules(model) is not None:
        return "torch"
    mod = type(model).__module__
    return "keras" if "keras" in mod else "tensorflow"


def _dataloader_eval(dataloader: Iterable[Any], metric: Any) -> Callable[[Any], float]:
    """eval_fn from INC's eval_dataloader + eval_metric (an object with update/result(/reset), or a callable)."""
    def evaluate(model: Any) -> float:
        if hasattr(metric, "reset"):
            metric.reset()
        preds: list[Any] = []
        labels: list[Any] = []
        for batch in dataloader:
            inputs, label = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
            out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            if hasattr(metric, "update"):
                metric.update(out, label)
            else:
                preds.append(out)
                labels.append(label)
        if hasattr(metric, "result"):
            return metric.result()
        return metric(preds, labels)
    return evaluate


class _MixPrecision:
    """``mix_precision`` namespace: ``mix_precision.fit(model, conf, eval_func=...)``."""

    @staticmethod
    def fit(model: Any, conf: MixedPrecisionConfig | None = None, eval_func: Callable[[Any], Any] | None = None,
            eval_dataloader: Iterable[Any] | None = None, eval_metric: Any = None, *,
            config: MixedPrecisionConfig | None = None, **kwargs: Any) -> MixedPrecisionModel:
        """Convert ``model`` as INC 2.x's ``mix_precision.fit`` does, with precision_policy's tuner.

        ``conf`` (or ``config=``) is a :class:`MixedPrecisionConfig`; ``eval_func(model) -> number``, or
        ``eval_dataloader`` + ``eval_metric``, turns on accuracy-aware tuning. Returns a
        :class:`MixedPrecisionModel`.
        """
        if conf is not None and config is not None:
            raise ConfigError("mix_precision.fit: give the config once (conf=... or config=...)")
        conf = conf if conf is not None else config
        if conf is None:
            conf = MixedPrecisionConfig()
        if not isinstance(conf, MixedPrecisionConfig):
            raise ConfigError(f"mix_precision.fit: config must be a MixedPrecisionConfig, not {type(conf).__name__}")
        if kwargs:
            raise ConfigError(f"mix_precision.fit: unknown argument(s) {', '.join(sorted(kwargs))}; valid: model, conf, "
                              "eval_func, eval_dataloader, eval_metric")
        framework = _framework(model)
        if conf.inputs or conf.outputs:
            if framework == "torch":
                log.warning("MixedPrecisionConfig.inputs/outputs name TensorFlow tensors; ignored for a torch model")
        keep = conf.keep_entries(model)
        run_config = conf.run_config(framework, keep)
        if eval_func is None and eval_dataloader is not None:
            if eval_metric is None:
                raise ConfigError("mix_precision.fit: eval_dataloader needs eval_metric (or give eval_func)")
            eval_func = _dataloader_eval(eval_dataloader, eval_metric)
        if eval_func is None:
            from precision_policy.tune.search import adapter_for

            adapter = adapter_for(model, run_config, conf.example_inputs, route=conf.route)
            converted, _ = adapter.build(frozenset())
            log.info("mix_precision.fit: no eval_func: converted in full under %s", run_config.mode.name)
            return MixedPrecisionModel(converted, None, run_config)
        from precision_policy.tune.search import tune

        acc = conf.accuracy_criterion
        tc = conf.tuning_criterion
        result = tune(model, run_config, eval_func, tolerable_loss=acc.tolerable_loss, relative=acc.criterion == "relative",
                      higher_is_better=acc.higher_is_better, max_trials=tc.max_trials, timeout=tc.timeout or None,
                      example_inputs=conf.example_inputs, route=conf.route)
        return MixedPrecisionModel(result.model, result, run_config)


mix_precision = _MixPrecision()
