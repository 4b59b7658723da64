"""`make demo`, part 5: accuracy-aware tuning (`pp.tune`) of a digits CNN with a bf16-sensitive last layer.

The CNN (tests/digits_models.py) is trained in float32 in about a second; then its last Linear
gets a large common offset on every logit (2**14, through its bias): float32 argmax is
unchanged, but bfloat16 rounds all ten logits of a sample to one value, so the full
allow_mix_precision_bf16 conversion falls to chance. `pp.tune` ranks the converted ops by
sensitivity, bisects, and keeps only that layer in float32. Its progress bar, per-trial table
and op-type table are shown (the library logs them through `logging`). The result goes to
demo_out/tuned/ (keep_dtype.txt, plan.json, trials.json) with the winner's plan report.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

import precision_policy as pp
from precision_policy.torch import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from digits_models import make_sensitive, train_digits  # noqa: E402

from demo_plots import out_dir, report, show_files  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the tuner's table is logged at INFO
    torch.set_num_threads(1)  # tiny kernels: one thread is many times faster than two on a busy 2-core machine
    print("\n=== pp.tune: a digits CNN whose last Linear is bf16-sensitive " + "=" * 24)
    digits = train_digits()
    model = make_sensitive(digits.model)
    config = pp.RunConfig(precision_mode="allow_mix_precision_bf16", op_info="torch_autocast_cpu")
    full, _ = prepare(copy.deepcopy(model), None, config)
    print(f"  float32 accuracy {digits.accuracy(model):.2%}; every op converted by {config.mode.name}: "
          f"{digits.accuracy(full):.2%} (chance is 10%)\n")
    with logging_redirect_tqdm():  # the table's rows print above the progress bar
        result = pp.tune(model, config, digits.accuracy, tolerable_loss=0.01, example_inputs=digits.x_train[:64],
                         progress=True)
    print(f"\n  kept in float32: {', '.join(result.keep_dtype)}; accuracy {result.best:.2%} "
          f"(baseline {result.baseline:.2%}) after {len(result.trials)} trial(s)")
    folder = out_dir("tuned")
    result.save(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".json"))
    if result.plan is not None:
        files.append(report(result.plan, folder / "report.html", title="tuned digits CNN: allow_mix_precision_bf16"))
    print(f"  reproduce it: pp.RunConfig(precision_mode=\"{config.mode.name}\", op_info=\"torch_autocast_cpu\", "
          f"keep_dtype=\"{os.path.relpath(folder / 'keep_dtype.txt')}\")")
    show_files(files)


if __name__ == "__main__":
    main()
