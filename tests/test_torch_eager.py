"""Eager route (``precision()``) against torch.autocast: in-place and ``out=`` calls, the
per-call cast cache (self-attention), op by op and in values."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.torch.eager import _out_dtypes  # noqa: E402
from precision_policy.backends.torch.ops import func_label, is_inplace, op_type_of  # noqa: E402
from precision_policy.torch import precision, trace_fx  # noqa: E402

BF16_AUTOCAST = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False)


class ObserveAll(TorchFunctionMode):
    """Records (call, output dtypes) of every mapped op and every in-place call with a float input."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = op_type_of(func)
        if (op is not None and op != "Cast") or is_inplace(getattr(func, "__name__", "")):
            leaves = torch.utils._pytree.tree_flatten((args, kwargs))[0]
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves):
                self.log.append((func_label(func), _out_dtypes(out)))
        return out


class CountMatmuls(TorchDispatchMode):
    """Counts the aten matrix products that actually run (below autograd and autocast)."""

    NAMES = frozenset({"addmm", "mm", "bmm", "baddbmm", "linear", "matmul"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block, residual updated in place: ``x += gamma * f(x)``, then ``x.mul_``/``x.add_``.

    ``gamma * f(x)`` is float32 under autocast (the float32 layer scale wins torch's promotion),
    so the residual stream stays float32."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = (self.gamma * self.pw2(self.act(self.pw1(y)))).permute(0, 3, 1, 2)
        x += y
        x *= 0.5
        x.add_(y, alpha=0.25)
        return x


def _convnext_input() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 8, 6, 6)


@pytest.mark.parametrize("give_model", [True, False])
def test_inplace_residual_keeps_float32_like_autocast(give_model):
    torch.manual_seed(0)
    block = ConvNeXtBlock()
    reference, ours = ObserveAll(), ObserveAll()
    x_ref, x_ours = _convnext_input(), _convnext_input()
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16), reference:
            y_ref = block(x_ref)
        with precision(BF16_AUTOCAST, model=block if give_model else None), ours:
            y = block(x_ours)
    assert ours.log == reference.log
    inplace = [entry for entry in ours.log if is_inplace(entry[0].rsplit(".", 1)[-1])]
    assert [d for _, d in inplace] == [("float32",)] * 3, ours.log
    # the residual stream is written in place: the caller's tensor is the result, float32
    assert y is x_ours and y.dtype == torch.float32 and y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    if give_model:  # the same decisions as the FX route's plan (which sees ``x += y`` as an update of x)
        x = _convnext_input()
        plan = pp.plan(trace_fx(block, (x.clone(),)).graph, BF16_AUTOCAST)
        record: list = []
        with torch.no_grad(), precision(BF16_AUTOCAST, model=block, record=record):
            block(x)
        assert [(r.op_type, r.dtype) for r in record] == [
            (d.op_type, d.dtype) for d in plan if not d.reason.startswith("source")]
        assert ("Mul", "float32") in [(r.op_type, r.dtype) for r in record]


def test_inplace_on_low_tensor_keeps_low_and_computes_in_wider_dtype_like_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x, other = torch.randn(4, 8), torch.randn(4, 8)

    def step(inp: torch.Tensor) -> torch.Tensor:
        h = lin(inp)  # bf16 under both
        h.add_(other)  # float32 other into a bf16 tensor: stays bf16
        h.mul_(other)
        return h

    reference, ours = ObserveAll(), ObserveAll()
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16), reference:
            y_ref = step(x)
        with precision(BF16_AUTOCAST, model=lin), ours:
            y = step(x)
    assert ours.log == reference.log
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("give_model", [True, False])
def test_out_variant_writes_into_the_given_tensor(give_model):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    results = {}
    for route in ("autocast", "ours"):
        out = torch.zeros(4, 8)
        if route == "autocast":
            ctx = torch.autocast("cpu", torch.bfloat16)
        else:
            ctx = precision(BF16_AUTOCAST, model=lin if give_model else None)
        with torch.no_grad(), ctx:
            h = lin(x)  # bf16 under both
            got = torch.add(h, h, out=out)  # bf16 values written into a float32 tensor
            torch.mul(h[:2], 2.0, out=out[:2])
        assert h.dtype == torch.bfloat16
        assert got is out and out.dtype == torch.float32
        assert out.abs().sum() > 0  # written into, not into a cast copy
        results[route] = out
    torch.testing.assert_close(results["ours"], results["autocast"], rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_self_attention_casts_once_and_takes_the_packed_projection(train):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).train(train)
    mha.dropout = 0.0
    x = torch.randn(2, 5, 16, requires_grad=True)  # grad: off the fused inference fast path
    ref_count, our_count = CountMatmuls(), CountMatmuls()
    with torch.autocast("cpu", torch.bfloat16), ref_count:
        y_ref, _ = mha(x, x, x)
    with precision(BF16_AUTOCAST, model=mha), our_count:
        y, _ = mha(x, x, x)
    # packed: one in-projection, two attention products, one out-projection
    assert ref_count.count == 4
    assert our_count.count == ref_count.count
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
