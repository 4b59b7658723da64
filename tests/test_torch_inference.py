"""convert_for_inference: real models converted once for inference, weights stored in the low dtype,
outputs equal to autocast's (the FX route computes as autocast does) and close to float32's,
the original model untouched, typed errors for bad input."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn as nn  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.torch.inference import convert_for_inference  # noqa: E402
from precision_policy.errors import ConfigError, GraphError  # noqa: E402
from precision_policy.torch import trace  # noqa: E402

import torch_zoo  # noqa: E402
from torch_models import ConvBNDropNet  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["dtypes"] == before["dtypes"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def _check(model: nn.Module, x: tuple, *, exact: bool = True, fp32_tol: float = 0.05) -> nn.Module:
    """Convert at batch 1, compare with autocast (eval, no_grad) and float32, check the weights."""
    before = _snapshot(model)
    fast = convert_for_inference(model, BF16, example_inputs=x)
    _assert_unchanged(model, before)
    assert not fast.training
    assert all(not p.requires_grad for p in fast.parameters())

    model.eval()
    with torch.no_grad():
        ref = model(*x)
        with torch.autocast("cpu", torch.bfloat16):
            ac = model(*x)
    y = fast(*x)
    assert y.dtype == torch.float32 and not y.requires_grad
    if exact:
        torch.testing.assert_close(y, ac.float(), rtol=0, atol=0)
    else:
        torch.testing.assert_close(y, ac.float(), rtol=2e-2, atol=2e-2 * float(ac.abs().max()))
    scale = float(ref.abs().max())
    assert float((y - ref).abs().max()) <= fp32_tol * scale, (float((y - ref).abs().max()), scale)

    # weights of the low ops (convolutions, linears) are stored in bfloat16; nothing else is
    stats = fast.pp_inference_stats
    assert stats.folded > 0 and stats.low_params
    params = dict(fast.named_parameters())
    for name, dt in stats.low_params.items():
        assert dt == torch.bfloat16
        assert params[name].dtype == torch.bfloat16
    low_ops = {n.target for n in fast.graph.nodes if n.op == "call_function"
               and n.target in (torch.conv2d, torch.nn.functional.conv2d, torch.nn.functional.linear)}
    assert low_ops, "expected convolutions or linears in the graph"
    for node in fast.graph.nodes:
        if node.op == "call_function" and node.target in low_ops:
            w = node.args[1]
            assert w.op == "get_attr" and params[str(w.target)].dtype == torch.bfloat16, node.format_node()
    # casting once is not per forward: no call_method "to" reads a parameter
    for node in fast.graph.nodes:
        if node.op == "call_method" and node.target == "to":
            assert node.args[0].op != "get_attr", node.format_node()
    return fast


def test_small_net_matches_autocast_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = ConvBNDropNet().train()
    x = (torch.randn(1, 3, 8, 8),)
    fast = _check(model, x)
    assert fast.conv.weight.dtype == torch.bfloat16 and fast.fc.weight.dtype == torch.bfloat16
    assert fast.bn.weight.dtype == torch.float32  # BatchNorm runs as autocast runs it, fp32 parameters
    assert not fast.bn.training and fast.bn is not model.bn
    assert model.conv.weight.dtype == torch.float32 and model.conv.weight.requires_grad
    # deterministic (dropout off), and the trace did not advance the model's statistics
    assert torch.equal(fast(*x), fast(*x))
    assert int(model.bn.num_batches_tracked) == 0
    # independent of the model: training it further leaves the converted weights as they were
    y = fast(*x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(fast(*x), y)


def test_works_from_a_plan_and_keeps_low_outputs_when_asked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    cfg = BF16.model_copy(update={"keep_output_dtype": False})
    plan = pp.plan(trace(model, (x,)), pp.RunConfig(**cfg.model_dump()))
    fast = convert_for_inference(model, plan, example_inputs=x)
    y = fast(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(y, model(x))
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert fast.pp_inference_stats.folded == 4  # two weights, two biases


def test_float16_emulated_stores_float16_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    cfg = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu", use_env_lists=False)
    fast = convert_for_inference(model, cfg, example_inputs=(x,))
    assert {p.dtype for p in fast.parameters()} == {torch.float16}
    with torch.no_grad():
        ref = model(x)
    y = fast(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


def test_no_low_dtype_is_a_config_error() -> None:
    model = nn.Linear(4, 4)
    for mode in ("must_keep_origin_dtype", "force_fp32"):
        cfg = pp.RunConfig(precision_mode=mode, op_info="torch_autocast_cpu", use_env_lists=False)
        with pytest.raises(ConfigError, match="names no low dtype"):
            convert_for_inference(model, cfg, example_inputs=(torch.randn(1, 4),))
    with pytest.raises(ConfigError, match="RunConfig or a CastPlan"):
        convert_for_inference(model, "allow_mix_precision_bf16", example_inputs=(torch.randn(1, 4),))  # type: ignore[arg-type]


def test_untraceable_input_is_a_graph_error() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(GraphError, match="positional input"):
        convert_for_inference(model, BF16, example_inputs=(torch.randn(1, 4), torch.randn(1, 4)))


def test_plan_for_another_graph_is_a_graph_error() -> None:
    a = nn.Sequential(nn.Linear(4, 4))
    b = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(1, 4)
    plan = pp.plan(trace(a, (x,)), BF16)
    with pytest.raises(GraphError, match="another graph"):
        convert_for_inference(b, plan, example_inputs=(x,))


@pytest.mark.slow
def test_torchvision_resnet18() -> None:
    tv = torch_zoo.import_torchvision()
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    _check(model, (torch.randn(1, 3, 64, 64),))


@pytest.mark.slow
def test_torchvision_swin_stochastic_depth_is_off() -> None:
    """Swin's stochastic depth reads ``self.training`` as a Python bool: traced in eval mode, it is off."""
    tv = torch_zoo.import_torchvision()
    torch.manual_seed(0)
    model = tv.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                      window_size=[4, 4], num_classes=10, stochastic_depth_prob=0.5)
    fast = _check(model, (torch.randn(1, 3, 32, 32),))
    assert not any("bernoulli" in str(n.target) for n in fast.graph.nodes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm_convnext_atto", "timm_vit_tiny"])
def test_timm(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = torch_zoo.timm_models()[name]()
    x = tuple(a[:1] for a in inputs["args"])
    fast = _check(model, x)
    # the residual adds take their bfloat16 branch as it is: the add upcasts it (bitwise as autocast)
    assert fast.pp_inference_stats.promoted > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_bert"])
def test_hugging_face_by_keyword(name: str) -> None:
    """torch.fx cannot trace these: the torch.export capture is converted (called as the model)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, inputs = torch_zoo.transformers_models()[name]()
    ids = inputs["kwargs"]["input_ids"][:1]
    before = _snapshot(model)
    try:
        fast = convert_for_inference(model, BF16, example_inputs=(), kwargs={"input_ids": ids})
    except GraphError as exc:  # a package without the torch.export route
        pytest.skip(f"no torch.export route: {exc}")
    _assert_unchanged(model, before)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with torch.autocast("cpu", torch.bfloat16):
            ac = model(input_ids=ids).logits
    y = fast(input_ids=ids).logits
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ac.float(), rtol=0, atol=0)
    assert float((y - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    torch.testing.assert_close(fast(ids).logits, y, rtol=0, atol=0)  # by position, as the model takes it
    low = {n: p.dtype for n, p in fast.named_parameters() if p.dtype == torch.bfloat16}
    assert low and fast.pp_inference_stats.folded > 0
    assert all(not p.requires_grad for p in fast.parameters())
    with pytest.raises(GraphError, match="convert again"):
        fast(input_ids=inputs["kwargs"]["input_ids"])  # batch 2: another shape than captured
