"""The PyTorch bar, on models nobody here wrote: torchvision, timm and Hugging Face transformers.

Each model of ``torch_zoo.zoo()`` (random weights, small configs) runs under
``torch.autocast("cpu", bfloat16)`` and under our routes with the ``torch_autocast_cpu``
library: the eager route must give every op autocast's dtypes and the same output; the static
route (torch.fx for the vision models, torch.export for the Hugging Face models) must too.
``prepare()`` then trains each model five steps in emulated float16 with its default loss scaler: finite losses, float32 parameters.
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
torch_zoo = pytest.importorskip("torch_zoo")
torch_zoo.import_torchvision()  # before timm and transformers import it
pytest.importorskip("timm")
pytest.importorskip("transformers")

from test_torch_backend import BF16_AUTOCAST, Observe  # noqa: E402
from test_torch_export import assert_static_route_is_autocast  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.torch.export import ExportedPrecision  # noqa: E402
from precision_policy.torch import apply, precision, prepare, trace  # noqa: E402

pytestmark = pytest.mark.slow

BUILDERS = torch_zoo.zoo()
FP16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False)


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def run_logged(model, inputs, ctx):
    seen = Observe()
    torch.manual_seed(1)  # same dropout masks in every run
    with ctx, seen:
        out = torch_zoo.call(model, inputs)
    return seen.log, first_tensor(out)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_eager_route_gives_every_op_autocasts_dtype(name, caplog):
    caplog.set_level(logging.ERROR)
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    model.train()
    ref_log, ref = run_logged(model, inputs, torch.autocast("cpu", torch.bfloat16))
    log, out = run_logged(model, inputs, precision(BF16_AUTOCAST, model=model))
    assert len(ref_log) >= 10
    mismatches = [(k, a, b) for k, (a, b) in enumerate(zip(ref_log, log)) if a != b]
    assert not mismatches and len(log) == len(ref_log), mismatches[:3]
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)


VISION = sorted(n for n in BUILDERS if not n.startswith("hf_"))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_route_gives_every_op_autocasts_dtype(name, train, caplog):
    """The static route: torch.fx traces the vision models, torch.export captures the Hugging Face
    ones (FX cannot trace them); every op runs in autocast's dtype, outputs are autocast's."""
    caplog.set_level(logging.ERROR)
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    model.train(train)
    graph = trace(model, inputs.get("args", ()), inputs.get("kwargs"))
    static = apply(model, pp.plan(graph, BF16_AUTOCAST))
    if name not in VISION:
        assert isinstance(static, ExportedPrecision)  # ATen ops: compared at the dispatch level
        assert_static_route_is_autocast(model, static, inputs)
        return
    assert isinstance(static, torch.fx.GraphModule)  # the vision models stay on the FX route
    ref_log, ref = run_logged(model, inputs, torch.autocast("cpu", torch.bfloat16))
    log, out = run_logged(static, inputs, torch.autocast("cpu", enabled=False))
    assert log == ref_log
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prepare_trains_five_steps_in_emulated_float16_with_loss_scaling(name, caplog):
    caplog.set_level(logging.ERROR)
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, scaler = prepare(model, opt, FP16)
    assert scaler is not None  # float16 trains with loss scaling by default
    losses = []
    for _ in range(5):
        out = torch_zoo.call(model, inputs)
        loss = getattr(out, "loss", None)
        if loss is None:
            loss = first_tensor(out).float().pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
