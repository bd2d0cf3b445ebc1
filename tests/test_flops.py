"""The FLOP floor of the benchmark (abmll.benchmark.flops, measure.time_pair / time_layer):
FlopCounterMode's counts checked against hand-written counts of the layers' matmuls."""

import pytest
import torch
from torchtune.modules.peft import LoRALinear

from abmll.benchmark.flops import count_flops, flop_counter
from abmll.benchmark.measure import time_layer, time_pair
from abmll.benchmark.report import benchmark_report, flop_floor, layer_flop_floors
from abmll.modules import PHI_PAIRS, GaussianLoRALinear
from abmll.modules.gaussian_lora import SAMPLINGS

D_OUT, D_IN, TOKENS, RANK = 24, 16, 8, 8


def mm(m: int, k: int, n: int) -> int:
    """FLOPs of one (m x k) @ (k x n) product, as FlopCounterMode counts it."""
    return 2 * m * k * n


def hand_count(kind: str, n: int, d_in: int, d_out: int, r: int, *, fold: bool = True, x_grad: bool = True) -> int:
    """The matmuls of one forward + backward of an adapted layer, read off its code.

    Trainable: LoRA's pair / the Gaussian layer's phi pairs (mu_phi, lv_phi); W0 frozen.
    ``x_grad``: whether the input needs a gradient (inside a network: every layer after the
    first adapted one). ``fold``: the weight path folds W0 and the noise into one matrix (fp32);
    in bf16 the noise has its own matmul in the forward and in the input's gradient.

    * W0: forward ``x W0^T``; backward ``g W0`` (the input's gradient only).
    * The LoRA term ``s B (A x)`` (torchtune's LoRALinear, and the Gaussian layer's mean
      ``mu_phi``): forward ``A x``, ``B (A x)``; backward ``dB = g^T (A x)``, ``d(Ax) = g B``,
      ``dA = d(Ax)^T x``, and ``dx = d(Ax) A``.
    * ``local``: ``lv = s B_lv A_lv + c`` (d_out x r x d_in) and the output variance
      ``x^2 exp(lv)^T`` in the forward; both again in the backward (the noise term is
      recomputed under ``checkpoint``); the variance matmul's backward (``d exp(lv)`` and
      ``d(x^2)``) and ``lv``'s (``dB_lv``, ``dA_lv``).
    * ``weight``: the noise std ``exp(lv / 2)`` from ``B_lv A_lv`` in the forward and again in
      the backward (the noise is regenerated from its seed); ``x (W0 + N)^T`` in the forward
      (bf16: ``x W0^T + x N^T``); backward ``dlv = (g^T x) * N / 2``, ``dB_lv``, ``dA_lv`` and
      ``dx = g (W0 + N)`` (bf16: two products).
    """
    dense = mm(n, d_in, d_out)  # one token-by-weight product of the full layer
    factor = mm(d_out, r, d_in)  # B @ A: one dense d_out x d_in matrix from a pair
    lora = mm(n, d_in, r) + mm(n, r, d_out) + 2 * mm(n, d_out, r) + mm(r, n, d_in) + x_grad * mm(n, r, d_in)
    w0 = dense + x_grad * dense
    if kind == "lora":
        return w0 + lora
    if kind == "local":
        noise = 2 * (factor + dense) + dense + x_grad * dense + 2 * factor
        return w0 + lora + noise
    if kind == "weight":
        forward = factor + dense * (1 if fold else 2)
        backward = factor + dense + 2 * factor + x_grad * dense * (1 if fold else 2)
        return lora + forward + backward
    raise ValueError(kind)


def _layers(dtype):
    torch.manual_seed(0)
    lora = LoRALinear(D_IN, D_OUT, rank=RANK, alpha=16.0)
    out = {"lora": lora}
    for sampling in SAMPLINGS:
        out[sampling] = GaussianLoRALinear(D_IN, D_OUT, RANK, 16.0, c=-4.0, sampling=sampling)
    for label, layer in out.items():
        layer.to(dtype=dtype)
        for p in layer.parameters():
            p.requires_grad_(False)
        trainable = [layer.lora_a.weight, layer.lora_b.weight] if label == "lora" else list(layer.pair_params(PHI_PAIRS))
        for p in trainable:
            p.requires_grad_(True)
    return out


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_layers_counted_flops_equal_the_hand_count_of_its_matmuls(dtype, x_grad):
    """For each sampling and LoRALinear: FlopCounterMode over one forward + backward equals
    :func:`hand_count`. Counting only the products of n tokens with a dense d_out x d_in matrix
    (x_grad = 1 when the input needs a gradient): LoRA 1 + x_grad; local 4 + 2 x_grad (the
    variance is a second forward product, recomputed in the backward, with two backward
    products of its own); weight 2 + x_grad in fp32 (the noise folded into W0), 3 + 2 x_grad in
    bf16 (the noise has its own products). So local > weight > LoRA, whatever the dtype."""
    x = torch.randn(TOKENS, D_IN, dtype=dtype, requires_grad=x_grad)
    cot = torch.randn(TOKENS, D_OUT, dtype=dtype)
    fold = dtype == torch.float32
    for label, layer in _layers(dtype).items():
        counted = count_flops(lambda: layer(x).backward(cot))
        assert counted == hand_count(label, TOKENS, D_IN, D_OUT, RANK, fold=fold, x_grad=x_grad), label
    if x_grad:  # what the benchmark's layer rows report: the same counts
        res = time_layer(D_OUT, D_IN, TOKENS, dtype="fp32" if fold else "bf16", rounds=1, warmup=0, rank=RANK)
        assert res["flops"] == {k: hand_count(k, TOKENS, D_IN, D_OUT, RANK, fold=fold) for k in ("lora", *SAMPLINGS)}
        floors = layer_flop_floors(res)
        assert set(floors) == set(SAMPLINGS)
        assert floors["local"]["flop_ratio"] > floors["weight"]["flop_ratio"] > 1


def test_flop_counter_counts_a_matmul_and_the_cpu_attention_forward():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(torch.mm, a, b) == mm(3, 5, 7)
    q = torch.randn(1, 2, 8, 4)
    with flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert fc.get_total_flops() == 2 * mm(1 * 2 * 8, 4, 8)  # QK^T and PV


def test_cpu_attention_flops_are_counted_with_the_cuda_formula():
    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    with flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    b, h, s, d = q.shape
    matmul = 2 * b * h * s * s * d  # one s x s x d product, full (the counter ignores causality)
    # forward: QK^T and PV; backward: the scores again, dV, dP, dQ and dK
    assert fc.get_total_flops() == (2 + 5) * matmul
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as plain:  # without the CPU kernel's formula: nothing
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert plain.get_total_flops() == 0


def _tiny_layer_units() -> dict:
    """The tiny model's adapted layers (2 blocks, d = 64, 4 heads / 2 KV heads of 16: q 64 -> 64,
    v 64 -> 32, output 64 -> 64) and whether each one's input needs a gradient: block 0's q and v
    read the frozen embeddings through a frozen norm (no), everything after them does (yes)."""
    return {("0", "q"): (64, 64, False), ("0", "v"): (64, 32, False),
            ("0", "output"): (64, 64, True), ("1", "q"): (64, 64, True), ("1", "v"): (64, 32, True),
            ("1", "output"): (64, 64, True)}


def test_episode_flops_at_the_tiny_shape():
    """One untimed episode of each method under FlopCounterMode (time_pair), each estimator.

    ABMLL > Regular LoRA (the Gaussian layers' extra products, the KL and the outer step), and
    local > weight: per adapted layer and forward + backward, local runs 2 + x_grad more
    products of the tokens with a dense d_out x d_in matrix than weight in fp32 (4 + 2 x_grad
    against 2 + x_grad, :func:`hand_count`); everything else (the KL, the prior, the outer step)
    is the same. The difference is exactly the inner steps': K forward + backward passes of
    batch 2 x seq tokens, summed over the adapted layers with their x_grad (the kl_only outer
    step's query NLL runs without autograd, one weight sample in both)."""
    seq, k = 16, 5
    res = {s: time_pair({"abmll": "tiny/abmll", "regular_lora": "tiny/regular_lora"}, rounds=1, warmup=0,
                        seq_len=seq, sampling=s) for s in SAMPLINGS}
    for s, timing in res.items():
        flops = timing["episode_flops"]
        assert timing["sampling"]["abmll"] == s and timing["inner_steps"] == k
        assert flops["regular_lora"] > 0 and flops["abmll"] > flops["regular_lora"], (s, flops)
        floor = flop_floor(timing)
        assert floor["flop_ratio"] == flops["abmll"] / flops["regular_lora"] > 1
        assert floor["time_ratio"] > 0 and floor["floor_share"] == pytest.approx(floor["flop_ratio"] / floor["time_ratio"])
        table = benchmark_report("tiny", timing, None, [], "random weights")
        assert "| Episode FLOPs (matmuls and attention, one untimed episode) |" in table
        assert "| Share of the FLOP floor reached (FLOP ratio / mean time ratio) |" in table
        assert "CPU capability" in table and "threads" in table and timing["dtype"] in table
    assert res["local"]["episode_flops"]["regular_lora"] == res["weight"]["episode_flops"]["regular_lora"]
    n = 2 * seq  # batch 2
    per_pass = sum(hand_count("local", n, d_in, d_out, RANK, x_grad=xg) - hand_count("weight", n, d_in, d_out, RANK, x_grad=xg)
                   for d_in, d_out, xg in _tiny_layer_units().values())
    diff = res["local"]["episode_flops"]["abmll"] - res["weight"]["episode_flops"]["abmll"]
    assert diff == k * per_pass > 0


def test_running_out_of_memory_while_counting_keeps_the_times(monkeypatch):
    """The counter undoes activation checkpointing (it keeps every module's output alive): if the
    counted episode runs out of memory (an 8B model on a small GPU), the times stay and the table
    says why there is no floor."""
    import abmll.benchmark.measure as measure

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(measure, "count_flops", oom)
    timing = time_pair({"abmll": "tiny/abmll", "regular_lora": "tiny/regular_lora"}, rounds=1, warmup=0, seq_len=8)
    assert all(len(v) == 1 for v in timing["episode_seconds"].values())
    assert timing["episode_flops"] == {"abmll": None, "regular_lora": None}
    assert flop_floor(timing)["flop_ratio"] is None and flop_floor(timing)["floor_share"] is None
    table = benchmark_report("tiny", timing, None, [], "random weights")
    assert "| Episode FLOPs: not counted, out of memory in the counted episode (CUDA out of memory." in table
    assert "Share of the FLOP floor" not in table
