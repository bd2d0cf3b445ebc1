"""The measurements, each run inside one (worker) process: episode time, saved-for-backward
bytes, peak memory, and one adapted layer.

* ``measure``: one method's config; ``episodes`` training episodes through the learner
  (``learner.train_episode``, exactly as the recipe does) on random token batches of the
  config's batch size and ``seq_len`` tokens, the answer being the last token. CUDA:
  ``torch.cuda.max_memory_allocated`` over the episodes (weights included, as the paper's
  25.6 GB vs 23.8 GB), and the same minus the memory allocated before training. CPU: peak
  RSS during the episodes (``ru_maxrss`` also reported), minus the RSS after model set-up.
  Every device: the saved-for-backward peak (:mod:`abmll.benchmark.probes`) and the bytes of
  trainable parameters, their gradients and AdamW states.
* ``time_pair``: several methods built side by side in one process, alternating episodes on
  the same random batches after warm-up rounds; then, untimed, each method's episode FLOPs
  (:mod:`abmll.benchmark.flops`), the floor of the time ratio.
* ``time_layer``: one adapted layer's forward and backward, ``GaussianLoRALinear`` (each
  sampling) against torchtune's ``LoRALinear``, timed, and its FLOPs counted apart.

``compile`` (``time_pair``, ``time_layer``): every method's model (layer) ``torch.compile``d the
same way (:mod:`abmll.compiling`) before anything runs; the warm-up rounds, timed apart, absorb
the compilation, and the dynamo counters say whether anything compiled during the timed rounds.
FLOPs are counted on the eager model (``torch.compiler.set_stance("force_eager")``: the same
matmuls; the counter's module hooks would otherwise be traced).
"""

from __future__ import annotations

import gc
import resource
import time
from typing import Any, Dict, Optional, Sequence

from abmll.benchmark.flops import count_flops
from abmll.benchmark.probes import rss_bytes, RssSampler, SavedTensorMeter
from abmll.benchmark.runner import num_query, random_batch, sampling_of, sync, build
from abmll.modules import DEFAULT_C


def _check_warmup(compile: bool, warmup: int) -> None:
    if compile and warmup < 1:
        raise ValueError("compile needs at least one warm-up round (--warmup >= 1): the warm-up "
                         "absorbs the compilation, which would otherwise be timed")


def _compile_counters() -> Dict[str, int]:
    """Dynamo's process-wide counters: graphs compiled, graph breaks (each time one is met
    while compiling), and frames it gave up on."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames_failed": int(counters["frames"]["total"] - counters["frames"]["ok"]),
    }


def _force_eager(compile: bool):
    """A context in which compiled modules run eagerly (the FLOP counter's episode)."""
    import contextlib

    import torch

    return torch.compiler.set_stance("force_eager") if compile else contextlib.nullcontext()

def measure(config: str, overrides: Sequence[str] = (), *, episodes: int = 2, seq_len: Optional[int] = None,
            load_weights: bool = False, device: Optional[str] = None,
            sampling: Optional[str] = None) -> Dict[str, Any]:
    """Build the config's model and learner in this process and measure ``episodes`` episodes."""
    import torch

    from abmll.learners.base import Episode

    cfg, model, learner, dev, precision = build(config, overrides, load_weights=load_weights, device=device,
                                            sampling=sampling)
    gc.collect()

    batch_size = int(cfg.data.get("batch_size", 2))
    seq_len = int(seq_len or cfg.data.get("max_seq_len", 256))
    vocab = model.tok_embeddings.num_embeddings
    gen = torch.Generator().manual_seed(0)
    k = learner.inner_steps
    n_query = num_query(learner)

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    base = {
        "config": config,
        "method": type(learner).__name__,
        "model": cfg.model._component_,
        "device": str(dev),
        "dtype": precision.name,
        "cpu_capability": precision.cpu_capability,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "episodes": episodes,
        "inner_steps": k,
        "activation_checkpointing": bool(cfg.get("enable_activation_checkpointing", False)),
        "sampling": sampling_of(model),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
    }
    meter = SavedTensorMeter(model, params)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    with RssSampler() as sampler, torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        for i in range(episodes):
            support = [random_batch(batch_size, seq_len, vocab, dev, gen) for _ in range(k)]
            query = [random_batch(batch_size, seq_len, vocab, dev, gen) for _ in range(n_query)]
            learner.train_episode(Episode(f"memory{i}", support, query))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    meter.close()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    opt_bytes = 0
    for name in ("optimizer", "inner_optimizer", "outer_optimizer"):
        opt = getattr(learner, name, None)
        if opt is None:
            continue
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    opt_bytes += v.numel() * v.element_size()
    out = dict(base)
    out.update({
        "seconds": seconds,
        "saved_for_backward_peak_bytes": meter.peak,
        "grad_bytes_at_end": grads,
        "optimizer_state_bytes": opt_bytes,
        "rss_after_setup_bytes": rss_before,
        "rss_peak_bytes": sampler.peak,
        "rss_peak_minus_setup_bytes": sampler.peak - rss_before,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })
    if dev.type == "cuda":
        out.update({
            "cuda_allocated_before_bytes": before,
            "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
            "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved(dev),
            "cuda_peak_minus_before_bytes": torch.cuda.max_memory_allocated(dev) - before,
        })
    return out


def time_pair(configs: Dict[str, str], overrides: Sequence[str] = (), *, rounds: int = 3, warmup: int = 1,
              seq_len: Optional[int] = None, device: Optional[str] = None, sampling: Optional[str] = None,
              load_weights: bool = False, compile: bool = False) -> Dict[str, Any]:
    """Episode wall time of several methods built side by side in this process.

    ``configs`` maps a method label to a config, in the order they run in each round (ABMLL then
    Regular LoRA). Every round draws one set of random batches and runs one episode of each
    method on them; the first ``warmup`` rounds are not timed. Then one more episode of each runs
    under ``SavedTensorMeter`` (the saved-for-backward peak; not timed), and one more under
    ``FlopCounterMode`` (``episode_flops``: the real graph on real tensors, matmuls and
    attention, recomputation included; in an episode of its own, because the counter's module
    hooks keep the outputs alive). All methods count on the same batches. ``compile``: every
    model compiled (module docstring); ``warmup_seconds`` are the warm-up rounds' times.
    """
    import torch

    from abmll.learners.base import Episode

    _check_warmup(compile, warmup)
    built = {label: build(cfg, overrides, load_weights=load_weights, device=device, sampling=sampling,
                          compile=compile)
             for label, cfg in configs.items()}
    first = next(iter(built.values()))
    cfg0, dev = first[0], first[3]
    batch_size = int(cfg0.data.get("batch_size", 2))
    seq_len = int(seq_len or cfg0.data.get("max_seq_len", 256))
    vocab = first[1].tok_embeddings.num_embeddings
    k_steps = {label: b[2].inner_steps for label, b in built.items()}
    if len(set(k_steps.values())) != 1:
        raise ValueError(f"the methods take different numbers of steps per episode: {k_steps}")
    k = next(iter(k_steps.values()))
    n_query = max(num_query(b[2]) for b in built.values())
    times: Dict[str, list] = {label: [] for label in built}
    warmup_times: Dict[str, list] = {label: [] for label in built}
    compiled: Dict[str, Any] = {}

    def episode(r: int) -> "Episode":
        gen = torch.Generator().manual_seed(1000 + r)
        support = [random_batch(batch_size, seq_len, vocab, dev, gen) for _ in range(k)]
        query = [random_batch(batch_size, seq_len, vocab, dev, gen) for _ in range(n_query)]
        return Episode(f"bench{r}", support, query)

    for r in range(warmup + rounds):
        if compile and r == warmup:
            compiled["after_warmup"] = _compile_counters()
        ep = episode(r)
        for label, (_, _, learner, _, _) in built.items():
            q = ep.query[: num_query(learner)]
            sync(dev)
            t0 = time.perf_counter()
            learner.train_episode(Episode(ep.task, ep.support, q))
            sync(dev)
            (times if r >= warmup else warmup_times)[label].append(time.perf_counter() - t0)
    if compile:
        after = _compile_counters()
        compiled["graphs_compiled_in_timed_rounds"] = after["graphs"] - compiled["after_warmup"]["graphs"]
        compiled["after_timed_rounds"] = after
    saved: Dict[str, int] = {}
    ep = episode(warmup + rounds)
    for label, (_, model, learner, _, _) in built.items():
        meter = SavedTensorMeter(model, list(model.parameters()))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            learner.train_episode(Episode(ep.task, ep.support, ep.query[: num_query(learner)]))
        meter.close()
        saved[label] = meter.peak
    flops: Dict[str, Optional[int]] = {}
    flops_error = None
    ep = episode(warmup + rounds + 1)
    for label, (_, _, learner, _, _) in built.items():
        try:  # the counter keeps every module's output alive (activation checkpointing undone)
            with _force_eager(compile):
                flops[label] = count_flops(learner.train_episode,
                                           Episode(ep.task, ep.support, ep.query[: num_query(learner)]))
        except torch.OutOfMemoryError as err:  # keep the times measured above
            flops[label], flops_error = None, f"out of memory in the counted episode ({str(err).splitlines()[0]})"
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "device": str(dev),
        "dtype": first[4].name,
        "cpu_capability": first[4].cpu_capability,
        "dtype_reason": first[4].reason,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "inner_steps": k,
        "query_batches": {label: num_query(b[2]) for label, b in built.items()},
        "rounds": rounds,
        "warmup": warmup,
        "support_tokens_per_episode": k * batch_size * seq_len,
        "models": {label: b[0].model._component_ for label, b in built.items()},
        "sampling": {label: sampling_of(b[1]) for label, b in built.items()},
        "activation_checkpointing": bool(cfg0.get("enable_activation_checkpointing", False)),
        "compile": compile,
        "compile_stats": compiled or None,
        "episode_seconds": times,
        "warmup_seconds": warmup_times,
        "saved_for_backward_peak_bytes": saved,
        "episode_flops": flops,
        "episode_flops_error": flops_error,
    }


def time_layer(d_out: int, d_in: int, tokens: int, *, dtype: str = "fp32", device: str = "cpu",
               rounds: int = 3, warmup: int = 1, rank: int = 8, alpha: float = 16.0,
               c: float = DEFAULT_C, samplings: Optional[Sequence[str]] = None,
               compile: bool = False) -> Dict[str, Any]:
    """Forward + backward of one adapted layer: ``GaussianLoRALinear`` (each sampling) against
    torchtune's ``LoRALinear``, on ``tokens`` random inputs, alternating in each round.

    Trainable: LoRA's pair, and the Gaussian layer's phi pairs (as in the inner loop); the
    input requires grad (as inside a network). Also the bytes saved for backward per call, and
    the FLOPs of one forward + backward (``flops``, counted in a call of its own). ``compile``:
    each layer compiled (module docstring), before the saved-bytes call, which compiles it.
    """
    import torch
    from torchtune.modules.peft import LoRALinear

    from abmll.modules import PHI_PAIRS
    from abmll.modules.gaussian_lora import SAMPLINGS, GaussianLoRALinear

    _check_warmup(compile, warmup)
    dev = torch.device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    layers: Dict[str, Any] = {"lora": LoRALinear(d_in, d_out, rank=rank, alpha=alpha)}
    for sampling in samplings or SAMPLINGS:
        layers[sampling] = GaussianLoRALinear(d_in, d_out, rank, alpha, c=c, sampling=sampling)
    for label, layer in layers.items():
        layer.to(device=dev, dtype=dt)
        for p in layer.parameters():
            p.requires_grad_(False)
        pairs = [layer.lora_a.weight, layer.lora_b.weight] if label == "lora" else list(layer.pair_params(PHI_PAIRS))
        for p in pairs:
            p.requires_grad_(True)
        if compile:
            from abmll.compiling import compile_module

            compile_module(layer)
    x = torch.randn(tokens, d_in, device=dev, dtype=dt, requires_grad=True)
    cot = torch.randn(tokens, d_out, device=dev, dtype=dt)

    def step(layer):
        layer(x).backward(cot)

    saved = {}
    for label, layer in layers.items():
        meter = SavedTensorMeter(layer, list(layer.parameters()))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            out = layer(x)
        out.backward(cot)
        saved[label] = meter.peak
    with _force_eager(compile):
        flops = {label: count_flops(step, layer) for label, layer in layers.items()}
    times: Dict[str, list] = {label: [] for label in layers}
    warmup_times: Dict[str, list] = {label: [] for label in layers}
    for r in range(warmup + rounds):
        for label, layer in layers.items():
            sync(dev)
            t0 = time.perf_counter()
            step(layer)
            sync(dev)
            (times if r >= warmup else warmup_times)[label].append(time.perf_counter() - t0)
    return {"d_out": d_out, "d_in": d_in, "tokens": tokens, "dtype": dtype, "device": str(dev),
            "rank": rank, "compile": compile, "seconds": times, "warmup_seconds": warmup_times,
            "saved_bytes": saved, "flops": flops}
