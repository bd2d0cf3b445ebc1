"""``abmll adapt RUN_DIR --support FILE --query FILE --out DIR``: put a meta-trained run to work
on your own task: adapt its adapters on a few labelled examples, then predict, with uncertainty.

What it does is the recipe's test-time adaptation of one unseen task, with your rows in place
of the split's (:func:`abmll.evaluation.adapt_and_predict`, the code the recipe's test runs):

1. the run's model, base weights, tokenizer, prompt and chat template, and its best adapters
   (``--adapters final``: the last epoch's), from its ``results.json`` and checkpoint;
2. K = ``learner.inner_steps`` adaptation steps at ``learner.test_lr``, one per support batch
   of ``data.batch_size`` rows: the first K * batch_size rows of ``--support``, in file order
   (more are left unused, with a warning; fewer is an error). Pretrained adapts nothing unless
   its run used test-time adaptation;
3. the query rows in evaluation batches (``data.eval_batch_size``) in the run's ``eval.mode``:
   the predictive is the mean of ``--samples`` weight samples (default: the run's largest
   ``eval.num_samples``; LoRA methods have no samples), decomposed into expected entropy and
   mutual information; with the run's ``eval.flip_rate`` / ``eval.temperature_scaling`` also
   the mean mode's and the temperature-scaled probabilities (temperature fitted on the support);
4. noise from the task's own RNG stream, ``seed_of(seed, "test", task)`` (``--seed``: the run's
   seed; ``--task``: the support file's name): the stream the recipe's test gives each task
   whenever tasks are seeded one by one (``learner.meta_batch_size`` > 1 or several
   processes). In the paper's setting the recipe's test draws from one running stream, so
   sampled predictions agree with it in distribution, not draw for draw.

It writes into ``--out`` (a new directory; RUN_DIR is only read): ``predictions.parquet`` (one
row per query row, :mod:`abmll.evaluation.predictions`' columns, in file order), ``adapt.json``
(what was done, and the metrics when the query rows have labels), and ``adapter/``: the
task-adapted adapter as a PEFT LoRA (mean mode: ABMLL's task mean, mu_phi), which
``PeftModel.from_pretrained`` loads on the base model.

Abstention (``--abstain-below P`` or ``--coverage F``) marks rows in the ``abstain`` column, by
the predictive's top probability: below P, or outside the F most confident rows (the ranking of
the selective metrics). ``adapt.json`` then reports accuracy on the answered rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from abmll.data.user_file import Columns, UserFileError, parse_fixed_options, read_user_examples
from abmll.evaluate_run import EvaluateError, read_finished_run

__all__ = ["AdaptError", "adapt_run", "main"]

log = logging.getLogger("abmll.adapt")

#: What ``abmll adapt`` writes into ``--out``; it refuses a directory holding any of them.
OUTPUTS = ("predictions.parquet", "adapt.json", "adapter")


class AdaptError(ValueError):
    """The run, the files or the flags cannot be used; one line naming the file, row or flag."""


def _check_lengths(examples, tokenizer, max_seq_len: int, chat: bool, path: Path, columns: Columns) -> None:
    """A row whose prompt is longer than ``data.max_seq_len`` is refused (the recipe cuts the
    question's end to fit; a user's own question is not cut without asking: ``--truncate``)."""
    from abmll.data.prompt import tokenize_example

    for ex in examples:
        n = len(tokenize_example(ex.example, tokenizer, 10**9, chat)["tokens"])
        if n > max_seq_len:
            raise AdaptError(
                f"{path}, row {ex.row}, column {columns.input!r}: the prompt is {n} tokens, more than the "
                f"run's data.max_seq_len={max_seq_len}; shorten it, or pass --truncate to cut the "
                f"question's end as the recipe does"
            )


def _rows(task: str, query, n_support: int, batches, pred: Dict[str, Any], dec, abstain, ts) -> List[Dict]:
    """One predictions row per query row, in file order."""
    from abmll.evaluation.evaluate import uncertainty_columns

    order = [int(i) - n_support for b in batches for i in b["example"]]  # batch order -> query index
    rows: List[Optional[Dict[str, Any]]] = [None] * len(query)
    for j, q in enumerate(order):
        ex = query[q]
        k = len(ex.example.options)
        row = {
            "task": task,
            "example": q,
            "line": ex.row,
            "label": ex.example.label if ex.labelled else None,
            "num_options": k,
            **uncertainty_columns(dec, j, k),  # as the recipe's predictions file
            "input": ex.example.input,
            "options": list(ex.example.options),
            "abstain": bool(abstain[j]),
        }
        row["answer"] = ex.example.options[row["pred"]]
        if "mean_mode" in pred:
            row["probs_mean_mode"] = pred["mean_mode"][j, :k].tolist()
        if ts is not None:
            row["probs_ts"] = ts[0][j, :k].tolist()
            row["temperature"] = ts[1]
        rows[q] = row
    return rows  # type: ignore[return-value]


def adapt_run(
    run_dir: Path,
    support: Path,
    query: Path,
    out: Path,
    *,
    columns: Columns = Columns(),
    task: Optional[str] = None,
    samples: Optional[int] = None,
    seed: Optional[int] = None,
    adapters: str = "best",
    abstain_below: Optional[float] = None,
    coverage: Optional[float] = None,
    truncate: bool = False,
) -> Dict[str, Any]:
    """Adapt ``run_dir``'s adapters on ``support`` and predict ``query`` into ``out``; returns
    the ``adapt.json`` record."""
    import torch

    import abmll_recipe
    from abmll.atomic import atomic_write_text
    from abmll.data import TaskSampler
    from abmll.distributed import seed_of
    from abmll.evaluation import sample_counts, write_predictions
    from abmll.evaluation.evaluate import adapt_and_predict, predictive_metrics, prefix_means
    from abmll.evaluation.uncertainty import abstentions, apply_temperature, decompose
    from abmll.export import save_peft_adapter
    from abmll.modules import gaussian_mode
    from abmll.run_contract import RunDir

    run, out = RunDir(run_dir), Path(out)
    if adapters not in ("best", "final"):
        raise AdaptError(f"--adapters must be best or final, got {adapters!r}")
    if abstain_below is not None and coverage is not None:
        raise AdaptError("--abstain-below and --coverage: give one of them, not both")
    if abstain_below is not None and not 0.0 <= abstain_below <= 1.0:
        raise AdaptError(f"--abstain-below {abstain_below}: must be a probability in [0, 1]")
    if coverage is not None and not 0.0 < coverage <= 1.0:
        raise AdaptError(f"--coverage {coverage}: must be in (0, 1]")
    if samples is not None and samples < 1:
        raise AdaptError(f"--samples {samples}: must be >= 1")
    if out.resolve() == Path(run_dir).resolve():
        raise AdaptError(f"--out {out}: must not be the run's own directory (abmll adapt never writes there)")
    taken = [name for name in OUTPUTS if (out / name).exists()]
    if taken:
        raise AdaptError(f"--out {out}: already holds {', '.join(taken)}; choose another directory")
    saved, cfg = read_finished_run(run)
    task = task or Path(support).stem
    # The files are read (and their columns checked) before the model is built.
    support_rows = read_user_examples(Path(support), task, columns, labels="required")
    query_rows = read_user_examples(Path(query), task, columns, labels="optional")

    state = torch.load(run.checkpoint, map_location="cpu", weights_only=False) if run.checkpoint.exists() else None
    if state is None and saved.get("epochs", 0) and saved.get("best_epoch", 0):
        raise AdaptError(f"{run.checkpoint}: missing; the run's adapters cannot be used without it")
    cfg.output_dir = str(out)  # read by the recipe's constructor; set-up for adaptation writes nothing
    recipe = abmll_recipe.ABMLLRecipe(cfg=cfg)
    try:
        recipe.setup_for_adaptation(cfg)  # the run's seed: a run without a checkpoint rebuilds its adapters
        learner, model = recipe.learner, recipe.model
        if state is not None:
            recipe.load_adapters(state["best"]["adapters"] if adapters == "best" else state["adapters"])

        k_batches, batch_size = learner.inner_steps, recipe.batch_size
        n_support = k_batches * batch_size
        if len(support_rows) < n_support:
            raise AdaptError(
                f"{support}: {len(support_rows)} rows; the run adapts in learner.inner_steps={k_batches} steps "
                f"of data.batch_size={batch_size}, so it needs at least {n_support} labelled rows"
            )
        if len(support_rows) > n_support:
            log.warning(f"{support}: using the first {n_support} of {len(support_rows)} rows "
                        f"(learner.inner_steps={k_batches} x data.batch_size={batch_size})")
        n_support_rows, support_rows = len(support_rows), support_rows[:n_support]
        chat = recipe.sampler_kw["chat_template"]
        max_seq_len = recipe.sampler_kw["max_seq_len"]
        if not truncate:
            _check_lengths(support_rows, recipe.tokenizer, max_seq_len, chat, Path(support), columns)
            _check_lengths(query_rows, recipe.tokenizer, max_seq_len, chat, Path(query), columns)
        sampler = TaskSampler({task: [r.example for r in support_rows + query_rows]}, recipe.tokenizer,
                              **recipe.eval_sampler_kw)
        # A run trained with data.num_demonstrations: the support rows are also the demonstrations.
        sampler.set_demonstration_pool(task, range(n_support))
        support_batches = sampler.batches(task, list(range(n_support)))
        query_batches = sampler.eval_batches(task, list(range(n_support, n_support + len(query_rows))))

        gaussian = learner.adapter_kind == "gaussian"
        sampled = recipe.eval_mode == "sample" and gaussian
        n_samples = (samples or sample_counts(recipe.num_samples)[-1]) if sampled else 1
        seed = int(saved["seed"] if seed is None else seed)
        export = bool(learner.adapter_params) and (learner.adapter_kind is not None or learner.test_time_adaptation)
        adapter_dir = out / "adapter"

        def save_adapter() -> None:  # called with the task's adapted adapters in place
            save_peft_adapter(learner.export_task_adapter(), model, adapter_dir,
                              base_model_name_or_path=cfg.get("base_model_name_or_path", None))

        out.mkdir(parents=True, exist_ok=True)
        with gaussian_mode(model, recipe.eval_mode):
            pred = adapt_and_predict(
                learner, support_batches, query_batches, recipe.option_ids, num_samples=n_samples,
                seed=seed_of(seed, "test", task), flip_rate=recipe.flip_rate and sampled,
                temperature_scaling=recipe.temperature_scaling,
                while_adapted=save_adapter if export else None,
            )
        probs = prefix_means(pred["samples"])[-1]
        dec = decompose(pred["samples"])
        ts = None
        if "temperature" in pred:
            ts = (apply_temperature(probs, pred["temperature"]), pred["temperature"])
        abstain = abstentions(dec["probs"], below=abstain_below, coverage=coverage)  # the rows' max_prob
        rows = _rows(task, query_rows, n_support, query_batches, pred, dec, abstain, ts)
        write_predictions(rows, out / "predictions.parquet")

        record: Dict[str, Any] = {
            "run_dir": str(run_dir),
            "method": saved["method"],
            "adapters": adapters,
            "epoch": saved["best_epoch"] if adapters == "best" else (state or {}).get("epoch", saved["best_epoch"]),
            "task": task,
            "seed": seed,
            "rng": f"seed_of({seed}, 'test', {task!r})",
            "eval_mode": recipe.eval_mode,
            "num_samples": n_samples,
            "adaptation": {"steps": k_batches if learner.test_time_adaptation else 0, "batch_size": batch_size,
                           "test_lr": learner.test_lr},
            "support": {"file": str(support), "rows": n_support_rows, "rows_used": n_support},
            "query": {"file": str(query), "rows": len(query_rows), "labelled": sum(r.labelled for r in query_rows)},
            "abstain": {"below": abstain_below, "coverage": coverage, "abstained": int(abstain.sum())},
            "temperature": None if ts is None else ts[1],
            "metrics": None,
            "adapter": "adapter" if export else None,
            "predictions": "predictions.parquet",
            "precision": recipe.precision.record(),
        }
        labelled = torch.tensor([r.labelled for r in query_rows])
        if labelled.any():
            # Rows are in batch order in probs/dec; the labelled mask is in file order.
            batch_to_file = torch.tensor([int(i) - n_support for b in query_batches for i in b["example"]])
            mask = labelled[batch_to_file]
            labels = torch.cat([b["label"] for b in query_batches])
            ece_bins = recipe.ece_bins
            record["metrics"] = predictive_metrics(probs[mask], labels[mask], dec["mutual_info"][mask], ece_bins)
            record["metrics"]["n"] = int(mask.sum())
            if ts is not None:
                record["metrics_ts"] = predictive_metrics(ts[0][mask], labels[mask], dec["mutual_info"][mask], ece_bins)
            answered = mask & ~abstain
            if abstain.any():
                hits = (dec["probs"].argmax(-1) == labels)[answered].double()  # the rows' pred
                record["abstain"]["accuracy_answered"] = hits.mean().item() if hits.numel() else None
                record["abstain"]["answered_labelled"] = int(answered.sum())
        atomic_write_text(out / "adapt.json", json.dumps(record, indent=2))
        return record
    finally:
        recipe.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="abmll adapt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run's output_dir")
    p.add_argument("--support", type=Path, required=True, help="labelled rows to adapt on")
    p.add_argument("--query", type=Path, required=True, help="rows to predict (labels optional)")
    p.add_argument("--out", type=Path, required=True, help="a new directory for the outputs")
    p.add_argument("--input-column", default="input")
    p.add_argument("--options-column", default="options", help="a list column (or JSON list strings)")
    p.add_argument("--options", default=None, help='the same options for every row, e.g. "yes,no"')
    p.add_argument("--label-column", default="output", help="the answer: an option's text, or an index")
    p.add_argument("--task", default=None, help="the task's name (default: the support file's name)")
    p.add_argument("--samples", type=int, default=None, help="weight samples per prediction (Gaussian runs)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--adapters", choices=("best", "final"), default="best")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--abstain-below", type=float, default=None, metavar="P",
                       help="abstain where the top probability is below P")
    group.add_argument("--coverage", type=float, default=None, metavar="F",
                       help="answer the most confident fraction F of the query rows, abstain on the rest")
    p.add_argument("--truncate", action="store_true", help="cut too-long questions as the recipe does")
    args = p.parse_args(argv)
    try:
        columns = Columns(args.input_column, args.options_column, args.label_column,
                          parse_fixed_options(args.options))
        rec = adapt_run(args.run_dir, args.support, args.query, args.out, columns=columns, task=args.task,
                        samples=args.samples, seed=args.seed, adapters=args.adapters,
                        abstain_below=args.abstain_below, coverage=args.coverage, truncate=args.truncate)
    except (AdaptError, EvaluateError, UserFileError, FileNotFoundError) as err:
        print(f"abmll adapt: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # the recipe's one-line config errors (e.g. missing base weights)
        print(f"abmll adapt: error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    q = rec["query"]
    line = (f"abmll adapt: {rec['method']} ({rec['adapters']} adapters, epoch {rec['epoch']}) adapted to "
            f"{rec['task']!r} in {rec['adaptation']['steps']} steps; {q['rows']} query rows predicted")
    if rec["metrics"] is not None:
        m = rec["metrics"]
        line += f"; on {m['n']} labelled: accuracy {m['accuracy']:.4f} ECE {m['ece']:.4f}"
    if rec["abstain"]["below"] is not None or rec["abstain"]["coverage"] is not None:
        line += f"; abstained on {rec['abstain']['abstained']}"
    print(f"{line}; wrote {args.out}/")
    return 0
