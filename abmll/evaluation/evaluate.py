"""Few-shot evaluation on unseen tasks: test-time adaptation, then option probabilities."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from abmll.distributed import LOCAL, Replicas, seed_of, seeded
from abmll.evaluation.metrics import classification_metrics, option_probs
from abmll.objectives import final_hidden_states, logits_at

Batch = Dict[str, torch.Tensor]
METRICS = ("accuracy", "ece", "nll", "brier")


@torch.no_grad()
def predict_option_probs(
    model: nn.Module,
    batch: Batch,
    option_ids: torch.Tensor,
    num_samples: int = 1,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """Class probabilities [B, C] averaged over ``num_samples`` forward passes.

    With a Gaussian LoRA model in ``"sample"`` mode each pass draws a weight sample; the
    predictive distribution is the mean of the per-sample option softmaxes.
    """
    tokens = batch["tokens"].to(device)
    rows = torch.arange(tokens.size(0), device=device)
    before_answer = batch["answer_pos"].to(device) - 1
    total = None
    for _ in range(num_samples):
        answer_logits = logits_at(model, final_hidden_states(model, tokens), rows, before_answer)
        probs = option_probs(answer_logits, option_ids, batch["num_options"])
        total = probs if total is None else total + probs
    return (total / num_samples).cpu()


def evaluate_batches(
    model: nn.Module,
    batches: Sequence[Batch],
    option_ids: torch.Tensor,
    num_samples: int = 1,
    n_bins: int = 15,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, float]:
    probs = torch.cat([predict_option_probs(model, b, option_ids, num_samples, device) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    return classification_metrics(probs, labels, n_bins)


def evaluate_unseen_tasks(
    learner,
    sampler,
    option_ids: torch.Tensor,
    *,
    num_support: int,
    max_eval_examples: Optional[int],
    num_samples: int = 1,
    n_bins: int = 15,
    desc: str = "eval",
    tasks: Optional[List[str]] = None,
    replicas: Replicas = LOCAL,
    seed: Optional[int] = None,
) -> Dict[str, object]:
    """Per unseen task: adapt a copy of the adapters on ``num_support`` support batches,
    evaluate the rest of the task (capped), restore. Returns per-task metrics and their
    unweighted mean over tasks (``mean``) plus metrics of all examples pooled (``pooled``).

    With several processes (``replicas``) each evaluates its share of the tasks and every
    process returns the results of all, in task order. ``seed``: each task runs under its own
    RNG seeded from (seed, desc, task), so its noise does not depend on which process runs it
    or what ran before (None: the running RNG).
    """
    tasks = list(tasks or sampler.task_names)
    mine: Dict[str, tuple] = {}
    for task in tqdm(replicas.shard(tasks), desc=desc, leave=False, disable=not replicas.is_main):
        support, eval_batches = sampler.adaptation_split(task, num_support, max_eval_examples)
        task_seed = None if seed is None else seed_of(seed, desc, task)
        with seeded(task_seed, learner.device), learner.adapted(support), learner.autocast():
            probs = torch.cat(
                [
                    predict_option_probs(learner.model, b, option_ids, num_samples, learner.device)
                    for b in eval_batches
                ]
            )
        labels = torch.cat([b["label"] for b in eval_batches])
        mine[task] = (classification_metrics(probs, labels, n_bins), probs, labels)
    done = {k: v for part in replicas.all_gather(mine) for k, v in part.items()}
    per_task = {task: done[task][0] for task in tasks}
    mean = {m: sum(r[m] for r in per_task.values()) / len(per_task) for m in METRICS}
    pooled = classification_metrics(
        torch.cat([done[t][1] for t in tasks]), torch.cat([done[t][2] for t in tasks]), n_bins
    )
    return {"per_task": per_task, "mean": mean, "pooled": pooled}
