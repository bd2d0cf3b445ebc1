"""Pictures of the uncertainty, per split, from the runs' predictions files and results.json:

* ``reliability_{split}.png`` / ``.csv``: a reliability diagram per method, pooled over seeds
  (every test example of every seed), top-label confidence in equal-width bins, with each
  bin's count;
* ``risk_coverage_{split}.png`` / ``.csv``: the risk-coverage curve per method, pooled over
  seeds (examples ranked by their predictive's top probability);
* ``samples_{split}.png``: accuracy, ECE, NLL and mutual information against the number of
  weight samples, for runs with a list ``eval.num_samples`` (mean over seeds).

Plain matplotlib (``pip install -e ".[plot]"``); without it the CSVs are still written and a
note says what was not drawn.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from abmll.atomic import atomic_write_text

from .results import RunResult, method_label

if TYPE_CHECKING:  # torch is imported where it is used: the reporting reads runs without it
    import torch

__all__ = ["pooled_predictions", "reliability_bins", "write_uncertainty_figures"]


def pooled_predictions(runs: List[RunResult]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(probs [N, C] zero-padded, labels [N]) of every seed's test predictions file, or None
    when no run kept one (runs written before predictions were saved)."""
    import torch

    from abmll.evaluation.predictions import read_predictions

    rows = []
    for r in runs:
        name = r.data.get("predictions")
        path = r.path.parent / name if name else None
        if path is not None and path.exists():
            rows.extend(read_predictions(path))
    if not rows:
        return None
    width = max(len(r["probs"]) for r in rows)
    probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in rows], dtype=torch.float64)
    return probs, torch.tensor([r["label"] for r in rows])


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> List[Dict[str, float]]:
    """Per equal-width bin of top-label confidence (right-closed, as the ECE): count, mean
    confidence, accuracy (NaN for an empty bin)."""
    import torch

    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(conf, edges[1:-1], right=False).clamp(0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = bins == b
        n = int(m.sum())
        out.append({
            "bin": b, "lower": edges[b].item(), "upper": edges[b + 1].item(), "count": n,
            "confidence": conf[m].mean().item() if n else float("nan"),
            "accuracy": correct[m].mean().item() if n else float("nan"),
        })
    return out


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_uncertainty_figures(by_method: Dict[str, List[RunResult]], split: str, out_dir: Path,
                              n_bins: int = 15) -> Tuple[List[Path], List[str]]:
    """Write the three figures (and the reliability / risk-coverage CSVs) for one split.
    Returns (written paths, notes on what could not be drawn)."""
    from abmll.evaluation.uncertainty import risk_coverage

    out_dir = Path(out_dir)
    written: List[Path] = []
    notes: List[str] = []
    pooled = {m: p for m, p in ((m, pooled_predictions(runs)) for m, runs in by_method.items()) if p is not None}
    curves = {m: runs for m, runs in by_method.items() if any(r.data["test"].get("samples_curve") for r in runs)}
    plt = _plt()
    if pooled:
        rel = io.StringIO()
        w = csv.writer(rel)
        w.writerow(["method", "bin", "lower", "upper", "count", "confidence", "accuracy"])
        rc = io.StringIO()
        w2 = csv.writer(rc)
        w2.writerow(["method", "coverage", "risk"])
        bins_of, rc_of = {}, {}
        for m, (probs, labels) in pooled.items():
            bins_of[m] = reliability_bins(probs, labels, n_bins)
            for b in bins_of[m]:
                w.writerow([m, b["bin"], f"{b['lower']:.4f}", f"{b['upper']:.4f}", b["count"],
                            f"{b['confidence']:.6f}", f"{b['accuracy']:.6f}"])
            rc_of[m] = risk_coverage(probs, labels)
            for cov, risk in zip(*(t.tolist() for t in rc_of[m])):
                w2.writerow([m, f"{cov:.6f}", f"{risk:.6f}"])
        written += [atomic_write_text(out_dir / f"reliability_{split}.csv", rel.getvalue(), parents=True),
                    atomic_write_text(out_dir / f"risk_coverage_{split}.csv", rc.getvalue(), parents=True)]
        if plt is not None:
            n = len(pooled)
            fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
            for ax, (m, bins) in zip(axes[0], bins_of.items()):
                width = 1.0 / n_bins
                xs = [b["lower"] for b in bins if b["count"]]
                ax.bar(xs, [b["accuracy"] for b in bins if b["count"]], width=width, align="edge",
                       edgecolor="k", alpha=0.7, label="accuracy")
                ax.plot([0, 1], [0, 1], "k--", lw=1)
                for b in bins:
                    if b["count"]:
                        ax.text(b["lower"] + width / 2, 0.02, str(b["count"]), ha="center", fontsize=6, rotation=90)
                ax.set_title(f"{method_label(m)} (n={len(pooled[m][1])})", fontsize=9)
                ax.set_xlabel("confidence (top probability)")
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
            axes[0][0].set_ylabel("accuracy in bin")
            fig.suptitle(f"{split}: reliability, test examples pooled over seeds ({n_bins} bins; counts at the bottom)", fontsize=9)
            fig.tight_layout()
            written.append(_save(fig, plt, out_dir / f"reliability_{split}.png"))
            fig, ax = plt.subplots(figsize=(5.5, 4.0))
            for i, (m, (cov, risk)) in enumerate(rc_of.items()):
                ax.plot(cov.numpy(), risk.numpy(), color=f"C{i}", label=method_label(m))
            ax.set_xlabel("coverage (most confident first)")
            ax.set_ylabel("risk (error rate of the covered)")
            ax.set_title(f"{split}: risk-coverage, pooled over seeds (AURC = area)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(_save(fig, plt, out_dir / f"risk_coverage_{split}.png"))
    if curves and plt is not None:
        metrics = ("accuracy", "ece", "nll", "mi")
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        for i, (m, runs) in enumerate(curves.items()):
            per_s: Dict[int, List[Dict[str, float]]] = {}
            for r in runs:
                for s, vals in (r.data["test"].get("samples_curve") or {}).items():
                    per_s.setdefault(int(s), []).append(vals)
            xs = sorted(per_s)
            for ax, metric in zip(axes, metrics):
                ys = [sum(v[metric] for v in per_s[s]) / len(per_s[s]) for s in xs]
                ax.plot(xs, ys, "o-", color=f"C{i}", label=method_label(m))
                ax.set_xscale("log")
                ax.set_xlabel("weight samples S")
                ax.set_title(metric, fontsize=9)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{split}: test metrics against the number of weight samples (mean over seeds)", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir / f"samples_{split}.png"))
    if plt is None and (pooled or curves):
        notes.append(f"{split}: uncertainty figures not drawn: matplotlib is not installed (pip install -e '.[plot]')")
    if not pooled:
        notes.append(f"{split}: no predictions files (runs written before they were kept): no reliability diagram")
    return written, notes


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
