"""The backend adapter protocol of the accuracy-aware tuner (``precision_policy.tune``).

The search (:mod:`precision_policy.tune.search`) is framework-neutral: it sees a model only
through a :class:`TuneAdapter`, which a backend implements (torch:
``precision_policy.backends.torch.tune.TorchTuneAdapter``; Keras and TF GraphDefs follow the
same protocol). An adapter

- lists the *candidates*: the ops the full conversion puts in low precision, named as a by-name
  ``keep_dtype`` line names them (torch module paths, Keras layer names, GraphDef node names),
  each with its canonical op type (:class:`Candidate`), and the ops that were never candidates
  (unknown op types, black ops, ...: :class:`Skipped`);
- builds the model for a keep set (:meth:`TuneAdapter.build`): the object ``eval_fn`` receives and
  the :class:`~precision_policy.plan.CastPlan` it runs with. Ops named in ``keep`` keep their origin
  dtype, exactly as ``RunConfig(keep_dtype=sorted(keep))`` (merged with the user's own
  ``keep_dtype``) would make them; :func:`config_with_keep` builds that config;
- measures per-op sensitivity on one calibration batch without spending a trial
  (:meth:`TuneAdapter.sensitivity`): each candidate's output under the full plan compared with
  its float32 output (:class:`Sensitivity`);
- fingerprints the model and config (:meth:`TuneAdapter.fingerprint`), so that a resumed search
  refuses a ``trials.json`` recorded for another model or config.

Example (a toy adapter over a made-up model; real ones wrap a framework's):

    >>> from precision_policy.tune.adapter import Candidate, Sensitivity, TuneAdapter
    >>> class Toy(TuneAdapter):
    ...     framework = "toy"
    ...     def baseline(self): return "fp32 model"
    ...     def candidates(self): return [Candidate("fc1", "MatMulV2"), Candidate("fc2", "MatMulV2")]
    ...     def skipped(self): return []
    ...     def build(self, keep): return sorted(keep), None
    ...     def sensitivity(self): return {"fc1": Sensitivity("fc1", 1e-3), "fc2": Sensitivity("fc2", 0.5)}
    ...     def fingerprint(self): return "toy-1"
    >>> sorted(Toy().sensitivity().values(), key=lambda s: s.score, reverse=True)[0].name
    'fc2'
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from precision_policy.config import RunConfig
    from precision_policy.plan import CastPlan

__all__ = ["Candidate", "Sensitivity", "Skipped", "TuneAdapter", "config_with_keep", "keep_lines"]


@dataclass(frozen=True)
class Candidate:
    """An op the full conversion puts in low precision.

    Attributes:
        name: the op's by-name ``keep_dtype`` name (torch module path such as ``layer1.0.conv1``,
            Keras layer name, GraphDef node name).
        op_type: its canonical op type (``Conv2D``, ``MatMulV2``, ...), for type-level fallback and tables.
        origin: its origin dtype (``float32``).
        low: the dtype the full conversion gives it (``bfloat16``/``float16``).
    """

    name: str
    op_type: str
    origin: str = "float32"
    low: str = "bfloat16"


@dataclass(frozen=True)
class Skipped:
    """An op that was never a candidate, and why (``unknown op type``, ``black-list``, ``keep_dtype``, ...)."""

    name: str
    op_type: str
    why: str


@dataclass(frozen=True)
class Sensitivity:
    """How far one op's output under the full plan is from its float32 output on the calibration batch.

    Attributes:
        name: the candidate's name.
        rel_error: ``max|low - fp32| / (max|fp32| + tiny)`` over the op's float outputs (finite values).
        nonfinite: how many output values are inf/NaN under the full plan but finite in float32.
        measured: False when the op did not run on the calibration batch (it then ranks last).
    """

    name: str
    rel_error: float
    nonfinite: int = 0
    measured: bool = True

    @property
    def score(self) -> float:
        """One number to rank by: non-finite values first, then relative error (unmeasured ops: -1)."""
        if not self.measured:
            return -1.0
        err = self.rel_error if math.isfinite(self.rel_error) else 1e30
        return float(self.nonfinite) * 1e6 + err


class TuneAdapter(ABC):
    """What the tuner needs from a backend (see the module docstring). One instance per ``tune`` call.

    Constructed by the backend from ``(model, config, example_inputs, **route options)``; the core
    never imports a framework. Methods may cache: ``candidates``/``skipped``/``sensitivity``/
    ``fingerprint`` are called once or a few times; ``build`` once per trial.
    """

    #: "torch", "keras", "tensorflow": shown in logs and recorded in trials.json.
    framework: str = ""

    def baseline(self) -> Any:
        """The unconverted model, for the baseline evaluation (what ``eval_fn`` receives first).

        Called once, before anything else. An adapter may capture a calibration batch from that
        evaluation (torch records the first forward's inputs when no ``example_inputs`` were given).
        """
        raise NotImplementedError

    def baseline_done(self) -> None:  # noqa: B027 - an optional hook
        """Called after the baseline evaluation (remove capture hooks here)."""

    @abstractmethod
    def candidates(self) -> list[Candidate]:
        """The ops the full conversion (keep set empty) puts in low precision, in graph order."""

    @abstractmethod
    def skipped(self) -> list[Skipped]:
        """Ops that compute in floating point but were never candidates (unknown, black, kept by the user)."""

    @abstractmethod
    def build(self, keep: frozenset[str]) -> tuple[Any, CastPlan | None]:
        """The model with the ops named in ``keep`` in their origin dtype, and its CastPlan.

        The first item is what ``eval_fn`` receives and what ``TuneResult.model`` holds for the
        winner: torch the prepared ``nn.Module`` (eager route) or the applied ``GraphModule`` (FX
        route); Keras the model with its policies set; TF a ``tf.Graph``/GraphDef or callable. The
        plan may be None where a route has no static plan (it is then re-derived by the core
        where it is needed, e.g. for ``plan.json``, by :meth:`plan`).
        """

    def plan(self, keep: frozenset[str]) -> CastPlan | None:
        """The CastPlan for ``keep`` (default: the plan :meth:`build` returns)."""
        return self.build(keep)[1]

    @abstractmethod
    def sensitivity(self) -> Mapping[str, Sensitivity]:
        """Sensitivity of every candidate on the calibration batch (``example_inputs``); no trial spent.

        Candidates that are absent rank last. An adapter without calibration data returns {}.
        """

    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable text identifying model structure and config (for resume validation)."""

    def describe(self) -> str:
        """A few words for logs: the framework and route."""
        return self.framework


def keep_lines(keep_dtype: str | Path | Iterable[str] | None) -> list[str]:
    """The ``keep_dtype`` entries of a config value (a file or a list) as lines: names and ``OpType::X``.

    Example:
        >>> keep_lines(["fc", "OpType::Relu"])
        ['fc', 'OpType::Relu']
        >>> keep_lines(None)
        []
    """
    if keep_dtype is None:
        return []
    if isinstance(keep_dtype, (str, Path)):
        from precision_policy.opinfo.overrides import load_keep_dtype

        names, types = load_keep_dtype(keep_dtype)
        return list(names) + [f"OpType::{t}" for t in types]
    return [str(x) for x in keep_dtype]


def config_with_keep(config: RunConfig, keep: Iterable[str]) -> RunConfig:
    """``config`` with the names in ``keep`` added to its ``keep_dtype`` (a list; the user's own entries first).

    Example:
        >>> from precision_policy import RunConfig
        >>> cfg = config_with_keep(RunConfig(precision_mode="allow_mix_precision_bf16"), {"fc2", "fc1"})
        >>> list(cfg.keep_dtype)
        ['fc1', 'fc2']
    """
    base = keep_lines(config.keep_dtype)
    extra = sorted(set(keep) - set(base))
    settings = config.model_dump(exclude_unset=True)
    settings["keep_dtype"] = (base + extra) or None
    from precision_policy.config import RunConfig as _RunConfig

    return _RunConfig(**settings)
