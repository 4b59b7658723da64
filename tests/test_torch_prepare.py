"""prepare(): structure-preserving outputs, default loss scaling for float16, optimizer checks;
LossScaler.unscale_'s fused check (bit-identical results, one warning per scale)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")

import precision_policy as pp  # noqa: E402
from precision_policy.errors import ConfigError  # noqa: E402
from precision_policy.loss_scale import DynamicLossScale, FixedLossScale  # noqa: E402
from precision_policy.torch import LossScaler, prepare  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False)
SCALER_LOG = "precision_policy.backends.torch.scaler"
PREPARE_LOG = "precision_policy.backends.torch.prepare"


# ---------------------------------------------------------------------------------------- outputs
class Pair(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor


@dataclasses.dataclass
class PlainOut:
    logits: torch.Tensor
    hidden: torch.Tensor
    step: int = 3
    note: str | None = None


@dataclasses.dataclass
class ModelOutputLike(collections.OrderedDict):
    """Shaped like transformers' ModelOutput: an OrderedDict whose keys are the non-None fields."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return tuple(self.values())[key]


class Returns(torch.nn.Module):
    """A Linear whose outputs (bfloat16 inside the precision mode) come back in a chosen structure."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 4)
        self.kind = kind

    def forward(self, x):
        logits = self.lin(x)
        hidden = logits.relu()
        ids = torch.arange(3)
        if self.kind == "dict":
            return {"logits": logits, "ids": ids, "nested": [hidden, (hidden, 1)]}
        if self.kind == "ordereddict":
            return collections.OrderedDict(logits=logits, hidden=hidden)
        if self.kind == "defaultdict":
            out = collections.defaultdict(list)
            out["logits"] = logits
            return out
        if self.kind == "list":
            return [logits, ids, hidden]
        if self.kind == "tuple":
            return logits, hidden
        if self.kind == "namedtuple":
            return Pair(logits, hidden)
        if self.kind == "return_types":
            return logits.max(dim=1)
        if self.kind == "dataclass":
            return PlainOut(logits, hidden, note="kept")
        if self.kind == "modeloutput":
            out = ModelOutputLike(loss=logits.sum(), logits=logits)
            out["extra"] = hidden  # a key that is not a field, as ModelOutput allows
            return out
        raise AssertionError(self.kind)


def tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out) and not isinstance(out, dict):
        return [t for f in dataclasses.fields(out) for t in tensors(getattr(out, f.name))]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors(v)]
    return []


@pytest.mark.parametrize("kind", ["dict", "ordereddict", "defaultdict", "list", "tuple", "namedtuple",
                                  "return_types", "dataclass", "modeloutput"])
def test_outputs_keep_their_structure_and_type_with_float_tensors_cast_back(kind):
    x = torch.randn(5, 8)
    raw_model, _ = prepare(Returns(kind), None, BF16, keep_output_dtype=False)
    raw = raw_model(x)
    model, _ = prepare(Returns(kind), None, BF16)
    out = model(x)
    assert type(out) is type(raw)
    low = [t for t in tensors(raw) if t.dtype == torch.bfloat16]
    assert low, "the precision mode must run something in bfloat16 for this test to mean anything"
    got, want = tensors(out), tensors(raw)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        expected = w.float() if w.dtype == torch.bfloat16 else w
        assert g.dtype == expected.dtype and torch.equal(g, expected)
    if kind == "namedtuple":
        assert out.logits.dtype == torch.float32 and out._fields == ("logits", "hidden")
    if kind == "return_types":
        assert out.values.dtype == torch.float32 and out.indices.dtype == torch.int64
    if kind == "dataclass":
        assert (out.step, out.note) == (3, "kept") and out.hidden.dtype == torch.float32
    if kind == "defaultdict":
        assert out.default_factory is list and out["missing"] == []
    if kind == "dict":
        assert out["nested"][1][1] == 1 and type(out["nested"][1]) is tuple
    if kind == "modeloutput":
        assert list(out.keys()) == ["loss", "logits", "extra"]
        assert out.loss is out["loss"] and out.logits is out["logits"] and out.extra is out["extra"]
        assert out.loss.dtype == torch.float32 and out[1] is out.logits and out.hidden is None


def test_output_with_nothing_to_cast_is_the_same_object():
    class Ints(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = {"ids": torch.arange(3), "pair": Pair(torch.zeros(2), torch.ones(2))}

        def forward(self, x):
            return self.out

    model, _ = prepare(Ints(), None, BF16)
    assert model(torch.randn(2, 8)) is model.out


def test_real_transformers_model_output_keeps_loss_attribute_and_keys():
    outputs = pytest.importorskip("transformers.modeling_outputs")

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x, labels):
            logits = self.lin(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            return outputs.SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=(logits, logits.relu()))

    x, labels = torch.randn(4, 8), torch.tensor([0, 2, 1, 0])
    model, _ = prepare(Classifier(), None, BF16)
    out = model(x, labels)
    assert type(out) is outputs.SequenceClassifierOutput
    assert list(out.keys()) == ["loss", "logits", "hidden_states"]
    assert out.loss is out["loss"] and out.logits is out[1] and out.hidden_states is out["hidden_states"]
    assert out.logits.dtype == torch.float32 and all(h.dtype == torch.float32 for h in out.hidden_states)
    assert out.to_tuple()[0] is out.loss and out.attentions is None
    out.loss.backward()
    assert model.lin.weight.grad is not None


def test_real_transformers_model_returns_its_model_output():
    transformers = pytest.importorskip("transformers")
    from torch_zoo import import_torchvision

    import_torchvision()  # transformers imports torchvision, whose PyPI wheel needs this on the CPU torch
    from transformers.models.bert.modeling_bert import BertForSequenceClassification
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    bert = BertForSequenceClassification(cfg).eval()
    ids, labels = torch.randint(0, 40, (2, 6)), torch.tensor([0, 2])
    ref = bert(input_ids=ids, labels=labels)
    model, _ = prepare(bert, None, BF16)
    out = model(input_ids=ids, labels=labels)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert out.loss is out["loss"] and out.loss.dtype == torch.float32 and out.logits.dtype == torch.float32


# ---------------------------------------------------------------------------------------- loss scaling
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize("mode", ["force_fp16", "allow_mix_precision", "allow_fp32_to_fp16", "force_fp32"])
@pytest.mark.parametrize("native", [False, True])
def test_float16_modes_get_dynamic_loss_scaling_by_default(mode, native):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = pp.RunConfig(precision_mode=mode, op_info="ascend910", use_env_lists=False, native_fp16=native)
    _, scaler = prepare(model, opt, cfg)
    assert isinstance(scaler, LossScaler) and isinstance(scaler.state, DynamicLossScale)
    assert scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("mode", ["allow_mix_precision_bf16", "force_bf16", "allow_fp32_to_bf16",
                                  "must_keep_origin_dtype"])
def test_modes_without_float16_get_no_scaler_by_default(mode):
    model = mlp()
    cfg = pp.RunConfig(precision_mode=mode, op_info="torch_autocast_cpu", use_env_lists=False)
    assert prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg)[1] is None


def test_explicit_loss_scale_wins_and_none_or_false_opt_out():
    fp16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert prepare(model, opt, fp16.model_copy(update={"loss_scale": None}))[1] is None
    assert prepare(model, opt, pp.RunConfig(precision_mode="allow_mix_precision", loss_scale=False))[1] is None
    assert prepare(model, opt, fp16, loss_scale=None)[1] is None
    fixed = prepare(model, opt, fp16, loss_scale=1.0)[1]
    assert isinstance(fixed.state, FixedLossScale) and fixed.get_scale() == 1.0
    assert prepare(model, opt, fp16, loss_scale="ascend")[1].get_scale() == 2.0**32
    # other settings given to prepare keep loss_scale unset, so the float16 default still applies
    assert prepare(model, opt, fp16, keep_output_dtype=False)[1].get_scale() == 2.0**16
    bf16_scaled = prepare(model, opt, BF16, loss_scale="dynamic")[1]
    assert bf16_scaled is not None and bf16_scaled.get_scale() == 2.0**16


def test_default_scaler_trains_float16_and_skips_an_overflow():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = pp.RunConfig(precision_mode="force_fp16", op_info="ascend910", use_env_lists=False)
    model, scaler = prepare(model, opt, cfg)
    x = torch.randn(16, 8)
    loss = torch.nn.functional.mse_loss(model(x * 1e4), x.sum(1, keepdim=True))  # float16 activations overflow
    scaler.scale(loss).backward()
    assert not scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**15


# ---------------------------------------------------------------------------------------- optimizer check
def test_optimizer_of_another_model_copy_is_an_error_naming_the_parameter():
    model = mlp()
    opt = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(16, 8\).*'0.weight'"):
        prepare(model, opt, BF16)


def test_optimizer_built_before_to_that_replaced_the_parameters_is_an_error():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = model[2].bias
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model = model.to("cpu")
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert model[2].bias is not before  # the premise: .to() made new parameter objects
    with pytest.raises(ConfigError, match="not a parameter of the model"):
        prepare(model, opt, BF16)
    prepare(model, torch.optim.Adam(model.parameters(), lr=0.1), BF16)  # rebuilt from the model: fine


def test_trainable_parameters_no_optimizer_holds_are_a_warning_frozen_ones_are_not(caplog):
    model = mlp()
    model[0].bias.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger=PREPARE_LOG):
        prepare(model, torch.optim.SGD(model[0].parameters(), lr=0.1), BF16)
    records = [r for r in caplog.records if r.name == PREPARE_LOG and r.levelno == logging.WARNING]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "2.weight, 2.bias" in text and "0.bias" not in text and "0.weight" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=PREPARE_LOG):
        prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), BF16)
    assert not [r for r in caplog.records if r.name == PREPARE_LOG]


def test_something_that_is_not_an_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a torch.optim.Optimizer"):
        prepare(mlp(), object(), BF16)


# ---------------------------------------------------------------------------------------- LossScaler
def reference_unscale(grads, scale):
    """What unscale_ computed before the fused kernel: per tensor isfinite, then grad.mul_(1/scale)."""
    inv = 1.0 / scale
    out, bad = [], []
    for i, g in enumerate(grads):
        values = g.coalesce()._values() if g.is_sparse else g
        if not bool(torch.isfinite(values).all()):
            bad.append(i)
        out.append(g.clone().mul_(inv))
    return out, bad


def bits(t):
    t = t.coalesce() if t.is_sparse else t
    t = t._values() if t.is_sparse else t
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


class Many(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(7, 5, generator=gen).to(dtypes[i % 3])) for i in range(99))
        self.emb = torch.nn.Embedding(10, 4, sparse=True)


@pytest.mark.parametrize("scale", [2.0**16, 3435973836.8, 1000.0, 1.0])
@pytest.mark.parametrize("plant", [(), (4, 50, 97)])
def test_unscale_on_100_parameters_is_bit_identical_to_the_per_parameter_loop(scale, plant):
    model = Many()
    params = list(model.parameters())
    assert len(params) == 100
    gen = torch.Generator().manual_seed(1)
    for p in params[:-1]:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e3).to(p.dtype)
    model.emb(torch.tensor([1, 3, 1])).sum().backward()  # a sparse gradient with a repeated row
    for i in plant:
        params[i].grad.view(-1)[i % 7] = float("nan") if i % 2 else float("inf")
    expected, bad = reference_unscale([p.grad for p in params], scale)
    opt = torch.optim.SGD([{"params": params[:60]}, {"params": params[60:]}], lr=0.1)
    scaler = LossScaler(FixedLossScale(scale), model=model)
    scaler.unscale_(opt)
    for p, e in zip(params, expected):
        assert p.grad.dtype == e.dtype and torch.equal(bits(p.grad), bits(e))
    names = dict((id(p), n) for n, p in model.named_parameters())
    assert bool(bad) == bool(plant)
    assert scaler.step(opt) is not bool(plant)
    if plant:
        assert scaler.last_overflow == [names[id(params[i])] for i in bad] == ["ps.4", "ps.50", "ps.97"]


def test_skipped_steps_warn_once_per_scale_and_debug_after(caplog):
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # ascend: the scale backs off after 2 counted bad steps, so two skips happen at each scale
    scaler = LossScaler(DynamicLossScale.preset("ascend", init_scale=2.0**10), model=model)

    def overflow_step():
        opt.zero_grad()
        scaler.scale(model(torch.ones(2, 4)).sum()).backward()
        model.bias.grad[0] = float("inf")
        assert not scaler.step(opt)
        scaler.update()

    with caplog.at_level(logging.DEBUG, logger=SCALER_LOG):
        for _ in range(4):
            overflow_step()
    levels = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records if r.name == SCALER_LOG]
    assert levels == [(logging.WARNING, "loss scale 1024"), (logging.DEBUG, "loss scale 1024"),
                      (logging.WARNING, "loss scale 819.2"), (logging.DEBUG, "loss scale 819.2")]
    assert all("bias" in r.getMessage() for r in caplog.records if r.name == SCALER_LOG)
    caplog.clear()
    fixed = LossScaler(8.0, model=model)  # a fixed scale never changes: one warning in all
    with caplog.at_level(logging.DEBUG, logger=SCALER_LOG):
        for _ in range(3):
            opt.zero_grad()
            fixed.scale(model(torch.ones(2, 4)).sum()).backward()
            model.weight.grad[0, 0] = float("nan")
            assert not fixed.step(opt) and fixed.last_overflow == ["weight"]
            fixed.update()
    assert [r.levelno for r in caplog.records if r.name == SCALER_LOG] == [logging.WARNING] + [logging.DEBUG] * 2


def test_state_dict_format_is_unchanged_and_old_checkpoints_load():
    scaler = LossScaler(DynamicLossScale.preset("torch", growth_interval=3))
    old = {"enabled": True, "loss_scale": {
        "kind": "dynamic", "scale": 512.0, "good_steps": 2, "bad_steps": 0, "steps": 9, "skipped_steps": 1,
        "init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
        "decr_every_n_nan_or_inf": 1, "min_scale": 0.0, "max_scale": 3.4028234663852886e38, "below_min": "clamp"}}
    scaler.load_state_dict(old)
    assert scaler.state_dict() == old and scaler.get_scale() == 512.0
    fixed = LossScaler("dynamic")
    fixed.load_state_dict({"enabled": True, "loss_scale": {"kind": "fixed", "scale": 4.0, "steps": 1,
                                                           "skipped_steps": 0}})
    assert isinstance(fixed.state, FixedLossScale) and fixed.get_scale() == 4.0
