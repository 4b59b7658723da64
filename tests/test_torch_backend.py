"""PyTorch backend: eager and FX routes agree with each other, with the plan, and with torch.autocast."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from torch.overrides import TorchFunctionMode  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.torch.eager import _busy, _out_dtypes  # noqa: E402
from precision_policy.backends.torch.ops import func_label, op_type_of  # noqa: E402
from precision_policy.rules import Rule  # noqa: E402
from precision_policy.torch import apply, precision, prepare, trace, trace_fx  # noqa: E402

from torch_models import models_and_inputs, resnet_cnn  # noqa: E402

BF16_AUTOCAST = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False)
CONFIGS = {
    "autocast-bf16": BF16_AUTOCAST,
    "ascend910b-mixed-fp16": pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910b", use_env_lists=False),
    "ascend910-force-fp16": pp.RunConfig(precision_mode="force_fp16", op_info="ascend910", use_env_lists=False),
    "ascend910b-mixed-bf16": pp.RunConfig(precision_mode="mixed_bfloat16", op_info="ascend910b", use_env_lists=False),
}


class Observe(TorchFunctionMode):
    """Records (call, output dtypes) of every mapped op with a float input; changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = op_type_of(func)
        if op is not None and op != "Cast":
            leaves = torch.utils._pytree.tree_flatten((args, kwargs))[0]
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves):
                self.log.append((func_label(func), _out_dtypes(out)))
        return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_eager_and_fx_give_every_op_the_plans_dtype(name, cfg_name):
    model, x = models_and_inputs()[name]
    cfg = CONFIGS[cfg_name]
    traced = trace_fx(model, (x,))
    plan = pp.plan(traced.graph, cfg)
    planned = [(d.op_type, d.dtype) for d in plan if d.rule is not Rule.SOURCE]
    record: list = []
    with precision(cfg, model=model, record=record):
        model(x)
    assert [(r.op_type, r.dtype) for r in record] == planned
    # the FX rewrite runs every op in the plan's dtype: observe the values flowing between ops
    if cfg.mode.low == "bfloat16":
        seen_fx, seen_eager = Observe(), Observe()
        with seen_fx:
            apply(model, plan, traced=traced)(x)
        with precision(cfg, model=model), seen_eager:
            model(x)
        assert seen_fx.log == seen_eager.log


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("train", [True, False])
def test_eager_matches_torch_autocast_op_by_op(name, train):
    model, x = models_and_inputs()[name]
    model.train(train)
    if name == "transformer" and not train:
        x = x.requires_grad_()  # keep TransformerEncoderLayer off its fused inference fast path
    reference, ours = Observe(), Observe()
    with torch.autocast("cpu", torch.bfloat16), reference:
        y_ref = model(x)
    with precision(BF16_AUTOCAST, model=model), ours:
        y = model(x)
    assert ours.log == reference.log
    assert y.dtype == y_ref.dtype
    assert len(ours.log) >= 4


def test_trace_names_ops_by_module_path_and_reports_unmapped_calls():
    model = resnet_cnn()
    graph = trace(model, (torch.randn(2, 1, 8, 8),))
    names = graph.node_names
    assert "3.conv1" in names and "3.bn1" in names and "0.weight" in names
    assert graph.node("3.conv1").op_type == "Conv2D" and graph.node("3.bn1").op_type == "BatchNorm"

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.i0e(x) + 1

    g = trace(Odd(), (torch.randn(3),))
    plan = pp.plan(g, BF16_AUTOCAST)
    assert list(plan.unknown) == ["torch:torch.special.special_i0e"] or any(k.startswith("torch:") for k in plan.unknown)


def test_untraceable_model_gives_a_typed_error_and_eager_still_works():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            for _ in range(int(x.sum().item() > 0) + 1):
                x = self.fc(x)
            return x

    model = DataDependent()
    x = torch.ones(2, 4)
    with pytest.raises(pp.GraphError, match="eager route"):
        trace(model, (x,))
    with precision(BF16_AUTOCAST, model=model):
        assert model(x).dtype == torch.bfloat16


def test_fx_route_keeps_fetch_dtype_and_trains():
    model, x = models_and_inputs()["cnn"]
    plan = pp.plan(trace(model, (x,)), BF16_AUTOCAST.model_copy(update={"keep_output_dtype": True}))
    gm = apply(model, plan)
    y = gm(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    w = model[0].weight
    assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32
    assert any(c.kind == "variable" and c.tensor == "0.weight:0" for c in plan.casts)


def test_emulated_fp16_stores_float16_and_computes_in_float32():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    cfg = pp.RunConfig(precision_mode="force_fp16", op_info="ascend910", use_env_lists=False)
    with precision(cfg, model=lin):
        y = lin(x)
    assert y.dtype == torch.float16
    expect = torch.nn.functional.linear(x.half().float(), lin.weight.half().float(), lin.bias.half().float()).half()
    assert torch.equal(y, expect)
    with precision(cfg, model=lin, native_fp16=True):
        y_native = lin(x)
    assert y_native.dtype == torch.float16


def test_context_nests_disables_is_thread_local_and_leaks_nothing():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    outer = BF16_AUTOCAST
    inner = pp.RunConfig(precision_mode="force_fp32", op_info="torch_autocast_cpu", use_env_lists=False)
    seen = {}
    with precision(outer, model=lin):
        assert lin(x).dtype == torch.bfloat16
        with precision(inner, model=lin):
            assert lin(x).dtype == torch.float32
        with precision(enabled=False):
            assert lin(x).dtype == torch.float32
        assert lin(x).dtype == torch.bfloat16

        def other_thread():
            seen["dtype"] = lin(x).dtype

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert seen["dtype"] == torch.float32
    with pytest.raises(ZeroDivisionError):
        with precision(outer, model=lin):
            lin(x)
            1 / 0  # noqa: B018  (raises inside the context on purpose)
    assert lin(x).dtype == torch.float32 and not _busy()
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_backward_through_eager_casts_keeps_float32_master_weights():
    model, x = models_and_inputs()["transformer"]
    with precision(BF16_AUTOCAST, model=model):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    for p in model.parameters():
        assert p.dtype == torch.float32
        assert p.grad is None or p.grad.dtype == torch.float32


def test_prepare_rejects_conv_under_must_keep_origin_naming_module_paths():
    model = resnet_cnn()
    cfg = pp.RunConfig(precision_mode="must_keep_origin_dtype", op_info="ascend910", use_env_lists=False)
    with pytest.raises(pp.PrecisionError) as err:
        prepare(model, None, cfg)
    text = str(err.value)
    assert "0 (Conv2D)" in text and "3.conv1 (Conv2D)" in text and "4.conv2 (Conv2D)" in text
    assert {op for _, op, _ in err.value.problems} == {"Conv2D"}


def test_prepare_wraps_forward_and_keeps_state_dict():
    model, x = models_and_inputs()["mlp"]
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model2, scaler = prepare(model, opt, BF16_AUTOCAST, example_inputs=(x,))
    assert model2 is model and list(model.state_dict()) == keys and scaler is None
    y = model(x)
    assert y.dtype == torch.float32  # keep_output_dtype: outputs back in float32
    _, scaler = prepare(model, opt, BF16_AUTOCAST.model_copy(update={"loss_scale": "dynamic"}))
    assert scaler is not None


def test_plan_says_float16_is_emulated_and_config_can_ask_for_native():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    cfg = pp.RunConfig(precision_mode="force_fp16", op_info="ascend910", use_env_lists=False)
    plan = pp.plan(trace(lin, (x,)), cfg)
    assert plan.to_dict()["config"]["float16"] == "emulated"
    assert "emulated: float16 storage, float32 compute" in plan.explain(plan.converted()[0].name)
    native = cfg.model_copy(update={"native_fp16": True})
    plan_native = pp.plan(trace(lin, (x,)), native)
    assert plan_native.to_dict()["config"]["float16"] == "native"
    gm = apply(lin, plan_native)
    assert gm.code.count("torch.float32") == 1  # only the fetch cast back: no upcasts for compute
    assert apply(lin, plan).code.count("torch.float32") > 1


def test_eager_reports_unknown_ops_and_warnings_once_however_many_steps():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.special.i0e(self.fc(x))

    model = Odd()
    with precision(BF16_AUTOCAST, model=model) as mode:
        for _ in range(5):
            model(torch.randn(2, 4))
    unknown = mode.decider.unknown
    assert len(unknown) == 1 and all(len(v) == 1 for v in unknown.values())


def test_unmapped_call_keeps_origin_dtype_in_both_routes():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.special.i0e(self.fc(x)).detach()

    model, x = Odd(), torch.randn(2, 4)
    cfg = BF16_AUTOCAST.model_copy(update={"keep_output_dtype": False})
    plan = pp.plan(trace(model, (x,)), cfg)
    (name,) = plan.unknown["torch:torch.special.special_i0e"]
    assert plan[name].dtype == "float32" and ("fc:0", "float32") in {(c.tensor, c.to) for c in plan.casts}
    assert apply(model, plan)(x).dtype == torch.float32
    with precision(cfg, model=model):
        assert model(x).dtype == torch.float32
