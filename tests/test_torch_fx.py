"""torch.fx route: tracing changes nothing in the model, the rewrite follows train()/eval(),
``torch.fx.wrap``'d helpers are traced through, and parameters vote as torch promotes them."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import torch.fx._symbolic_trace as fx_trace  # noqa: E402
import torch.nn as nn  # noqa: E402
from test_torch_backend import Observe  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.graph import OpGraph  # noqa: E402
from precision_policy.rules import Rule  # noqa: E402
from precision_policy.torch import apply, precision, trace, trace_fx  # noqa: E402

BF16_AUTOCAST = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A Swin-style helper that torch.fx.wrap keeps as one call in a symbolic trace."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


torch.fx.wrap("window_attention")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision's ``stochastic_depth``: a factory in ``x.dtype`` and in-place updates whose result is unused."""
    if not training:
        return x
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    noise = noise.bernoulli_(1 - p)
    noise.div_(1 - p)
    return x * noise


torch.fx.wrap("drop_path")


def masked_scores(s: torch.Tensor) -> torch.Tensor:
    """Swin's attention mask: item assignment on a tensor, then Python comparisons."""
    mask = s.new_zeros(s.shape[-2:])
    mask[: s.shape[-2] // 2, :] = 1.0
    return s.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0) + s


torch.fx.wrap("masked_scores")


class ResidualDropPath(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = drop_path(self.fc(x), 0.5, self.training)
        y += x
        return masked_scores(y @ y.transpose(-2, -1))


class WindowBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(window_attention(q, k, v))


class BNDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.bn1d = nn.BatchNorm1d(8, momentum=None)  # cumulative average: reads num_batches_tracked
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.bn1d(y.mean(dim=(2, 3))))


class BiasAfterLinear(nn.Module):
    """BART's ``lm_head(h) + final_logits_bias``: a float32 parameter added to a bf16 matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, bias=False)
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h) + self.bias


class ScalarGate(nn.Module):
    """A 0-dim parameter times a bf16 tensor: torch promotes the dimensioned tensor, bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h) * self.alpha


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trace_changes_nothing_in_the_model():
    torch.manual_seed(0)
    model, x = BNDropNet().train(), torch.randn(4, 3, 6, 6)
    before = _state(model)
    rng = torch.get_rng_state()
    graph = trace(model, (x,))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "trace moved a buffer"
    assert int(model.bn.num_batches_tracked) == 0 and int(model.bn1d.num_batches_tracked) == 0
    assert torch.equal(torch.get_rng_state(), rng), "trace drew from the global generator"
    # BatchNorm and Dropout are one op each, named by their module path, with the right type
    assert graph.node("bn").op_type == "BatchNorm" and graph.node("bn1d").op_type == "BatchNorm"
    assert graph.node("drop").op_type == "Dropout"
    assert model.training


def test_applied_module_follows_train_and_eval_like_autocast():
    torch.manual_seed(0)
    model, x = BNDropNet().train(), torch.randn(4, 3, 6, 6)
    reference = copy.deepcopy(model)
    plan = pp.plan(trace(model, (x,)), BF16_AUTOCAST.model_copy(update={"keep_output_dtype": False}))
    assert plan["bn"].dtype == "bfloat16" and plan["drop"].dtype == "bfloat16"  # statistics do not vote
    gm = apply(model, plan)
    # train(): running statistics and num_batches_tracked move as in the original under autocast
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = reference(x)
    torch.manual_seed(1)
    y = gm(x)
    assert y.dtype == y_ref.dtype
    for name in ("bn", "bn1d"):
        ours, ref = getattr(model, name), getattr(reference, name)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1
        assert not torch.equal(ours.running_mean, torch.zeros_like(ours.running_mean))
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=5e-2, atol=5e-2)  # same dropout mask
    # eval(): running statistics are used and left alone, dropout is off, outputs are deterministic
    gm.eval()
    reference.eval()
    assert not model.bn.training and not model.drop.training
    frozen = _state(model)
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = reference(x)
    y1, y2 = gm(x), gm(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1.float(), y_ref.float(), rtol=5e-2, atol=5e-2)
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())
    # op by op, in both modes, the rewrite runs what the eager route and autocast run
    for train in (True, False):
        gm.train(train)
        reference.train(train)
        seen_fx, seen_eager, seen_autocast = Observe(), Observe(), Observe()
        with seen_fx:
            gm(x)
        with precision(BF16_AUTOCAST, model=reference), seen_eager:
            reference(x)
        with torch.autocast("cpu", torch.bfloat16), seen_autocast:
            reference(x)
        assert seen_fx.log == seen_eager.log == seen_autocast.log


def test_fx_wrapped_helpers_are_traced_through():
    torch.manual_seed(0)
    model, x = WindowBlock(), torch.randn(2, 5, 16)
    # a plain symbolic trace keeps the helper as one call: the reason the route must trace through
    plain = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_function" and n.target is window_attention for n in plain.graph.nodes)
    traced = trace_fx(model, (x,))
    ops = [n.op_type for n in traced.graph]
    assert ops.count("BatchMatMulV2") == 2 and "SoftmaxV2" in ops
    assert not any("window_attention" in op for op in ops)
    plan = pp.plan(traced.graph, BF16_AUTOCAST)
    record: list = []
    with precision(BF16_AUTOCAST, model=model, record=record):
        model(x)
    planned = [(d.op_type, d.dtype) for d in plan if d.rule is not Rule.SOURCE]
    assert [(r.op_type, r.dtype) for r in record] == planned
    assert ("BatchMatMulV2", "bfloat16") in planned
    seen_fx, seen_autocast = Observe(), Observe()
    with seen_fx:
        apply(model, plan, traced=traced)(x)
    with torch.autocast("cpu", torch.bfloat16), seen_autocast:
        model(x)
    assert seen_fx.log == seen_autocast.log
    # torch.fx.wrap's registry is left as it was
    assert any(name == "window_attention" for _, name in fx_trace._wrapped_fns_to_patch)


def test_parameter_added_to_a_bf16_tensor_votes_as_torch_promotes_it():
    torch.manual_seed(0)
    model, h = BiasAfterLinear(), torch.randn(3, 8)
    graph = trace(model, (h,))
    assert graph.variables_vote
    assert OpGraph.from_dict(graph.to_dict()).variables_vote
    assert "variables_vote" not in OpGraph("tf-like").to_dict()  # TF graphs: omitted, False
    plan = pp.plan(graph, BF16_AUTOCAST)
    (add,) = [d for d in plan if d.op_type == "Add"]
    assert add.dtype == "float32", add.reason
    assert plan["lin"].dtype == "bfloat16"
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = model(h)
    assert y_ref.dtype == torch.float32
    y = apply(model, plan)(h)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    # the same graph without the flag (TensorFlow's rule): the parameter does not vote
    g_tf = OpGraph.from_dict({**graph.to_dict(), "variables_vote": False})
    (add_tf,) = [d for d in pp.plan(g_tf, BF16_AUTOCAST) if d.op_type == "Add"]
    assert add_tf.dtype == "bfloat16"


def test_traced_through_helpers_keep_inplace_updates_and_match_autocast_bit_for_bit():
    torch.manual_seed(0)
    model, x = ResidualDropPath().train(), torch.randn(4, 6, 16)
    cfg = BF16_AUTOCAST.model_copy(update={"keep_output_dtype": False})
    traced = trace_fx(model, (x,))
    plan = pp.plan(traced.graph, cfg)
    assert not plan.unknown, plan.unknown  # no torch.empty op, ==/!= are Equal/NotEqual
    assert {"Equal", "NotEqual", "MaskedFill"} <= {d.op_type for d in plan}
    gm = apply(model, plan, traced=traced)
    assert "div_" in gm.code and "+=" in gm.code  # in-place updates survive dead-code elimination
    seen_fx, seen_autocast = Observe(), Observe()
    torch.manual_seed(1)
    with seen_fx:
        y = gm(x)
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16), seen_autocast:
        y_ref = model(x)
    assert seen_fx.log == seen_autocast.log
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)


def test_attention_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 6, 32)
    cfg = BF16_AUTOCAST.model_copy(update={"keep_output_dtype": False})
    traced = trace_fx(model, (x,))
    gm = apply(model, pp.plan(traced.graph, cfg), traced=traced)
    for train in (True, False):
        gm.train(train)
        model.train(train)
        torch.manual_seed(3)
        y = gm(x)
        torch.manual_seed(3)
        with torch.autocast("cpu", torch.bfloat16):
            y_ref = model(x)
        assert torch.equal(y, y_ref), f"train={train}"
    assert torch.equal(gm(x), gm(x))  # eval: no dropout anywhere, attention included


def test_zero_dim_parameter_does_not_vote():
    torch.manual_seed(0)
    model, h = ScalarGate(), torch.randn(3, 8)
    cfg = BF16_AUTOCAST.model_copy(update={"keep_output_dtype": False})
    plan = pp.plan(trace(model, (h,)), cfg)
    (mul,) = [d for d in plan if d.op_type == "Mul"]
    assert mul.dtype == "bfloat16", mul.reason
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = model(h)
    y = apply(model, plan)(h)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)


def test_training_branches_in_helpers_follow_train_and_eval_after_the_rewrite():
    """torchvision's stochastic_depth and a functional F.dropout(x, p, self.training) branch on the
    flag in Python: traced in train mode, the rewrite must still stop dropping in eval."""
    torch_zoo = pytest.importorskip("torch_zoo")
    tv = torch_zoo.import_torchvision()

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.sd = tv.ops.StochasticDepth(0.5, "row")

        def forward(self, x):
            y = torch.nn.functional.dropout(self.lin(x), 0.5, self.training)
            return x + self.sd(y)

    torch.manual_seed(0)
    model = Block().train()
    x = torch.randn(16, 8)
    traced = trace_fx(model, (x,))
    gm = apply(model, pp.plan(traced.graph, precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu",
                              use_env_lists=False), traced=traced).eval()
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        ref = model(x)
    assert torch.equal(gm(x), gm(x)) and torch.equal(gm(x), ref)
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(2)
    assert not torch.equal(a, gm(x))  # dropping again in train mode
