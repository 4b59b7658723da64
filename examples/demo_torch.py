"""`make demo`, part 2: train a ResNet-style CNN on scikit-learn's digits under precision modes.

Trains the same model from the same seed in float32, under allow_mix_precision_bf16 (with
torch.autocast's CPU lists) and under allow_mix_precision (float16, emulated on the CPU),
prints test accuracy and step time, and shows what the plan decided for a few ops.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import precision_policy as pp
from precision_policy.torch import prepare, trace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from torch_models import resnet_cnn  # noqa: E402

EPOCHS, BATCH = 20, 64


def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(0.8 * len(y))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def train(config: pp.RunConfig | None) -> tuple[float, float]:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = resnet_cnn(16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=EPOCHS * ((len(y_train) + BATCH - 1) // BATCH))
    if config is not None:
        model, _ = prepare(model, opt, config)
    order = torch.Generator().manual_seed(1)
    t0, steps = time.perf_counter(), 0
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
            steps += 1
    per_step = (time.perf_counter() - t0) / steps
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    return acc, per_step


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    print("\n=== PyTorch: ResNet-style CNN on scikit-learn digits (1437 train / 360 test) " + "=" * 10)
    configs = {
        "float32": None,
        "allow_mix_precision_bf16 / torch_autocast_cpu": pp.RunConfig(precision_mode="allow_mix_precision_bf16",
                                                                      op_info="torch_autocast_cpu"),
        "allow_mix_precision (fp16, emulated) / ascend910": pp.RunConfig(precision_mode="allow_mix_precision",
                                                                        op_info="ascend910"),
    }
    base = None
    for name, cfg in configs.items():
        acc, per_step = train(cfg)
        base = base or per_step
        print(f"  {name:<50} test accuracy {acc:6.2f}%   {per_step * 1e3:6.1f} ms/step ({base / per_step:.2f}x)")
    print("  (a model this small is dominated by per-op overhead; benchmarks/torch_overhead.py measures speed)")
    cfg = configs["allow_mix_precision_bf16 / torch_autocast_cpu"]
    plan = pp.plan(trace(resnet_cnn(16), (torch.randn(2, 1, 8, 8),)), cfg)
    print(f"\n  plan: {plan.summary()}")
    for name in ("0", "1", "3.bn1", "3/add", "6", "7"):
        if name in plan.names:
            d = plan[name]
            print(f"    {d.name:<8} {d.op_type:<18} {d.dtype:<9} {d.reason}")
    print("\n" + plan.explain("3.conv1"))


if __name__ == "__main__":
    main()
