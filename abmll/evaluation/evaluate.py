"""Few-shot evaluation on unseen tasks: test-time adaptation, then option probabilities, their
uncertainty, and the controls that say what that uncertainty is worth.

Per task, inside one adapted copy of the adapters and one seeded RNG stream:

1. every evaluation batch gets ``max(num_samples)`` sampled forwards (the per-sample option
   probabilities are kept, so a list of sample counts costs the largest, not their sum);
2. with ``flip_rate``, one more forward of the same batch in mean mode (it draws no noise, so
   the sampled predictions are exactly those of a run without it);
3. with ``temperature_scaling``, after all evaluation batches and on a forked RNG (again
   leaving every sampled prediction untouched), the support examples' predictive, on which one
   temperature is fitted by NLL.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from abmll.distributed import LOCAL, Replicas, seed_of, seeded
from abmll.evaluation.metrics import classification_metrics, masked_option_softmax
from abmll.evaluation.uncertainty import apply_temperature, decompose, fit_temperature
from abmll.modules import gaussian_mode
from abmll.objectives import final_hidden_states, option_logits_at
from abmll.run_contract import TEST_METRICS

Batch = Dict[str, torch.Tensor]
#: Metrics averaged over tasks (``mean``); every one is also computed on the pooled examples.
METRICS = TEST_METRICS
#: The metrics of the curve over sample counts (``samples_curve``).
CURVE_METRICS = ("accuracy", "ece", "nll", "brier", "mi")


@torch.no_grad()
def sample_option_probs(
    model: nn.Module,
    batch: Batch,
    option_ids: torch.Tensor,
    num_samples: int = 1,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """Option probabilities of ``num_samples`` forward passes, [S, B, C], float32 on the CPU.

    With a Gaussian LoRA model in ``"sample"`` mode each pass draws a weight sample."""
    tokens = batch["tokens"].to(device)
    rows = torch.arange(tokens.size(0), device=device)
    before_answer = batch["answer_pos"].to(device) - 1
    out = []
    for _ in range(num_samples):
        # The options' logits in float32 even in bf16 (objectives.option_logits_at: bf16 logits tie).
        logits = option_logits_at(model, final_hidden_states(model, tokens), rows, before_answer, option_ids)
        out.append(masked_option_softmax(logits, batch["num_options"]).cpu())
    return torch.stack(out)


def predict_option_probs(
    model: nn.Module,
    batch: Batch,
    option_ids: torch.Tensor,
    num_samples: int = 1,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """The predictive [B, C]: the mean of ``num_samples`` per-sample option softmaxes."""
    return prefix_means(sample_option_probs(model, batch, option_ids, num_samples, device))[-1]


def prefix_means(samples: torch.Tensor) -> torch.Tensor:
    """[S, ...] -> the mean of the first s samples for s = 1..S (a running sum, in draw order)."""
    counts = torch.arange(1, samples.size(0) + 1, dtype=samples.dtype).view(-1, *([1] * (samples.dim() - 1)))
    return samples.cumsum(0) / counts


def sample_counts(num_samples: Union[int, Sequence[int]]) -> List[int]:
    """``eval.num_samples`` as a sorted list of distinct positive counts (an int or a list)."""
    try:
        values = [num_samples] if isinstance(num_samples, (int, str)) else list(num_samples)
        counts = sorted({int(s) for s in values})
    except (TypeError, ValueError):
        counts = []
    if not counts or counts[0] < 1:
        raise ValueError(f"eval.num_samples must be a positive integer or a list of them, got {num_samples!r}")
    return counts


def predictive_metrics(probs: torch.Tensor, labels: torch.Tensor, mi: torch.Tensor, n_bins: int) -> Dict[str, float]:
    """Accuracy, ECE, NLL, Brier, the selective metrics, and the mean mutual information."""
    out = classification_metrics(probs, labels, n_bins)
    out["mi"] = mi.double().mean().item()
    return out


def _mean_over_tasks(per_task: Dict[str, Dict[str, float]], metrics: Sequence[str]) -> Dict[str, float]:
    return {m: sum(r[m] for r in per_task.values()) / len(per_task) for m in metrics}


def _task_rows(task: str, sampler, eval_batches: List[Batch], dec: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
    examples = torch.cat([b["example"] for b in eval_batches]).tolist()
    labels = torch.cat([b["label"] for b in eval_batches]).tolist()
    n_opts = torch.cat([b["num_options"] for b in eval_batches]).tolist()
    rows = []
    for j, (idx, label, k) in enumerate(zip(examples, labels, n_opts)):
        line = sampler.tasks[task][idx].line
        rows.append({
            "task": task,
            "example": int(idx),
            "line": -1 if line is None else int(line),
            "label": int(label),
            "num_options": int(k),
            **uncertainty_columns(dec, j, k),
        })
    return rows


def uncertainty_columns(dec: Dict[str, torch.Tensor], j: int, k: int) -> Dict[str, Any]:
    """The predictions file's per-example columns from :func:`decompose`'s output, for the
    ``j``-th evaluated example with ``k`` options (the recipe's test and ``abmll adapt``)."""
    return {
        "probs": dec["probs"][j, :k].tolist(),
        "pred": int(dec["probs"][j].argmax()),
        "max_prob": dec["max_prob"][j].item(),
        "entropy": dec["entropy"][j].item(),
        "expected_entropy": dec["expected_entropy"][j].item(),
        "mutual_info": dec["mutual_info"][j].item(),
    }


def adapt_and_predict(
    learner,
    support: List[Batch],
    eval_batches: List[Batch],
    option_ids: torch.Tensor,
    *,
    num_samples: int = 1,
    seed: Optional[int] = None,
    flip_rate: bool = False,
    temperature_scaling: bool = False,
    while_adapted: Optional[Callable[[], None]] = None,
) -> Dict[str, torch.Tensor]:
    """One task's test-time adaptation and predictions, in the order the module docstring gives.

    Returns ``samples`` [S, N, C] (per-sample option probabilities of the evaluation batches,
    in batch order), and when asked ``mean_mode`` [N, C] and ``temperature`` (fitted on the
    support examples' predictive). ``seed``: the task's own RNG stream (None:
    the running one). ``while_adapted`` is called with the adapted adapters still in place
    (``abmll adapt`` exports them there)."""
    samples, mean_mode, out = [], [], {}
    with seeded(seed, learner.device), learner.adapted(support), learner.autocast():
        for b in eval_batches:
            samples.append(sample_option_probs(learner.model, b, option_ids, num_samples, learner.device))
            if flip_rate:
                with gaussian_mode(learner.model, "mean"):
                    mean_mode.append(sample_option_probs(learner.model, b, option_ids, 1, learner.device)[0])
        if temperature_scaling and support:
            # On a forked RNG: the support's weight samples must not shift the noise that
            # later tasks draw from the running stream (one process, one task at a time).
            with torch.random.fork_rng(devices=[learner.device] if learner.device.type == "cuda" else []):
                support_probs = torch.cat(
                    [prefix_means(sample_option_probs(learner.model, b, option_ids, num_samples, learner.device))[-1]
                     for b in support]
                )
            out["temperature"] = fit_temperature(support_probs, torch.cat([b["label"] for b in support]))
        if while_adapted is not None:
            while_adapted()
    out["samples"] = torch.cat(samples, dim=1)
    if flip_rate:
        out["mean_mode"] = torch.cat(mean_mode)
    return out


def evaluate_unseen_tasks(
    learner,
    sampler,
    option_ids: torch.Tensor,
    *,
    num_support: int,
    max_eval_examples: Optional[int],
    num_samples: Union[int, Sequence[int]] = 1,
    n_bins: int = 15,
    desc: str = "eval",
    tasks: Optional[List[str]] = None,
    replicas: Replicas = LOCAL,
    seed: Optional[int] = None,
    flip_rate: bool = False,
    temperature_scaling: bool = False,
    keep_predictions: bool = False,
) -> Dict[str, object]:
    """Per unseen task: adapt a copy of the adapters on ``num_support`` support batches,
    evaluate the rest of the task (capped), restore.

    Returns ``per_task`` metrics, their unweighted mean over tasks (``mean``) and the metrics of
    all examples pooled (``pooled``), computed from the predictive of ``max(num_samples)``
    samples; ``num_samples`` (that count); and, when asked: ``samples_curve`` (a list of counts:
    {S: mean over tasks} for each prefix of the same draws), ``flip`` (share of examples whose
    argmax differs between the first sample and the mean mode, mean max |Δp|), ``ts`` (the
    temperature-scaled predictive's metrics and each task's temperature) and ``predictions``
    (one row per example, :mod:`abmll.evaluation.predictions`).

    With several processes (``replicas``) each evaluates its share of the tasks and every
    process returns the results of all, in task order. ``seed``: each task runs under its own
    RNG seeded from (seed, desc, task), so its noise does not depend on which process runs it
    or what ran before (None: the running RNG).
    """
    counts = sample_counts(num_samples)
    s_max = counts[-1]
    tasks = list(tasks or sampler.task_names)
    mine: Dict[str, Dict[str, Any]] = {}
    for task in tqdm(replicas.shard(tasks), desc=desc, leave=False, disable=not replicas.is_main):
        support, eval_batches = sampler.adaptation_split(task, num_support, max_eval_examples)
        pred = adapt_and_predict(
            learner, support, eval_batches, option_ids, num_samples=s_max,
            seed=None if seed is None else seed_of(seed, desc, task),
            flip_rate=flip_rate, temperature_scaling=temperature_scaling,
        )
        samples_t, mean_mode, temperature = pred["samples"], pred.get("mean_mode"), pred.get("temperature")
        labels = torch.cat([b["label"] for b in eval_batches])
        probs = prefix_means(samples_t)[-1]  # the predictive, summed in draw order
        dec = decompose(samples_t)
        result: Dict[str, Any] = {"metrics": predictive_metrics(probs, labels, dec["mutual_info"], n_bins),
                                  "probs": probs, "labels": labels, "mi": dec["mutual_info"]}
        if len(counts) > 1:
            means = prefix_means(samples_t)
            result["curve"] = {
                s: predictive_metrics(means[s - 1], labels, decompose(samples_t[:s])["mutual_info"], n_bins)
                for s in counts
            }
        rows = _task_rows(task, sampler, eval_batches, dec) if keep_predictions else None
        if flip_rate:
            first = samples_t[0]
            flips = first.argmax(-1) != mean_mode.argmax(-1)
            dp = (first.double() - mean_mode.double()).abs().max(-1).values
            result["flip"] = (int(flips.sum()), dp.sum().item(), int(flips.numel()))
            if rows is not None:
                for j, r in enumerate(rows):
                    r["probs_mean_mode"] = mean_mode[j, : r["num_options"]].tolist()
        if temperature is not None:
            ts_probs = apply_temperature(probs, temperature)
            # The temperature rescales the predictive, not the weight samples: the TS metrics
            # carry the raw mutual information.
            result["ts"] = {"metrics": predictive_metrics(ts_probs, labels, dec["mutual_info"], n_bins),
                            "probs": ts_probs, "temperature": temperature}
            if rows is not None:
                for j, r in enumerate(rows):
                    r["probs_ts"] = ts_probs[j, : r["num_options"]].tolist()
                    r["temperature"] = temperature
        if rows is not None:
            result["rows"] = rows
        mine[task] = result
    done = {k: v for part in replicas.all_gather(mine) for k, v in part.items()}
    return _combine(tasks, done, counts, n_bins)


def _combine(tasks: List[str], done: Dict[str, Dict[str, Any]], counts: List[int], n_bins: int) -> Dict[str, object]:
    per_task = {t: done[t]["metrics"] for t in tasks}
    labels = torch.cat([done[t]["labels"] for t in tasks])
    mi = torch.cat([done[t]["mi"] for t in tasks])
    out: Dict[str, object] = {
        "per_task": per_task,
        "mean": _mean_over_tasks(per_task, METRICS),
        "pooled": predictive_metrics(torch.cat([done[t]["probs"] for t in tasks]), labels, mi, n_bins),
        "num_samples": counts[-1],
    }
    if len(counts) > 1:
        out["samples_curve"] = {
            str(s): _mean_over_tasks({t: done[t]["curve"][s] for t in tasks}, CURVE_METRICS) for s in counts
        }
    if all("flip" in done[t] for t in tasks):
        flips, dp, n = (sum(done[t]["flip"][i] for t in tasks) for i in range(3))
        out["flip"] = {"flip_rate": flips / n, "mean_abs_dp": dp / n, "n": n}
    if all("ts" in done[t] for t in tasks):
        ts_per_task = {t: dict(done[t]["ts"]["metrics"], temperature=done[t]["ts"]["temperature"]) for t in tasks}
        out["ts"] = {
            "per_task": ts_per_task,
            "mean": _mean_over_tasks(ts_per_task, METRICS + ("temperature",)),
            "pooled": predictive_metrics(torch.cat([done[t]["ts"]["probs"] for t in tasks]), labels, mi, n_bins),
        }
    if all("rows" in done[t] for t in tasks):
        out["predictions"] = [r for t in tasks for r in done[t]["rows"]]
    return out


__all__ = [
    "METRICS",
    "CURVE_METRICS",
    "sample_option_probs",
    "predict_option_probs",
    "prefix_means",
    "sample_counts",
    "adapt_and_predict",
    "uncertainty_columns",
    "predictive_metrics",
    "evaluate_unseen_tasks",
]
