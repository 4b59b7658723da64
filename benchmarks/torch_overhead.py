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
traces, or the torch.export capture where FX cannot trace (Hugging Face models).

With ``--real`` (or ``--inference``) it then times inference at batch 1 (eval mode, under
``torch.no_grad()``): fp32, autocast, and the model converted once by
``convert_for_inference`` (the FX rewrite with its weights stored in bfloat16, no cast per
forward). Target: converted >= 1.2x faster than autocast. ``--inference`` runs only that part.
Variants are interleaved over several rounds and the median of every round's calls is kept,
so drift on a shared machine hits them alike.

    python benchmarks/torch_overhead.py [--steps 30] [--threads N] [--real] [--inference] [--models a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while they wait lose their core to other
# processes and a step can take 10-50x longer (seen with 2 threads on 2 busy cores); passive
# waiting keeps the timings of every variant comparable. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import precision_policy as pp  # noqa: E402
from precision_policy.backends.torch.inference import convert_for_inference  # noqa: E402
from precision_policy.errors import PrecisionPolicyError  # noqa: E402
from precision_policy.torch import apply, precision, trace  # noqa: E402

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


INFER_CONFIG = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu",
                            use_env_lists=False)


def _batch1(x):
    """The first sample of every tensor input (batch 1), as the workloads' input dict."""
    cut = lambda v: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
    if isinstance(x, dict):
        return {"args": tuple(cut(a) for a in x.get("args", ())),
                "kwargs": {k: cut(v) for k, v in x.get("kwargs", {}).items() if k != "labels"}}
    return {"args": (cut(x),), "kwargs": {}}


def _infer_time(fn, calls: int) -> list[float]:
    times = []
    with torch.no_grad():
        for k in range(calls + 3):
            t0 = time.perf_counter()
            fn()
            if k >= 3:
                times.append(time.perf_counter() - t0)
    return times


def inference_table(work: dict, calls: int, rounds: int = 3) -> None:
    """fp32 / autocast / converted at batch 1, eval mode, no_grad; medians over interleaved rounds."""
    print(f"\ninference, batch 1 (eval, no_grad), median of {calls * rounds} calls in {rounds} interleaved rounds")
    print(f"{'model':<20}{'fp32':>9}{'autocast':>10}{'converted':>11}   ac/conv  fp32/conv  fp32/ac  max|conv-ac|")
    for name, (model, x, _) in work.items():
        x1 = _batch1(x)
        args_, kwargs = x1["args"], x1["kwargs"]
        model.eval()
        try:
            fast = convert_for_inference(model, INFER_CONFIG, example_inputs=args_, kwargs=kwargs or None)
        except PrecisionPolicyError as exc:
            fast = None
            print(f"  ({name}: conversion n/a: {type(exc).__name__}: {str(exc)[:90]})")

        def ac_call():
            with torch.autocast("cpu", torch.bfloat16):
                return model(*args_, **kwargs)

        variants = {"fp32": lambda: model(*args_, **kwargs), "autocast": ac_call,
                    "converted": (lambda: fast(*args_, **kwargs)) if fast is not None else None}
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            order = list(variants.items())
            if r % 2:
                order.reverse()
            for label, fn in order:
                if fn is not None:
                    samples[label] += _infer_time(fn, calls)
        med = {k: (statistics.median(v) if v else float("nan")) for k, v in samples.items()}
        err = float("nan")
        if fast is not None:
            with torch.no_grad():
                a, c = ac_call(), fast(*args_, **kwargs)
            a, c = (getattr(a, "logits", a), getattr(c, "logits", c))
            err = float((c.float() - a.float()).abs().max())
        ms = {k: v * 1e3 for k, v in med.items()}
        print(f"{name:<20}{ms['fp32']:>8.2f}m{ms['autocast']:>9.2f}m{ms['converted']:>10.2f}m"
              f"   {med['autocast'] / med['converted']:6.2f}x {med['fp32'] / med['converted']:9.2f}x "
              f"{med['fp32'] / med['autocast']:7.2f}x  {err:11.3g}")
        model.train()
    print("\nms = milliseconds per forward; ac/conv > 1 means the converted model is faster than autocast "
          "(target >= 1.2x).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--real", action="store_true", help="real models (torchvision, timm, transformers)")
    parser.add_argument("--inference", action="store_true",
                        help="only the inference-at-batch-1 table (real models), no training steps")
    parser.add_argument("--models", default="", help="comma-separated model names to keep (default: all)")
    parser.add_argument("--calls", type=int, default=30, help="forward calls per variant per round (inference)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = real_workloads() if args.real or args.inference else workloads()
    if args.models:
        keep = set(args.models.split(","))
        work = {k: v for k, v in work.items() if k in keep}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.inference:
        inference_table(work, args.calls)
        return
    print(f"\ntraining step, median of {args.steps} steps")
    print(f"{'model':<20}{'fp32':>9}{'autocast':>10}{'eager':>9}{'fx':>9}   eager/ac  fx/ac  fp32/ac  fp32/eager")
    for name, (model, x, loss_fn) in work.items():
        fx_model = None
        try:
            args_ = x.get("args", ()) if isinstance(x, dict) else (x,)
            kwargs_ = x.get("kwargs") if isinstance(x, dict) else None
            # the FX trace, or the torch.export capture where FX fails (Hugging Face models)
            graph = trace(model, args_, kwargs_ or None)
            fx_model = apply(model, pp.plan(graph, CONFIG))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            print(f"  ({name}: FX route n/a: {type(exc).__name__}: {str(exc)[:100]})")
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
    if args.real:
        inference_table(work, args.calls)


if __name__ == "__main__":
    main()
