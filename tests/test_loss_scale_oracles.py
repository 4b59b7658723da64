"""The torch and keras loss-scale presets against the real thing, step by step.

Each run plants infs and nans in the gradients of some steps and uses a short growth interval,
so the scale both backs off and grows several times; the preset (the core state machine) and
the backend's own scaler must give the same scale after every step, and skip the same steps,
as ``torch.amp.GradScaler`` and Keras 3's ``keras.optimizers.LossScaleOptimizer``.
"""

from __future__ import annotations

import math

import pytest

from precision_policy.loss_scale import DynamicLossScale

STEPS = 24
INTERVAL = 3
#: step -> what is planted in one gradient entry that step (runs of bad steps, good runs long enough to grow)
PLANTED = {2: math.inf, 3: math.nan, 9: -math.inf, 13: math.nan, 14: math.inf, 15: math.inf, 22: math.nan}


def _core_run(preset: str) -> list[tuple[float, bool]]:
    s = DynamicLossScale.preset(preset, growth_interval=INTERVAL)
    out = []
    for step in range(STEPS):
        applied = s.update(found_inf=step in PLANTED)
        out.append((s.scale, applied))
    return out


def test_schedule_exercises_backoff_and_growth():
    seq = [scale for scale, _ in _core_run("torch")]
    assert any(b < a for a, b in zip(seq, seq[1:])) and any(b > a for a, b in zip(seq, seq[1:]))


# ---------------------------------------------------------------------- torch.amp.GradScaler
def test_torch_preset_defaults_are_grad_scalers():
    torch = pytest.importorskip("torch")
    ref = torch.amp.GradScaler("cpu")
    p = DynamicLossScale.PRESETS["torch"]
    assert (p["init_scale"], p["growth_factor"], p["backoff_factor"], p["growth_interval"]) == (
        ref.get_scale(), ref.get_growth_factor(), ref.get_backoff_factor(), ref.get_growth_interval())


def test_torch_preset_and_loss_scaler_match_grad_scaler_step_by_step():
    torch = pytest.importorskip("torch")
    from precision_policy.torch import LossScaler

    def run(make_scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = make_scaler(model)
        out = []
        for step in range(STEPS):
            opt.zero_grad()
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 4, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            scaler.scale(loss).backward()
            if step in PLANTED:
                model.weight.grad[0, step % 4] = PLANTED[step]
            before = model.weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            applied = not torch.equal(before, model.weight.detach())
            out.append((float(scaler.get_scale()), applied))
        return out, [p.detach().clone() for p in model.parameters()]

    ref, ref_params = run(lambda m: torch.amp.GradScaler("cpu", growth_interval=INTERVAL))
    ours, our_params = run(lambda m: LossScaler(DynamicLossScale.preset("torch", growth_interval=INTERVAL), model=m))
    assert [a for _, a in ref] == [step not in PLANTED for step in range(STEPS)]  # the oracle skipped the planted steps
    assert ours == ref
    assert _core_run("torch") == ref
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same updates, bit for bit


# ---------------------------------------------------------------------- Keras 3 LossScaleOptimizer
def test_keras_preset_defaults_are_loss_scale_optimizers():
    keras = pytest.importorskip("keras")
    ref = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    p = DynamicLossScale.PRESETS["keras"]
    assert p["init_scale"] == ref.initial_scale and p["growth_interval"] == ref.dynamic_growth_steps
    assert (p["growth_factor"], p["backoff_factor"]) == (2.0, 0.5)  # Keras 3 doubles and halves


def test_keras_preset_and_optimizer_match_keras_loss_scale_optimizer_step_by_step():
    keras = pytest.importorskip("keras")
    np = pytest.importorskip("numpy")
    from precision_policy.keras import LossScaleOptimizer

    def run(opt, scale_of):
        v = keras.Variable(np.ones((4,), "float32"))
        out = []
        for step in range(STEPS):
            grad = np.full((4,), 0.25, "float32") * float(scale_of(opt) if step else opt.initial_scale)
            if step in PLANTED:
                grad[step % 4] = PLANTED[step]
            before = np.array(v.numpy())
            opt.apply([keras.ops.convert_to_tensor(grad)], [v])
            applied = not np.array_equal(before, v.numpy())
            out.append((float(scale_of(opt)), applied))
        return out, v.numpy()

    ref, ref_v = run(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), dynamic_growth_steps=INTERVAL),
                     lambda o: o.dynamic_scale.numpy())
    ours, our_v = run(LossScaleOptimizer(keras.optimizers.SGD(0.1),
                                         loss_scale=DynamicLossScale.preset("keras", growth_interval=INTERVAL)),
                      lambda o: o.dynamic_scale.numpy())
    assert [a for _, a in ref] == [step not in PLANTED for step in range(STEPS)]
    assert ours == ref
    assert _core_run("keras") == ref
    np.testing.assert_array_equal(our_v, ref_v)
