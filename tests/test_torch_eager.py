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
from precision_policy.rules import Rule  # noqa: E402
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
            (d.op_type, d.dtype) for d in plan if d.rule is not Rule.SOURCE]
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


# ---------------------------------------------------------------------- by-name overrides (bug 8)
def _resnet():
    from torch_models import resnet_cnn

    torch.manual_seed(0)
    return resnet_cnn(), torch.randn(4, 1, 8, 8)


def _keep_config(tmp_path, lines, **extra):
    f = tmp_path / "keep.txt"
    f.write_text("\n".join(lines) + "\n")
    return pp.RunConfig(**{**BF16_AUTOCAST.model_dump(), "keep_dtype": str(f), **extra})


def test_keep_dtype_by_module_path_keeps_the_same_ops_in_both_routes(tmp_path):
    model, x = _resnet()
    cfg = _keep_config(tmp_path, ["0", "3.conv2", "7"])  # stem conv, a block's second conv, the classifier
    plan = pp.plan(trace_fx(model, (x,)).graph, cfg)
    fx_kept = {d.name: d.dtype for d in plan if d.rule is Rule.KEEP_DTYPE}
    assert fx_kept == {"0": "float32", "3.conv2": "float32", "7": "float32"}
    record: list = []
    with precision(cfg, model=model, record=record):
        model(x)
    kept = {r.name: r.dtype for r in record if r.rule is Rule.KEEP_DTYPE}
    assert kept == fx_kept
    # every other conv and the matmuls are still lowered, as without the file
    assert {r.name: r.dtype for r in record if r.op_type == "Conv2D" and r.name not in kept} == {
        "3.conv1": "bfloat16", "4.conv1": "bfloat16", "4.conv2": "bfloat16"}
    # prepare() routes the same names
    from precision_policy.torch import prepare

    prepared, _ = prepare(model, None, cfg)
    with TraceOps() as seen:
        prepared(x)
    assert [d for label, d in seen.log if label == "torch.nn.functional.linear"] == [("float32",)]


def test_customize_dtypes_by_module_path_in_the_eager_route(tmp_path):
    model, x = _resnet()
    f = tmp_path / "custom.txt"
    f.write_text("7::InputDtype:float32,float32,float32,OutputDtype:float32\n")
    cfg = pp.RunConfig(**{**BF16_AUTOCAST.model_dump(), "customize_dtypes": str(f)})
    record: list = []
    with precision(cfg, model=model, record=record):
        model(x)
    (fc,) = [r for r in record if r.name == "7"]
    assert fc.dtype == "float32" and fc.rule is Rule.CUSTOMIZE_DTYPES


def test_by_name_overrides_that_match_nothing_are_errors_naming_the_closest(tmp_path):
    from precision_policy.errors import ConfigError, OverrideError
    from precision_policy.torch import prepare

    model, x = _resnet()
    with pytest.raises(OverrideError, match=r"keep\.txt:2: '3\.conv3' is no module path.*'3\.conv2'|keep\.txt:2: '3\.conv3'.*did you mean"):
        prepare(model, None, _keep_config(tmp_path, ["7", "3.conv3"]))
    assert "_pp_config" not in model.__dict__  # nothing half-done
    # a container module runs no op of its own: the error names its ops, after the first forward
    net = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    with pytest.raises(OverrideError, match=r"keep\.txt:1: '0' is a module that runs no op of its own.*'0\.0'"):
        with precision(_keep_config(tmp_path, ["0"]), model=net):
            net(torch.randn(2, 8))
    # a block with ops of its own (BasicBlock's relu and residual add): its name is its first op
    record: list = []
    with precision(_keep_config(tmp_path, ["3"]), model=model, record=record):
        model(x)
    assert [(r.name, r.op_type) for r in record if r.rule is Rule.KEEP_DTYPE] == [("3", "Relu")]
    # by-name overrides need the model, to know which module runs
    with pytest.raises(ConfigError, match="model=model"):
        with precision(_keep_config(tmp_path, ["7"])):
            pass


class TraceOps(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.log: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if op_type_of(func) is not None:
            self.log.append((func_label(func), _out_dtypes(out)))
        return out


# ---------------------------------------------------------------------- fused fast paths (bug 5)
def _encoder(layers=None):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return (nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else layer).eval()


class FusedCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.fused: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_transformer_encoder_layer_fwd" in name or "_native_multi_head_attention" in name:
            self.fused.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["layer", "stack", "mha"])
def test_inference_keeps_the_fused_fast_path_and_equals_autocast(kind):
    model = _encoder(2 if kind == "stack" else None)
    if kind == "mha":
        model = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 8, 64)

    def run():
        return model(x, x, x)[0] if kind == "mha" else model(x)

    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            ref = run()
        record: list = []
        with precision(BF16_AUTOCAST, model=model, record=record):
            out = run()
        with FusedCalls() as fused, precision(BF16_AUTOCAST, model=model):
            run()
        f32 = run()
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)
    assert (out.float() - f32).abs().max() > 0  # it did run in bfloat16
    assert len(fused.fused) == (2 if kind == "stack" else 1)  # the fused kernel ran, once per layer
    assert {r.op_type for r in record} <= {"TransformerEncoderLayer", "MultiHeadAttention"}, record
    assert all(r.dtype == "bfloat16" for r in record)


def test_fast_path_module_in_training_or_with_grad_runs_op_by_op_like_autocast():
    model = _encoder().train()
    x = torch.randn(2, 8, 64)
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        ref = model(x)
    record: list = []
    torch.manual_seed(1)
    with precision(BF16_AUTOCAST, model=model, record=record):
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "TransformerEncoderLayer" not in {r.op_type for r in record} and len(record) > 5


def test_fast_path_in_origin_dtype_when_the_mode_keeps_it():
    model = _encoder()
    x = torch.randn(2, 8, 64)
    cfg = pp.RunConfig(precision_mode="force_fp32", op_info="torch_autocast_cpu", use_env_lists=False)
    with torch.no_grad():
        f32 = model(x)
        with FusedCalls() as fused, precision(cfg, model=model):
            out = model(x)
    assert fused.fused and out.dtype == torch.float32
    torch.testing.assert_close(out, f32, rtol=0, atol=0)


def test_cached_decisions_belong_to_their_config_and_by_name_configs_decide_per_op(tmp_path):
    """Decisions are cached per RunConfig across contexts (prepare() opens one per forward): two
    configs used in turn keep their own answers, and a by-name config still decides per module."""
    model, x = _resnet()
    fp32 = pp.RunConfig(precision_mode="force_fp32", op_info="torch_autocast_cpu", use_env_lists=False)
    keep = _keep_config(tmp_path, ["7"])
    for _ in range(2):
        for cfg, want in ((BF16_AUTOCAST, "bfloat16"), (fp32, "float32"), (keep, "float32")):
            record: list = []
            with precision(cfg, model=model, record=record):
                model(x)
            fc = [r for r in record if r.op_type == "MatMulV2"]
            assert [r.dtype for r in fc] == [want], (cfg.precision_mode, fc)
            convs = {r.dtype for r in record if r.op_type == "Conv2D"}
            assert convs == ({"float32"} if cfg is fp32 else {"bfloat16"})
