"""The Qwen2-7B configs' checkpoint and tokenizer path, end to end, on a tiny checkpoint in Hugging Face's format.

``tests/test_config_matrix.py`` runs every shipped config with the checkpointer and the tokenizer
swapped out. Here they stay as shipped (``torchtune.training.FullModelHFCheckpointer`` with
``model_type: QWEN2`` reading the four ``model-0000{1..4}-of-00004.safetensors`` shards and
``config.json``; ``torchtune.models.qwen2.qwen2_tokenizer`` reading ``vocab.json`` and
``merges.txt``) and read files this test writes in the layout of
``tune download Qwen/Qwen2-7B-Instruct``: a transformers ``Qwen2ForCausalLM`` at a tiny shape
(random weights and q/k/v biases, bf16) saved under Hugging Face's names in four shards, and a
byte-level BPE ``vocab.json``/``merges.txt`` (Qwen2's special tokens sit at ids 151643-151645, so
the tiny model keeps the real vocab_size 152064).

The model shape: as in ``test_llama3_checkpoint_path.py``, the shipped ``model._component_`` is
kept and only the shape keys of its call into torchtune's component builder (``qwen2`` /
``lora_qwen2``) are shrunk; vocab_size, max_seq_len, norm_eps and rope_base stay the 7B builder's
own, checked against Qwen2-7B-Instruct's ``config.json``.

Checked per config: (1) the base weights the recipe loads are the checkpoint's, and the loaded
model's logits equal transformers' Qwen2 on the same files, so a wrong key mapping, a lost bias,
a q/k permutation or a wrong rope_base/norm_eps fails; (2) the run writes results.json and the
PEFT export; (3) the tokenizer gives Qwen2's ChatML around the paper's prompt (the configs set
``data.chat_template: true``).
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import shrink_builders

pytestmark = pytest.mark.slow  # the qwen2_7b configs end to end on an HF-format checkpoint: not in the quick tier

# config.json of Qwen/Qwen2-7B-Instruct (the entries the model shape depends on).
QWEN2_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "use_sliding_window": False, "torch_dtype": "bfloat16",
}
# The same file at the tiny shape: only the shape entries differ.
TINY_CONFIG = dict(QWEN2_7B_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
# Multi-byte BPE tokens of the tiny vocab (each with its prefixes, so BPE reaches it).
BPE_WORDS = ["Return", " the", " label", " of", " correct", " answer", " for", " question", " below",
             "Question", "Choices", "Answer", "user", "assistant", " A", " B", " C", " D"]
_ABSENT = object()


def _tune_kwargs(c: dict) -> dict:
    """The torchtune component-builder keys that Hugging Face's config.json fixes."""
    return {
        "vocab_size": c["vocab_size"], "num_layers": c["num_hidden_layers"],
        "num_heads": c["num_attention_heads"], "num_kv_heads": c["num_key_value_heads"],
        "embed_dim": c["hidden_size"], "intermediate_dim": c["intermediate_size"],
        "max_seq_len": c["max_position_embeddings"], "norm_eps": c["rms_norm_eps"],
        "rope_base": c["rope_theta"],
    }


TINY_SHAPE = {k: _tune_kwargs(TINY_CONFIG)[k] for k in SHAPE_KEYS}


# ----------------------------------------------------------------------------- the files
def _hf_model(state: dict | None = None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "model_type")})
    model = Qwen2ForCausalLM(cfg).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def _hf_state_dict(seed: int = 1234) -> dict:
    """Random weights under Hugging Face's names, bf16 as in the released shards; biases and
    norm scales not at their init values, so that losing one shows."""
    torch.manual_seed(seed)
    model = _hf_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def _bytes_to_unicode() -> dict:
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _vocab_and_merges():
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = []
    for word in BPE_WORDS:
        chars = "".join(b2u[b] for b in word.encode())
        for n in range(2, len(chars) + 1):
            if chars[:n] not in vocab:
                merges.append(f"{chars[:n - 1]} {chars[n - 1]}")
                vocab[chars[:n]] = len(vocab)
    return vocab, merges


def _write_download_dir(path: Path) -> dict:
    path.mkdir(parents=True)
    sd = _hf_state_dict()
    layers = TINY_CONFIG["num_hidden_layers"]

    def shard(key: str) -> int:  # embeddings | layer 0 | layer 1 | final norm + lm_head
        if key.startswith("model.layers."):
            return 1 + int(key.split(".")[2]) * 2 // layers
        return 0 if "embed_tokens" in key else 3

    for i, name in enumerate(SHARDS):
        save_file({k: v for k, v in sd.items() if shard(k) == i}, str(path / name), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    vocab, merges = _vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return sd


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """A tiny Qwen2-7B-Instruct download directory, and its Hugging Face-named tensors."""
    path = tmp_path_factory.mktemp("dl") / "Qwen2-7B-Instruct"
    return path, _write_download_dir(path)


@pytest.fixture
def tiny_7b_builders(monkeypatch):
    """Shrink the shape keys of the 7B builders' call into torchtune's component builders;
    returns the keys each call was made with (the 7B builder's own)."""
    import torchtune.models.qwen2._model_builders as builders

    return shrink_builders(monkeypatch, builders, ["qwen2", "lora_qwen2"], TINY_SHAPE)


def _load(method: str, family: str = "qwen2_7b"):
    return OmegaConf.load(str(files("abmll.configs").joinpath(f"{family}/{method}.yaml")))


def _tiny_run_config(method: str, ckpt_dir: Path, out: Path):
    cfg = _load(method)
    tiny = _load(method, "tiny")
    swaps = {
        "checkpointer.checkpoint_dir": str(ckpt_dir),
        "tokenizer.path": str(ckpt_dir / "vocab.json"),
        "tokenizer.merges_file": str(ckpt_dir / "merges.txt"),
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
def test_tiny_vocab_gives_qwen2_chatml_around_the_prompt(download):
    from torchtune import config

    from abmll.data.examples import MCExample
    from abmll.data.prompt import format_prompt, option_token_ids, tokenize_example

    path, _ = download
    cfg = _tiny_run_config("abmll", path, path.parent / "unused")
    tok = config.instantiate(cfg.tokenizer)
    assert tok.max_seq_len == cfg.data.max_seq_len
    assert (tok.im_start_id, tok.im_end_id, tok.eos_id, tok.pad_id, tok.bos_id) == (
        SPECIAL["<|im_start|>"], SPECIAL["<|im_end|>"], SPECIAL["<|im_end|>"], SPECIAL["<|endoftext|>"], None)
    vocab, _ = _vocab_and_merges()
    assert tok.encode("Question", add_bos=False, add_eos=False) == [vocab["Question"]]

    ex = MCExample(task="t", input="Is a cat an animal?", options=("yes", "no"), output="no")
    prompt = format_prompt(ex)
    item = tokenize_example(ex, tok, int(cfg.data.max_seq_len), chat_template=cfg.data.chat_template)
    text = tok.decode(item["tokens"], skip_special_tokens=False)
    # ChatML as torchtune's Qwen2Tokenizer writes it: no default system message; the last
    # assistant turn ends with the eos token, <|im_end|>.
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\nB<|im_end|>"
    letters = option_token_ids(tok, chat_template=True)
    assert letters == [vocab[c] for c in "ABCD"]
    pos = item["answer_pos"]
    assert item["tokens"][pos] == letters[1] and item["tokens"][pos + 1] == SPECIAL["<|im_end|>"]
    assert [i for i, lab in enumerate(item["labels"]) if lab != -100] == [pos]
    assert max(item["tokens"]) < TINY_CONFIG["vocab_size"] and None not in item["tokens"]
    # Plain mode works too (no BOS in Qwen2; " A" is one token).
    assert option_token_ids(tok, chat_template=False) == [vocab["\u0120" + c] for c in "ABCD"]


def _base_state(model) -> dict:
    from torchtune.modules.peft import get_adapter_params

    from abmll.modules.names import clean_name

    adapters = {clean_name(k) for k in get_adapter_params(model)}
    return {clean_name(k): v for k, v in model.state_dict().items() if clean_name(k) not in adapters}


# torchtune's RMSNorm upcasts the input but not its bf16 scale: torch warns, the result is right.
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
# The two model kinds (Gaussian, plain LoRA): structured_lora, reptile and pretrained build the
# plain one with the same checkpointer and tokenizer, and run at tiny shape in the config matrix.
@pytest.mark.parametrize("method", ["abmll", "regular_lora"])
def test_qwen2_7b_config_loads_the_hf_checkpoint_and_runs(method, download, tiny_7b_builders, tmp_path, monkeypatch):
    import abmll_recipe
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    from abmll.modules import set_gaussian_mode

    ckpt_dir, hf_sd = download
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

    # The 7B builder's own keys are Qwen2-7B-Instruct's config.json; only the shape keys were shrunk.
    assert len(tiny_7b_builders) == 1
    called = tiny_7b_builders[0]
    assert {k: called[k] for k in _tune_kwargs(QWEN2_7B_CONFIG)} == _tune_kwargs(QWEN2_7B_CONFIG)
    assert called.get("tie_word_embeddings", False) is False

    # (1) The loaded base weights are the checkpoint's (biases included), in the run's dtype.
    expected = qwen2_hf_to_tune(dict(hf_sd), num_heads=4, num_kv_heads=2, dim=64)
    assert sum(k.endswith("_proj.bias") for k in expected) == 3 * TINY_CONFIG["num_hidden_layers"]
    for when in ("at_load", "model"):  # and training leaves the frozen base alone
        base = _base_state(seen[when])
        assert sorted(base) == sorted(expected), when
        for k, v in expected.items():
            # The learner keeps RMSNorm scales float32 under bf16 (the same values: docs/notes.md, note 17).
            dtype = torch.float32 if when == "model" and k.endswith("norm.scale") else torch.bfloat16
            assert base[k].dtype == dtype and torch.equal(base[k], v.to(dtype)), (when, k)
    # ... and the model built from them computes transformers' Qwen2 (adapters at init: B = 0).
    model = seen["at_load"].float().eval()
    set_gaussian_mode(model, "mean")  # no-op for torchtune's LoRA
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = _hf_model(hf_sd)(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)

    # (2) results.json and the PEFT export.
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["errors"] == {}
    assert len(res["test"]["per_task"]) == 3 and 0.0 <= res["test"]["mean"]["accuracy"] <= 1.0
    if method == "pretrained":
        assert not (out / "adapter_best").exists()
        return
    dim, hd = TINY_CONFIG["hidden_size"], TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    out_dims = {"q_proj": dim, "v_proj": TINY_CONFIG["num_key_value_heads"] * hd, "o_proj": dim}
    for which in ("adapter_best", "adapter_final"):
        conf = json.loads((out / which / "adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == "Qwen/Qwen2-7B-Instruct"
        assert (conf["r"], conf["lora_alpha"]) == (cfg.model.lora_rank, cfg.model.lora_alpha)
        assert sorted(conf["target_modules"]) == sorted(out_dims)
        saved = load_file(out / which / "adapter_model.safetensors")
        want = {}
        for i in range(TINY_CONFIG["num_hidden_layers"]):
            for proj, n_out in out_dims.items():
                pre = f"base_model.model.model.layers.{i}.self_attn.{proj}."
                want[pre + "lora_A.weight"] = (cfg.model.lora_rank, dim)
                want[pre + "lora_B.weight"] = (n_out, cfg.model.lora_rank)
        assert {k: tuple(v.shape) for k, v in saved.items()} == want
        assert all(torch.isfinite(v).all() for v in saved.values())
