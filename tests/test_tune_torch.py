"""pp.tune on torch models (both routes), with a real trained digits CNN whose last Linear is bf16-sensitive.

Trials are counted without the baseline (the baseline is ``result.baseline``, not a Trial): trial 1 is
the full conversion, so "passes in 1 trial" and the issue's bound 1 + ceil(log2(candidates)) + 2 read alike.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from digits_models import digits, make_sensitive, one_thread, sensitive, train_digits  # noqa: E402, F401  (fixtures: one_thread, digits, sensitive)

import precision_policy as pp  # noqa: E402
from precision_policy.torch import apply, prepare, trace  # noqa: E402

CFG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
SENSITIVE = "8"  # the last Linear's module path in the Sequential




def bound(n: int) -> int:
    return 1 + math.ceil(math.log2(n)) + 2


def test_full_bf16_really_destroys_accuracy(digits, sensitive):
    base = digits.accuracy(sensitive)
    assert base > 0.95
    assert digits.accuracy(digits.model) == base  # the offset leaves fp32 argmax unchanged
    converted, _ = prepare(copy.deepcopy(sensitive), None, CFG)
    assert digits.accuracy(converted) < 0.2  # chance is 0.1


@pytest.mark.parametrize("route", ["eager", "fx"])
def test_tune_keeps_exactly_the_sensitive_layer(digits, sensitive, route, caplog):
    caplog.set_level(logging.INFO, logger="precision_policy.tune")
    result = pp.tune(sensitive, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64], route=route)
    n = len(result.candidates)
    assert n >= 8
    assert result.keep_dtype == [SENSITIVE]
    assert result.converted == n - 1
    assert abs(result.best - result.baseline) <= 0.01 * result.baseline
    assert abs(digits.accuracy(result.model) - result.baseline) <= 0.01 * result.baseline
    assert len(result.trials) <= bound(n), [t.to_dict() for t in result.trials]
    assert [t.number for t in result.trials] == list(range(1, len(result.trials) + 1))
    assert result.trials[0].keep_dtype == () and not result.trials[0].passed
    ranked_top = max(result.sensitivity.values(), key=lambda s: s.score)
    assert ranked_top.name == SENSITIVE and ranked_top.measured
    # the plan: the winner's, with exactly that layer in float32
    assert result.plan is not None and result.plan[SENSITIVE].dtype == "float32"
    assert sum(1 for d in result.plan if d.converted) >= n - 1
    text = caplog.text
    assert "passed" in text and "failed" in text and "op type" in text and "MatMulV2" in text
    assert f"{n - 1} of {n} ops converted" in text
    if route == "fx":
        assert isinstance(result.model, torch.fx.GraphModule)
    else:
        assert result.model is sensitive


def test_calibration_batch_comes_from_the_baseline_when_not_given(digits, sensitive):
    result = pp.tune(sensitive, CFG, digits.accuracy, tolerable_loss=0.01)
    assert result.keep_dtype == [SENSITIVE]
    assert len(result.trials) <= bound(len(result.candidates))


def test_no_sensitive_op_passes_in_one_trial(digits):
    model = copy.deepcopy(digits.model)
    result = pp.tune(model, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:32])
    assert len(result.trials) == 1 and result.trials[0].passed
    assert result.keep_dtype == [] and result.converted == len(result.candidates)


def test_a_model_that_cannot_pass_raises_tune_error_naming_the_best_trial(digits, sensitive):
    calls = []

    def flaky(model):  # the baseline scores 1.0; every converted model scores less, better with more kept
        calls.append(1)
        return 1.0 if len(calls) == 1 else 0.5 + 0.001 * len(calls)

    with pytest.raises(pp.TuneError, match=r"no model reached the target .*the best was trial \d+") as info:
        pp.tune(sensitive, CFG, flaky, tolerable_loss=0.01, example_inputs=digits.x_train[:32])
    err = info.value
    assert err.best_trial is not None and not err.best_trial.passed
    assert err.result is not None and err.result.best is None and err.result.trials
    assert err.best_trial.number == len(err.result.trials)  # the metric rose with each call: the last is best


def test_max_trials_ends_with_the_best_passing_model_so_far(digits, sensitive):
    result = pp.tune(sensitive, CFG, digits.accuracy, tolerable_loss=0.01, max_trials=2,
                     example_inputs=digits.x_train[:32])
    assert len(result.trials) == 2 and result.stopped == "max_trials"
    assert SENSITIVE in result.keep_dtype and result.trials[1].passed
    assert abs(digits.accuracy(result.model) - result.baseline) <= 0.01 * result.baseline
    with pytest.raises(pp.TuneError, match="after max_trials"):
        pp.tune(sensitive, CFG, digits.accuracy, tolerable_loss=0.01, max_trials=1, example_inputs=digits.x_train[:32])


def test_timeout_stops_at_a_trial_boundary(digits, sensitive):
    def slow(model):
        time.sleep(0.3)
        return digits.accuracy(model)

    with pytest.raises(pp.TuneError, match="after timeout"):  # the baseline alone takes longer: no trial runs
        pp.tune(sensitive, CFG, slow, timeout=0.1, example_inputs=digits.x_train[:32])
    result = pp.tune(sensitive, CFG, slow, timeout=0.75, example_inputs=digits.x_train[:32])
    assert result.stopped == "timeout" and 2 <= len(result.trials) < 4
    assert SENSITIVE in result.keep_dtype


def test_save_resume_and_reproduce(digits, sensitive, tmp_path):
    result = pp.tune(sensitive, CFG, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64])
    out = result.save(tmp_path / "tuned")
    assert sorted(p.name for p in out.iterdir()) == ["keep_dtype.txt", "plan.json", "trials.json"]
    assert [ln for ln in (out / "keep_dtype.txt").read_text().splitlines() if not ln.startswith("#")] == [SENSITIVE]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary or lock files left
    recorded = json.loads((out / "trials.json").read_text())
    assert len(recorded["trials"]) == len(result.trials) and recorded["keep_dtype"] == [SENSITIVE]

    # keep_dtype.txt alone reproduces the winner, on both routes
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu",
                       keep_dtype=out / "keep_dtype.txt")
    again, _ = prepare(copy.deepcopy(sensitive), None, cfg)
    assert digits.accuracy(again) == result.best
    plan = pp.plan(trace(sensitive, (digits.x_train[:64],)), cfg)
    saved = pp.CastPlan.from_json(out / "plan.json")
    assert plan.dtype == saved.dtype and plan.names == saved.names
    assert digits.accuracy(apply(sensitive, plan)) == result.best

    # resume: every trial is replayed, eval_fn runs once (the baseline, checked against the record)
    calls = []

    def counted(model):
        calls.append(1)
        return digits.accuracy(model)

    resumed = pp.tune(sensitive, CFG, counted, tolerable_loss=0.01, example_inputs=digits.x_train[:64],
                      resume=out / "trials.json")
    assert len(calls) == 1
    assert resumed.keep_dtype == result.keep_dtype
    assert [t.metric for t in resumed.trials] == [t.metric for t in result.trials]
    assert all(t.replayed for t in resumed.trials)

    # a record of another config, or a file that is no trials record, is a clear error
    fp16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu")
    with pytest.raises(pp.TuneError, match="another model or config"):
        pp.tune(sensitive, fp16, digits.accuracy, example_inputs=digits.x_train[:64], resume=out / "trials.json")
    with pytest.raises(pp.TuneError, match="not a tune trials file"):
        pp.tune(sensitive, CFG, digits.accuracy, example_inputs=digits.x_train[:64], resume=out / "plan.json")
    with pytest.raises(pp.TuneError, match="recorded baseline"):
        pp.tune(sensitive, CFG, lambda m: 0.5 * digits.accuracy(m), example_inputs=digits.x_train[:64],
                resume=out / "trials.json")


def test_keep_dtype_list_in_run_config(digits, sensitive):
    cfg = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", keep_dtype=[SENSITIVE])
    assert cfg.keep_dtype == (SENSITIVE,)
    model, _ = prepare(copy.deepcopy(sensitive), None, cfg)
    base = digits.accuracy(sensitive)
    assert abs(digits.accuracy(model) - base) <= 0.01
    plan = pp.plan(trace(sensitive, (digits.x_train[:8],)), cfg)
    assert plan[SENSITIVE].dtype == "float32" and plan["6"].dtype == "bfloat16"
    bad = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", keep_dtype=["9"])
    with pytest.raises(pp.OverrideError, match=r"RunConfig.keep_dtype\[0\]: '9'"):
        prepare(copy.deepcopy(sensitive), None, bad)
    with pytest.raises(pp.OverrideError, match=r"RunConfig.keep_dtype\[0\]: '9' matches no node"):
        pp.plan(trace(sensitive, (digits.x_train[:8],)), bad)
    with pytest.raises(pp.ConfigError, match="keep_dtype"):
        pp.RunConfig(keep_dtype=["a::b"])
    # the user's own keep_dtype entries are never candidates, and stay kept
    result = pp.tune(copy.deepcopy(sensitive), cfg, digits.accuracy, example_inputs=digits.x_train[:32])
    assert len(result.trials) == 1 and SENSITIVE in {s.name for s in result.skipped}


def test_bad_eval_fn(digits, sensitive):
    with pytest.raises(pp.TuneError, match="eval_fn returned 'high'"):
        pp.tune(sensitive, CFG, lambda m: "high", example_inputs=digits.x_train[:8])
    with pytest.raises(pp.TuneError, match="eval_fn returned None"):
        pp.tune(sensitive, CFG, lambda m: None, example_inputs=digits.x_train[:8])
    assert pp.tune(copy.deepcopy(digits.model), CFG, lambda m: torch.tensor(digits.accuracy(m)),
                   example_inputs=digits.x_train[:8]).converted > 0  # a one-element tensor is a number
    with pytest.raises(pp.ConfigError, match="max_trials"):
        pp.tune(sensitive, CFG, digits.accuracy, max_trials=0)
    with pytest.raises(pp.ConfigError, match="no backend can tune"):
        pp.tune(object(), CFG, digits.accuracy)


def test_all_origin_result_is_never_a_silent_success(digits, sensitive, caplog):
    from precision_policy.backends.torch.tune import TorchTuneAdapter

    names = {c.name for c in TorchTuneAdapter(sensitive, CFG, digits.x_train[:8]).candidates()}

    def strict(model):  # the eager route's model carries its config: only "everything kept" scores 1.0
        config = getattr(model, "_pp_config", None)
        kept = set(config.keep_dtype or ()) if config is not None else names
        return 1.0 - 0.01 * len(names - kept)

    caplog.set_level(logging.INFO, logger="precision_policy.tune")
    result = pp.tune(sensitive, CFG, strict, tolerable_loss=0.0, max_trials=8, example_inputs=digits.x_train[:32])
    n = len(result.candidates)
    assert result.converted == 0 and len(result.keep_dtype) == n
    assert any(t.step == "all-origin" and t.passed for t in result.trials)
    assert f"0 of {n} ops converted" in result.summary()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "0 of" in r.getMessage()]
    assert warnings and "not a mixed-precision success" in warnings[0].getMessage()
