"""The loss-scale state machines, step by step against each preset's documented behaviour."""

import math

import pytest

import precision_policy as pp
from precision_policy.errors import ConfigError
from precision_policy.loss_scale import FLOAT32_MAX, DynamicLossScale, FixedLossScale, from_config


def run(state, flags):
    out = []
    for f in flags:
        applied = state.update(f)
        out.append((applied, state.scale))
    return out


def test_torch_gradscaler_schedule():
    s = DynamicLossScale.preset("torch", growth_interval=3)
    assert s.scale == 2.0**16
    got = run(s, [False, False, True, False, False, False, False])
    assert got == [(True, 65536.0), (True, 65536.0), (False, 32768.0),  # overflow: back off, reset the run
                   (True, 32768.0), (True, 32768.0), (True, 65536.0), (True, 65536.0)]  # 3 good in a row: grow
    assert DynamicLossScale.preset("GradScaler").growth_interval == 2000


def test_keras_loss_scale_optimizer_schedule():
    s = DynamicLossScale.preset("keras")
    assert (s.scale, s.growth_interval, s.backoff_factor) == (2.0**15, 2000, 0.5)
    run(s, [False] * 1999)
    assert s.scale == 2.0**15
    s.update(False)
    assert s.scale == 2.0**16


def test_ascend_exponential_update_counts_bad_steps_before_backing_off():
    s = DynamicLossScale.preset("ascend", growth_interval=3)
    got = run(s, [True, False, True, False, False, False])
    # bad steps accumulate across a good step; the second one backs off by 0.8 and clears both counters
    assert got[0] == (False, 2.0**32) and got[1] == (True, 2.0**32)
    assert got[2] == (False, 2.0**32 * 0.8)
    assert got[3:] == [(True, 2.0**32 * 0.8), (True, 2.0**32 * 0.8), (True, 2.0**32 * 0.8 * 2)]
    # an update that would go below 1 is not applied
    low = DynamicLossScale.preset("ascend", init_scale=1.1, decr_every_n_nan_or_inf=1)
    low.update(True)
    assert low.scale == 1.1


def test_mindspore_clamps_at_one():
    s = DynamicLossScale.preset("mindspore", init_scale=1.5)
    s.update(True)
    assert s.scale == 1.0
    assert DynamicLossScale.preset("mindspore").scale == 2.0**24


def test_growth_never_passes_float32_range():
    s = DynamicLossScale(init_scale=FLOAT32_MAX / 1.5, growth_interval=1)
    s.update(False)
    assert s.scale == FLOAT32_MAX / 1.5 and math.isfinite(s.scale)


def test_fixed_scale_skips_but_never_changes():
    s = FixedLossScale(128)
    assert run(s, [False, True, False]) == [(True, 128.0), (False, 128.0), (True, 128.0)]
    assert s.skipped_steps == 1


def test_state_dict_round_trip_continues_identically():
    a = DynamicLossScale.preset("ascend", growth_interval=4)
    run(a, [True, False, False, True, False])
    b = DynamicLossScale()
    b.load_state_dict(a.state_dict())
    flags = [False, False, True, True, False, False, False, False]
    assert run(a, flags) == run(b, flags)
    with pytest.raises(ConfigError, match="not a fixed one"):
        FixedLossScale(1).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "value,kind,scale",
    [("dynamic", DynamicLossScale, 2.0**16), (1024, FixedLossScale, 1024.0), ("512", FixedLossScale, 512.0),
     ("ascend", DynamicLossScale, 2.0**32), ({"preset": "keras", "growth_interval": 10}, DynamicLossScale, 2.0**15),
     ({"init_scale": 8.0}, DynamicLossScale, 8.0), (True, DynamicLossScale, 2.0**16)],
)
def test_config_values(value, kind, scale):
    state = pp.RunConfig(loss_scale=value).make_loss_scale()
    assert isinstance(state, kind) and state.scale == scale
    assert from_config(None) is None and pp.RunConfig().make_loss_scale() is None


@pytest.mark.parametrize(
    "value,needle",
    [("asend", "presets: torch, keras, ascend, mindspore"), (-1, "positive"), ({"growth_factor": 0.5}, "growth_factor"),
     ({"scale_window": 3}, "scale_window"), ({"init_scale": 1.0, "min_scale": 2.0}, "min_scale")],
)
def test_bad_config_values_are_config_errors(value, needle):
    with pytest.raises(ConfigError) as err:
        pp.RunConfig(loss_scale=value)
    assert needle in str(err.value)
