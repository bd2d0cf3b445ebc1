"""abmll.reporting: the aggregation arithmetic against hand-made results.json files."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch

from abmll.reporting import (
    load_results,
    mark_best,
    moving_average,
    summarize,
    table1,
    table2,
    table3,
    welch_t_test,
)
from abmll.reporting.aggregate import main as aggregate_main
from abmll.reporting.figure2 import figure2_curves, figure2_csv, save_figure2_png
from abmll.reporting.results import FAILED_MARKER
from abmll.reporting.tables import Cell


# ----------------------------------------------------------------------------- statistics
def test_summarize_mean_and_standard_error():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # ddof=1
    assert s.se == pytest.approx(math.sqrt(5 / 3) / 2)
    one = summarize([0.7])
    assert (one.mean, one.std, one.se, one.n, one.se_defined) == (0.7, 0.0, 0.0, 1, False)
    assert summarize([]) is None
    assert summarize([1.0, float("nan"), 3.0]).n == 2


def test_welch_t_test_known_values():
    # Reference values: mpmath quadrature of the Student-t density at Welch's t and df.
    r = welch_t_test([0.752, 0.748, 0.751], [0.73, 0.725, 0.735])
    assert r.t == pytest.approx(6.502621848846106, rel=1e-12)
    assert r.df == pytest.approx(2.673110113910942, rel=1e-12)
    assert r.p_value == pytest.approx(0.010420237416916285, rel=1e-9)
    r = welch_t_test([1, 2, 3, 4], [2, 4, 6, 8, 10])
    assert r.t == pytest.approx(-2.251436323159369, rel=1e-12)
    assert r.df == pytest.approx(5.520787746170678, rel=1e-12)
    assert r.p_value == pytest.approx(0.06913359319239241, rel=1e-9)
    # Symmetric in its arguments; undefined with < 2 values; degenerate zero-variance cases.
    assert welch_t_test([2, 4, 6, 8, 10], [1, 2, 3, 4]).p_value == pytest.approx(r.p_value)
    assert welch_t_test([1.0], [1.0, 2.0]) is None
    assert welch_t_test([0.5, 0.5], [0.5, 0.5]).p_value == 1.0
    assert welch_t_test([0.5, 0.5], [0.6, 0.6]).p_value == 0.0


def test_moving_average_over_three_most_recent():
    assert moving_average([1, 2, 3, 4, 5]) == [1, 1.5, 2, 3, 4]
    assert moving_average([2.0]) == [2.0]
    assert moving_average([1, 2, 3, 4], window=2) == [1, 1.5, 2.5, 3.5]
    with pytest.raises(ValueError):
        moving_average([1], window=0)


def test_mark_best_bolds_best_and_inseparable():
    def cell(vals, metric="accuracy"):
        return Cell(summarize(vals), metric)

    col = {
        "best": cell([0.80, 0.81, 0.79]),
        "close": cell([0.70, 0.85, 0.78]),  # noisy: Welch cannot separate it
        "far": cell([0.50, 0.51, 0.49]),
        "single": cell([0.79]),  # n=1: untestable, not tied -> not bold
        "missing": Cell(None, "accuracy"),
    }
    mark_best(col, higher_is_better=True, alpha=0.05)
    assert col["best"].bold and col["best"].is_best
    assert col["close"].bold and col["close"].p_value > 0.05
    assert not col["far"].bold and col["far"].p_value < 0.05
    assert not col["single"].bold and col["single"].p_value is None
    assert not col["missing"].bold
    # Lower is better (ECE); exact ties on the mean are all best.
    ece = {"a": cell([0.2, 0.3], "ece"), "b": cell([0.25, 0.25], "ece"), "c": cell([0.9, 0.91], "ece")}
    mark_best(ece, higher_is_better=False)
    assert ece["a"].is_best and ece["b"].is_best and not ece["c"].bold


# ----------------------------------------------------------------------------- hand-made runs
METHOD_DIRS = {
    "Pretrained": "pretrained",
    "RegularLoRA": "regular_lora",
    "StructuredLoRA": "structured_lora",
    "Reptile": "reptile",
    "ABMLL": "abmll",
}


def _fake_model(method):
    """The model section a run records: a Gaussian method's names its estimator (the recipe writes
    the builder's default in when the config leaves it out); without it a run counts as one from
    before the key, i.e. local, the other estimator's row."""
    from abmll.modules import DEFAULT_SAMPLING
    from abmll.run_contract import ABMLL_METHODS

    return {"_component_": "m", **({"sampling": DEFAULT_SAMPLING} if method in ABMLL_METHODS else {})}


def fake_run(root: Path, split, method, seed, acc, ece, *, beta=None, val=None, pruning=None,
             history=None, finished=True, dirname=None, epochs=3, extra_cfg=None):
    """Write a results.json shaped like the recipe's."""
    out = root / split / (dirname or METHOD_DIRS[method]) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    val = val or (acc - 0.01, ece + 0.01)
    learner = {"_component_": f"abmll.learners.{method}", "inner_steps": 5}
    if method == "ABMLL":
        learner["beta"] = 1e-8 if beta is None else beta
    cfg = {"output_dir": str(out), "seed": seed, "split": split, "epochs": epochs, "learner": learner,
           "model": _fake_model(method), **(extra_cfg or {})}
    if history is None:
        history = [{"epoch": e, "train": {}, "val": {"accuracy": val[0], "ece": val[1]}} for e in range(1, epochs + 1)]
    data = {
        "method": method,
        "learner": learner["_component_"],
        "split": split,
        "seed": seed,
        "best_epoch": epochs,
        "epochs": epochs,
        "val_at_best": {"accuracy": val[0], "ece": val[1], "nll": 1.0, "brier": 0.5},
        "test": {"mean": {"accuracy": acc, "ece": ece, "nll": 1.0, "brier": 0.5},
                 "pooled": {"accuracy": acc, "ece": ece, "nll": 1.0, "brier": 0.5, "n": 10},
                 "per_task": {}},
        "pruning": pruning or {},
        "history": history,
        "config": cfg,
        "finished": finished,
    }
    (out / "results.json").write_text(json.dumps(data))
    return out


# Table-1 accuracies/ECEs per (split, method): one value per seed.
ACC = {
    ("cls45", "Pretrained"): [0.261, 0.261, 0.261],
    ("cls45", "RegularLoRA"): [0.71, 0.72, 0.716],
    ("cls45", "StructuredLoRA"): [0.744, 0.746, 0.745],
    ("cls45", "Reptile"): [0.73, 0.725, 0.735],
    ("cls45", "ABMLL"): [0.752, 0.748, 0.751],
    ("nli", "Pretrained"): [0.576, 0.576, 0.576],
    ("nli", "RegularLoRA"): [0.785, 0.785, 0.785],
    ("nli", "StructuredLoRA"): [0.754, 0.755, 0.756],
    ("nli", "Reptile"): [0.83, 0.838, 0.831],
    ("nli", "ABMLL"): [0.822, 0.821, 0.823],
}
ECE = {k: [round(1 - v, 3) / 2 for v in vals] for k, vals in ACC.items()}


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "results"
    for (split, method), accs in ACC.items():
        for seed, acc in enumerate(accs):
            ece = ECE[(split, method)][seed]
            pruning = {f"{f:g}": {"accuracy": acc - f / 10, "ece": ece + f / 10, "nll": 1, "brier": 0.5}
                       for f in (0.01, 0.1, 0.2, 0.3)}
            fake_run(root, split, method, seed, acc, ece, pruning=pruning)
    # Table 3 sweep on cls45 (beta=1e-8 is the Table 1 run).
    for lb, vals in ((0, [0.64, 0.65, 0.645]), (-5, [0.70, 0.71, 0.70]), (-16, [0.60, 0.61, 0.61])):
        for seed, v in enumerate(vals):
            fake_run(root, "cls45", "ABMLL", seed, v, 0.3, beta=10.0**lb, val=(v, 0.4 - v / 10),
                     dirname=f"abmll_beta{lb}")
    return root


def test_load_reports_unusable_runs(grid):
    bad = grid / "cls23"
    fake_run(bad, "cls23", "Reptile", 0, 0.5, 0.2, finished=False)  # unfinished
    (bad / "corrupt" / "seed0").mkdir(parents=True)
    (bad / "corrupt" / "seed0" / "results.json").write_text("{not json")
    (bad / "running" / "seed0" / "checkpoints").mkdir(parents=True)
    (bad / "running" / "seed0" / "checkpoints" / "recipe_state.pt").write_bytes(b"x")
    (bad / "failed" / "seed0").mkdir(parents=True)
    (bad / "failed" / "seed0" / FAILED_MARKER).write_text("boom\nabmll_recipe: error: x")
    fake_run(bad, "cls45", "ABMLL", 0, 0.1, 0.1, dirname="dup")  # same split/method/beta/seed
    fake_run(bad, "nli", "Reptile", 0, 0.1, 0.1, dirname="zz_dup")
    fake_run(grid / "other", "para", "Reptile", 0, 0.6, 0.3, extra_cfg={"data": {"max_seq_len": 1}})
    fake_run(grid / "other", "para", "Reptile", 1, 0.6, 0.3, extra_cfg={"data": {"max_seq_len": 2}})
    res = load_results(grid)
    kinds = sorted(p.kind for p in res.problems)
    assert kinds == ["config-mismatch", "corrupt", "duplicate", "duplicate", "failed", "in-progress", "unfinished"]
    mismatch = next(p for p in res.problems if p.kind == "config-mismatch")
    assert "data.max_seq_len" in mismatch.message
    assert len(res.runs) == 30 + 9 + 2
    assert res.splits() == ["cls45", "nli", "para"]
    assert res.betas("cls45") == pytest.approx([1.0, 1e-5, 1e-8, 1e-16])


def _md_rows(md: str):
    return [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Method")
            and not line.startswith("| log10")]


def test_table1_layout_arithmetic_and_bold(grid):
    res = load_results(grid)
    t = table1(res)
    acc, ece = t.blocks
    assert [lbl for _, lbl in acc.rows] == ["Pretrained", "Regular LoRA", "Struct. LoRA", "Reptile", "ABMLL"]
    assert [lbl for _, lbl, _ in acc.columns] == ["cls-45 Acc ↑", "NLI Acc ↑"]
    assert [lbl for _, lbl, _ in ece.columns] == ["cls-45 ECE ↓", "NLI ECE ↓"]
    # Arithmetic: mean and SE (ddof=1) of the hand-made values.
    c = acc.cell("ABMLL", "cls45")
    vals = ACC[("cls45", "ABMLL")]
    mean = sum(vals) / 3
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2) / math.sqrt(3)
    assert c.summary.mean == pytest.approx(mean) and c.summary.se == pytest.approx(se)
    assert c.text(3) == "75.0% ± 0.1%"
    assert acc.cell("Pretrained", "cls45").text(3) == "26.1% ± 0.0%"
    assert ece.cell("ABMLL", "cls45").text(3) == f"{sum(ECE[('cls45', 'ABMLL')]) / 3:.3f} ± 0.001"
    # Bold: cls45 -> ABMLL only (others separable); nli -> Reptile best, ABMLL not separable? check p.
    assert acc.cell("ABMLL", "cls45").is_best
    assert [k for k, _ in acc.rows if acc.cell(k, "cls45").bold] == ["ABMLL"]
    assert acc.cell("Reptile", "nli").is_best
    p = welch_t_test(ACC[("nli", "ABMLL")], ACC[("nli", "Reptile")]).p_value
    assert acc.cell("ABMLL", "nli").p_value == pytest.approx(p)
    assert acc.cell("ABMLL", "nli").bold == (p >= 0.05)
    # ECE: lower is better -> the best accuracy has the best ECE here by construction.
    assert ece.cell("ABMLL", "cls45").is_best
    md = t.to_markdown()
    rows = _md_rows(md)
    assert len(rows) == 10 and all(r.count("|") == 4 for r in rows)
    assert "| ABMLL | **75.0% ± 0.1%** |" in md
    assert "Welch" in md
    tex = t.to_latex()
    assert r"\textbf{75.0\% $\pm$ 0.1\%}" in tex and tex.count(r"\begin{tabular}") == 2
    rows = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert len(rows) == 2 * 5 * 2
    r = next(r for r in rows if r["row"] == "ABMLL" and r["column"] == "cls45" and r["metric"] == "accuracy")
    assert r["n"] == "3" and r["bold"] == "1" and r["seeds"] == "0;1;2"
    assert float(r["se"]) == pytest.approx(se)


def test_table1_missing_cells_and_single_seed(tmp_path):
    root = tmp_path / "r"
    fake_run(root, "nli", "ABMLL", 0, 0.8, 0.2)
    fake_run(root, "nli", "ABMLL", 1, 0.82, 0.2)
    fake_run(root, "nli", "Reptile", 0, 0.9, 0.1)  # single seed, higher mean: the best
    fake_run(root, "para", "Reptile", 0, 0.5, 0.1)
    t = table1(load_results(root))
    acc = t.blocks[0]
    assert [k for k, _ in acc.rows] == ["Reptile", "ABMLL"]
    assert acc.cell("ABMLL", "para").text(2) == "—"
    assert acc.cell("Reptile", "nli").text(2) == "90.0% ± 0.0% (n=1)"
    assert acc.cell("Reptile", "nli").bold
    assert not acc.cell("ABMLL", "nli").bold  # untestable against n=1, not tied
    assert "(n=1)" in t.to_markdown() and "SE 0" in t.to_markdown()


def test_table2_pruning_columns(grid):
    t = table2(load_results(grid), ["nli", "cls45"])
    assert [b.title for b in t.blocks] == ["(a) NLI, accuracy", "(b) cls-45, accuracy", "(c) NLI, ECE", "(d) cls-45, ECE"]
    b = t.blocks[0]
    assert [lbl for _, lbl, _ in b.columns] == ["0% Pruned", "1% Pruned", "10% Pruned", "20% Pruned", "30% Pruned"]
    assert len(b.rows) == 5
    vals = ACC[("nli", "ABMLL")]
    assert b.cell("ABMLL", "0").summary.mean == pytest.approx(sum(vals) / 3)
    assert b.cell("ABMLL", "0.2").summary.mean == pytest.approx(sum(vals) / 3 - 0.02)
    assert len(_md_rows(t.to_markdown())) == 4 * 5


def test_table3_beta_rows(grid):
    t = table3(load_results(grid))
    (b,) = t.blocks
    assert [lbl for _, lbl in b.rows] == ["0", "-5", "-8", "-16"]
    assert [lbl for _, lbl, _ in b.columns] == ["Accuracy ↑", "ECE ↓"]
    assert b.cell(repr(-5.0), "accuracy").summary.mean == pytest.approx((0.70 + 0.71 + 0.70) / 3)
    # -8 is the Table 1 ABMLL run: its validation accuracy.
    assert b.cell(repr(-8.0), "accuracy").summary.mean == pytest.approx(sum(ACC[("cls45", "ABMLL")]) / 3 - 0.01)
    assert b.cell(repr(-8.0), "accuracy").is_best
    assert "cls-45" in t.notes[0]
    # nli has a single beta: no Table 3 block for it unless asked.
    assert len(table3(load_results(grid), ["nli"]).blocks[0].rows) == 1


def test_figure2_mean_over_seeds_then_moving_average(tmp_path):
    root = tmp_path / "r"
    for seed, accs in enumerate(([0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6])):
        hist = [{"epoch": e + 1, "train": {}, "val": {"accuracy": a, "ece": 1 - a}} for e, a in enumerate(accs)]
        fake_run(root, "cls45", "Reptile", seed, 0.5, 0.2, history=hist, epochs=4)
    fake_run(root, "cls45", "Pretrained", 0, 0.3, 0.3,
             history=[{"epoch": 0, "val": {"accuracy": 0.26, "ece": 0.45}}], epochs=0)
    curves = figure2_curves(load_results(root), "cls45")
    assert [c.method for c in curves] == ["Pretrained", "Reptile"]
    rep = curves[1]
    assert rep.epochs == [1, 2, 3, 4] and rep.n_seeds == [2, 2, 2, 2]
    assert rep.accuracy == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert rep.accuracy_ma == pytest.approx([0.2, 0.25, 0.3, 0.4])
    assert rep.ece_ma == pytest.approx([0.8, 0.75, 0.7, 0.6])
    rows = list(csv.DictReader(io.StringIO(figure2_csv(curves))))
    assert len(rows) == 5 and rows[0]["method"] == "Pretrained" and rows[0]["epoch"] == "0"
    note = save_figure2_png(curves, tmp_path / "f.png")
    try:
        import matplotlib  # noqa: F401

        assert note is None and (tmp_path / "f.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib" in note and not (tmp_path / "f.png").exists()


def test_aggregate_command_writes_every_table(grid, tmp_path, capsys):
    (grid / "cls45" / "reptile" / "seed9").mkdir(parents=True)
    (grid / "cls45" / "reptile" / "seed9" / "results.json").write_text("")
    out = tmp_path / "tables"
    assert aggregate_main([str(grid), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    for t in ("table1", "table2", "table3"):
        assert {f"{t}.md", f"{t}.csv", f"{t}.tex"} <= names
    assert {"figure2.csv", "runs.csv", "tables.md"} <= names
    log = capsys.readouterr().out
    assert "skipped corrupt" in log and "seed9" in log
    assert "corrupt" in (out / "tables.md").read_text()
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 39
    assert aggregate_main([str(grid), "--out", str(out), "--strict"]) == 1
    # Merging two trees (e.g. two machines) works the same as one.
    assert aggregate_main([str(grid / "cls45"), str(grid / "nli"), "--out", str(tmp_path / "t2")]) == 0
    assert (tmp_path / "t2" / "table1.csv").read_text() == (out / "table1.csv").read_text()
    assert aggregate_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "t3")]) == 1


def test_a_run_without_validation_is_used_for_test_tables(tmp_path):
    """eval.validate=false writes val_at_best: null; the run still counts for Tables 1-2."""
    import json

    from abmll.reporting.results import load_results

    run = tmp_path / "runs" / "s" / "abmll" / "seed0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "method": "ABMLL", "split": "s", "seed": 0, "finished": True, "best_epoch": 1,
        "val_at_best": None, "history": [{"epoch": 1}],
        "test": {"mean": {"accuracy": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5}},
        "config": {"learner": {"beta": 1e-8}},
    }))
    results = load_results(tmp_path)
    assert len(results.runs) == 1 and not results.problems
    assert results.runs[0].val_at_best == {}


# ----------------------------------------------------------------------------- method comparison
def test_comparison_variants_pairs_and_per_task(tmp_path):
    """Variants are their own rows; pairs carry Welch's p; per-task cells average over seeds."""
    from abmll.reporting.compare import comparison_csv, comparison_markdown, method_runs, per_task_tables

    root = tmp_path / "runs"
    accs = {"Pretrained": [0.40, 0.40, 0.40], "PretrainedTTA": [0.42, 0.44, 0.43],
            "ABMLL": [0.50, 0.52, 0.51], "ABMLL-FO": [0.49, 0.55, 0.43]}
    for method, vals in accs.items():
        for seed, acc in enumerate(vals):
            out = fake_run(root, "s", method, seed, acc, 0.1 + seed / 100, dirname=method.lower(), epochs=1)
            data = json.loads((out / "results.json").read_text())
            data["test"]["per_task"] = {"t1": {"accuracy": acc + 0.1, "ece": 0.2}, "t2": {"accuracy": acc - 0.1, "ece": 0.3}}
            if method == "ABMLL-FO":
                data["config"]["learner"]["beta"] = 1e-8
            (out / "results.json").write_text(json.dumps(data))
    results = load_results(root)
    assert not results.problems
    by_method = method_runs(results, "s")
    assert list(by_method) == ["Pretrained", "PretrainedTTA", "ABMLL", "ABMLL-FO"]
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(comparison_csv(by_method)))}
    assert float(rows["ABMLL"]["accuracy_mean"]) == pytest.approx(0.51)
    assert float(rows["ABMLL"]["accuracy_se"]) == pytest.approx(summarize([0.50, 0.52, 0.51]).se, abs=1e-6)
    assert rows["ABMLL-FO"]["label"] == "ABMLL (first-order)" and rows["PretrainedTTA"]["label"] == "Pretrained + TTA"
    md = comparison_markdown(by_method, "s")
    p = welch_t_test(accs["ABMLL"], accs["PretrainedTTA"]).p_value
    line = next(l for l in md.splitlines() if l.startswith("| Pretrained + TTA | ABMLL |"))
    assert f"{p:.3f}" in line and "-8.0" in line  # 43 - 51 points
    noisy = next(l for l in md.splitlines() if l.startswith("| ABMLL | ABMLL (first-order) |"))
    assert "*" not in noisy.split("|")[4]  # 51 vs 49 +- 3.5: not separable
    # Paired over the 3 common seeds: scipy's ttest_rel on the seed-matched values.
    from scipy.stats import ttest_rel

    from abmll.reporting.compare import paired_p

    ref = ttest_rel(accs["ABMLL"], accs["PretrainedTTA"]).pvalue
    assert paired_p(by_method["ABMLL"], by_method["PretrainedTTA"], "accuracy") == (pytest.approx(ref), 3)
    assert f"{ref:.3f}" in line.split("|")[5] and "(3)" in line.split("|")[5]
    # A gain on every seed (2, 4, 3 points) is separated by the pairing.
    assert paired_p(by_method["PretrainedTTA"], by_method["Pretrained"], "accuracy")[0] < 0.05
    task_md, task_csv = per_task_tables(by_method, "s")
    t1 = [r for r in csv.DictReader(io.StringIO(task_csv)) if r["task"] == "t1" and r["method"] == "ABMLL"][0]
    assert float(t1["accuracy_mean"]) == pytest.approx(0.61) and t1["n_seeds"] == "3"
    assert "| t2 |" in task_md


def test_the_training_estimator_is_part_of_the_row(tmp_path):
    """Since note 30 the default estimator is weight: ABMLL runs with model.sampling=local, and
    runs from before the key (which trained with local), are the "ABMLL (local reparam.)" row,
    never seeds of ABMLL."""
    from abmll.reporting.compare import comparison_rows, method_runs
    from abmll.run_contract import estimator_method, method

    root = tmp_path / "runs"
    for seed, sampling in ((0, None), (1, "local"), (2, "local")):  # seed 0: before the key
        model = {"_component_": "m"} if sampling is None else {"_component_": "m", "sampling": sampling}
        fake_run(root, "s", "ABMLL", seed, 0.5 + seed / 100, 0.1, epochs=1, dirname="abmll_local",
                 extra_cfg={"model": model})
    for seed in (0, 1):
        fake_run(root, "s", "ABMLL", seed, 0.4, 0.2, epochs=1,
                 extra_cfg={"model": {"_component_": "m", "sampling": "weight"}})
    results = load_results(root)
    assert not results.problems  # no config mismatch between seed 0 (no key) and seeds 1-2
    by_method = method_runs(results, "s")
    assert list(by_method) == ["ABMLL", "ABMLL-L"]
    assert sorted(r.seed for r in by_method["ABMLL"]) == [0, 1]
    assert sorted(r.seed for r in by_method["ABMLL-L"]) == [0, 1, 2]
    assert all(r.beta == 1e-8 for r in by_method["ABMLL-L"])  # grouped by beta like ABMLL
    for r in by_method["ABMLL-L"]:  # a temperature-scaled test: the + TS control row follows
        r.data["test_ts"] = {"mean": r.data["test"]["mean"]}
    assert [row.key for row in comparison_rows(by_method)] == ["ABMLL", "ABMLL-L", "ABMLL-L+TS"]
    assert estimator_method("ABMLL-L", "local") == "ABMLL-L"  # a name that says it already
    assert estimator_method("ABMLL", "weight") == "ABMLL" and estimator_method("ABMLL", None) == "ABMLL-L"
    entry = method("abmll_local")
    assert (entry.name, entry.label, entry.overrides) == ("ABMLL-L", "ABMLL (local reparam.)", ("model.sampling=local",))
    assert method("abmll_weight").name == "ABMLL"  # the weight row's old key: now the default's
    # --methods restricts the comparison too (here to the two estimators, without Pretrained).
    fake_run(root, "s", "Pretrained", 0, 0.3, 0.4, epochs=1)
    aggregate_main([str(root), "--out", str(tmp_path / "t"), "--methods", "ABMLL,abmll_local", "--no-latex"])
    rows = [l.split("|")[1].strip() for l in (tmp_path / "t" / "comparison_s.md").read_text().splitlines()
            if l.startswith("| ") and l.split("|")[2].strip().isdigit()]
    assert rows == ["ABMLL", "ABMLL (local reparam.)"]
    # A variant's run with the other estimator (+ ICL, from before the key) is a row of its own
    # too, labelled by both, right after the variant, and keeps the variant's + TS row.
    for seed in (0, 1):
        out = fake_run(root, "s", "ABMLL-ICL", seed, 0.45, 0.2, epochs=1, dirname="icl_local",
                       extra_cfg={"model": {"_component_": "m"}})
        data = json.loads((out / "results.json").read_text())
        data["test_ts"] = {"mean": data["test"]["mean"]}
        (out / "results.json").write_text(json.dumps(data))
    by_method = method_runs(load_results(root), "s")
    assert list(by_method) == ["Pretrained", "ABMLL", "ABMLL-ICL-L", "ABMLL-L"]
    from abmll.run_contract import method_label

    assert method_label("ABMLL-ICL-L") == "ABMLL + ICL (local reparam.)"
    assert "ABMLL-ICL-L+TS" in [row.key for row in comparison_rows(by_method)]


def test_runs_on_other_tasks_under_the_same_split_name_are_not_pooled(tmp_path):
    root = tmp_path / "runs"
    for seed, sha, split_file in ((0, "aaa", None), (1, "aaa", None), (2, "bbb", "/my/split.yaml")):
        out = fake_run(root, "bigbench-mc", "ABMLL", seed, 0.5, 0.1, epochs=1)
        data = json.loads((out / "results.json").read_text())
        data.update(task_lists_sha256=sha, split_file=split_file)
        (out / "results.json").write_text(json.dumps(data))
    results = load_results(root)
    assert [r.seed for r in results.runs] == [0, 1]
    [problem] = [p for p in results.problems if p.kind == "task-mismatch"]
    assert "seed2" in str(problem.path) and "/my/split.yaml" in problem.message


def test_seeds_run_in_different_dtypes_are_not_pooled_unseen(tmp_path, capsys):
    """dtype: auto resolves per machine: the resolved dtype is shown, and seeds of one cell in
    different dtypes are reported as a config mismatch (the config's own value is the same)."""
    from abmll.reporting.aggregate import aggregate

    root = tmp_path / "results"
    for seed, (dtype, cap) in enumerate([("fp32", "AVX2"), ("bf16", "AVX512")]):
        out = fake_run(root, "nli", "Reptile", seed, 0.8, 0.1, extra_cfg={"dtype": "auto"})
        data = json.loads((out / "results.json").read_text())
        data["precision"] = {"dtype": dtype, "requested": "auto", "cpu_capability": cap}
        (out / "results.json").write_text(json.dumps(data))
    fake_run(root, "nli", "Pretrained", 0, 0.5, 0.3, extra_cfg={"dtype": "fp32"})  # before precision was recorded
    results = load_results(root)
    mismatch = [p for p in results.problems if p.kind == "config-mismatch"]
    assert len(mismatch) == 1 and "dtype: 'fp32' vs 'bf16'" in mismatch[0].message
    by_seed = {r.seed: r for r in results.select(method="Reptile")}
    assert (by_seed[0].dtype, by_seed[0].cpu_capability) == ("fp32", "AVX2")
    assert results.select(method="Pretrained")[0].dtype == "fp32"
    aggregate([root], tmp_path / "tables", latex=False)
    tables = (tmp_path / "tables" / "tables.md").read_text()
    assert "bf16 on AVX512: 1 run(s)" in tables and "fp32 on AVX2: 1 run(s)" in tables
    runs_csv = (tmp_path / "tables" / "runs.csv").read_text().splitlines()
    assert runs_csv[0].split(",")[4:6] == ["dtype", "cpu_capability"]


def _with_uncertainty(out: Path, seed: int, *, ts_ece: float, curve: bool, probs_rows: list):
    """Add what a run of this version writes: test_ts, a samples curve, a predictions file."""
    from abmll.evaluation.predictions import write_predictions

    data = json.loads((out / "results.json").read_text())
    for block in (data["test"]["mean"], data["test"]["pooled"]):
        block.update({"aurc": 0.3, "acc_at_50": 0.9, "acc_at_80": 0.85, "acc_at_90": 0.8, "mi": 0.01})
    data["test_ts"] = {"mean": dict(data["test"]["mean"], ece=ts_ece, temperature=2.0), "per_task": {}, "pooled": {}}
    data["test"]["samples_curve"] = (
        {str(s): {"accuracy": 0.8, "ece": 0.1 / s, "nll": 1.0, "brier": 0.5, "mi": 0.01 * s} for s in (1, 2, 4)}
        if curve else None
    )
    write_predictions(probs_rows, out / "predictions_test.parquet")
    data["predictions"] = "predictions_test.parquet"
    (out / "results.json").write_text(json.dumps(data))


def test_comparison_has_ts_rows_new_columns_and_uncertainty_figures(tmp_path):
    from abmll.reporting.aggregate import aggregate
    from abmll.reporting.uncertainty_figures import reliability_bins
    from abmll.evaluation.metrics import expected_calibration_error

    root = tmp_path / "results"
    g = torch.Generator().manual_seed(0)
    for method in ("Pretrained", "ABMLL", "Reptile"):
        for seed in range(2):
            out = fake_run(root, "nli", method, seed, 0.8 + seed / 100, 0.1)
            probs = torch.softmax(torch.randn(20, 3, generator=g), -1)
            rows = [{"task": "t", "example": i, "line": i + 1, "label": i % 3, "num_options": 3,
                     "probs": probs[i].tolist()} for i in range(20)]
            ts_ece = 0.05 + 0.02 * seed if method == "Pretrained" else 0.05
            _with_uncertainty(out, seed, ts_ece=ts_ece, curve=method == "ABMLL", probs_rows=rows)
    aggregate([root], tmp_path / "tables", latex=False)
    md = (tmp_path / "tables" / "comparison_nli.md").read_text()
    # Every row's ECE against Pretrained + TS's (0.05, 0.07), paired over seeds: scipy's ttest_rel.
    from scipy.stats import ttest_rel

    against = md.split("Against a temperature")[1]
    reptile = next(l for l in against.splitlines() if l.startswith("| Reptile |")).split("|")
    assert reptile[2].strip() == "+0.040"  # 0.1 against the mean of 0.05 and 0.07
    assert reptile[4].strip().startswith(f"{ttest_rel([0.1, 0.1], [0.05, 0.07]).pvalue:.3f}")
    assert "| Pretrained + TS |" not in against  # the reference is not compared with itself
    assert "| Pretrained + TS | 2 |" in md and "| ABMLL + TS | 2 |" in md
    assert "Reptile + TS" not in md  # the control is for Pretrained, Regular LoRA and ABMLL (and their variants)
    assert "ECE (15 bins, fraction)" in md and "AURC" in md and "MI (nats)" in md
    ts_row = [line for line in md.splitlines() if line.startswith("| ABMLL + TS")][0]
    assert "| 0.050 ± 0.000 |" in ts_row  # the ECE of test_ts, not of test
    assert "| 90.0 / 85.0 / 80.0 |" in ts_row  # acc_at_50 / 80 / 90, in that order
    csv_rows = (tmp_path / "tables" / "comparison_nli.csv").read_text().splitlines()
    assert csv_rows[0].count("aurc_mean") == 1 and any(r.startswith("ABMLL+TS,") for r in csv_rows)
    assert all(f"acc_at_{c}_se" in csv_rows[0] for c in (50, 80, 90))  # the SEs the markdown leaves out
    rel = (tmp_path / "tables" / "reliability_nli.csv").read_text().splitlines()
    assert rel[0] == "method,bin,lower,upper,count,confidence,accuracy"
    assert sum(int(r.split(",")[4]) for r in rel[1:] if r.startswith("ABMLL,")) == 40  # 2 seeds x 20
    assert (tmp_path / "tables" / "risk_coverage_nli.csv").exists()
    # The diagram's bins give back the ECE (an independent computation of the same quantity).
    probs = torch.softmax(torch.randn(50, 4, generator=g), -1)
    labels = torch.randint(0, 4, (50,), generator=g)
    bins = reliability_bins(probs, labels, 15)
    ece = sum(b["count"] / 50 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(expected_calibration_error(probs, labels, 15), abs=1e-12)


def test_cost_per_run_from_the_recorded_prompts_and_times(tmp_path):
    """The cost table and runs.csv read what the recipe records: k and tokens per test prompt
    (``data``), training seconds (``history``) and test seconds (``data.test_seconds``)."""
    from abmll.reporting.aggregate import aggregate

    root = tmp_path / "results"
    for seed, (train_s, test_s, tokens) in enumerate(((600.0, 1200.0, 770.0), (900.0, 1800.0, 780.0))):
        hist = [{"epoch": 1, "train": {"seconds": train_s}}]
        out = fake_run(root, "nli", "ABMLL", seed, 0.8, 0.1, history=hist, epochs=1, dirname="abmll_icl")
        res = json.loads((out / "results.json").read_text())
        res["method"] = "ABMLL-ICL"
        res["data"] = {"num_demonstrations": 4, "test_prompts": {"tokens_per_evaluated_prompt": tokens},
                       "test_seconds": test_s}
        res["precision"] = {"dtype": "fp32", "cpu_capability": "AVX512", "threads": 1}
        (out / "results.json").write_text(json.dumps(res))
    # A run from before the times were recorded: no data block, so "—" and "[n of m]", not 0.
    fake_run(root, "nli", "Pretrained", 0, 0.4, 0.4, history=[{"epoch": 0}], epochs=1)
    aggregate([root], tmp_path / "tables", latex=False)
    md = (tmp_path / "tables" / "comparison_nli.md").read_text()
    cost = md.split("Cost per run")[1].splitlines()
    icl = next(line for line in cost if line.startswith("| ABMLL + ICL |")).split("|")
    assert [c.strip() for c in icl[2:7]] == ["4", "775", "12.5 (10.0-15.0)", "25.0 (20.0-30.0)", "AVX512, 1"]
    pre = next(line for line in cost if line.startswith("| Pretrained |")).split("|")
    assert [c.strip() for c in pre[2:6]] == ["0", "—", "0", "—"]  # nothing trained; test time not recorded
    runs = (tmp_path / "tables" / "runs.csv").read_text().splitlines()
    header = runs[0].split(",")
    icl_run = next(r.split(",") for r in runs[1:] if ",ABMLL-ICL," in r and "seed1" in r)
    got = {k: icl_run[header.index(k)] for k in ("demonstrations", "tokens_per_test_prompt", "train_seconds",
                                                 "test_seconds", "threads")}
    assert got == {"demonstrations": "4", "tokens_per_test_prompt": "780.0", "train_seconds": "900.0",
                   "test_seconds": "1800.0", "threads": "1"}
    # Runs that recorded no prompts at all: no cost table (older result trees stay as they were).
    fake_run(tmp_path / "old", "nli", "Reptile", 0, 0.5, 0.2)
    aggregate([tmp_path / "old"], tmp_path / "old_tables", latex=False)
    assert "Cost per run" not in (tmp_path / "old_tables" / "comparison_nli.md").read_text()
