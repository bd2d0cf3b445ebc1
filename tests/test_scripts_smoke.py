"""scripts/: the smoke profile end to end (real `tune run` subprocesses), dry runs, memory.

The end-to-end test runs Table 1's smoke grid with all five methods but seeds {0, 1} only
(10 tiny runs, ~40 s on two idle cores) instead of the profile's three seeds, to keep this
file within a few minutes on busy cores; the full grid is `python scripts/reproduce_table1.py
--profile smoke` (~1 minute).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abmll.cache import OFFLINE_ENV

pytestmark = pytest.mark.slow  # the reproduce scripts end to end on the smoke profile: not in the quick tier


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def script(name, *args, timeout=900, cwd=None):
    env = dict(os.environ, **OFFLINE_ENV)
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
    )


def table_rows(md: str):
    return [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| Method")]


def test_table1_smoke_end_to_end_resumes_and_reports_failures(tmp_path):
    out = tmp_path / "smoke"
    # A run that will fail: a corrupt checkpoint makes its resume crash.
    broken = out / "runs" / "tiny" / "pretrained" / "seed1" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "recipe_state.pt").write_bytes(b"not a checkpoint")

    proc = script("reproduce_table1.py", "--profile", "smoke", "--seeds", "0", "1", "--out", out)
    log = proc.stdout
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert log.count("/10] ") == 10  # one progress line per run
    assert "summary: 10 runs: 9 done, 1 failed" in log
    assert "FAILED: tiny/pretrained/seed1" in log
    marker = out / "runs" / "tiny" / "pretrained" / "seed1" / "reproduce_failed.log"
    assert "exited with code" in marker.read_text()
    # The table is still written from what finished: 5 methods x 1 split, twice (Acc, ECE).
    md = (out / "table1.md").read_text()
    rows = table_rows(md)
    assert len(rows) == 10 and all(r.count("|") == 3 for r in rows)
    assert [r.split("|")[1].strip() for r in rows[:5]] == [
        "Pretrained", "Regular LoRA", "Struct. LoRA", "Reptile", "ABMLL"]
    assert "tiny Acc ↑" in md and "tiny ECE ↓" in md
    assert "(n=1)" in rows[0] and "(n=1)" not in rows[4]
    assert "**" in md
    res = json.loads((out / "runs" / "tiny" / "abmll" / "seed0" / "results.json").read_text())
    assert set(res["pruning"]) == {"0.01", "0.1", "0.2", "0.3"} and res["epochs"] == 2

    # Fix the broken run and rerun: the 9 finished runs are skipped, only it runs.
    (broken / "recipe_state.pt").unlink()
    proc = script("reproduce_table1.py", "--profile", "smoke", "--seeds", "0", "1", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "summary: 10 runs: 1 done, 9 skipped" in proc.stdout
    assert not marker.exists()
    rows = table_rows((out / "table1.md").read_text())
    assert "(n=" not in "".join(rows)
    data = list(csv.DictReader((out / "table1.csv").open()))
    assert len(data) == 10 and {r["n"] for r in data} == {"2"}

    # Table 2 and Figure 2 reuse Table 1's runs: nothing new is trained.
    proc = script("reproduce_table2.py", "--profile", "smoke", "--seeds", "0", "1", "--out", out)
    assert proc.returncode == 0 and "10 skipped" in proc.stdout, proc.stdout[-2000:]
    md = (out / "table2.md").read_text()
    assert "| Method | 0% Pruned | 1% Pruned | 10% Pruned | 20% Pruned | 30% Pruned |" in md
    assert len(table_rows(md)) == 2 * 5
    proc = script("reproduce_figure2.py", "--profile", "smoke", "--seeds", "0", "1", "--out", out)
    assert proc.returncode == 0 and "10 skipped" in proc.stdout, proc.stdout[-2000:]
    fig = list(csv.DictReader((out / "figure2.csv").open()))
    assert {r["method"] for r in fig} == {"Pretrained", "RegularLoRA", "StructuredLoRA", "Reptile", "ABMLL"}
    assert len(fig) == 1 + 4 * 2  # Pretrained: epoch 0; others: epochs 1-2

    # The one aggregation command over the whole tree.
    proc = script("aggregate.py", out / "runs", "--out", tmp_path / "tables")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tables" / "table1.csv").read_text() == (out / "table1.csv").read_text()


def test_dry_runs_print_the_paper_grid(tmp_path):
    proc = script("reproduce_table1.py", "--profile", "paper", "--dry-run", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmds = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    assert len(cmds) == 5 * 5 * 3
    assert all("--config llama3_8b/" in c and "resume_from_checkpoint=True" in c for c in cmds)
    assert all("eval.prune_fractions=[0.01,0.1,0.2,0.3]" in c for c in cmds)
    assert sum("split=cls45" in c for c in cmds) == 15
    assert any(f"output_dir={tmp_path.resolve()}/runs/mcqa/regular_lora/seed2" in c for c in cmds)
    assert not (tmp_path / "runs").exists()

    data = tmp_path / "data"
    data.mkdir()
    proc = script("reproduce_table3.py", "--profile", "paper", "--dry-run", "--out", tmp_path,
                  "--data-dir", data, "--betas", "0", "-5", "-8", "-16")
    cmds = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    assert len(cmds) == 12 and all("split=cls45" in c for c in cmds)
    assert all(f"data.data_dir={data.resolve()}" in c for c in cmds)
    beta8 = [c for c in cmds if "/runs/cls45/abmll/seed" in c]  # shared with Table 1
    assert len(beta8) == 3 and not any("learner.beta" in c for c in beta8)
    assert sum("learner.beta=1e-16" in c and "abmll_beta-16" in c for c in cmds) == 3

    proc = script("reproduce_table2.py", "--profile", "paper", "--dry-run", "--methods", "abmll", "reptile")
    cmds = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    assert len(cmds) == 4 * 2 * 3
    # Seed-major: a sweep stopped part-way leaves whole seeds (all splits and methods).
    assert all("seed=0" in c for c in cmds[:8]) and all("seed=2" in c for c in cmds[16:])
    assert [c.split("split=")[1].split()[0] for c in cmds[:8:2]] == ["nli", "para", "cls45", "cls23"]

    # Without data or weights the paper profile refuses to start.
    proc = script("reproduce_table1.py", "--profile", "paper", "--out", tmp_path)
    assert proc.returncode == 2 and "--data-dir" in proc.stderr and "--checkpoint-dir" in proc.stderr
    proc = script("reproduce_table1.py", "--profile", "smoke", "--methods", "maml", "--dry-run")
    assert proc.returncode != 0 and "unknown method" in proc.stderr


def test_dry_run_of_the_qwen2_profile(tmp_path):
    """--profile paper-qwen2: the qwen2_7b configs, and both tokenizer files from the weights."""
    weights = tmp_path / "qwen2"
    weights.mkdir()
    proc = script("reproduce_table1.py", "--profile", "paper-qwen2", "--dry-run", "--out", tmp_path,
                  "--checkpoint-dir", weights, "--methods", "abmll", "--seeds", "0")
    assert proc.returncode == 0, proc.stderr
    cmds = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    assert len(cmds) == 5  # the paper's five splits
    w = weights.resolve()
    assert all("--config qwen2_7b/abmll" in c and f"checkpointer.checkpoint_dir={w}" in c
               and f"tokenizer.path={w}/vocab.json" in c and f"tokenizer.merges_file={w}/merges.txt" in c
               for c in cmds)
    proc = script("reproduce_table1.py", "--profile", "paper-qwen2", "--dry-run", "--out", tmp_path,
                  "--checkpoint-dir", weights, "--tokenizer-path", tmp_path / "my_vocab.json", "--seeds", "0")
    cmds = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    assert cmds and all(c.count("tokenizer.path=") == 1 and f"tokenizer.path={tmp_path.resolve()}/my_vocab.json" in c
                        and f"tokenizer.merges_file={w}/merges.txt" in c for c in cmds)
    proc = script("reproduce_table1.py", "--profile", "paper-qwen2", "--out", tmp_path)
    assert proc.returncode == 2 and "Qwen2-7B-Instruct weights" in proc.stderr


def test_benchmark_memory_tiny(tmp_path):
    proc = script("benchmark_memory.py", "--config-pair", "tiny", "--episodes", "1", "--seq-len", "64",
                  "--json", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Saved for backward (peak, unique, no params) |" in proc.stdout
    assert "25.6 GB" in proc.stdout
    data = json.loads((tmp_path / "m.json").read_text())
    lora, abmll = data["regular_lora"], data["abmll"]
    assert lora["method"] == "RegularLoRA" and abmll["method"] == "ABMLL"
    assert lora["batch_size"] == abmll["batch_size"] and lora["seq_len"] == abmll["seq_len"] == 64
    # Four LoRA pairs instead of one: four times the trainable parameters.
    assert abmll["trainable_params"] == 4 * lora["trainable_params"]
    assert abmll["saved_for_backward_peak_bytes"] > 0 and lora["saved_for_backward_peak_bytes"] > 0
    assert lora["rss_peak_bytes"] > 0
