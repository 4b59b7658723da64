"""precision_policy.inc runs Intel Neural Compressor 2.x mix_precision scripts unchanged (real torch, no mocks)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from digits_models import digits, make_sensitive, one_thread, sensitive, train_digits  # noqa: E402, F401  (fixtures: one_thread, digits, sensitive)

import precision_policy as pp  # noqa: E402
from precision_policy.inc import AccuracyCriterion, MixedPrecisionConfig, TuningCriterion, mix_precision  # noqa: E402

FP32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}




def test_inc_script_runs_unchanged_and_keeps_the_same_layer(digits, sensitive, tmp_path):
    # --- the INC 2.x script of the seeds, imports changed only ---
    model = sensitive

    def eval_func(model):
        return digits.accuracy(model)

    conf = MixedPrecisionConfig(
        precisions="bf16",
        excluded_precisions=[],
        accuracy_criterion=AccuracyCriterion(tolerable_loss=0.01, criterion="relative", higher_is_better=True),
        tuning_criterion=TuningCriterion(max_trials=20, timeout=0),
    )
    converted_model = mix_precision.fit(model, config=conf, eval_func=eval_func)
    converted_model.save(str(tmp_path / "path" / "to" / "save"))
    # --- end of script ---
    saved = tmp_path / "path" / "to" / "save"
    assert sorted(p.name for p in saved.iterdir()) == ["best_model.pt", "keep_dtype.txt", "plan.json", "trials.json"]
    assert converted_model.result.keep_dtype == ["8"]  # the same layer pp.tune keeps
    assert converted_model.model is model
    assert abs(eval_func(converted_model) - digits.accuracy(digits.model)) <= 0.01
    state = torch.load(saved / "best_model.pt")
    assert set(state) == set(model.state_dict())
    assert converted_model.config.mode.name == "allow_mix_precision_bf16"


def test_op_type_dict_and_op_name_dict_become_keep_dtype(digits, sensitive):
    for key in ("Linear", "MatMulV2"):  # a torch module class, and the canonical op type
        conf = MixedPrecisionConfig(op_type_dict={key: FP32})
        out = mix_precision.fit(copy.deepcopy(sensitive), conf, eval_func=digits.accuracy)
        assert len(out.result.trials) == 1 and out.result.trials[0].passed  # every Linear kept: nothing to fall back
        assert {"6", "8"} <= {s.name for s in out.result.skipped}
    conf = MixedPrecisionConfig(op_name_dict={"8": FP32})
    assert conf.keep_entries(sensitive) == ["8"]
    out = mix_precision.fit(copy.deepcopy(sensitive), conf, eval_func=digits.accuracy)
    assert len(out.result.trials) == 1 and out.result.keep_dtype == []
    assert MixedPrecisionConfig(op_type_dict={"Linear": FP32}).keep_entries(sensitive) == ["6", "8"]
    assert MixedPrecisionConfig(op_type_dict={"Conv2D": FP32}).keep_entries(sensitive) == ["OpType::Conv2D"]
    # an entry that allows bf16 keeps nothing
    assert MixedPrecisionConfig(op_type_dict={"Linear": {"activation": {"dtype": ["bf16", "fp32"]}}}).keep_entries(sensitive) == []


def test_bad_inc_input_is_an_error_not_an_exit(sensitive, digits):
    with pytest.raises(pp.ConfigError, match=r"unknown op type 'Lineer'; did you mean 'Linear'"):
        mix_precision.fit(sensitive, MixedPrecisionConfig(op_type_dict={"Lineer": FP32}), eval_func=digits.accuracy)
    with pytest.raises(pp.ConfigError, match="unknown dtype 'fp8'"):
        MixedPrecisionConfig(op_type_dict={"Linear": {"activation": {"dtype": ["fp8"]}}})
    with pytest.raises(pp.ConfigError, match="unknown precision 'int4'"):
        MixedPrecisionConfig(precisions="int4")
    with pytest.raises(pp.ConfigError, match="did you mean 'accuracy_criterion'"):
        MixedPrecisionConfig(accuracy_criterium=AccuracyCriterion())
    with pytest.raises(pp.ConfigError, match="excluded_precisions"):
        MixedPrecisionConfig(precisions="bf16", excluded_precisions=["bf16"]).run_config()
    with pytest.raises(pp.OverrideError, match="'fc9'"):
        mix_precision.fit(sensitive, MixedPrecisionConfig(op_name_dict={"fc9": FP32}), eval_func=digits.accuracy)


def test_fp16_mapping_and_conversion_without_evaluation(digits, sensitive):
    assert MixedPrecisionConfig(precisions="fp16").run_config().mode.name == "allow_mix_precision"
    out = mix_precision.fit(copy.deepcopy(sensitive), MixedPrecisionConfig())  # no eval: converted in full
    assert out.result is None
    assert digits.accuracy(out) < 0.2  # the sensitive layer in bf16, as INC's plain conversion would give


def test_eval_dataloader_and_metric(digits, sensitive):
    loader = [(digits.x_test[i:i + 100], digits.y_test[i:i + 100]) for i in range(0, len(digits.x_test), 100)]

    class Accuracy:  # INC's metric protocol: reset / update(preds, labels) / result()
        def reset(self):
            self.right = self.total = 0

        def update(self, preds, labels):
            self.right += int((preds.argmax(1) == labels).sum())
            self.total += len(labels)

        def result(self):
            return self.right / self.total

    out = mix_precision.fit(sensitive, MixedPrecisionConfig(), eval_dataloader=loader, eval_metric=Accuracy())
    assert out.result.keep_dtype == ["8"]
