"""torch.export route: models torch.fx cannot trace (Hugging Face transformers) are captured
with torch.export, planned, rewritten and run; every op runs in autocast's dtype and the
outputs are autocast's, bit for bit, in train() and eval(); the applied module trains the
model's own parameters; capture leaves the model as it was; an untraceable model is a
typed GraphError.

Ops are compared at the ATen dispatch level (:class:`DispatchObserve`): the exported graph holds
ATen ops (``aten.linear``), not the torch functions ``Observe`` sees (``F.linear``).
"""

from __future__ import annotations

import copy
import logging

import pytest

torch = pytest.importorskip("torch")

import torch.nn as nn  # noqa: E402
from test_torch_backend import BF16_AUTOCAST  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.backends.torch.export import ExportedPrecision  # noqa: E402
from precision_policy.backends.torch.ops import aten_disagreements, aten_op_type, op_type_of  # noqa: E402
from precision_policy.torch import apply, precision, trace, trace_fx  # noqa: E402

from torch_models import ConvBNDropNet  # noqa: E402

#: ATen ops that only change a tensor's dtype: autocast's casts and the plan's.
CASTS = frozenset({"_to_copy", "to", "copy_"})


class DispatchObserve(TorchDispatchMode):
    """Records (ATen op, output dtypes) of every op the dispatcher runs, casts and metadata queries
    (``prim.device``) left out.

    It sits below autocast and below autograd: under ``torch.autocast`` it sees the kernels
    autocast calls (``aten.addmm`` on bfloat16 inputs), so a matmul left in float32, a cast
    too many that changes an op's dtype, or an op missing or added all show.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in CASTS and func.namespace != "prim":  # prim: metadata queries
            dts = tuple(str(t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            self.log.append((str(func), dts))
        return out


def tensors(out) -> list:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def dispatch_logged(module, inputs: dict, ctx):
    seen = DispatchObserve()
    torch.manual_seed(1)  # same dropout masks in every run
    with ctx, seen:
        out = module(*inputs.get("args", ()), **inputs.get("kwargs", {}))
    return seen.log, out


def assert_static_route_is_autocast(model, static, inputs: dict):
    """The applied module's ops, op by op, are those of autocast on the captured program, and its
    output is the model's output under autocast (rtol=0, atol=0)."""
    captured = static.captured()
    ref_log, ref = dispatch_logged(captured, inputs, torch.autocast("cpu", torch.bfloat16))
    log, out = dispatch_logged(static, inputs, torch.autocast("cpu", enabled=False))
    assert len(ref_log) >= 5
    mismatches = [(k, a, b) for k, (a, b) in enumerate(zip(ref_log, log)) if a != b]
    assert not mismatches and len(log) == len(ref_log), mismatches[:3]
    assert any(dts == ("torch.bfloat16",) for _, dts in log) and any(dts == ("torch.float32",) for _, dts in log)
    _, eager = dispatch_logged(model, inputs, torch.autocast("cpu", torch.bfloat16))
    assert type(out) is type(eager)
    assert len(tensors(out)) == len(tensors(eager)) >= 1
    for a, b in zip(tensors(out), tensors(eager)):  # logits (float32 again: keep_output_dtype), loss...
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0)
    return out


class Gated(nn.Module):
    """Keyword-only inputs, a dict output, dropout and a 0-dim parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> dict:
        h = self.drop(self.fc(x)) * self.alpha  # 0-dim: does not vote, bf16
        return {"y": h * gate, "z": self.fc(x) + self.bias}  # a float32 parameter votes: float32


class Rotary(nn.Module):
    """Llama's rotary embedding: a ``@torch.no_grad()`` forward (a ``wrap_with_set_grad_enabled``
    region in the exported graph) on a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(4), persistent=False)

    @torch.no_grad()
    def forward(self, pos: torch.Tensor) -> tuple:
        f = pos[..., None].float() * self.inv_freq
        return f.cos(), f.sin()


class RotaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rot = Rotary()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rot(pos)
        return self.fc(x * cos + sin)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.sum().item() > 0) + 1):
            x = self.fc(x)
        return x


def test_aten_ops_have_the_op_types_of_the_torch_functions_of_their_names():
    assert aten_disagreements() == []
    aten = torch.ops.aten
    assert aten_op_type(aten.linear.default) == op_type_of(torch.nn.functional.linear) == "MatMulV2"
    assert aten_op_type(aten.layer_norm.default) == op_type_of(torch.nn.functional.layer_norm)
    assert aten_op_type(aten.scaled_dot_product_attention.default) == op_type_of(
        torch.nn.functional.scaled_dot_product_attention)
    assert aten_op_type(aten.cross_entropy_loss.default) == op_type_of(torch.nn.functional.cross_entropy)
    assert aten_op_type(aten.__and__.Tensor) == op_type_of(torch.Tensor.__and__)
    assert aten_op_type(aten.add_.Tensor) is None and aten_op_type(aten.sym_size.int) is None
    assert aten_op_type(aten._assert_tensor_metadata.default) is None


def test_keyword_inputs_parameters_and_dropout_through_the_export_route():
    torch.manual_seed(0)
    model = Gated().train()
    inputs = {"kwargs": {"x": torch.randn(4, 8), "gate": torch.rand(8)}}
    graph = trace(model, kwargs=inputs["kwargs"])  # torch.fx cannot bind keyword-only inputs: export
    assert graph.node("fc").attrs["torch"] == "aten.linear.default"
    assert graph.node("fc.weight").op_type == "Parameter" and graph.node("alpha").attrs == {"rank": 0}
    assert "drop" in graph.node_names and "fc/linear_1" in graph.node_names  # module paths, then path/node
    plan = pp.plan(graph, BF16_AUTOCAST)
    static = apply(model, plan)
    assert isinstance(static, ExportedPrecision)
    assert list(static.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(static.parameters(), model.parameters()))
    out = assert_static_route_is_autocast(model, static, inputs)
    assert out["y"].dtype == torch.float32 and out["z"].dtype == torch.float32  # keep_output_dtype
    mul = [d for d in plan if d.op_type == "Mul"]
    assert mul[0].dtype == "bfloat16"  # dropout output times the 0-dim alpha
    (add,) = [d for d in plan if d.op_type == "Add"]
    assert add.dtype == "float32", add.reason
    static.eval()  # captured again in eval mode, planned alike: dropout off, deterministic
    assert not model.training and not model.drop.training
    assert torch.equal(static(**inputs["kwargs"])["y"], static(**inputs["kwargs"])["y"])
    assert_static_route_is_autocast(model, static, inputs)
    assert len(static._runs) == 2


def test_capture_changes_nothing_and_buffers_update_as_under_autocast():
    torch.manual_seed(0)
    model, x = ConvBNDropNet().train(), torch.randn(4, 3, 6, 6)
    model.conv.bias.requires_grad_(False)
    model.drop.eval()  # a submodule's own flag is kept, and the capture is specialised on it
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    graph = trace(model, (x,), route="export")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.drop.training and not model.conv.bias.requires_grad
    assert graph.node("bn.running_mean").op_type == "Parameter"
    static = apply(model, pp.plan(graph, BF16_AUTOCAST))
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = reference(x)
    torch.manual_seed(1)
    y = static(x)
    assert torch.equal(y, y_ref.float())
    assert int(model.bn.num_batches_tracked) == int(reference.bn.num_batches_tracked) == 1
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)
    assert torch.equal(model.bn.running_var, reference.bn.running_var)
    static.eval()
    reference.eval()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = reference(x)
    assert torch.equal(static(x), y_ref.float())
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())


def test_no_grad_regions_are_inlined_and_keep_grad_mode():
    torch.manual_seed(0)
    model, x, pos = RotaryNet(), torch.randn(2, 3, 4, requires_grad=True), torch.arange(3).expand(2, 3)
    graph = trace(model, (x, pos), route="export")
    assert graph.node("rot/cos").op_type == "Cos" and graph.node("rot.inv_freq").op_type == "Parameter"
    static = apply(model, pp.plan(graph, BF16_AUTOCAST))
    inputs = {"args": (x, pos)}
    assert_static_route_is_autocast(model, static, inputs)
    assert "_set_grad_enabled" in static.graph_module.code
    y = static(x, pos)
    assert torch.is_grad_enabled()
    y.sum().backward()
    assert model.fc.weight.grad is not None and x.grad is not None


def test_new_input_shapes_are_captured_and_planned_again():
    torch.manual_seed(0)
    model = Gated().eval()
    static = apply(model, pp.plan(trace(model, kwargs={"x": torch.randn(4, 8), "gate": torch.rand(8)}), BF16_AUTOCAST))
    x, gate = torch.randn(7, 8), torch.rand(8)
    y = static(x=x, gate=gate)["y"]
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(y, model(x, gate=gate)["y"].float())
    assert len(static._runs) == 2


def test_fx_route_takes_keyword_inputs():
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4)
    traced = trace_fx(model, kwargs={"input": x})
    gm = apply(model, pp.plan(traced.graph, BF16_AUTOCAST), traced=traced)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(gm(input=x), model(x).float())
    with pytest.raises(pp.GraphError, match="keyword input"):
        trace_fx(model, kwargs={"nope": x})


def test_untraceable_model_is_a_typed_error_naming_it_and_the_eager_route():
    model, x = DataDependent(), torch.ones(2, 4)
    for route in ("auto", "export"):
        with pytest.raises(pp.GraphError) as err:
            trace(model, (x,), route=route)
        text = str(err.value)
        assert "DataDependent" in text and "eager route" in text and "Traceback" not in text
    with precision(BF16_AUTOCAST, model=model):
        assert model(x).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def hf():
    torch_zoo = pytest.importorskip("torch_zoo")
    torch_zoo.import_torchvision()  # before transformers imports it
    pytest.importorskip("transformers")
    return torch_zoo.transformers_models()


@pytest.mark.slow
def test_hf_gpt2_with_keyword_inputs_traces_plans_applies_and_equals_autocast(hf, caplog):
    caplog.set_level(logging.ERROR)
    torch.manual_seed(0)
    model, inputs = hf["hf_gpt2"]()
    model.train()
    graph = trace(model, kwargs=inputs["kwargs"])  # no use_cache given: captured with use_cache=False
    (c_attn,) = [n.name for n in graph if n.name.startswith("transformer.h.0.attn.c_attn") and n.op_type == "MatMulV2"]
    assert c_attn == "transformer.h.0.attn.c_attn/addmm"  # GPT2's Conv1D: view, addmm, view
    assert graph.node("transformer.h.0.attn.c_attn").op_type == "Reshape"
    assert graph.node("transformer.wte.weight").op_type == "Parameter"
    plan = pp.plan(graph, BF16_AUTOCAST)
    assert not plan.unknown, plan.unknown
    assert plan[c_attn].dtype == "bfloat16"
    assert plan["transformer.h.0.ln_1"].dtype == "float32"  # layer_norm: autocast's fp32 list
    static = apply(model, plan)
    assert static.original_model is model and static.transformer is model.transformer
    out = assert_static_route_is_autocast(model, static, {"kwargs": inputs["kwargs"]})
    assert out.logits.shape == (2, 8, 100) and out.loss.dtype == torch.float32
    static.eval()
    assert_static_route_is_autocast(model, static, {"kwargs": inputs["kwargs"]})


@pytest.mark.slow
def test_a_train_step_through_the_applied_module_trains_the_models_own_parameters(hf, caplog):
    caplog.set_level(logging.ERROR)
    torch.manual_seed(0)
    model, inputs = hf["hf_bert"]()
    model.train()
    reference = copy.deepcopy(model)
    static = apply(model, pp.plan(trace(model, kwargs=inputs["kwargs"]), BF16_AUTOCAST))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(static.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.5)
    torch.manual_seed(1)
    loss = static(**inputs["kwargs"]).loss
    loss.backward()
    opt.step()
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        loss_ref = reference(**inputs["kwargs"]).loss
    loss_ref.backward()
    opt_ref.step()
    assert torch.equal(loss, loss_ref)
    changed = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert len(changed) > 10
    for (k, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), k
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=k)
