"""Runtime audit on the torch eager route: executed dtypes per op against the decisions."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.audit import EMULATED_NOTE  # noqa: E402
from precision_policy.report.schema import load_audit  # noqa: E402
from precision_policy.torch import audit, prepare  # noqa: E402

BF16 = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
FP16 = pp.RunConfig(precision_mode="allow_mix_precision", op_info="torch_autocast_cpu")


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def cnn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))


def plant_fp32(module: torch.nn.Linear) -> None:
    """The module casts its input to float32 and computes in float32, out of the precision mode's sight
    (as a fused or custom kernel would)."""

    def forward(x):
        with torch._C.DisableTorchFunction():
            return F.linear(x.float(), module.weight, module.bias)

    module.forward = forward


def test_clean_bf16_run_has_no_mismatch():
    torch.manual_seed(0)
    for model, x in ((MLP(), torch.randn(4, 8)), (cnn(), torch.randn(2, 3, 8, 8))):
        result = audit(model, (x,), BF16)
        assert result.mismatches() == [], result.table()
        lowered = [r for r in result.rows if r.planned == "bfloat16"]
        assert lowered and all(r.executed == "bfloat16" for r in lowered)


def test_planted_float32_op_is_named_and_only_it():
    torch.manual_seed(0)
    model = MLP()
    plant_fp32(model.fc2)
    result = audit(model, (torch.randn(4, 8),), BF16)
    bad = result.mismatches()
    assert [r.name for r in bad] == ["fc2"], result.table()
    assert bad[0].planned == "bfloat16" and bad[0].executed == "float32"
    assert "planned bfloat16, ran float32" in bad[0].mismatch and "outside the precision mode" in bad[0].mismatch
    assert "fc2" in result.table()


def test_emulated_float16_is_expected_not_a_mismatch():
    torch.manual_seed(0)
    result = audit(cnn(), (torch.randn(2, 3, 8, 8),), FP16)
    assert result.mismatches() == []
    conv = result["0"]
    assert (conv.planned, conv.executed, conv.note) == ("float16", "float32", EMULATED_NOTE)


def test_fused_fast_path_that_ran_float32_is_named():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    with torch.no_grad():
        result = audit(layer, (torch.randn(2, 5, 16),), BF16)
    (row,) = result.rows
    assert row.op_type == "TransformerEncoderLayer" and row.planned == "bfloat16"
    assert row.mismatch is not None and "fused fast path ran in float32" in row.mismatch


def test_audit_of_a_prepared_model_and_json(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    prepare(model, None, BF16)
    plant_fp32(model.fc1)
    result = audit(model, (torch.randn(4, 8),), BF16)
    assert [r.name for r in result.mismatches()] == ["fc1"]
    out = tmp_path / "audit.json"
    result.to_json(out)
    loaded = load_audit(out)
    assert [e.node for e in loaded.mismatches()] == ["fc1"]
    assert {e.node for e in loaded.nodes} == {r.name for r in result.rows}
    assert model(torch.randn(2, 8)).dtype == torch.float32  # still prepared


def test_static_route_audit_matches_the_eager_route():
    torch.manual_seed(0)
    for model, x in ((MLP(), torch.randn(4, 8)), (cnn(), torch.randn(2, 3, 8, 8))):
        for config in (BF16, FP16):
            static = audit(model, (x,), config, route="fx")
            eager = audit(model, (x,), config)
            assert static.mismatches() == [], static.table()
            assert {(r.name, r.planned) for r in static.rows if r.name in {e.name for e in eager.rows}} \
                == {(r.name, r.planned) for r in eager.rows if r.name in {s.name for s in static.rows}}
            assert {"fc1", "fc2", "head"} <= {r.name for r in static.rows} or {"0", "1", "5"} <= {r.name for r in static.rows}
