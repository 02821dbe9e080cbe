"""The Triton fused-MoE (kernels/triton_fused_moe.py) against the torch reference, on CPU and CUDA.

Small cases run on CPU through Triton's interpreter (tests/conftest.py sets it up when there is
no GPU) and on CUDA; the shape matrix of the published models (Qwen3-30B-A3B and
Qwen3-235B-A22B expert shapes, whole and split over tensor-parallel ranks, 1 to 8192 tokens)
runs on CUDA only, eager and replayed from a CUDA graph with new inputs. The reference runs in
float32 on the same (rounded) inputs.

    PYTHONPATH=. python3 -m pytest -m gpu -q tests/test_fused_moe_kernels.py
"""

from __future__ import annotations

import os

import pytest
import torch

from myvllm.kernels import reference_moe
from myvllm.kernels.triton_fused_moe import fused_experts, max_padded_rows, moe_align_block_size, moe_tiles

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton runs on CPU only interpreted"),
                   id="cpu")
CUDA = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
BF16_TOL = 1e-2  # relative error of the bf16 kernel against the float32 reference
FP32_TOL = 1e-5

# (experts, top-k, hidden, intermediate per rank): the published MoE models, whole and per rank
A3B = (128, 8, 2048, 768)
A3B_TP4 = (128, 8, 2048, 192)
A22B = (128, 8, 4096, 1536)
A22B_TP8 = (128, 8, 4096, 192)
GPU_TOKENS = (1, 7, 64, 256, 1024, 8192)


def cases(devices: list, *params) -> list:
    return [pytest.param(d.values[0], *p, marks=d.marks, id=f"{d.id}-{'-'.join(map(str, p))}")
            for p in params for d in devices]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def random_moe(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
               device: str, seed: int = 0, skew: float = 0.0):
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I] scaled to unit-size outputs, and a routing of
    random logits (skew > 0 sends most tokens to the first experts)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = randn(num_tokens, hidden)
    w13 = randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = randn(num_experts, hidden, inter, scale=inter**-0.5)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    logits -= skew * torch.arange(num_experts, device=device)
    weights, ids = reference_moe.topk_softmax(logits.to(dtype), top_k, renormalize=True)
    return x, w13, w2, weights, ids


def reference(x, w13, w2, weights, ids) -> torch.Tensor:
    return reference_moe.fused_experts(x.float(), w13.float(), w2.float(), weights.float(), ids)


# ---- alignment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device, num_tokens, num_experts, top_k, block_m, skew", cases(
    [CPU, CUDA], (1, 8, 2, 16, 0.0), (7, 8, 2, 16, 0.0), (50, 60, 4, 16, 0.0), (300, 8, 2, 32, 3.0),
    (40, 128, 8, 64, 0.0)) + cases([CUDA], (8192, 128, 8, 64, 0.0), (4096, 128, 8, 16, 0.5)))
def test_align_lists_each_row_once_in_its_experts_blocks(device, num_tokens, num_experts, top_k, block_m, skew):
    *_, ids = random_moe(num_tokens, num_experts, top_k, 16, 16, torch.float32, device, skew=skew)
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(ids, block_m, num_experts)
    num_rows = ids.numel()
    assert sorted_ids.numel() == max_padded_rows(num_rows, num_experts, block_m)
    flat, sorted_ids, expert_ids = ids.reshape(-1).cpu(), sorted_ids.cpu().long(), expert_ids.cpu().long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(padded.sum())
    assert int(num_post_padded) == total
    used = total // block_m
    assert (expert_ids[used:] == -1).all()
    # every block of the used part belongs to one expert, in ascending order, as many as it needs
    assert torch.equal(torch.bincount(expert_ids[:used], minlength=num_experts), padded // block_m)
    assert (expert_ids[:used].diff() >= 0).all()
    blocks = sorted_ids[:total].view(used, block_m)
    real = blocks < num_rows
    assert (flat[blocks[real]] == expert_ids[:used, None].expand_as(blocks)[real]).all()
    assert torch.equal(blocks[real].sort().values, torch.arange(num_rows))  # each row exactly once
    assert (sorted_ids[total:] == num_rows).all()


# ---- fused experts -------------------------------------------------------------------------------

@pytest.mark.parametrize("device, num_tokens, num_experts, top_k, hidden, inter", cases(
    [CPU, CUDA], (1, 8, 2, 64, 48), (7, 8, 2, 64, 48), (33, 16, 4, 40, 24), (20, 6, 6, 32, 16)))
def test_fused_experts_small_float32(device, num_tokens, num_experts, top_k, hidden, inter):
    """Sizes that fill no tile (masked edges), every expert chosen (top_k == E), float32."""
    x, w13, w2, weights, ids = random_moe(num_tokens, num_experts, top_k, hidden, inter, torch.float32, device)
    out = fused_experts(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, reference(x, w13, w2, weights, ids)) < FP32_TOL


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("num_tokens", [5, 40])
def test_every_tile_config_agrees(device, num_tokens):
    x, w13, w2, weights, ids = random_moe(num_tokens, 8, 2, 64, 80, torch.float32, device, seed=1)
    ref = reference(x, w13, w2, weights, ids)
    tiles = [moe_tiles(tokens, 2, 8, torch.float32) for tokens in (1, 128, 1024)]
    assert len(set(tiles)) == 3  # the three tile shapes moe_tiles chooses from
    for tile in tiles:
        assert rel_err(fused_experts(x, w13, w2, weights, ids, tile), ref) < FP32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [A3B, A3B_TP4, A22B, A22B_TP8], ids=["30b-a3b", "30b-a3b-tp4", "235b-a22b",
                                                                        "235b-a22b-tp8"])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_fused_experts_bf16_eager_and_graph(shape, num_tokens):
    num_experts, top_k, hidden, inter = shape
    inputs = random_moe(num_tokens, num_experts, top_k, hidden, inter, torch.bfloat16, "cuda")
    out = fused_experts(*inputs)
    assert rel_err(out, reference(*inputs)) < BF16_TOL

    from capture_util import capture_outputs

    static = [t.clone() for t in inputs]
    graph, graph_out = capture_outputs(lambda: fused_experts(*static))
    fresh = random_moe(num_tokens, num_experts, top_k, hidden, inter, torch.bfloat16, "cuda", seed=7, skew=0.05)
    for buf, new in zip(static, fresh):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(graph_out, reference(*fresh)) < BF16_TOL


@pytest.mark.gpu
def test_skewed_routing_bf16():
    """Most tokens on a few experts: long expert lists, many empty experts."""
    inputs = random_moe(2048, 128, 8, 2048, 768, torch.bfloat16, "cuda", skew=0.5)
    assert int(inputs[-1].max()) < 64  # the skew really concentrates the routing
    assert rel_err(fused_experts(*inputs), reference(*inputs)) < BF16_TOL
