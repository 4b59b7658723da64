"""End to end: a ResNet-style CNN trains on scikit-learn's digits under mixed precision."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

import precision_policy as pp  # noqa: E402
from precision_policy.torch import prepare  # noqa: E402
from torch_models import resnet_cnn  # noqa: E402

EPOCHS = 20
BATCH = 64


def digits():
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(0.8 * len(y))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def train_and_test(config: pp.RunConfig | None) -> float:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = resnet_cnn(16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = EPOCHS * ((len(y_train) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    if config is not None:
        model, _ = prepare(model, opt, config)
    order = torch.Generator().manual_seed(1)
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(0, len(y_train), BATCH):
            idx = perm[i : i + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for p in model.parameters():
        assert p.dtype == torch.float32  # master weights stay float32
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


@pytest.fixture(scope="module")
def fp32_accuracy() -> float:
    return train_and_test(None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False),
        pp.RunConfig(precision_mode="allow_mix_precision", op_info="ascend910", use_env_lists=False),  # fp16, emulated
    ],
    ids=["bf16", "fp16-emulated"],
)
def test_digits_cnn_trains_within_one_point_of_fp32(config, fp32_accuracy):
    assert fp32_accuracy > 95
    acc = train_and_test(config)
    assert acc >= fp32_accuracy - 1.0, (acc, fp32_accuracy)
