"""`abmll adapt`: a finished run adapted to a user's own file gives the recipe's own test-time
adaptation's predictions, exports the adapted adapter for PEFT, and refuses bad input in one
line naming the file, row and column, without touching the run."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abmll.adapt import AdaptError, adapt_run
from abmll.data import TaskSampler, load_split
from abmll.data.user_file import Columns, UserFileError, parse_fixed_options, read_user_examples
from abmll.evaluation import read_predictions
from abmll.evaluation.uncertainty import abstentions
from abmll.models import tiny_tokenizer
from test_configs import METHODS

TASK = "more_than_fifty"


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write_jsonl(path: Path, examples) -> Path:
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps({"task": ex.task, "input": ex.input, "options": list(ex.options), "output": ex.output}) + "\n")
    return path


def _recipe_split_files(tmp_path: Path, seed: int = 0, max_eval: int = 6):
    """The tiny test task as the recipe's test splits it: its support rows in the order the
    adaptation steps take them, its evaluated rows in evaluation order."""
    split = load_split("tiny", None)
    sampler = TaskSampler(split.test, tiny_tokenizer(), batch_size=2, max_seq_len=256, seed=seed, eval_batch_size=8)
    support, evaluated = sampler.adaptation_split(TASK, 5, max_eval)
    exs = split.test[TASK]
    pick = lambda batches: [exs[int(i)] for b in batches for i in b["example"]]  # noqa: E731
    return (_write_jsonl(tmp_path / "support.jsonl", pick(support)),
            _write_jsonl(tmp_path / "query.jsonl", pick(evaluated)))


@pytest.mark.parametrize("method", METHODS)
def test_adapt_gives_the_recipes_own_test_time_adaptation(run_recipe, tmp_path, method):
    """With tasks seeded one by one (meta_batch_size 2), the recipe's test of a task and
    `abmll adapt` on that task's rows draw the same noise: the predictions must agree exactly."""
    run = tmp_path / "run"
    proc = run_recipe("--config", f"tiny/{method}", f"output_dir={run}", "epochs=1", "learner.meta_batch_size=2",
                      "data.max_eval_examples_per_task=6", "eval.num_samples=[1,2]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = _tree_digest(run)
    support, query = _recipe_split_files(tmp_path)
    rec = adapt_run(run, support, query, tmp_path / "adapted", task=TASK)
    ours = read_predictions(tmp_path / "adapted" / "predictions.parquet")
    theirs = [r for r in read_predictions(run / "predictions_test.parquet") if r["task"] == TASK]
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        for key in ("label", "probs", "pred", "mutual_info", "probs_mean_mode", "probs_ts", "temperature"):
            assert a.get(key) == b.get(key), (key, a.get(key), b.get(key))
    results = json.loads((run / "results.json").read_text())
    expected = results["test"]["per_task"][TASK]
    assert rec["metrics"]["accuracy"] == expected["accuracy"] and rec["metrics"]["ece"] == expected["ece"]
    assert rec["num_samples"] == (2 if method == "abmll" else 1)
    assert (rec["adapter"] is not None) == (method != "pretrained")
    assert _tree_digest(run) == before  # the run's own directory is only read


def _hf_probs(adapter_dir: Path, tokens: torch.Tensor, answer_pos: torch.Tensor, n_opts: int):
    from peft import PeftModel
    from test_peft_export import _hf_llama

    from abmll.data import option_token_ids
    from abmll.models import tiny_llama

    torch.manual_seed(0)  # the tiny run's base weights come from its seed (0)
    hf = PeftModel.from_pretrained(_hf_llama(tiny_llama().state_dict()), str(adapter_dir)).eval()
    ids = torch.tensor(option_token_ids(tiny_tokenizer()))[:n_opts]
    with torch.no_grad():
        logits = hf(input_ids=tokens).logits
    rows = torch.arange(tokens.size(0))
    return torch.softmax(logits[rows, answer_pos - 1][:, ids], -1)


def test_cli_on_a_csv_with_fixed_options_abstains_and_exports_a_peft_adapter(run_recipe, tmp_path):
    """The command a user types: a CSV of two columns, the options given once, abstention by
    coverage; the adapted adapter, loaded by PEFT on transformers' Llama, predicts what our
    model in mean mode predicts."""
    run = tmp_path / "run"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={run}", "epochs=1", "eval.mode=mean",
                      "data.max_eval_examples_per_task=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [(f"Is {n} more than 50?", "yes" if n > 50 else "no") for n in (3, 97, 51, 12, 80, 44, 66, 20, 75, 9, 58)]
    with open(tmp_path / "mine.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows(rows[:10])
    with open(tmp_path / "ask.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows([rows[10], ("Is 2 more than 50?", ""), ("Is 99 more than 50?", "yes"), ("Is 50 more than 50?", "")])
    exe = Path(sys.executable).with_name("abmll")
    out = tmp_path / "out"
    proc = subprocess.run([str(exe), "adapt", str(run), "--support", str(tmp_path / "mine.csv"),
                           "--query", str(tmp_path / "ask.csv"), "--out", str(out), "--input-column", "question",
                           "--label-column", "answer", "--options", "no,yes", "--coverage", "0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 2 labelled" in proc.stdout and "abstained on 2" in proc.stdout
    preds = read_predictions(out / "predictions.parquet")
    assert [r["line"] for r in preds] == [1, 2, 3, 4] and [r["label"] for r in preds] == [1, None, 1, None]
    assert sum(r["abstain"] for r in preds) == 2
    assert all(r["answer"] == r["options"][r["pred"]] and r["options"] == ["no", "yes"] for r in preds)
    rec = json.loads((out / "adapt.json").read_text())
    assert rec["task"] == "mine" and rec["support"] == {"file": str(tmp_path / "mine.csv"), "rows": 10, "rows_used": 10}
    assert rec["metrics"]["n"] == 2

    # The exported adapter is the adapted one: PEFT on transformers gives our probabilities.
    sampler = TaskSampler({"q": [r.example for r in read_user_examples(
        tmp_path / "ask.csv", "q", Columns("question", label="answer", fixed_options=("no", "yes")),
        labels="optional")]}, tiny_tokenizer(), batch_size=1, max_seq_len=256, seed=0)
    for r in preds:
        b = sampler.batches("q", [r["example"]])[0]
        hf = _hf_probs(out / "adapter", b["tokens"], b["answer_pos"], 2)[0]
        torch.testing.assert_close(hf, torch.tensor(r["probs"]), rtol=0, atol=1e-5)


def test_bad_input_is_refused_in_one_line_naming_file_row_and_column(run_recipe, tmp_path):
    run = tmp_path / "run"
    proc = run_recipe("--config", "tiny/regular_lora", f"output_dir={run}", "epochs=1",
                      "data.max_eval_examples_per_task=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = _tree_digest(run)
    support, query = _recipe_split_files(tmp_path)
    cases = {}
    (tmp_path / "nocol.csv").write_text("question,answer\nIs 3 more than 50?,no\n")
    cases["no column 'input'"] = dict(query=tmp_path / "nocol.csv")
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"input": "x", "options": ["a", "b"], "output": "a"}) + "\n"
        + json.dumps({"input": "y", "options": ["a", "b"], "output": "c"}) + "\n")
    cases["bad.jsonl, row 2, column 'output': answer 'c' is not among the options"] = dict(query=tmp_path / "bad.jsonl")
    short = tmp_path / "short.jsonl"
    short.write_text("".join(support.read_text().splitlines(True)[:9]))
    cases["short.jsonl: 9 rows; the run adapts in learner.inner_steps=5 steps of data.batch_size=2"] = dict(support=short)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"input": "w " * 400, "options": ["a", "b"], "output": "a"}) + "\n")
    cases["long.jsonl, row 1, column 'input': the prompt is"] = dict(query=long)
    for expected, files in cases.items():
        args = {"support": support, "query": query, **files}
        with pytest.raises((AdaptError, UserFileError), match=expected.replace("(", r"\(")):
            adapt_run(run, args["support"], args["query"], tmp_path / "o")
    with pytest.raises(AdaptError, match="must not be the run's own directory"):
        adapt_run(run, support, query, run)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(ValueError, match="no finished run there"):
        adapt_run(unfinished, support, query, tmp_path / "o")
    assert _tree_digest(run) == before and not (tmp_path / "o" / "adapt.json").exists()
    # --truncate cuts the question as the recipe does, and the row is predicted.
    rec = adapt_run(run, support, long, tmp_path / "cut", truncate=True)
    assert rec["query"]["rows"] == 1
    with pytest.raises(AdaptError, match="already holds predictions.parquet, adapt.json"):
        adapt_run(run, support, query, tmp_path / "cut")


def test_missing_base_weights_are_named_by_their_key(tmp_path):
    """A run whose base weights are gone: the recipe's one-line error names the key."""
    run = tmp_path / "run"
    run.mkdir()
    from omegaconf import OmegaConf

    from abmll.config_registry import resolve_config

    cfg = OmegaConf.to_container(OmegaConf.load(resolve_config("tiny/abmll")), resolve=True)
    cfg["checkpointer"] = {"_component_": "torchtune.training.FullModelHFCheckpointer",
                           "checkpoint_dir": str(tmp_path / "gone"), "checkpoint_files": ["x.safetensors"],
                           "output_dir": str(tmp_path), "model_type": "LLAMA3"}
    (run / "results.json").write_text(json.dumps({"finished": True, "config": cfg, "seed": 0, "method": "ABMLL",
                                                  "best_epoch": 0, "epochs": 0}))
    support, query = _recipe_split_files(tmp_path)
    with pytest.raises(ValueError, match="checkpointer.checkpoint_dir: .*gone is not a directory"):
        adapt_run(run, support, query, tmp_path / "o")


def test_fixed_options_and_abstention_rules(tmp_path):
    assert parse_fixed_options("yes, no") == ("yes", "no")
    with pytest.raises(UserFileError, match="--options 'yes'"):
        parse_fixed_options("yes")
    p = tmp_path / "q.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": ["a?", "b?", "c?"], "options": [["x", "y"], ["x", "y", "z"], ["u", "v"]],
                             "output": [1, 2, None]}), p)
    rows = read_user_examples(p, "t", labels="optional")
    assert [(r.example.output, r.labelled, r.row) for r in rows] == [("y", True, 1), ("z", True, 2), ("u", False, 3)]
    with pytest.raises(UserFileError, match=r"q.parquet, row 3, column 'output': no answer"):
        read_user_examples(p, "t", labels="required")
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.55, 0.45]])
    assert abstentions(probs, below=0.6).tolist() == [False, False, False, True]
    assert abstentions(probs, coverage=0.5).tolist() == [False, False, True, True]  # ties: file order
    assert abstentions(probs).tolist() == [False] * 4


@pytest.mark.slow
def test_smollm2_task_adapter_loads_in_peft_and_matches_our_mean_mode(tmp_path):
    """The real model: after test-time adaptation, the exported task adapter (ABMLL's mu_phi)
    on transformers' SmolLM2 via PEFT gives our adapted model's mean-mode logits. Tolerance as
    in test_peft_export (fp32, atol 1e-3 on logits of magnitude ~10-30)."""
    import transformers
    from peft import PeftModel

    from abmll.data import MCExample, collate_mc, tokenize_example
    from abmll.export import save_peft_adapter
    from abmll.learners import ABMLL
    from abmll.models import smollm2 as S
    from abmll.modules import PAIRS, gaussian_lora_modules, set_gaussian_mode

    torch.manual_seed(0)
    model = S.gaussian_lora_smollm2_135m(["q_proj", "k_proj", "v_proj", "output_proj"])
    model.load_state_dict(S.SmolLM2Checkpointer().load_checkpoint()["model"], strict=False)
    with torch.no_grad():
        for _, layer in gaussian_lora_modules(model):
            for p in layer.pair_params(PAIRS):
                p.normal_(0, 0.02)
            layer.copy_theta_to_phi()
    learner = ABMLL(inner_steps=2, test_lr=1e-2)
    learner.setup(model, torch.device("cpu"))
    tokenizer = S.smollm2_tokenizer()
    examples = [MCExample("t", f"Is {n} more than 50?", ("no", "yes"), "yes" if n > 50 else "no") for n in (3, 97, 51, 12)]
    support = [collate_mc([tokenize_example(e, tokenizer, 256) for e in examples[i:i + 2]], 0) for i in (0, 2)]
    global_mean = learner.export_adapter()
    prompts = [torch.tensor([tokenizer.encode(p, add_bos=True, add_eos=False)]) for p in ("Q: 2+2?\nA:", "The sky is")]
    set_gaussian_mode(model, "mean")
    with learner.adapted(support), torch.no_grad():
        task = learner.export_task_adapter()
        assert max((task[k] - global_mean[k]).abs().max().item() for k in task) > 1e-3  # it adapted
        save_peft_adapter(task, model, tmp_path)
        ours = [model(ids) for ids in prompts]
    gguf = S.fetch_smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        for ids, mine in zip(prompts, ours):
            torch.testing.assert_close(peft(input_ids=ids).logits, mine, rtol=0, atol=1e-3)
