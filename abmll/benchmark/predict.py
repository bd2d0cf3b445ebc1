"""A training episode's memory and FLOPs at full scale (Llama3-8B, Qwen2-7B), without a GPU.

The model is built on the ``meta`` device and materialised as fake tensors on the CPU
(``torch._subclasses.fake_tensor.FakeTensorMode``): every op runs its shape logic and no
memory is allocated. Around one episode of the learner (``learner.train_episode``, the code
the recipe runs: K inner steps, the query, the outer step), two of PyTorch's own tools count:

* ``torch.distributed._tools.mem_tracker.MemTracker``: the peak of live tensor bytes, by
  kind (parameters, buffers, gradients, activations, temporaries, optimizer states);
* ``torch.utils.flop_counter.FlopCounterMode``: the FLOPs of the ops as dispatched (matmuls
  and attention), recomputation under activation checkpointing included.

Three things are adapted to make this work; each is stated because it is a choice:

* Fake tensors hold no data, so the episode's two data reads are answered without it: the
  answer positions (``nonzero`` of the labels; here the last token of every row, as the
  random batches are built) and ``.item()`` (logged metrics only, and Adam's step count: 1).
* ``MemTracker`` of torch 2.13 puts a gradient hook on every parameter and refuses a model
  called twice in one tracked region; the subclass here hooks only trainable parameters and
  resets the per-module statistics between the episode's forwards (the global peak, which is
  what is read, is kept).
* Memory and FLOPs grow by the same amount with each identical decoder layer, so the episode
  runs on the model cut to ``fit_layers`` (2 and 4) layers, the result is a straight line in
  the number of layers, read at the model's own depth; a third depth (3) checks the line. A
  32-layer fake episode would take an hour here: ``MemTracker`` walks every live tensor at
  every op.
* The memory episode runs ``inner_steps=2`` (the config says K = 5): from the second inner
  step on, each step holds the same tensors as the one before (the inner AdamW's moments exist
  from the first step), so the peak is reached by then. FLOPs are counted in episodes of 1 and
  2 inner steps: their difference is one inner step, the rest is the outer step, and the
  config's K gives ``outer + K x step``. They are counted apart from the memory: the flop
  counter's module hooks keep every module's output alive for backward, which would undo
  activation checkpointing in the memory episode.

The CPU's attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is the same
algorithm as CUDA's flash attention and saves the same tensors for backward (the output and a
float32 log-sum-exp per row and head); ``FlopCounterMode`` has no formula for the CPU kernel,
so the CUDA one is registered for it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Sequence

from abmll.benchmark.flops import flop_counter

#: MemTracker's kinds, in the order tables print them.
KINDS = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")
FIT_LAYERS = (2, 4)
CHECK_LAYERS = 3
PREDICT_INNER_STEPS = 2


def _frozen_aware_tracker():
    """A ``MemTracker`` for a model with frozen weights that is called several times."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class EpisodeMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:  # only trainable parameters get gradients (and hooks)
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                        def hook(grad, tracker=self):
                            tracker._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(hook),
                            p.register_post_accumulate_grad_hook(lambda q, h=hook: h(q.grad)),
                        )
            return out

        def _pre_fw_hook(self, module, inputs):
            # The root called again outside backward: the episode's next forward, not a new
            # training iteration. Module-wise statistics restart; the global peak stays.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    self.reset_mod_stats()
            return super()._pre_fw_hook(module, inputs)

    return EpisodeMemTracker()


@contextlib.contextmanager
def _without_data():
    """Answer the episode's data reads without data (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor

    import abmll.learners.base as learner_base
    from abmll.objectives import final_hidden_states, logits_at

    real_item, real_nll = torch.Tensor.item, learner_base.model_answer_nll

    def item(self):
        if isinstance(self, FakeTensor):
            return 1.0 if self.dtype.is_floating_point else 1
        return real_item(self)

    def answer_nll_last_token(model, tokens, labels):
        # model_answer_nll with the positions known: every row's answer is its last token.
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        cols = torch.full_like(rows, tokens.shape[1] - 2)
        hidden = final_hidden_states(model, tokens)
        return F.cross_entropy(logits_at(model, hidden, rows, cols), labels[:, 1:][rows, cols])

    torch.Tensor.item, learner_base.model_answer_nll = item, answer_nll_last_token
    try:
        yield
    finally:
        torch.Tensor.item, learner_base.model_answer_nll = real_item, real_nll


def fake_episode(config: str, overrides: Sequence[str] = (), *, num_layers: Optional[int] = None,
                 activation_checkpointing: Optional[bool] = None, seq_len: Optional[int] = None,
                 inner_steps: int = PREDICT_INNER_STEPS, fake: bool = True,
                 sampling: Optional[str] = None) -> Dict[str, Any]:
    """One training episode of ``config`` (its model cut to ``num_layers`` decoder layers when
    given), on fake CPU tensors unless ``fake=False`` (real tensors: the tiny configs, to check
    that fake and real agree). Returns the peak bytes by kind, the FLOPs of the inner steps and
    of the outer step, and what was run."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtune import config as tt_config, modules, training

    from abmll.benchmark.runner import _load_config, num_query, random_batch, sampling_of
    from abmll.learners.base import Episode
    from torchtune.training.precision import PRECISION_STR_TO_DTYPE

    cfg = _load_config(config, overrides)
    cpu = torch.device("cpu")
    # The config's dtype as its own device would run it (bf16 for the 8B configs; `auto` is
    # bf16 on an A100 or H100), whatever this CPU computes natively.
    name = str(cfg.get("dtype", "fp32"))
    dtype = torch.bfloat16 if name == "auto" else PRECISION_STR_TO_DTYPE[name]
    ac = bool(cfg.get("enable_activation_checkpointing", False)) if activation_checkpointing is None \
        else bool(activation_checkpointing)
    torch.manual_seed(0)
    with torch.device("meta" if fake else "cpu"), training.set_default_dtype(dtype):
        model = tt_config.instantiate(cfg.model)
    full_layers = len(model.layers)
    if num_layers is not None:
        if not 1 <= num_layers <= full_layers:
            raise ValueError(f"num_layers must be in 1..{full_layers}, got {num_layers}")
        model.layers = model.layers[:num_layers]
    if sampling is not None:  # the Gaussian layers' estimator (abmll.modules.gaussian_lora.SAMPLINGS)
        from abmll.modules.gaussian_lora import set_gaussian_sampling

        set_gaussian_sampling(model, sampling)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        if fake:
            model.to_empty(device=cpu)
        if ac:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        learner = tt_config.instantiate(cfg.learner)
        learner.setup(model, cpu, compute_dtype=dtype)
        learner.inner_steps = int(inner_steps)
        model.train()
        batch_size = int(cfg.data.get("batch_size", 2))
        seq_len = int(seq_len or cfg.data.get("max_seq_len", 256))
        vocab = model.tok_embeddings.num_embeddings
        gen = torch.Generator().manual_seed(0)
        support = [random_batch(batch_size, seq_len, vocab, cpu, gen) for _ in range(learner.inner_steps)]
        query = [random_batch(batch_size, seq_len, vocab, cpu, gen) for _ in range(num_query(learner))]
        tracker = _frozen_aware_tracker()
        tracker.track_external(model)
        with tracker, _without_data():
            learner.train_episode(Episode("predict", support, query))
        peak = tracker.get_tracker_snapshot("peak")[cpu]
        # FLOPs in episodes of their own: FlopCounterMode's module hooks hold the modules'
        # outputs for backward, which would defeat activation checkpointing above. With 1 and
        # 2 inner steps: their difference is one inner step, the rest is the outer step.
        flops = {}
        for k in (1, 2):
            learner.inner_steps = k
            with flop_counter() as counter, _without_data():
                learner.train_episode(Episode("predict", support[:k], query))
            flops[k] = counter.get_total_flops()
        learner.inner_steps = int(inner_steps)
        # One evaluation forward (no gradients) of one example, as the test and validation run it.
        eval_flops = flop_counter()
        with eval_flops, _without_data(), torch.no_grad():
            learner.nll(random_batch(1, seq_len, vocab, cpu, gen))
    by_kind = {k: int(peak.get(k, 0)) for k in KINDS}
    return {
        "config": config,
        # the family of a packaged config (llama3_8b/abmll -> llama3_8b), else the builder
        "model": config.split("/")[0] if config.count("/") == 1 and not config.endswith(".yaml")
        else cfg.model._component_,
        "method": type(learner).__name__,
        "dtype": str(dtype).replace("torch.", ""),
        "activation_checkpointing": ac,
        "sampling": sampling_of(model),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_layers": len(model.layers),
        "full_layers": full_layers,
        "inner_steps_run": learner.inner_steps,
        "inner_steps_config": int(cfg.learner.get("inner_steps", learner.inner_steps)),
        "peak_bytes": by_kind,
        "peak_total_bytes": int(peak.get("Total", sum(by_kind.values()))),
        "flops_inner_step": int(flops[2] - flops[1]),
        "flops_outer": int(2 * flops[1] - flops[2]),
        "flops_eval_example": int(eval_flops.get_total_flops()),
    }


def _line(points: Dict[int, float], at: int) -> float:
    (x0, y0), (x1, y1) = sorted(points.items())
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


def predict_episode(config: str, overrides: Sequence[str] = (), *, activation_checkpointing: Optional[bool] = None,
                    seq_len: Optional[int] = None, fit_layers: Sequence[int] = FIT_LAYERS,
                    check_layers: Optional[int] = CHECK_LAYERS, sampling: Optional[str] = None) -> Dict[str, Any]:
    """The episode's peak memory by kind and its FLOPs at the model's full depth, from fake
    episodes at ``fit_layers`` depths (a straight line), checked at ``check_layers``."""
    runs = {n: fake_episode(config, overrides, num_layers=n, activation_checkpointing=activation_checkpointing,
                            seq_len=seq_len, sampling=sampling) for n in fit_layers}
    first = next(iter(runs.values()))
    full = first["full_layers"]

    def extrapolate(get, at=full):
        return _line({n: get(r) for n, r in runs.items()}, at)

    out = {k: v for k, v in first.items() if k not in ("peak_bytes", "peak_total_bytes", "flops_inner_step",
                                                         "flops_outer", "flops_eval_example", "num_layers")}
    out["fit_layers"] = list(fit_layers)
    out["peak_bytes"] = {k: int(round(extrapolate(lambda r, k=k: r["peak_bytes"][k]))) for k in KINDS}
    out["peak_total_bytes"] = int(round(extrapolate(lambda r: r["peak_total_bytes"])))
    step = extrapolate(lambda r: r["flops_inner_step"])
    out["flops_inner_step"] = int(round(step))
    out["flops_episode"] = int(round(extrapolate(lambda r: r["flops_outer"]) + first["inner_steps_config"] * step))
    out["flops_eval_example"] = int(round(extrapolate(lambda r: r["flops_eval_example"])))
    if check_layers is not None:
        chk = fake_episode(config, overrides, num_layers=check_layers, activation_checkpointing=activation_checkpointing,
                           seq_len=seq_len, sampling=sampling)
        line = extrapolate(lambda r: r["peak_total_bytes"], check_layers)
        out["check"] = {"layers": check_layers, "peak_total_bytes": chk["peak_total_bytes"],
                        "line_peak_total_bytes": int(round(line)),
                        "flops_inner_step": chk["flops_inner_step"],
                        "line_flops_inner_step": int(round(extrapolate(lambda r: r["flops_inner_step"],
                                                                       check_layers)))}
    return out


# --- from the episode to a GPU ----------------------------------------------------------------

GIB = 1024 ** 3
#: Dense bf16 tensor-core peaks (NVIDIA's data sheets; without sparsity).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100 SXM": 989e12}
DEFAULT_MFU = 0.4


def hours(flops: float, gpu: str, mfu: float = DEFAULT_MFU) -> float:
    return flops / (GPU_PEAK_FLOPS[gpu] * mfu) / 3600.0



def epoch_flops(pred: Dict[str, Any], *, train_tasks: int, val_tasks: int, eval_examples: int,
                inner_steps: int) -> Dict[str, float]:
    """FLOPs of one epoch: an episode per training task, and a validation of ``val_tasks``
    unseen tasks (``inner_steps`` steps of test-time adaptation, then ``eval_examples``
    forwards each, at the episode's sequence length: an upper bound, prompts are shorter)."""
    train = pred["flops_episode"] * train_tasks
    val = val_tasks * (inner_steps * pred["flops_inner_step"] + eval_examples * pred["flops_eval_example"])
    return {"train": float(train), "validation": float(val), "total": float(train + val)}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def memory_table(preds: Sequence[Dict[str, Any]], paper: Optional[Dict[str, float]] = None,
                 card_gb: float = 40.0) -> str:
    """Markdown: peak by kind (GiB), total in GiB and GB, and the ratio to Regular LoRA of the
    same model and checkpointing, with and without buffers (torchtune's ``lora_*`` builders give
    every layer its own RoPE cache; its plain builders, which the Gaussian models start from,
    share one)."""
    head = ("| model | method | sampling | activation ckpt | params | buffers | grads | optimizer | activations "
            "| temporaries | peak (GiB) | peak (GB) | / Regular LoRA | / Regular LoRA, buffers apart "
            "| fits a 40 GB card |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lora = {(p["model"], p["activation_checkpointing"]): p for p in preds if p["method"] == "RegularLoRA"}
    for p in preds:
        b = p["peak_bytes"]
        base = lora.get((p["model"], p["activation_checkpointing"]))
        ratio = ratio_nb = "-"
        if base:
            ratio = f"x{p['peak_total_bytes'] / base['peak_total_bytes']:.3f}"
            no_buf = (p["peak_total_bytes"] - b["Buffer"]) / (base["peak_total_bytes"] - base["peak_bytes"]["Buffer"])
            ratio_nb = f"x{no_buf:.3f}"
        gb = p["peak_total_bytes"] / 1e9
        lines.append(
            f"| {p['model']} | {p['method']} | {p.get('sampling') or '-'} "
            f"| {'on' if p['activation_checkpointing'] else 'off'} "
            f"| {_gib(b['Parameter'])} | {_gib(b['Buffer'])} | {_gib(b['Gradient'])} | {_gib(b['Optstate'])} "
            f"| {_gib(b['Activation'])} | {_gib(b['Temp'] + b['Other'])} | {_gib(p['peak_total_bytes'])} "
            f"| {gb:.1f} | {ratio} | {ratio_nb} | {'yes' if gb < card_gb else 'no'} |")
    if paper:
        lines.append(f"| paper: Llama3-8B, A100 40 GB | ABMLL / Regular LoRA | | | | | | | | | "
                     f"| {paper['ABMLL']:.1f} / {paper['RegularLoRA']:.1f} "
                     f"| x{paper['ABMLL'] / paper['RegularLoRA']:.3f} | | yes |")
    return "\n".join(lines)


def _key(pred: Dict[str, Any]) -> tuple:
    return pred["config"], pred["activation_checkpointing"], pred.get("sampling")


def time_table(preds: Sequence[Dict[str, Any]], epochs: Dict[str, Dict[str, float]], *, n_epochs: int,
               split: str, mfu: float = DEFAULT_MFU) -> str:
    """Markdown: FLOPs per episode and per epoch, GPU hours for one epoch and ``n_epochs``."""
    gpus = list(GPU_PEAK_FLOPS)
    head = (f"| model | method | TFLOP / episode | PFLOP / epoch of {split} (train + validation) | "
            + " | ".join(f"{g} h / epoch | {g} h / {n_epochs} epochs" for g in gpus) + " |")
    lines = [head, "|---|---|---:|---:|" + "---:|" * (2 * len(gpus))]
    for p in preds:
        e = epochs[_key(p)]
        cells = " | ".join(f"{hours(e['total'], g, mfu):.2f} | {hours(e['total'] * n_epochs, g, mfu):,.0f}"
                           for g in gpus)
        lines.append(f"| {p['model']} | {p['method']} | {p['flops_episode'] / 1e12:,.1f} "
                     f"| {e['train'] / 1e15:,.1f} + {e['validation'] / 1e15:,.1f} | {cells} |")
    return "\n".join(lines)


PAPER_GB = {"ABMLL": 25.6, "RegularLoRA": 23.8}  # the paper's memory figure, Llama3-8B, one A100 40 GB


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python scripts/predict_gpu.py``: the memory and time tables of the 7-8B configs."""
    import argparse
    import json
    from pathlib import Path

    from abmll.data.metaicl import split_def

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=["llama3_8b", "qwen2_7b"])
    ap.add_argument("--methods", nargs="+", default=["abmll", "regular_lora"])
    ap.add_argument("--activation-checkpointing", choices=["on", "off", "both"], default="both")
    ap.add_argument("--split", default="cls45", help="the split whose epoch is priced (its task counts)")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed for hours")
    ap.add_argument("--no-check", action="store_true", help="skip the third depth that checks the line")
    ap.add_argument("--weight-sampling-row", action="store_true",
                    help="also ABMLL with model sampling 'weight' (one weight sample per forward), checkpointing on")
    ap.add_argument("--out", help="folder for predictions.json and tables.md (refused if it holds them)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None and any((out / f).exists() for f in ("predictions.json", "tables.md")):
        ap.error(f"--out {out} already holds predictions.json or tables.md; choose another folder")
    acs = {"on": [True], "off": [False], "both": [True, False]}[args.activation_checkpointing]
    preds = []
    for family in args.families:
        for ac in acs:
            for method in args.methods:
                cfg = f"{family}/{method}"
                print(f"predicting {cfg} (activation checkpointing {'on' if ac else 'off'}) ...", flush=True)
                preds.append(predict_episode(cfg, activation_checkpointing=ac,
                                             check_layers=None if args.no_check else CHECK_LAYERS))
    if args.weight_sampling_row:
        for family in args.families:
            print(f"predicting {family}/abmll with weight sampling ...", flush=True)
            preds.append(predict_episode(f"{family}/abmll", activation_checkpointing=True, sampling="weight",
                                         check_layers=None if args.no_check else CHECK_LAYERS))
    sdef = split_def(args.split)
    from abmll.benchmark.runner import _load_config

    epochs, n_epochs = {}, None
    for p in preds:
        cfg = _load_config(p["config"], ())
        n_epochs = int(cfg.epochs)
        epochs[_key(p)] = epoch_flops(p, train_tasks=len(sdef["train"]), val_tasks=len(sdef["val"]),
                                          eval_examples=int(cfg.data.max_eval_examples_per_task),
                                          inner_steps=p["inner_steps_config"])
    mem = memory_table(preds, PAPER_GB)
    timed = time_table([p for p in preds if p["activation_checkpointing"] == acs[0] and p.get("sampling") != "weight"],
                       epochs,
                       n_epochs=n_epochs, split=args.split, mfu=args.mfu)
    first = preds[0]
    header = (f"Predicted on a CPU with fake tensors (torch {__import__('torch').__version__}): one training "
              f"episode, batch {first['batch_size']} x {first['seq_len']} tokens, {first['dtype']}, "
              f"K = {first['inner_steps_config']}; depth fitted at {first['fit_layers']} layers. "
              f"Hours at MFU {args.mfu:.0%} of the dense bf16 peak.")
    checks = [f"{p['config']} ({'on' if p['activation_checkpointing'] else 'off'}): at {p['check']['layers']} layers "
              f"the line says {_gib(p['check']['line_peak_total_bytes'])} GiB / "
              f"{p['check']['line_flops_inner_step'] / 1e12:.3f} TFLOP per inner step, the episode measured "
              f"{_gib(p['check']['peak_total_bytes'])} GiB / {p['check']['flops_inner_step'] / 1e12:.3f} TFLOP"
              for p in preds if "check" in p]
    text = "\n\n".join([header, mem, timed, "Checks of the straight line:\n" + "\n".join(f"- {c}" for c in checks)])
    print(text)
    if out is not None:
        from abmll.atomic import atomic_write_text

        atomic_write_text(out / "predictions.json", json.dumps(preds, indent=1), parents=True)
        atomic_write_text(out / "tables.md", text + "\n", parents=True)
        print(f"wrote {out / 'predictions.json'}, {out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
