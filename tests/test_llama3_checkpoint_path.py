"""The Llama3-8B configs' checkpoint and tokenizer path, end to end, on a tiny checkpoint in Meta's format.

``tests/test_config_matrix.py`` runs every shipped config with the checkpointer and the tokenizer
swapped out. Here they stay as shipped (``torchtune.training.FullModelMetaCheckpointer`` reading
``consolidated.00.pth``, ``torchtune.models.llama3.llama3_tokenizer`` reading ``tokenizer.model``)
and read files this test writes in the layout of ``original/`` from
``tune download meta-llama/Meta-Llama-3-8B-Instruct``: ``consolidated.00.pth`` (bf16 tensors under
Meta's names: ``tok_embeddings.weight``, ``layers.0.attention.wq.weight``,
``layers.0.feed_forward.w1.weight``, ...), ``params.json`` and a tiktoken ``tokenizer.model``
(``base64(token bytes) rank`` per line; Llama3's special tokens sit at ids 128000-128255, so
the tiny model keeps the real vocab_size 128256).

The model shape: every shipped ``model._component_`` (``abmll.models.gaussian_lora_llama3_8b``,
``torchtune.models.llama3.lora_llama3_8b``) hard-codes the 8B shape and takes no shape keys.
Instead of replacing it by another builder, the test keeps the shipped component and shrinks
only the shape keys (layers, heads, kv heads, dim, FFN dim) of the call it makes to torchtune's
component builder (``llama3`` / ``lora_llama3``); vocab_size, max_seq_len, norm_eps and
rope_base stay the 8B builder's own, and are checked against Meta's 8B ``params.json``.
Everything else changed in the config is what test_config_matrix changes too (device, data,
epochs, output_dir) plus the two paths (``checkpointer.checkpoint_dir``, ``tokenizer.path``).

Checked per config: (1) the base weights the recipe loads are the reference weights, and the
loaded model's logits equal those of a from-scratch implementation of Meta's reference Llama3
forward (``llama/model.py``) on the Meta-format tensors, so a wrong key mapping (w1/w3 swapped),
a wrong q/k permutation or a wrong rope_base/norm_eps fails; (2) the run writes results.json and
the PEFT export; (3) the tiny ``tokenizer.model`` gives Llama3's chat format around the
paper's prompt (the configs set ``data.chat_template: true``).
"""

from __future__ import annotations

import base64
import copy
import json
import math
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import shrink_builders
from test_configs import METHODS  # abmll, regular_lora, structured_lora, reptile, pretrained

pytestmark = pytest.mark.slow  # the llama3_8b configs end to end on a Meta-format checkpoint: not in the quick tier

# original/params.json of Meta-Llama-3-8B-Instruct.
META_8B_PARAMS = {
    "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
}
# The same file at the tiny shape: only the shape entries differ.
TINY_PARAMS = dict(META_8B_PARAMS, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")

# Meta's name -> torchtune's name, written out here (not torchtune's table) to check its mapping.
META_TO_TUNE = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "norm.weight": "norm.scale",
    "output.weight": "output.weight",
    "layers.{}.attention.wq.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attn.output_proj.weight",
    "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.w3.weight",
    "layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
    "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
}
# Multi-byte BPE tokens of the tiny tokenizer.model (each with its prefixes, so BPE reaches it).
BPE_WORDS = ["Return", " the", " label", " of", " correct", " answer", " for", " question", " below",
             "Question", "Choices", "Answer", "user", "assistant", "\n\n", " is", " a", " word"]
_ABSENT = object()


def _ffn_dim(p: dict) -> int:
    """FeedForward's hidden size in Meta's llama/model.py."""
    hidden = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    return p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"])


def _tune_kwargs(p: dict) -> dict:
    """The torchtune component-builder keys that Meta's params.json fixes."""
    return {
        "vocab_size": p["vocab_size"], "num_layers": p["n_layers"], "num_heads": p["n_heads"],
        "num_kv_heads": p["n_kv_heads"], "embed_dim": p["dim"], "intermediate_dim": _ffn_dim(p),
        "norm_eps": p["norm_eps"], "rope_base": p["rope_theta"],
    }


TINY_SHAPE = {k: _tune_kwargs(TINY_PARAMS)[k] for k in SHAPE_KEYS}


def _tune_name(meta_key: str) -> str:
    parts = meta_key.split(".")
    if parts[0] == "layers":
        return META_TO_TUNE[".".join(["layers", "{}", *parts[2:]])].format(parts[1])
    return META_TO_TUNE[meta_key]


# ----------------------------------------------------------------------------- the files
def _meta_state_dict(p: dict, seed: int = 1234) -> dict:
    """Random weights under Meta's names, bf16 as in consolidated.00.pth."""
    g = torch.Generator().manual_seed(seed)
    dim, hd = p["dim"], p["dim"] // p["n_heads"]
    kv, ffn, vocab = p["n_kv_heads"] * hd, _ffn_dim(p), p["vocab_size"]

    def w(*shape, scale=None, offset=0.0):
        scale = 1 / math.sqrt(shape[-1]) if scale is None else scale
        return (offset + scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    sd = {"tok_embeddings.weight": w(vocab, dim, scale=1.0)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        sd[pre + "attention.wq.weight"] = w(dim, dim)
        sd[pre + "attention.wk.weight"] = w(kv, dim)
        sd[pre + "attention.wv.weight"] = w(kv, dim)
        sd[pre + "attention.wo.weight"] = w(dim, dim)
        sd[pre + "feed_forward.w1.weight"] = w(ffn, dim)
        sd[pre + "feed_forward.w2.weight"] = w(dim, ffn)
        sd[pre + "feed_forward.w3.weight"] = w(ffn, dim)
        sd[pre + "attention_norm.weight"] = w(dim, scale=0.1, offset=1.0)
        sd[pre + "ffn_norm.weight"] = w(dim, scale=0.1, offset=1.0)
    sd["norm.weight"] = w(dim, scale=0.1, offset=1.0)
    sd["output.weight"] = w(vocab, dim)
    return sd


def _bpe_ranks() -> list:
    ranks = [bytes([b]) for b in range(256)]
    for word in BPE_WORDS:
        b = word.encode()
        ranks += [b[:n] for n in range(2, len(b) + 1) if b[:n] not in ranks]
    return ranks


def _write_original_dir(path: Path) -> dict:
    path.mkdir(parents=True)
    sd = _meta_state_dict(TINY_PARAMS)
    torch.save(sd, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(TINY_PARAMS))
    (path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(_bpe_ranks()))
    )
    return sd


# ------------------------------------------------------------------ Meta's reference forward
def _meta_forward(sd: dict, p: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py (Llama 3) in float32: complex-pair RoPE, repeat_kv GQA, SwiGLU."""
    f = {k: v.float() for k, v in sd.items()}
    B, T = tokens.shape
    dim, H, KV = p["dim"], p["n_heads"], p["n_kv_heads"]
    hd = dim // H
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["norm_eps"]) * weight

    def rope(x):  # (B, T, heads, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = f["tok_embeddings.weight"][tokens]
    for i in range(p["n_layers"]):
        def wt(name):
            return f[f"layers.{i}.{name}.weight"].T

        x = rms(h, f[f"layers.{i}.attention_norm.weight"])
        q = rope((x @ wt("attention.wq")).view(B, T, H, hd))
        k = rope((x @ wt("attention.wk")).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (x @ wt("attention.wv")).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, T, dim) @ wt("attention.wo")
        x = rms(h, f[f"layers.{i}.ffn_norm.weight"])
        h = h + (F.silu(x @ wt("feed_forward.w1")) * (x @ wt("feed_forward.w3"))) @ wt("feed_forward.w2")
    return rms(h, f["norm.weight"]) @ f["output.weight"].T


def _hf_permuted(sd: dict, p: dict) -> dict:
    """wq/wk in Hugging Face's rotary layout: what a wrong (extra) permutation would load."""
    out = dict(sd)
    hd = p["dim"] // p["n_heads"]
    for key, heads in [(k, p["n_heads"] if ".wq." in k else p["n_kv_heads"]) for k in sd if ".wq." in k or ".wk." in k]:
        w = sd[key]
        out[key] = w.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)
    return out


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny Meta-Llama-3-8B-Instruct/original directory, and its Meta-named tensors."""
    path = tmp_path_factory.mktemp("Meta-Llama-3-8B-Instruct") / "original"
    return path, _write_original_dir(path)


@pytest.fixture
def tiny_8b_builders(monkeypatch):
    """Shrink the shape keys of the 8B builders' call into torchtune's component builders;
    returns the keys each call was made with (the 8B builder's own)."""
    import torchtune.models.llama3._model_builders as builders

    return shrink_builders(monkeypatch, builders, ["llama3", "lora_llama3"], TINY_SHAPE)


def _load(method: str, family: str = "llama3_8b"):
    return OmegaConf.load(str(files("abmll.configs").joinpath(f"{family}/{method}.yaml")))


def _tiny_run_config(method: str, ckpt_dir: Path, out: Path):
    cfg = _load(method)
    tiny = _load(method, "tiny")
    swaps = {
        "checkpointer.checkpoint_dir": str(ckpt_dir),
        "tokenizer.path": str(ckpt_dir / "tokenizer.model"),
        "device": "cpu",
        "split": tiny.split,
        "data.data_dir": tiny.data.data_dir,
        "data.split_file": tiny.data.split_file,
        "epochs": 1,
        "output_dir": str(out),
    }
    for key, value in swaps.items():
        assert OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT, key
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", METHODS)
def test_shipped_checkpoint_sections_read_metas_original_dir(method):
    """What `tune download meta-llama/Meta-Llama-3-8B-Instruct --output-dir /tmp/...` gives."""
    cfg = _load(method)
    assert cfg.checkpointer._component_ == "torchtune.training.FullModelMetaCheckpointer"
    assert list(cfg.checkpointer.checkpoint_files) == ["consolidated.00.pth"]
    assert cfg.checkpointer.model_type == "LLAMA3"
    assert cfg.tokenizer._component_ == "torchtune.models.llama3.llama3_tokenizer"
    assert Path(cfg.tokenizer.path) == Path(cfg.checkpointer.checkpoint_dir) / "tokenizer.model"
    assert cfg.data.chat_template is True


def test_reference_forward_catches_wrong_mappings(original):
    """The logits check below can fail: a permuted q/k or swapped w1/w3 changes Meta's forward."""
    _, sd = original
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _meta_forward(sd, TINY_PARAMS, tokens)
    swapped = dict(sd, **{"layers.0.feed_forward.w1.weight": sd["layers.0.feed_forward.w3.weight"],
                          "layers.0.feed_forward.w3.weight": sd["layers.0.feed_forward.w1.weight"]})
    for wrong in (_hf_permuted(sd, TINY_PARAMS), swapped):
        assert (_meta_forward(wrong, TINY_PARAMS, tokens) - ref).abs().max() > 1e-1
    assert (_meta_forward(sd, dict(TINY_PARAMS, rope_theta=10000.0), tokens) - ref).abs().max() > 1e-2


def test_tiny_tokenizer_model_gives_llama3_chat_format_around_the_prompt(original):
    from torchtune import config

    from abmll.data.examples import MCExample
    from abmll.data.prompt import format_prompt, option_token_ids, tokenize_example

    path, _ = original
    cfg = _tiny_run_config("abmll", path, path.parent / "unused")
    tok = config.instantiate(cfg.tokenizer)
    assert tok.max_seq_len == cfg.data.max_seq_len
    special = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
               "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
    for name, idx in special.items():
        assert tok.special_tokens[name] == idx
    assert tok.base_vocab_size == len(_bpe_ranks()) and tok.pad_id < TINY_PARAMS["vocab_size"]
    assert tok.encode("Question", add_bos=False, add_eos=False) == [_bpe_ranks().index(b"Question")]

    ex = MCExample(task="t", input="Is a cat an animal?", options=("yes", "no"), output="no")
    prompt = format_prompt(ex)
    item = tokenize_example(ex, tok, int(cfg.data.max_seq_len), chat_template=cfg.data.chat_template)
    text = tok.decode(item["tokens"], truncate_at_eos=False, skip_special_tokens=False)
    # Llama 3 Instruct's chat format (torchtune's tokenize_messages also appends end_of_text).
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + prompt + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nB<|eot_id|><|end_of_text|>"
    )
    letters = option_token_ids(tok, chat_template=True)
    assert letters == [tok.encode(c, add_bos=False, add_eos=False)[0] for c in "ABCD"]
    pos = item["answer_pos"]
    assert item["tokens"][pos] == letters[1] and item["tokens"][pos + 1] == special["<|eot_id|>"]
    assert [i for i, lab in enumerate(item["labels"]) if lab != -100] == [pos]
    assert max(item["tokens"]) < TINY_PARAMS["vocab_size"]


def _base_state(model) -> dict:
    from torchtune.modules.peft import get_adapter_params

    from abmll.modules.names import clean_name

    adapters = {clean_name(k) for k in get_adapter_params(model)}
    return {clean_name(k): v for k, v in model.state_dict().items() if clean_name(k) not in adapters}


# torchtune's RMSNorm upcasts the input but not its bf16 scale: torch warns, the result is right.
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
@pytest.mark.parametrize("method", METHODS)
def test_llama3_8b_config_loads_metas_checkpoint_and_runs(method, original, tiny_8b_builders, tmp_path, monkeypatch):
    import abmll_recipe

    from abmll.modules import set_gaussian_mode

    ckpt_dir, meta_sd = original
    out = tmp_path / "run"
    cfg = _tiny_run_config(method, ckpt_dir, out)

    seen = {}
    setup_model = abmll_recipe.ABMLLRecipe._setup_model

    def spy(self, cfg):
        model = setup_model(self, cfg)
        seen["model"], seen["at_load"] = model, copy.deepcopy(model)
        return model

    monkeypatch.setattr(abmll_recipe.ABMLLRecipe, "_setup_model", spy)
    try:
        abmll_recipe.recipe_main.__wrapped__(cfg)
    except SystemExit as stop:
        assert not stop.code, f"recipe exited with {stop.code}"

    # The 8B builder's own keys are Meta's 8B params.json; only the shape keys were shrunk.
    assert len(tiny_8b_builders) == 1
    called = tiny_8b_builders[0]
    assert {k: called[k] for k in _tune_kwargs(META_8B_PARAMS)} == _tune_kwargs(META_8B_PARAMS)

    # (1) The loaded base weights are the reference's, under torchtune's names, in the run's dtype.
    expected = {_tune_name(k): v for k, v in meta_sd.items()}
    for when in ("at_load", "model"):  # and training leaves the frozen base alone
        base = _base_state(seen[when])
        assert sorted(base) == sorted(expected), when
        for k, v in expected.items():
            # The learner keeps RMSNorm scales float32 under bf16 (the same values: docs/notes.md, note 17).
            dtype = torch.float32 if when == "model" and k.endswith("norm.scale") else torch.bfloat16
            assert base[k].dtype == dtype and torch.equal(base[k], v.to(dtype)), (when, k)
    # ... and the model built from them computes Meta's reference forward (adapters at init: B = 0).
    model = seen["at_load"].float().eval()
    set_gaussian_mode(model, "mean")  # no-op for torchtune's LoRA
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, _meta_forward(meta_sd, TINY_PARAMS, tokens), atol=2e-4, rtol=1e-4)

    # (2) results.json and the PEFT export.
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["errors"] == {}
    assert len(res["test"]["per_task"]) == 3 and 0.0 <= res["test"]["mean"]["accuracy"] <= 1.0
    if method == "pretrained":
        assert not (out / "adapter_best").exists()
        return
    hd = TINY_PARAMS["dim"] // TINY_PARAMS["n_heads"]
    out_dims = {"q_proj": TINY_PARAMS["dim"], "v_proj": TINY_PARAMS["n_kv_heads"] * hd, "o_proj": TINY_PARAMS["dim"]}
    for which in ("adapter_best", "adapter_final"):
        conf = json.loads((out / which / "adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == "meta-llama/Meta-Llama-3-8B-Instruct"
        assert (conf["r"], conf["lora_alpha"]) == (cfg.model.lora_rank, cfg.model.lora_alpha)
        assert sorted(conf["target_modules"]) == sorted(out_dims)
        saved = load_file(out / which / "adapter_model.safetensors")
        want = {}
        for i in range(TINY_PARAMS["n_layers"]):
            for proj, n_out in out_dims.items():
                pre = f"base_model.model.model.layers.{i}.self_attn.{proj}."
                want[pre + "lora_A.weight"] = (cfg.model.lora_rank, TINY_PARAMS["dim"])
                want[pre + "lora_B.weight"] = (n_out, cfg.model.lora_rank)
        assert {k: tuple(v.shape) for k, v in saved.items()} == want
        assert all(torch.isfinite(v).all() for v in saved.values())
