"""What the `make demo` scripts share: the output folder, matplotlib plots (PNG, Agg backend), plan reports.

Everything goes under ``demo_out/`` at the repository root (``PP_DEMO_OUT`` moves it).
``PP_DEMO_EPOCHS`` trains every demo model for that many epochs instead of its default
(tests/test_demo_outputs.py uses 1 to check the files quickly).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402

import precision_policy as pp  # noqa: E402
from precision_policy.report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def out_dir(part: str) -> Path:
    """``demo_out/<part>/``, created."""
    folder = Path(os.environ.get("PP_DEMO_OUT", ROOT / "demo_out")) / part
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def epochs(default: int) -> int:
    return max(1, int(os.environ.get("PP_DEMO_EPOCHS", default)))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]  # runs that coincide (the same plan) stay visible


def plot_losses(curves: Mapping[str, Sequence[float]], path: Path, title: str, xlabel: str = "step",
                steps_per_epoch: int | None = None) -> Path:
    """Training loss per precision mode; with ``steps_per_epoch`` the per-step losses are drawn faint with epoch means."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, losses) in enumerate(curves.items()):
        style: dict[str, Any] = {"color": f"C{i}", "linestyle": STYLES[i % len(STYLES)], "linewidth": 1.8}
        if steps_per_epoch and len(losses) > steps_per_epoch:
            ax.plot(range(1, len(losses) + 1), losses, color=f"C{i}", alpha=0.2, linewidth=0.7)
            means = [sum(losses[k:k + steps_per_epoch]) / len(losses[k:k + steps_per_epoch])
                     for k in range(0, len(losses), steps_per_epoch)]
            ax.plot([min(k * steps_per_epoch, len(losses)) for k in range(1, len(means) + 1)], means, label=name, **style)
        else:
            ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_scale(runs: Mapping[str, tuple[Sequence[float], Sequence[bool]]], path: Path, title: str) -> Path:
    """The loss scale each step ran with, one panel per run; steps skipped for non-finite gradients marked with a red x.

    Runs without loss scaling (no scales) get no panel but keep their colour slot, as in :func:`plot_losses`.
    """
    colors = {name: f"C{i}" for i, name in enumerate(runs)}
    scaled = {name: run for name, run in runs.items() if len(run[0])}
    fig, axes = plt.subplots(len(scaled), 1, figsize=(8, 1.2 + 2.0 * len(scaled)), sharex=True, squeeze=False)
    for ax, (name, (scales, skipped)) in zip(axes[:, 0], scaled.items()):
        steps = range(1, len(scales) + 1)
        ax.step(steps, scales, where="post", color=colors[name], label="loss scale the step ran with")
        xs = [s for s, bad in zip(steps, skipped) if bad]
        ax.scatter(xs, [scales[s - 1] for s in xs], marker="x", color="red", zorder=3, s=40,
                   label=f"skipped step: inf/nan gradients ({len(xs)})")
        ax.set_yscale("log", base=2)
        ax.set_ylabel("loss scale")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_accuracy(accuracy: Mapping[str, float], path: Path, title: str) -> Path:
    """Final test accuracy (%) per precision mode, as bars."""
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.55 * len(accuracy)))
    names = list(accuracy)
    bars = ax.barh(range(len(names)), [accuracy[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    for bar, name in zip(bars, names):
        ax.text(max(bar.get_width() - 1, 12), bar.get_y() + bar.get_height() / 2, f"{accuracy[name]:.1f}%", ha="right",
                va="center", color="white", fontweight="bold", fontsize=9)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def report(plan: pp.CastPlan, path: Path, title: str | None = None) -> Path:
    """The plan's HTML report (precision_policy.report.write_report)."""
    write_report(plan, path, title=title)
    return path


def show_files(paths: Iterable[Path]) -> None:
    """Say where the files are (relative to the current folder when they are under it)."""
    print("\n  files written:")
    for p in paths:
        try:
            shown = p.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            shown = p
        print(f"    {shown}")
