"""Overflow localization and range statistics for torch (forward, backward), and the loss scaler's on-demand locate."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

import precision_policy as pp  # noqa: E402
from precision_policy.report.schema import load_ranges  # noqa: E402
from precision_policy.torch import LossScaler, find_overflow, prepare, range_stats  # noqa: E402

FP16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu")
BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")


class Scale(torch.nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


class Net(torch.nn.Module):
    """encoder.0 -> relu -> encoder.1 (the planted Linear) -> head -> scale."""

    def __init__(self, big: float = 1.0, k: float = 1.0) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 4)
        self.scale = Scale(k)
        with torch.no_grad():
            self.encoder[1].weight.mul_(big)  # pushes encoder.1's outputs past float16's 65504 when big

    def forward(self, x):
        h = torch.relu(self.encoder[0](x))
        return self.scale(self.head(torch.tanh(self.encoder[1](h))))


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(4, 8),)


def test_forward_overflow_names_the_planted_linear():
    torch.manual_seed(0)
    model = Net(big=3e5)
    x = _inputs()
    before = [p.detach().clone() for p in model.parameters()]
    report = find_overflow(model, x, FP16)
    assert report.found and report.phase == "forward"
    assert (report.name, report.op_type, report.planned) == ("encoder.1", "MatMulV2", "float16")
    assert report.output.nonfinite > 0 and report.reference.finite
    assert report.reference.max_abs > 65504 and report.dtype_max == 65504
    assert report.input_max_abs is not None and report.input_max_abs < 65504
    assert report.context[-1] == "relu"
    assert "encoder.1" in report.message and "float16 max 65504" in report.message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is untouched


def test_backward_overflow_names_the_op_whose_gradient_overflows():
    torch.manual_seed(0)
    model = Net(k=1000.0)  # forward stays in range; d(loss)/d(head output) = 1000 * loss scale
    report = find_overflow(model, _inputs(), FP16, loss_fn=lambda y: y.sum(), scale=100.0)
    assert report.found and report.phase == "backward", report.message
    assert report.name == "scale" and report.op_type == "Mul"
    assert report.reference.max_abs == pytest.approx(1e5) and report.output.nonfinite > 0
    assert report.grad_fn is not None
    assert find_overflow(model, _inputs(), FP16, loss_fn=lambda y: y.sum(), scale=1.0).found is False


def test_no_overflow_in_bfloat16_and_float32_overflow_is_not_blamed_on_the_plan():
    torch.manual_seed(0)
    assert find_overflow(Net(big=3e5), _inputs(), BF16).found is False
    model = Net(big=1e38)
    report = find_overflow(model, (_inputs()[0] * 1e3,), FP16)  # encoder.1 passes float32's 3.4e38 too
    assert not report.found and "float32 too" in report.reason


def test_range_stats_flag_the_op_and_suggest_keep_dtype(tmp_path):
    torch.manual_seed(0)
    model = Net(big=3e5)
    batches = [_inputs(), (torch.randn(4, 8) * 2,)]
    result = range_stats(model, batches, FP16)
    row = result["encoder.1"]
    assert row.overflows and row.suggestion == "keep_dtype: encoder.1"
    assert row.message.startswith("MatMulV2 `encoder.1`: max |x| ") and "> float16 max 65504" in row.message
    assert [r.name for r in result.flagged()] == ["encoder.1"]  # tanh follows it: keeping encoder.1 keeps tanh
    assert result.batches == 2
    out = tmp_path / "ranges.json"
    result.to_json(out)
    loaded = load_ranges(out)
    entry = next(e for e in loaded.nodes if e.node == "encoder.1")
    assert entry.overflows and entry.suggestion == "keep_dtype: encoder.1" and loaded.batches == 2
    # the suggested keep_dtype file is one the eager route takes, and it removes the overflow
    keep = tmp_path / "keep.txt"
    keep.write_text(result.keep_dtype_lines())
    fixed = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu", keep_dtype=keep)
    assert find_overflow(model, _inputs(), fixed).found is False


def test_loss_scaler_locates_the_op_after_a_skipped_step(caplog):
    torch.manual_seed(0)
    model = Net(k=1000.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, scaler = prepare(model, opt, FP16)
    assert isinstance(scaler, LossScaler)
    x = _inputs()
    loss = model(*x).sum()
    scaler.scale(loss).backward()
    assert scaler.step(opt) is False  # 65536 * 1000 overflows float16 gradients
    with caplog.at_level(logging.WARNING, logger="precision_policy.backends.torch.scaler"):
        report = scaler.locate_overflow(model, x, lambda y: y.sum())
    scaler.update()
    assert report.found and report.phase == "backward" and report.name == "scale"
    assert scaler.last_overflow_op is report
    assert any("scale" in r.getMessage() and "backward" in r.getMessage() for r in caplog.records)
