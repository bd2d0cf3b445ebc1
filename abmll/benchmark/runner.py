"""Build a config's model and learner as the recipe does, and the random batches fed to them.

``build`` loads a packaged config (``abmll.config_registry.resolve_config``) or a path, applies
``KEY=VALUE`` overrides, instantiates the model (random weights unless ``load_weights``) and
the learner, and sets them up for training; the small helpers here are shared by the
measurements in :mod:`abmll.benchmark.measure`.
"""

from __future__ import annotations

from typing import Optional, Sequence

def _load_config(name: str, overrides: Sequence[str]):
    from omegaconf import OmegaConf

    from abmll.config_registry import resolve_config

    cfg = OmegaConf.load(resolve_config(name))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def random_batch(batch_size: int, seq_len: int, vocab: int, device, generator):
    import torch

    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    from abmll.data.prompt import IGNORE_INDEX

    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, -1] = tokens[:, -1]
    return {"tokens": tokens.to(device), "labels": labels.to(device)}


def build(config: str, overrides: Sequence[str] = (), *, load_weights: bool = False,
          device: Optional[str] = None, sampling: Optional[str] = None, compile: bool = False):
    """The config's model (random weights unless ``load_weights``) and set-up learner, in
    training mode, as the recipe builds them. Returns ``(cfg, model, learner, device, precision)``
    (:class:`abmll.precision.Precision`: the resolved dtype, the CPU capability). ``compile``:
    each transformer layer ``torch.compile``d after the learner's set-up, as the recipe's
    ``compile: true`` (:func:`abmll.compiling.compile_model`; the config's own key is not read:
    the caller decides)."""
    import torch
    from torchtune import config as tt_config, training, utils

    cfg = _load_config(config, overrides)
    want = str(device or cfg.get("device", "cpu"))
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"{config} asks for device={want} but no CUDA device is available here; "
            f"run on a GPU, or pass --device cpu (an 8B model on a CPU needs > 32 GB and hours)"
        )
    dev = utils.get_device(device=want)
    from abmll.config_keys import check_config_keys
    from abmll.precision import resolve_precision

    check_config_keys(cfg, where="the benchmark")
    precision = resolve_precision(cfg.get("dtype", "fp32"), dev)  # dtype: auto, as the recipe
    if precision.slow_bf16:
        print(f"benchmark: warning: {precision.slow_bf16_warning()}", flush=True)
    dtype = precision.dtype
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), dev:
        model = tt_config.instantiate(cfg.model)
    if load_weights and cfg.get("checkpointer") is not None:
        ckpt = tt_config.instantiate(cfg.checkpointer)
        model.load_state_dict(ckpt.load_checkpoint()[training.MODEL_KEY], strict=False)
    if sampling is not None:
        from abmll.modules.gaussian_lora import SAMPLINGS, set_gaussian_sampling

        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        # Overrides the config's model.sampling (the Regular LoRA config has no such key); a
        # no-op for models without Gaussian layers.
        set_gaussian_sampling(model, sampling)
    if cfg.get("enable_activation_checkpointing", False):  # as the recipe does
        from torchtune import modules

        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    learner = tt_config.instantiate(cfg.learner)
    learner.setup(model, dev, compute_dtype=dtype)  # as the recipe: bf16 compute, float32 adapters
    model.train()
    if compile:
        from abmll.compiling import compile_model

        compile_model(model, verbose=False)
    return cfg, model, learner, dev, precision


def num_query(learner) -> int:
    return int(getattr(learner, "num_query_batches", 0)) if type(learner).__name__ == "ABMLL" else 0


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sampling_of(model) -> Optional[str]:
    from abmll.modules import gaussian_lora_modules

    found = {m.sampling for _, m in gaussian_lora_modules(model)}
    return found.pop() if len(found) == 1 else (None if not found else "mixed")
