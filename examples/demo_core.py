"""`make demo`: every precision mode on the example graphs, against ascend910 and ascend910b.

For each library and mode it prints the plan summary of the seeds' conv2d -> bias_add -> relu
graph and of a transformer encoder block (forward, backward, Adam), the converted ops and
casts of the conv graph, and then `explain` of the Conv2D. Writes the HTML reports of both
graphs' plans under allow_mix_precision (ascend910) and allow_mix_precision_bf16 (ascend910b)
to demo_out/core/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import precision_policy as pp

from demo_plots import out_dir, report, show_files

HERE = Path(__file__).resolve().parent
CONV = HERE / "graphs" / "conv2d_bias_relu.json"
TRANSFORMER = HERE / "graphs" / "transformer_encoder_block.json"
REPORTED = {("ascend910", "allow_mix_precision"), ("ascend910b", "allow_mix_precision_bf16")}  # (library, mode)


def short(plan: pp.CastPlan) -> str:
    text = plan.summary().replace(" (excluding Const and Variable casts)", "").replace(" precision", "")
    return text + (f"  [{len(plan.warnings)} warning(s)]" if plan.warnings else "")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # plan warnings are shown per plan below
    graphs = {"conv2d_bias_relu": pp.OpGraph.from_json(CONV), "transformer_block": pp.OpGraph.from_json(TRANSFORMER)}
    folder, files = out_dir("core"), []
    for lib in ("ascend910", "ascend910b"):
        print(f"\n=== op-info library {lib} " + "=" * 60)
        for mode in pp.modes.all_modes():
            cfg = pp.RunConfig(precision_mode=mode.name, op_info=lib, use_env_lists=False)
            print(f"\n{mode.name}  ({mode.description})")
            for gname, g in graphs.items():
                try:
                    plan = pp.plan(g, cfg)
                except pp.PrecisionError as exc:
                    first = str(exc).splitlines()
                    print(f"  {gname:<18} precision error: {first[1].strip()}")
                    continue
                print(f"  {gname:<18} {short(plan)}")
                if (lib, mode.name) in REPORTED:
                    files.append(report(plan, folder / f"report_{gname}_{mode.name}_{lib}.html", title=f"{gname}: {mode.name}, {lib}"))
                if gname == "conv2d_bias_relu":
                    for d in plan.converted():
                        print(f"      {d.name:<10} {d.op_type:<8} {d.origin} -> {d.dtype:<9} {d.reason}")
                    for c in plan.casts:
                        print(f"      cast {c.tensor:<11} {c.from_dtype} -> {c.to:<9} ({c.kind}{', fetch' if c.for_fetch else ''})")
    print("\n=== explain myConv (Conv2D), allow_mix_precision on ascend910 " + "=" * 20)
    plan = pp.plan(graphs["conv2d_bias_relu"], pp.RunConfig(precision_mode="allow_mix_precision", use_env_lists=False))
    print(plan.summary())
    print(plan.explain("myConv"))
    print(plan.explain("myOutput"))
    print("\n=== explain myConv under force_fp32 on ascend910 (no float32 kernel) " + "=" * 10)
    plan = pp.plan(graphs["conv2d_bias_relu"], pp.RunConfig(precision_mode="force_fp32", use_env_lists=False))
    print(plan.explain("myConv"))
    show_files(files)


if __name__ == "__main__":
    main()
