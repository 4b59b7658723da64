"""End to end: a ResNet-style CNN trains on scikit-learn's digits under mixed precision (the demo's loop)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn.datasets")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import precision_policy as pp  # noqa: E402

from demo_torch import train  # noqa: E402  (the loop `make demo` runs)


@pytest.fixture(scope="module")
def fp32_accuracy() -> float:
    return train("fp32", None).accuracy


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False),
        pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False),  # fp16, emulated
    ],
    ids=["bf16", "fp16-emulated"],
)
def test_digits_cnn_trains_within_one_point_of_fp32(config, fp32_accuracy):
    assert fp32_accuracy > 95
    run = train(config.precision_mode or "mode", config)
    assert run.accuracy >= fp32_accuracy - 1.0, (run.accuracy, fp32_accuracy)
    if config.mode.low == "float16":  # prepare() gave the float16 mode a dynamic loss scaler, and it stepped
        assert run.scales and not all(run.skipped)
