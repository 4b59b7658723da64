"""`make demo`, part 2: train a ResNet-style CNN on scikit-learn's digits under precision modes.

Trains the same model from the same seed in float32, under allow_mix_precision_bf16 (with
torch.autocast's CPU lists), under allow_mix_precision and force_fp16 (float16, emulated on the
CPU, with the LossScaler `prepare` returns) and allow_fp32_to_fp16 (Ascend's default: cube ops
float16, vector ops float32), prints test accuracy and step time, and shows what
the plan decided for a few ops. Writes to demo_out/torch/: the loss curves, the float16 runs'
loss scale with the skipped steps, the accuracy per mode (PNG) and each mode's plan report (HTML).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import precision_policy as pp
from precision_policy.torch import prepare, trace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from demo_plots import epochs, out_dir, plot_accuracy, plot_loss_scale, plot_losses, report, show_files, slug  # noqa: E402
from torch_models import resnet_cnn  # noqa: E402

EPOCHS, BATCH = epochs(15), 64
# float16 runs: dynamic loss scaling that starts high (2**24), so the first steps overflow, are skipped and halve
# the scale until the gradients fit float16; it grows again after every 100 good steps
FP16_SCALE = {"preset": "torch", "init_scale": 2.0**24, "growth_interval": 100}


def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(0.8 * len(y))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


class Run:
    """One training run: losses per step, the loss scale per step and which steps were skipped."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.scales: list[float] = []
        self.skipped: list[bool] = []
        self.accuracy = 0.0
        self.per_step = 0.0


def train(name: str, config: pp.RunConfig | None) -> Run:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = resnet_cnn(16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps_per_epoch = (len(y_train) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=EPOCHS * steps_per_epoch)
    scaler = None
    if config is not None:
        model, scaler = prepare(model, opt, config)  # float16 modes get a LossScaler, bf16 modes None
    run = Run()
    order = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    with tqdm(total=EPOCHS * steps_per_epoch, desc=f"  {name[:28]:<28}", unit="step", leave=False) as bar:
        for _ in range(EPOCHS):
            model.train()
            perm = torch.randperm(len(y_train), generator=order)
            for i in range(0, len(y_train), BATCH):
                idx = perm[i : i + BATCH]
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                if scaler is None:
                    loss.backward()
                    opt.step()
                    applied = True
                else:
                    run.scales.append(scaler.get_scale())
                    scaler.scale(loss).backward()
                    applied = scaler.step(opt)  # False: inf/nan gradients, the step is skipped
                    scaler.update()
                    run.skipped.append(not applied)
                if applied:
                    sched.step()
                run.losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{run.losses[-1]:.3f}", refresh=False)
    run.per_step = (time.perf_counter() - t0) / len(run.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    model.eval()
    with torch.no_grad():
        run.accuracy = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    return run


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)  # tiny kernels: one thread is many times faster than two on a busy 2-core machine
    print(f"\n=== PyTorch: ResNet-style CNN on scikit-learn digits (1437 train / 360 test, {EPOCHS} epochs) " + "=" * 4)
    configs = {
        "float32": None,
        "allow_mix_precision_bf16 / torch_autocast_cpu": pp.RunConfig(precision_mode="allow_mix_precision_bf16",
                                                                      op_info="torch_autocast_cpu"),
        "allow_mix_precision (fp16, emulated) / ascend910": pp.RunConfig(precision_mode="allow_mix_precision",
                                                                        op_info="ascend910", loss_scale=FP16_SCALE),
        "force_fp16 (emulated) / ascend910": pp.RunConfig(precision_mode="force_fp16", op_info="ascend910",
                                                          loss_scale=FP16_SCALE),
        "allow_fp32_to_fp16 (emulated) / ascend910": pp.RunConfig(precision_mode="allow_fp32_to_fp16", op_info="ascend910",
                                                                  loss_scale=FP16_SCALE),
    }
    runs: dict[str, Run] = {}
    base = None
    for name, cfg in configs.items():
        run = runs[name] = train(name, cfg)
        base = base or run.per_step
        skipped = f"   {sum(run.skipped)} step(s) skipped by the loss scaler" if run.scales else ""
        print(f"  {name:<50} test accuracy {run.accuracy:6.2f}%   {run.per_step * 1e3:6.1f} ms/step "
              f"({base / run.per_step:.2f}x){skipped}")
    print("  (a model this small is dominated by per-op overhead; benchmarks/torch_overhead.py measures speed)")
    print("  (force_fp16 and allow_mix_precision make the same plan here: the model has no black-list op, so their curves coincide)")

    out = out_dir("torch")
    steps_per_epoch = len(runs["float32"].losses) // EPOCHS
    files = [
        plot_losses({n: r.losses for n, r in runs.items()}, out / "loss.png",
                    "PyTorch ResNet-style CNN on digits: training loss per precision mode", steps_per_epoch=steps_per_epoch),
        plot_loss_scale({n: (r.scales, r.skipped) for n, r in runs.items()}, out / "loss_scale.png",
                        "PyTorch float16 runs: the LossScaler's scale per step (starting at 2**24)"),
        plot_accuracy({n: r.accuracy for n, r in runs.items()}, out / "accuracy.png",
                      f"PyTorch CNN on digits: test accuracy after {EPOCHS} epochs"),
    ]
    example = (torch.randn(2, 1, 8, 8),)
    for name, cfg in configs.items():
        if cfg is not None:
            plan = pp.plan(trace(resnet_cnn(16), example), cfg)
            files.append(report(plan, out / f"report_{slug(cfg.mode.name)}.html", title=f"resnet_cnn: {name}"))

    cfg = configs["allow_mix_precision_bf16 / torch_autocast_cpu"]
    plan = pp.plan(trace(resnet_cnn(16), example), cfg)
    print(f"\n  plan: {plan.summary()}")
    for name in ("0", "1", "3.bn1", "3/add", "6", "7"):
        if name in plan.names:
            d = plan[name]
            print(f"    {d.name:<8} {d.op_type:<18} {d.dtype:<9} {d.reason}")
    print("\n" + plan.explain("3.conv1"))
    show_files(files)


if __name__ == "__main__":
    main()
