"""Which attention backend runs each phase, and the plumbing of the per-phase and flash-attn
backends, on CPU with a stub `flash_attn` module (the real one needs a GPU)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from myvllm.attention import selector
from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.attention.phase_backend import PhaseBackend
from myvllm.attention.selector import BackendChoice, choose_backends
from myvllm.attention.torch_backend import TorchAttentionBackend
from myvllm.kernels import reference

FLASH_WINS_PREFILL = {"prefill": "flash_attn", "decode": "triton"}


def test_cpu_runs_torch():
    assert choose_backends("auto", "cpu", 256, 128, True) == BackendChoice("torch", "torch", "the device is a CPU")
    with pytest.raises(ValueError, match="attention_backend='triton' needs CUDA"):
        choose_backends("triton", "cpu", 16, 128, False)
    assert choose_backends("triton", "cpu", 16, 128, False, interpreted_triton=True).decode == "triton"


def test_auto_follows_the_measured_winner_of_each_phase(monkeypatch):
    choice = choose_backends("auto", "cuda", 256, 128, True)
    assert (choice.prefill, choice.decode) == (selector.MEASURED_FASTER["prefill"], selector.MEASURED_FASTER["decode"])
    monkeypatch.setattr(selector, "MEASURED_FASTER", FLASH_WINS_PREFILL)
    choice = choose_backends("auto", "cuda", 256, 128, True)
    assert (choice.prefill, choice.decode) == ("flash_attn", "triton")
    assert "prefill: flash_attn (measured faster)" in choice.reason


def test_decode_is_not_flash_attn_by_default():
    """flash-attn was the slower decode backend end to end: auto never picks it for decode."""
    assert selector.MEASURED_FASTER["decode"] == "triton"
    assert choose_backends("auto", "cuda", 256, 128, True).decode == "triton"


@pytest.mark.parametrize("block_size, installed, problem", [
    (16, True, "kvcache_block_size=16 is not a multiple of 256"),
    (128, True, "kvcache_block_size=128 is not a multiple of 256"),
    (256, False, "flash_attn is not installed"),
])
def test_flash_attn_needs_the_package_and_a_256_multiple(monkeypatch, block_size, installed, problem):
    monkeypatch.setattr(selector, "MEASURED_FASTER", FLASH_WINS_PREFILL)
    choice = choose_backends("auto", "cuda", block_size, 128, installed)
    assert (choice.prefill, choice.decode) == ("triton", "triton")
    assert problem in choice.reason
    with pytest.raises(ValueError, match=problem):
        choose_backends("flash_attn", "cuda", block_size, 128, installed)


def test_auto_uses_flash_attn_only_at_the_measured_head_dim(monkeypatch):
    monkeypatch.setattr(selector, "MEASURED_FASTER", FLASH_WINS_PREFILL)
    choice = choose_backends("auto", "cuda", 256, 64, True)
    assert (choice.prefill, choice.decode) == ("triton", "triton") and "head_dim=64" in choice.reason
    assert choose_backends("flash_attn", "cuda", 256, 64, True).prefill == "flash_attn"  # asked for by name


def test_named_backend_runs_both_phases():
    flash = choose_backends("flash_attn", "cuda", 512, 128, True)
    assert flash == BackendChoice("flash_attn", "flash_attn", "asked for")
    assert choose_backends("triton", "cuda", 16, 128, True) == BackendChoice("triton", "triton", "asked for")


# ---- a stub flash_attn module ---------------------------------------------------------------

def _seq_lens(cu: torch.Tensor) -> torch.Tensor:
    return (cu[1:] - cu[:-1]).to(torch.int32)


@pytest.fixture
def stub_flash_attn(monkeypatch):
    """A `flash_attn` module whose two functions compute attention with the torch reference from
    the arguments flash-attn's API takes, and record each call."""
    calls = []
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal):
        calls.append("with_kvcache")
        assert q.dim() == 4 and q.shape[1] == 1 and causal  # [B, 1, H, D]
        b = q.shape[0]
        qsl = torch.arange(b + 1, dtype=torch.int32)
        out = reference.paged_attention(q[:, 0], k_cache, v_cache, qsl, cache_seqlens, block_table, softmax_scale)
        return out.unsqueeze(1)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                               causal, block_table):
        calls.append("varlen")
        assert causal and max_seqlen_q == int(_seq_lens(cu_seqlens_q).max())
        assert max_seqlen_k >= int(_seq_lens(cu_seqlens_k).max())
        return reference.paged_attention(q, k, v, cu_seqlens_q, _seq_lens(cu_seqlens_k), block_table, softmax_scale)

    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def test_stub_is_seen_as_installed(stub_flash_attn):
    assert selector.flash_attn_installed()


def _step(decode: bool):
    """A batch over a paged cache [blocks=8, block_size=4, Hkv=2, D=16] with random contents:
    three sequences, prefix hits and chunks (prefill) or one token each (decode)."""
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 8, 4, 2, 16, generator=g)
    seq_lens = torch.tensor([7, 3, 10], dtype=torch.int32)
    q_lens = [1, 1, 1] if decode else [3, 3, 4]  # prefill: 4 and 6 tokens already cached, one prompt whole
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    block_tables = torch.tensor([[5, 1, 0], [2, 0, 0], [3, 6, 7]], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((sum(q_lens),), -1), block_tables=block_tables,
                             seq_lens=seq_lens, query_start_loc=qsl, max_query_len=max(q_lens), max_seq_len=10,
                             logits_indices=qsl[1:].long() - 1, is_decode_only=decode)
    q = torch.randn(sum(q_lens), 4, 16, generator=g)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("decode", [True, False])
def test_flash_attn_backend_passes_the_step_as_flash_attn_expects(stub_flash_attn, decode):
    from myvllm.attention.flash_attn_backend import FlashAttnBackend

    q, k_cache, v_cache, meta = _step(decode)
    backend = FlashAttnBackend()
    backend.prepare(meta)
    out = backend.forward(q, k_cache, v_cache, meta, 0.25)
    assert stub_flash_attn == ["with_kvcache" if decode else "varlen"]
    expected = reference.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                         meta.block_tables, 0.25)
    torch.testing.assert_close(out, expected)


class Recording(AttentionBackend):
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def prepare(self, meta):
        self.log.append((self.name, "prepare"))
        meta.backend_state = self.name

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        self.log.append((self.name, "store_kv"))

    def forward(self, q, k_cache, v_cache, meta, scale, k_scale=None, v_scale=None):
        self.log.append((self.name, "forward", meta.backend_state))
        return q

    def init_graph_buffers(self, max_batch_size):
        self.log.append((self.name, "init_graph_buffers"))

    def prepare_replay(self, meta, padded_batch_size):
        self.log.append((self.name, "prepare_replay"))


def test_phase_backend_sends_each_step_to_its_phase():
    log = []
    backend = PhaseBackend(Recording("P", log), Recording("D", log))
    assert backend.name == "P (prefill) + D (decode)"
    for decode in (False, True):
        q, k_cache, v_cache, meta = _step(decode)
        backend.prepare(meta)
        backend.forward(q, k_cache, v_cache, meta, 1.0)
    backend.init_graph_buffers(4)
    backend.prepare_replay(meta, 4)
    assert log == [("P", "prepare"), ("P", "forward", "P"), ("D", "prepare"), ("D", "forward", "D"),
                   ("D", "init_graph_buffers"), ("D", "prepare_replay")]


def test_phase_backend_over_one_cache_equals_one_backend(stub_flash_attn):
    """flash-attn (stub) prefills, torch decodes the same cache: the outputs of a torch-only run."""
    from myvllm.attention.flash_attn_backend import FlashAttnBackend

    phases = PhaseBackend(FlashAttnBackend(), TorchAttentionBackend())
    for decode in (False, True):
        q, k_cache, v_cache, meta = _step(decode)
        phases.prepare(meta)
        torch.testing.assert_close(phases.forward(q, k_cache, v_cache, meta, 0.25),
                                   TorchAttentionBackend().forward(q, k_cache, v_cache, meta, 0.25))
    assert stub_flash_attn == ["varlen"]


def test_create_backend_builds_a_phase_backend_when_the_phases_differ(monkeypatch, stub_flash_attn):
    monkeypatch.setattr(selector, "MEASURED_FASTER", FLASH_WINS_PREFILL)
    built = []

    def build(name, *args):
        built.append(name)
        return Recording(name, [])

    monkeypatch.setattr(selector, "_build", build)
    backend = selector.create_backend("auto", torch.device("cuda"), 256, 4, 128, 8, 64)
    assert isinstance(backend, PhaseBackend) and built == ["flash_attn", "triton"]
    built.clear()
    backend = selector.create_backend("auto", torch.device("cuda"), 16, 4, 128, 8, 64)
    assert not isinstance(backend, PhaseBackend) and built == ["triton"]
