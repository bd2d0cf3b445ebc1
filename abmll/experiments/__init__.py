"""Run the paper's experiments: the grid of ``tune run`` runs and a resumable runner.

* :mod:`abmll.experiments.grid` — profiles (paper / offline / smoke) and the runs of each table.
* :mod:`abmll.experiments.runner` — runs them as subprocesses, skipping finished ones.
* :mod:`abmll.experiments.cli` — ``scripts/reproduce_*.py``.

Turning the finished runs into tables is :mod:`abmll.reporting`'s job.
"""

from .cli import main

__all__ = ["main"]
