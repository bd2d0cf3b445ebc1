"""Reproduce the paper's tables from ``results.json`` files: load, aggregate over seeds, tabulate.

* :mod:`abmll.reporting.results` — find and load runs, report unusable ones.
* :mod:`abmll.reporting.stats` — mean ± SE, Welch's t-test (scipy's Student t), moving average.
* :mod:`abmll.reporting.tables` — Tables 1-3 (Markdown, CSV, LaTeX).
* :mod:`abmll.reporting.figure2` — Figure 2 (CSV; PNG with the optional ``plot`` extra).
* :mod:`abmll.reporting.aggregate` — ``scripts/aggregate.py``.
* :mod:`abmll.reporting.compare` — method comparison: pairwise tests, per-task tables, plot.

Running the experiments is :mod:`abmll.experiments`; the run directory and results record are
:mod:`abmll.run_contract`'s; the speed/memory benchmark is :mod:`abmll.benchmark`.
"""

from .results import Problem, ResultSet, RunResult, load_results
from .stats import Summary, moving_average, summarize, welch_t_test
from .tables import Table, mark_best, table1, table2, table3

__all__ = [
    "Problem",
    "ResultSet",
    "RunResult",
    "load_results",
    "Summary",
    "moving_average",
    "summarize",
    "welch_t_test",
    "Table",
    "mark_best",
    "table1",
    "table2",
    "table3",
]
