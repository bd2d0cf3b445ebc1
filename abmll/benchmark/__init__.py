"""Speed and memory of ABMLL against Regular LoRA on the same model and batches
(``scripts/benchmark.py``, ``scripts/benchmark_memory.py``).

Each measurement runs in its own fresh subprocess, so that no method sees another's allocations.

* :mod:`abmll.benchmark.probes` — peak RSS sampler and saved-for-backward meter.
* :mod:`abmll.benchmark.runner` — build a config's model and learner as the recipe does.
* :mod:`abmll.benchmark.measure` — ``measure`` (one method), ``time_pair``, ``time_layer``.
* :mod:`abmll.benchmark.flops` — FLOPs of the real graph (``FlopCounterMode``): the FLOP floor.
* :mod:`abmll.benchmark.workers` — run those in fresh processes and read their results back.
* :mod:`abmll.benchmark.report` — the Markdown tables.
* :mod:`abmll.benchmark.cli` — the scripts' command lines (``main``, ``benchmark_main``).
* :mod:`abmll.benchmark.processes` — epoch time with 1 vs N processes (``scripts/benchmark_processes.py``).
"""
