"""Training-step time under precision modes, side by side in one run.

For an MLP, a ResNet-style CNN and nn.TransformerEncoderLayer it times a full training
step (forward, backward, optimizer) under: fp32; torch.autocast("cpu", bfloat16); our eager
route (allow_mix_precision_bf16 with the torch_autocast_cpu library); our FX route (the
same plan applied as a static rewrite). It prints milliseconds per step and the ratios.
Targets: eager <= 1.10x autocast, FX <= 1.05x autocast, bf16 >= 2x faster than fp32 on
the MLP and the transformer (on a CPU with avx512_bf16/AMX).

With ``--real`` it times real models instead (tests/torch_zoo.py: torchvision resnet18 and
mobilenet_v3_small, timm vit_tiny and convnext_atto, Hugging Face gpt2 and bert from small
configs; random weights): fp32, autocast, our eager route, and our FX route where the model
traces (Hugging Face models need the torch.export capture, not built yet: "n/a").

    python benchmarks/torch_overhead.py [--steps 30] [--threads N] [--real]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import precision_policy as pp  # noqa: E402
from precision_policy.torch import apply, precision, trace_fx  # noqa: E402
from torch_models import BasicBlock  # noqa: E402

CONFIG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu", use_env_lists=False,
                      keep_output_dtype=False)


def workloads():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 1024))
    cnn = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        BasicBlock(64), BasicBlock(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    tfm = nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True, dropout=0.0)
    return {
        "mlp": (mlp, torch.randn(256, 1024), lambda y: y.float().pow(2).mean()),
        "cnn": (cnn, torch.randn(32, 3, 32, 32), lambda y: y.float().pow(2).mean()),
        "transformer": (tfm, torch.randn(8, 128, 1024), lambda y: y.float().pow(2).mean()),
    }


def real_workloads():
    import torch_zoo

    def loss_of(out):
        loss = getattr(out, "loss", None)
        if loss is None:
            loss = (out.logits if hasattr(out, "logits") else out).float().pow(2).mean()
        return loss

    picked = {"tv_resnet18": "resnet18", "tv_mobilenet_v3_small": "mobilenet_v3_small", "timm_vit_tiny": "vit_tiny",
              "timm_convnext_atto": "convnext_atto", "hf_gpt2": "gpt2", "hf_bert": "bert"}
    builders = torch_zoo.zoo()
    out = {}
    for key, label in picked.items():
        torch.manual_seed(0)
        model, inputs = builders[key]()
        out[label] = (model, inputs, loss_of)
    return out


def step_time(model, x, loss_fn, ctx_factory, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for k in range(steps + 5):
        t0 = time.perf_counter()
        with ctx_factory():
            y = model(*x.get("args", ()), **x.get("kwargs", {})) if isinstance(x, dict) else model(x)
        loss = loss_fn(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--real", action="store_true", help="real models (torchvision, timm, transformers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.steps} steps\n")
    print(f"{'model':<20}{'fp32':>9}{'autocast':>10}{'eager':>9}{'fx':>9}   eager/ac  fx/ac  fp32/ac  fp32/eager")
    for name, (model, x, loss_fn) in (real_workloads() if args.real else workloads()).items():
        fx_model = None
        try:
            if isinstance(x, dict) and "args" not in x:
                raise TypeError("keyword inputs")
            args_ = x["args"] if isinstance(x, dict) else (x,)
            traced = trace_fx(model, args_)
            fx_model = apply(model, pp.plan(traced.graph, CONFIG), traced=traced)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            print(f"  ({name}: FX route n/a: {type(exc).__name__})")
        results = {}
        # interleave the variants twice so that drift on a shared machine hits them alike
        for _ in range(2):
            for label, m, ctx in (
                ("fp32", model, contextlib.nullcontext),
                ("autocast", model, lambda: torch.autocast("cpu", torch.bfloat16)),
                ("eager", model, lambda: precision(CONFIG, model=model)),
                ("fx", fx_model, contextlib.nullcontext),
            ):
                if m is None:
                    results[label] = float("nan")
                    continue
                t = step_time(m, x, loss_fn, ctx, args.steps // 2)
                results[label] = min(results.get(label, float("inf")), t)
        ms = {k: v * 1e3 for k, v in results.items()}
        ac = results["autocast"]
        print(f"{name:<20}{ms['fp32']:>8.1f}m{ms['autocast']:>9.1f}m{ms['eager']:>8.1f}m{ms['fx']:>8.1f}m"
              f"   {results['eager'] / ac:7.2f}x {results['fx'] / ac:5.2f}x {results['fp32'] / ac:7.2f}x "
              f"{results['fp32'] / results['eager']:9.2f}x")
    print("\nms = milliseconds per training step; ratios > 1 in the first two columns mean slower than autocast.")


if __name__ == "__main__":
    main()
