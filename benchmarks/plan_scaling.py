"""How planning time scales with graph size.

Plans synthetic graphs of 10k, 100k and 1M nodes (a repeated MLP/attention-like block
of white, gray and black ops with constants and a residual) under allow_mix_precision
with the shipped ascend910 library, and prints seconds and time per node. Target: 1M
nodes planned in under 5 s, time per node at 1M within 1.5x of that at 10k.

    python benchmarks/plan_scaling.py [--sizes 10000 100000 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import time

import precision_policy as pp
from precision_policy.graph import OpGraph

# (op type, number of data inputs from the chain, uses a weight const)
BLOCK = [
    ("MatMulV2", True),
    ("BiasAdd", True),
    ("Relu", False),
    ("BatchMatMulV2", True),
    ("Mul", True),
    ("Softmax", False),
    ("Cast", False),
    ("ReduceSum", False),
    ("AddV2", "residual"),
    ("LayerNorm", True),
]


def synthetic_graph(n_nodes: int) -> OpGraph:
    g = OpGraph(f"synthetic_{n_nodes}")
    g.add_node("x", "Placeholder", outputs=["float32"])
    prev = "x:0"
    block_in = prev
    k = 1
    b = 0
    while k < n_nodes:
        for op, extra in BLOCK:
            if k >= n_nodes:
                break
            name = f"b{b}/{op}"
            if extra is True and k + 1 < n_nodes:
                w = f"b{b}/{op}/w"
                g.add_node(w, "Const", outputs=["float32"])
                k += 1
                ins = [prev, f"{w}:0"]
            elif extra == "residual":
                ins = [prev, block_in]
            else:
                ins = [prev]
            outs = ["float32", "float32", "float32"] if op == "LayerNorm" else ["float32"]
            g.add_node(name, op, inputs=ins, outputs=outs)
            prev = f"{name}:0"
            k += 1
        block_in = prev
        b += 1
    g.set_outputs([prev])
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3, help="plans per size; the best time is reported")
    parser.add_argument("--mode", default="allow_mix_precision")
    args = parser.parse_args()
    config = pp.RunConfig(precision_mode=args.mode, op_info="ascend910", use_env_lists=False)
    config.library()  # load once, outside the timing
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        g = synthetic_graph(n)
        g.resolve()
        build = time.perf_counter() - t0
        best = float("inf")
        plan = None
        for _ in range(args.repeat):
            plan = None
            gc.collect()
            t0 = time.perf_counter()
            plan = pp.plan(g, config)
            best = min(best, time.perf_counter() - t0)
        rows.append((n, build, best, plan.summary()))
        print(f"{n:>9} nodes: build+resolve {build:6.2f} s, plan {best:6.3f} s, {best / n * 1e6:6.2f} us/node"
              f"   [{plan.summary()}]", flush=True)
    base = rows[0][2] / rows[0][0]
    print()
    for n, _, t, _ in rows:
        print(f"{n:>9} nodes: time per node = {t / n / base:4.2f}x that at {rows[0][0]} nodes")
    largest = rows[-1]
    print(f"\ntarget: {largest[0]} nodes in < 5 s -> {'met' if largest[2] < 5 else 'NOT met'} ({largest[2]:.2f} s); "
          f"per-node ratio {largest[2] / largest[0] / base:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
