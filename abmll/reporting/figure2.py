"""Figure 2: validation accuracy and ECE per epoch for every method, as CSV and (optionally) PNG.

Per method: the per-epoch validation metrics of each seed's ``history`` are averaged over the
seeds that have that epoch, then smoothed with a trailing moving average over the 3 most
recent evaluated epochs (the paper: "sliding-window moving average over the three most
recent epochs"; the first two points average over 1 and 2 epochs). Pretrained has no
training: its single epoch-0 validation is drawn as a horizontal line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .results import ABMLL_METHODS, ResultSet, method_label, method_sort_key, split_label
from .stats import moving_average
from .tables import abmll_runs

__all__ = ["Curve", "figure2_curves", "figure2_csv", "save_figure2_png", "WINDOW"]

WINDOW = 3


@dataclass
class Curve:
    split: str
    method: str
    epochs: List[int]
    n_seeds: List[int]
    accuracy: List[float]  # mean over seeds
    ece: List[float]
    accuracy_ma: List[float]  # trailing moving average of the mean
    ece_ma: List[float]


def figure2_curves(
    results: ResultSet,
    split: str,
    methods: Optional[Sequence[str]] = None,
    *,
    abmll_beta: Optional[float] = None,
    window: int = WINDOW,
) -> List[Curve]:
    methods = sorted(methods if methods is not None else results.methods(), key=method_sort_key)
    curves = []
    for m in methods:
        if m in ABMLL_METHODS:
            runs, _ = abmll_runs(results, split, abmll_beta, m)
        else:
            runs = results.select(split=split, method=m)
        per_epoch: Dict[int, Dict[str, List[float]]] = {}
        for r in runs:
            for h in r.history:
                val = h.get("val")
                if not val or "epoch" not in h:
                    continue
                slot = per_epoch.setdefault(int(h["epoch"]), {"accuracy": [], "ece": []})
                for k in ("accuracy", "ece"):
                    if isinstance(val.get(k), (int, float)):
                        slot[k].append(float(val[k]))
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        acc = [_mean(per_epoch[e]["accuracy"]) for e in epochs]
        ece = [_mean(per_epoch[e]["ece"]) for e in epochs]
        n = [len(per_epoch[e]["accuracy"]) for e in epochs]
        curves.append(
            Curve(split, m, epochs, n, acc, ece, moving_average(acc, window), moving_average(ece, window))
        )
    return curves


def _mean(vals: List[float]) -> float:
    return math.fsum(vals) / len(vals) if vals else float("nan")


CSV_FIELDS = [
    "split", "method", "epoch", "n_seeds",
    "val_accuracy_mean", "val_ece_mean", "val_accuracy_ma3", "val_ece_ma3",
]


def figure2_csv(curves: Sequence[Curve]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for c in curves:
        for i, e in enumerate(c.epochs):
            w.writerow({
                "split": c.split,
                "method": c.method,
                "epoch": e,
                "n_seeds": c.n_seeds[i],
                "val_accuracy_mean": repr(c.accuracy[i]),
                "val_ece_mean": repr(c.ece[i]),
                "val_accuracy_ma3": repr(c.accuracy_ma[i]),
                "val_ece_ma3": repr(c.ece_ma[i]),
            })
    return buf.getvalue()


def save_figure2_png(curves: Sequence[Curve], path: Path) -> Optional[str]:
    """Draw the figure with matplotlib; returns a note (and draws nothing) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return (
            "matplotlib is not installed: Figure 2 written as CSV only "
            "(install the optional extra: pip install -e '.[plot]')"
        )
    if not curves:
        return "Figure 2: no validation history to plot"
    max_epoch = max(max(c.epochs) for c in curves)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "accuracy_ma", "Accuracy"), (axes[1], "ece_ma", "ECE")):
        for c in curves:
            ys = getattr(c, key)
            if len(c.epochs) == 1 and c.epochs[0] == 0:  # Pretrained: no training
                ax.plot([0, max(max_epoch, 1)], [ys[0], ys[0]], "--", label=method_label(c.method))
            else:
                ax.plot(c.epochs, ys, marker="o" if len(c.epochs) < 30 else None, ms=3, label=method_label(c.method))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("Epoch")
        ax.set_ylabel(f"Validation {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{split_label(curves[0].split)}: validation accuracy and ECE "
        f"(mean over seeds, moving average over {WINDOW} epochs)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None
