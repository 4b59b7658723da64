"""Accuracy-aware tuning: convert a model, and fall ops back to their origin dtype until its metric is tolerable.

The search (each numbered step a *trial*: one model built and evaluated; the baseline is not a trial):

0. evaluate the origin-dtype model (the baseline) and fix the target: ``baseline - tolerable_loss*|baseline|``
   (``relative=True``) or ``baseline - tolerable_loss`` (absolute); ``+`` when lower is better;
1. trial 1: the full conversion; it passes: done (``1 trial``);
2. rank the candidates by sensitivity on one calibration batch (no trial spent);
3. fall back by op type first only where that is cheaper: when the clearly sensitive ops (score at
   least half the top one) are exactly all the candidates of one op type, one trial keeping that type
   replaces the bisection steps that would find them;
4. bisection over the ranked list: keep the top ``k`` ops in the origin dtype, ``k`` halving the
   interval between the largest failing and the smallest passing ``k``; ``ceil(log2(N))`` trials for
   ``N`` candidates. When even every candidate kept has not been tried, it is (``all-origin``);
5. put back ops the bisection took out needlessly: each kept op but the one the bisection proved
   needed, least sensitive first, is tried in low precision again;
6. ``max_trials`` and ``timeout`` end the search at a trial boundary with the best passing model so
   far, or a :class:`~precision_policy.errors.TuneError` naming the best trial when none passed.

With a perfect ranking the search takes ``1 + ceil(log2(N))`` trials. A winner that converts nothing
is reported as "0 of N ops converted" with a WARNING, never as a plain success.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from precision_policy.config import RunConfig
from precision_policy.errors import ConfigError, TuneError
from precision_policy.tune.adapter import Candidate, Sensitivity, TuneAdapter
from precision_policy.tune.result import Trial, TuneResult, load_trials, replay_table

log = logging.getLogger("precision_policy.tune")

__all__ = ["adapter_for", "tune"]

#: Backend modules asked, in order, for an adapter: each has ``adapter_for(model, config, example_inputs,
#: **options) -> TuneAdapter | None`` and is imported only when its framework is already imported.
ADAPTER_MODULES: list[tuple[str, str]] = [
    ("torch", "precision_policy.backends.torch.tune"),
    ("keras", "precision_policy.backends.tensorflow.tune"),
    ("tensorflow", "precision_policy.backends.tensorflow.tune"),
]


def adapter_for(model: Any, config: RunConfig, example_inputs: Any = None, **options: Any) -> TuneAdapter:
    """The backend adapter for ``model`` (a :class:`TuneAdapter` is returned as it is).

    Only frameworks the caller already imported are considered, so this never imports torch or TF itself.
    """
    if isinstance(model, TuneAdapter):
        return model
    path_like = isinstance(model, (str, os.PathLike))  # a SavedModel / .pb / .keras path: TF reads it
    tried: set[str] = set()
    for framework, module_name in ADAPTER_MODULES:
        if module_name in tried:
            continue
        if framework not in sys.modules and not (
                path_like and framework == "tensorflow" and importlib.util.find_spec("tensorflow") is not None):
            continue
        tried.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        make = getattr(module, "adapter_for", None)
        adapter = make(model, config, example_inputs, **options) if make is not None else None
        if adapter is not None:
            return adapter
    raise ConfigError(f"tune: no backend can tune a {type(model).__module__}.{type(model).__qualname__}; "
                      "supported: torch.nn.Module (and Keras models / TF graphs where that backend is installed)")


def _metric(value: Any, what: str) -> float:
    """eval_fn's return value as a float; anything but a real number is a TuneError."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TuneError(f"eval_fn returned {value!r} ({type(value).__name__}) for {what}; it must return a number "
                        "(the metric, e.g. accuracy)")
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays, one-element tensors
    size = getattr(value, "size", None)
    numel = getattr(value, "numel", None)
    if callable(item):
        n = numel() if callable(numel) else (size if isinstance(size, int) else 1)
        if n == 1:
            out = item()
            if isinstance(out, numbers.Real) and not isinstance(out, bool):
                return float(out)
    raise TuneError(f"eval_fn returned {value!r} ({type(value).__name__}) for {what}; it must return a number "
                    "(the metric, e.g. accuracy)")


class _Stop(Exception):
    """The trial budget (max_trials) or the timeout is spent."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


class _Search:
    def __init__(self, adapter: TuneAdapter, eval_fn: Callable[[Any], Any], *, tolerable_loss: float, relative: bool,
                 higher_is_better: bool, max_trials: int, timeout: float | None,
                 replay: Mapping[frozenset[str], Trial]) -> None:
        self.adapter = adapter
        self.eval_fn = eval_fn
        self.tolerable_loss = tolerable_loss
        self.relative = relative
        self.higher = higher_is_better
        self.max_trials = max_trials
        self.timeout = timeout
        self.replay = dict(replay)
        self.trials: list[Trial] = []
        self.memo: dict[frozenset[str], Trial] = {}
        self.start = time.monotonic()
        self.baseline = math.nan
        self.target = math.nan
        self.candidates: list[Candidate] = []
        self.bar: Any = None

    # ------------------------------------------------------------------ metrics
    def set_target(self, baseline: float) -> None:
        self.baseline = baseline
        room = self.tolerable_loss * (abs(baseline) if self.relative else 1.0)
        self.target = baseline - room if self.higher else baseline + room

    def passes(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        slack = 1e-12 * max(1.0, abs(self.target))
        return metric >= self.target - slack if self.higher else metric <= self.target + slack

    def better(self, a: float, b: float) -> bool:
        if math.isnan(b):
            return not math.isnan(a)
        return (a > b) if self.higher else (a < b)

    def best_passing(self) -> Trial | None:
        best: Trial | None = None
        for t in self.trials:
            if not t.passed:
                continue
            if best is None or t.low > best.low or (t.low == best.low and self.better(t.metric, best.metric)):
                best = t
        return best

    def best_metric(self) -> Trial | None:
        best: Trial | None = None
        for t in self.trials:
            if best is None or self.better(t.metric, best.metric):
                best = t
        return best

    # ------------------------------------------------------------------ trials
    def trial(self, keep: frozenset[str], step: str) -> Trial:
        hit = self.memo.get(keep)
        if hit is not None:
            return hit
        if len(self.trials) >= self.max_trials:
            raise _Stop("max_trials")
        if self.timeout is not None and time.monotonic() - self.start >= self.timeout:
            raise _Stop("timeout")
        number = len(self.trials) + 1
        low = len(self.candidates) - len(keep)
        recorded = self.replay.get(keep)
        if recorded is not None:
            metric, seconds, replayed = recorded.metric, recorded.seconds, True
        else:
            t0 = time.monotonic()
            obj, _ = self.adapter.build(keep)
            metric = _metric(self.eval_fn(obj), f"trial {number}")
            seconds, replayed = time.monotonic() - t0, False
        t = Trial(number, tuple(sorted(keep)), metric, self.passes(metric), seconds, low, step, replayed)
        self.trials.append(t)
        self.memo[keep] = t
        self.log_row(t)
        if self.bar is not None:
            self.bar.update(1)
            best = self.best_passing()
            self.bar.set_postfix_str(f"best {best.metric:.4g} ({best.low} low)" if best else "none passed")
        return t

    def log_row(self, t: Trial) -> None:
        best = self.best_passing()
        best_text = f"{best.metric:.6g} (#{best.number})" if best is not None else "-"
        n = len(self.candidates)
        log.info("%-9s | %3d/%-3d low | %-10.6g | %-10.6g | %-6s | %-16s | %7.2fs%s", f"{t.number}/{self.max_trials}",
                 t.low, n, t.metric, self.target, "passed" if t.passed else "failed", best_text, t.seconds,
                 f"  ({t.step}{', replayed' if t.replayed else ''})")

    # ------------------------------------------------------------------ the search
    def ranked(self, sens: Mapping[str, Sensitivity]) -> list[str]:
        order = {c.name: i for i, c in enumerate(self.candidates)}
        unmeasured = Sensitivity("", math.nan, measured=False)
        # most sensitive first; ties (and unmeasured ops) later graph position first
        return sorted(order, key=lambda n: (-sens.get(n, unmeasured).score, -order[n]))

    def run(self, sens_fn: Callable[[], Mapping[str, Sensitivity]]) -> tuple[dict[str, Sensitivity], str]:
        """The search after the baseline; returns the sensitivity figures and why it stopped early ("" if not)."""
        sens: dict[str, Sensitivity] = {}
        try:
            if not self.candidates:
                return sens, ""
            if self.trial(frozenset(), "full").passed:
                return sens, ""
            sens = dict(sens_fn())
            ranked = self.ranked(sens)
            n = len(ranked)
            lo, hi = 0, n  # keeping ranked[:lo] failed; ranked[:hi] passes (hi == n: assumed, not tried)
            cluster = self.type_cluster(ranked, sens)
            if cluster:
                k = len(cluster)
                if self.trial(frozenset(ranked[:k]), "type").passed:
                    hi = k
                else:
                    lo = k
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.trial(frozenset(ranked[:mid]), "bisect").passed:
                    hi = mid
                else:
                    lo = mid
            if hi == n and not self.trial(frozenset(ranked), "all-origin").passed:
                return sens, ""
            kept = list(ranked[:hi])
            needed = kept[-1] if hi - 1 == lo else None  # ranked[:hi-1] failed: the last one is needed
            for name in reversed(kept):  # least sensitive first
                if name == needed:
                    continue
                trial = self.trial(frozenset(kept) - {name}, "put-back")
                if trial.passed:
                    kept.remove(name)
            return sens, ""
        except _Stop as stop:
            return sens, stop.why

    def type_cluster(self, ranked: Sequence[str], sens: Mapping[str, Sensitivity]) -> list[str]:
        """The clearly sensitive head of the ranking when it is exactly every candidate of one op type (else [])."""
        if not ranked:
            return []
        top = sens.get(ranked[0])
        if top is None or not top.measured or top.score <= 0:
            return []
        head = [n for n in ranked if n in sens and sens[n].measured and sens[n].score >= 0.5 * top.score]
        types = {c.name: c.op_type for c in self.candidates}
        kinds = {types[n] for n in head}
        if len(head) < 2 or len(kinds) != 1:
            return []
        (kind,) = kinds
        members = {c.name for c in self.candidates if c.op_type == kind}
        return head if members == set(head) else []


def tune(
    model: Any,
    config: RunConfig | None,
    eval_fn: Callable[[Any], Any],
    tolerable_loss: float = 0.01,
    relative: bool = True,
    higher_is_better: bool = True,
    max_trials: int = 50,
    timeout: float | None = None,
    example_inputs: Any = None,
    resume: str | Path | None = None,
    *,
    route: str = "eager",
    progress: bool | None = None,
    **options: Any,
) -> TuneResult:
    """Convert ``model`` under ``config``, falling ops back to their origin dtype until ``eval_fn`` is tolerable.

    Args:
        model: a ``torch.nn.Module`` (or a model another installed backend tunes, or a TuneAdapter).
        config: the RunConfig of the full conversion (default: ``allow_mix_precision_bf16`` with the
            ``torch_autocast_cpu`` library for torch models, ``tf_amp_bf16`` for Keras and TF graphs).
            Its own ``keep_dtype`` entries stay kept.
        eval_fn: called with the model to evaluate (torch: the prepared module, or the FX rewrite
            with ``route="fx"``; Keras: a copy of the model with its policies set; a TF graph,
            SavedModel or .pb: a :class:`~precision_policy.backends.tensorflow.tune.GraphModel`);
            returns a number.
        tolerable_loss: how much worse than the baseline a model may be; a fraction of the baseline
            when ``relative`` (0.01: 1 %), else in the metric's units.
        higher_is_better: whether a larger metric is better (accuracy) or worse (loss).
        max_trials: the most models evaluated after the baseline.
        timeout: seconds; the search stops at the next trial boundary after it.
        example_inputs: one calibration batch (torch: a tensor, a tuple, or a dict of keyword inputs).
            Without it, the first forward of the baseline evaluation is used.
        resume: a ``trials.json`` from :meth:`TuneResult.save`; its trials are replayed, not re-evaluated.
        route: torch only: ``"eager"`` (prepare) or ``"fx"`` (trace + apply).
        progress: show a progress bar (None: when stderr is a terminal).
        options: passed to the backend's adapter (TF graphs: ``fetches``, ``inputs``, ``tags``).

    Raises:
        TuneError: no trial passed (``best_trial`` names the best one), eval_fn returned no number,
            or ``resume`` names a file for another model or config.

    Example (``pp.tune`` is this function):
        >>> import torch, precision_policy as pp
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(64, 4); y = model(x).argmax(1)
        >>> accuracy = lambda m: float((m(x).argmax(1) == y).float().mean())
        >>> cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
        >>> result = pp.tune(model, cfg, accuracy, tolerable_loss=0.5, example_inputs=x)
        >>> len(result.trials), result.keep_dtype, result.converted
        (1, [], 3)
    """
    if config is None:
        torch = sys.modules.get("torch")
        torch_model = torch is not None and isinstance(model, torch.nn.Module)
        config = RunConfig(precision_mode="allow_mix_precision_bf16",
                           op_info="torch_autocast_cpu" if torch_model else "tf_amp_bf16")
    if not callable(eval_fn):
        raise TuneError(f"eval_fn must be a callable that takes the model and returns a number, not {type(eval_fn).__name__}")
    if not isinstance(max_trials, int) or max_trials < 1:
        raise ConfigError(f"tune: max_trials must be a positive integer, not {max_trials!r}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"tune: timeout must be a positive number of seconds, not {timeout!r}")
    if not tolerable_loss >= 0:
        raise ConfigError(f"tune: tolerable_loss must be >= 0, not {tolerable_loss!r}")
    adapter = adapter_for(model, config, example_inputs, route=route, **options)
    settings = {"tolerable_loss": tolerable_loss, "relative": relative, "higher_is_better": higher_is_better}
    recorded = load_trials(resume) if resume is not None else None

    search = _Search(adapter, eval_fn, tolerable_loss=tolerable_loss, relative=relative, higher_is_better=higher_is_better,
                     max_trials=max_trials, timeout=timeout, replay={})
    t0 = time.monotonic()
    baseline = _metric(eval_fn(adapter.baseline()), "the baseline (origin-dtype) model")
    baseline_seconds = time.monotonic() - t0
    adapter.baseline_done()
    if math.isnan(baseline):
        raise TuneError("eval_fn returned NaN for the baseline (origin-dtype) model; nothing can be compared with it")
    search.set_target(baseline)
    candidates = adapter.candidates()
    search.candidates = candidates
    fingerprint = adapter.fingerprint()
    if recorded is not None:
        _check_resume(resume, recorded, adapter, fingerprint, candidates, baseline, config)
        search.replay = replay_table(recorded["trials"])
        log.info("tune: resuming from %s: %d recorded trial(s) are replayed, not re-evaluated", resume,
                 len(recorded["trials"]))
    skipped = adapter.skipped()
    log.info("tune %s: %d candidate op(s) in low precision under %s; baseline %.6g, target %s %.6g "
             "(tolerable loss %g%s)", adapter.describe(), len(candidates), config.mode.name, baseline,
             ">=" if higher_is_better else "<=", search.target, tolerable_loss, " relative" if relative else "")
    log.info("%-9s | %-11s | %-10s | %-10s | %-6s | %-16s | %8s", "trial", "ops low", "metric", "target", "result",
             "best so far", "seconds")
    estimate = min(max_trials, 1 + math.ceil(math.log2(max(len(candidates), 1))) + 2)
    try:
        from tqdm.auto import tqdm

        search.bar = tqdm(total=estimate, desc="tune", unit="trial", disable=None if progress is None else not progress,
                          leave=False, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        search.bar = None
    try:
        sens, stopped = search.run(adapter.sensitivity)
    finally:
        if search.bar is not None:
            search.bar.close()

    winner = search.best_passing()
    result = TuneResult(model=None, keep_dtype=[], plan=None, baseline=baseline, best=None, target=search.target,
                        trials=search.trials, candidates=candidates, skipped=skipped, sensitivity=sens,
                        framework=adapter.framework, fingerprint=fingerprint, config=config.summary(), settings=settings,
                        baseline_seconds=baseline_seconds, stopped=stopped)
    if candidates and winner is None:
        best = search.best_metric()
        where = f" after {stopped}" if stopped else ""
        named = (f"the best was trial {best.number} (metric {best.metric:.6g}, {best.low} of {len(candidates)} ops low, "
                 f"kept: {', '.join(best.keep_dtype) or 'none'})") if best is not None else "no trial ran"
        raise TuneError(f"tune: no model reached the target {search.target:.6g} (baseline {baseline:.6g}){where}; {named}",
                        best_trial=best, result=result)
    keep = frozenset(winner.keep_dtype) if winner is not None else frozenset()
    result.keep_dtype = sorted(keep)
    result.best = winner.metric if winner is not None else baseline
    result.model, plan = adapter.build(keep)
    result.plan = plan if plan is not None else adapter.plan(keep)
    if stopped:
        log.info("tune: stopped by %s; the best passing model so far wins (trial %d)", stopped,
                 winner.number if winner else 0)
    if result.converted == 0:
        log.warning("tune: %d of %d ops converted: every candidate op keeps its origin dtype, so the model runs as "
                    "before (not a mixed-precision success)%s", result.converted, len(candidates),
                    "" if candidates else "; the full conversion puts no op in low precision")
    else:
        log.info("tune: %s", result.summary())
    log.info("tune: op types\n%s", result.report())
    return result


def _check_resume(path: Any, recorded: Mapping[str, Any], adapter: TuneAdapter, fingerprint: str,
                  candidates: Sequence[Candidate], baseline: float, config: RunConfig) -> None:
    """A recorded trials.json must come from the same model, config and eval_fn (TuneError says what differs)."""
    if recorded.get("framework") != adapter.framework or recorded.get("fingerprint") != fingerprint:
        raise TuneError(f"{path}: recorded for another model or config (fingerprint {recorded.get('fingerprint')!r}, "
                        f"this one {fingerprint!r}; recorded config {recorded.get('config')}, this one {config.summary()}); "
                        "resume only the search that wrote it")
    names = [c.name for c in candidates]
    if list(recorded["candidates"]) != names:
        raise TuneError(f"{path}: recorded candidates differ from this model's ({len(recorded['candidates'])} vs "
                        f"{len(names)}); resume only the search that wrote it")
    then = recorded.get("baseline", {}).get("metric")
    if then is None or not math.isclose(float(then), baseline, rel_tol=1e-9, abs_tol=1e-12):
        raise TuneError(f"{path}: the recorded baseline metric was {then}, eval_fn now gives {baseline:.10g}: the model "
                        "or eval_fn changed since; start a new search")
