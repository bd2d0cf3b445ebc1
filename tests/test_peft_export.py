"""The exported adapter is a standard LoRA that Hugging Face PEFT loads: a transformers
Llama (Qwen2) with the tiny model's base weights plus the PEFT adapter gives the same logits as
our Gaussian model in mean mode with phi = theta (W0 + the global mean offset), or as
torchtune's LoRA model."""

import pytest
import torch
from torchtune.models.convert_weights import tune_to_hf
from torchtune.modules.peft import get_adapter_params

from abmll.export import save_peft_adapter
from abmll.learners import ABMLL
from abmll.models import gaussian_lora_tiny_llama, gaussian_lora_tiny_qwen2, lora_tiny_qwen2
from abmll.models.tiny import _TINY_ARCH, _TINY_QWEN2_ARCH
from abmll.modules import PAIRS, gaussian_lora_modules, set_gaussian_mode


def _hf_llama(base_state):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = _TINY_ARCH
    cfg = LlamaConfig(
        vocab_size=a["vocab_size"], hidden_size=a["embed_dim"], intermediate_size=a["intermediate_dim"],
        num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
        num_key_value_heads=a["num_kv_heads"], max_position_embeddings=a["max_seq_len"],
        rms_norm_eps=a["norm_eps"], rope_theta=a["rope_base"], tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    hf = tune_to_hf(base_state, num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], dim=a["embed_dim"])
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def _hf_qwen2(base_state):
    """A transformers Qwen2 (q/k/v biases, untied embeddings) with torchtune's tiny Qwen2 weights,
    converted by torchtune's own ``qwen2_tune_to_hf`` (which copies q/k unpermuted)."""
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = _TINY_QWEN2_ARCH
    cfg = Qwen2Config(
        vocab_size=a["vocab_size"], hidden_size=a["embed_dim"], intermediate_size=a["intermediate_dim"],
        num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
        num_key_value_heads=a["num_kv_heads"], max_position_embeddings=a["max_seq_len"],
        rms_norm_eps=a["norm_eps"], rope_theta=a["rope_base"], tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    hf = qwen2_tune_to_hf(base_state, num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], dim=a["embed_dim"])
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def _random_gaussian_adapters(model):
    """Every pair N(0, 0.2) (not the zero init, which would make any export look right), and
    the task pairs equal to the global ones."""
    with torch.no_grad():
        for _, layer in gaussian_lora_modules(model):
            for p in layer.pair_params(PAIRS):
                p.normal_(0, 0.2)
            layer.copy_theta_to_phi()
    return model


def test_exported_global_mean_adapter_loads_in_peft_and_matches(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = _random_gaussian_adapters(gaussian_lora_tiny_llama().eval())
    learner = ABMLL()
    learner.setup(model, torch.device("cpu"))
    save_peft_adapter(learner.export_adapter(), model, tmp_path, rank=8, alpha=16)

    adapter_keys = set(get_adapter_params(model))
    base_state = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    hf = PeftModel.from_pretrained(_hf_llama(base_state), str(tmp_path)).eval()

    tokens = torch.randint(0, 256, (2, 11))
    set_gaussian_mode(model, "mean")
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
        base_only = _hf_llama(base_state)(input_ids=tokens).logits
    assert (ours - base_only).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_export_loads_in_peft_on_transformers_smollm2_and_matches(tmp_path):
    """The real model: SmolLM2-135M (tied embeddings, 9 query / 3 kv heads, so the q and k
    ``lora_B`` rows are permuted with different head counts). Our Gaussian model in mean mode
    against transformers reading the same GGUF (its own dequantiser, Q/K un-permutation and
    rotate-half RoPE) with the exported adapter loaded by PEFT.

    Tolerance: fp32, ``atol=1e-3`` on the logits, ``rtol=0``. The two implementations differ
    only in float32 rounding (other op order, other RoPE formulation): without an adapter they
    agree to ~3e-5 on logits of magnitude ~10-30 (``tests/test_smollm2.py`` allows 1e-3 there
    too), and with it about the same. The adapter moves the logits by several units, three
    orders of magnitude above the tolerance, so a wrong permutation or scale cannot pass.
    """
    import transformers
    from peft import PeftModel

    from abmll.models import smollm2 as S

    torch.manual_seed(0)
    # All four projections (the configs adapt q/v/output): k_proj's lora_B is permuted with the
    # 3 kv heads, q_proj's with the 9 query heads.
    model = S.gaussian_lora_smollm2_135m(["q_proj", "k_proj", "v_proj", "output_proj"])
    missing, unexpected = model.load_state_dict(
        S.SmolLM2Checkpointer().load_checkpoint()["model"], strict=False
    )
    assert not unexpected and all(".lora_" in k for k in missing)
    model.eval()
    with torch.no_grad():
        for _, layer in gaussian_lora_modules(model):
            for p in layer.pair_params(PAIRS):
                p.normal_(0, 0.05)
            layer.copy_theta_to_phi()
    learner = ABMLL()
    learner.setup(model, torch.device("cpu"))
    # As the recipe calls it: rank and alpha read off the model.
    save_peft_adapter(learner.export_adapter(), model, tmp_path)

    gguf = S.fetch_smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    assert hf.config.tie_word_embeddings
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (9, 3)
    tokenizer = S.smollm2_tokenizer()
    prompts = ["The capital of France is", "def f(x):\n    return x + 1", "Q: 2+2?\nA:"]
    sequences = [torch.tensor([tokenizer.encode(p, add_bos=True, add_eos=False)]) for p in prompts]
    with torch.no_grad():
        base = [hf(input_ids=ids).logits for ids in sequences]
        peft = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
        set_gaussian_mode(model, "mean")
        for ids, base_logits in zip(sequences, base):
            ours, theirs = model(ids), peft(input_ids=ids).logits
            assert (ours - base_logits).abs().max() > 1.0  # the adapter does something
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-3)


_ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


@pytest.mark.parametrize("kind", ["gaussian", "lora"])
def test_qwen2_export_loads_in_peft_on_transformers_qwen2_and_matches(kind, tmp_path):
    """Qwen2's RoPE rotates halves (Hugging Face's layout), so torchtune's q/k weights are Hugging
    Face's unpermuted and so must the exported q/k ``lora_B`` be; the Llama-style permutation
    that torchtune's converter applies gives other logits. All four projections are adapted, so
    q (4 heads) and k (2 kv heads) are both checked; the q/k/v biases are random, not zero."""
    from peft import PeftModel
    from torchtune.modules.peft import get_adapter_state_dict

    torch.manual_seed(0)
    if kind == "gaussian":
        model = _random_gaussian_adapters(gaussian_lora_tiny_qwen2(_ALL_ATTN).eval())
        learner = ABMLL()
        learner.setup(model, torch.device("cpu"))
        adapter = learner.export_adapter()
        set_gaussian_mode(model, "mean")
    else:
        model = lora_tiny_qwen2(_ALL_ATTN).eval()
        with torch.no_grad():
            for p in get_adapter_params(model).values():
                p.normal_(0, 0.2)
        adapter = get_adapter_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    save_peft_adapter(adapter, model, tmp_path)  # rank and alpha read off the model

    adapter_keys = set(get_adapter_params(model))
    base_state = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    assert sum(k.endswith("_proj.bias") for k in base_state) == 3 * _TINY_QWEN2_ARCH["num_layers"]
    hf = PeftModel.from_pretrained(_hf_qwen2(base_state), str(tmp_path)).eval()
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
        base_only = _hf_qwen2(base_state)(input_ids=tokens).logits
    assert (ours - base_only).abs().max() > 1e-1  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
