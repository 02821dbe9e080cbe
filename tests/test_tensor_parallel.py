"""Tensor parallelism: TP=2 generates exactly what TP=1 does; worker processes start and stop
cleanly (shutdown, garbage collection, Ctrl-C, errors), a worker's error reaches the caller,
and sizes the model cannot be split by are refused before any process starts.

CPU tests run the ranks over gloo. The GPU test (marked gpu) needs two or more GPUs:
PYTHONPATH=. python3 -m pytest -m gpu -q tests/test_tensor_parallel.py
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from engine_utils import RunStats, run_checked
from tiny_model import build_checkpoint

from myvllm import LLM, SamplingParams
from myvllm.config import EngineConfig, ModelConfig
from myvllm.runtime.workers import WorkerError, WorkerGroup

CPU = dict(dtype="float32", device="cpu", cpu_kv_cache_gib=0.05, kvcache_block_size=16)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompts() -> list[list[int]]:
    """Lengths 1..90; the 90-token one is chunked under max_num_batched_tokens=32."""
    return [[3], [5, 6, 7, 8], [100, 200, 300, 17, 42, 9, 9, 1], list(range(10, 100)), list(range(200, 240))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def generate_checked(llm: LLM, params: list[SamplingParams]):
    """Outputs of prompts() with block-manager checks; also the passes of every batch."""
    runner = llm.engine.runner
    original = runner.execute
    calls = []

    def counting(batch, prev=None):
        calls.append(batch.num_passes)
        return original(batch, prev)

    runner.execute = counting
    stats = RunStats()
    try:
        outs = run_checked(llm, prompts(), params, stats)
    finally:
        runner.execute = original
    return outs, stats, calls


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory) -> str:
    """One KV head for 4 query heads (replicated on both ranks) and an untied LM head."""
    return build_checkpoint(str(tmp_path_factory.mktemp("tiny-mqa")), heads=4, kv_heads=1, tie=False)


@pytest.mark.parametrize("layout", ["gqa", "mqa"])
def test_tp2_matches_tp1(layout, tiny_model_dir, mqa_dir):
    path = tiny_model_dir if layout == "gqa" else mqa_dir
    params = [GREEDY] * 4 + [SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True, logprobs=2)]
    results = {}
    for tp in (1, 2):
        llm = LLM(path, tensor_parallel_size=tp, max_num_batched_tokens=32, **CPU)
        if tp == 2:
            assert llm.engine.runner.num_kv_heads == 1  # gqa: 2 KV heads split; mqa: the one KV head copied
            assert llm.engine.runner.model.lm_head.weight.shape[0] == 256  # half the vocabulary
        results[tp] = generate_checked(llm, params)
        llm.shutdown()
    (one, _, _), (two, two_stats, multi_steps) = results[1], results[2]
    assert two_stats.chunked_steps > 0, "no prompt was chunked"
    assert multi_steps and max(multi_steps) > 1, "no multi-step decode ran"
    for i, (a, b) in enumerate(zip(one, two)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, f"prompt {i}"
    lp_one, lp_two = one[-1].outputs[0].logprobs, two[-1].outputs[0].logprobs
    for step_one, step_two in zip(lp_one, lp_two):
        assert step_one.keys() == step_two.keys()
        for tok in step_one:
            assert step_two[tok].logprob == pytest.approx(step_one[tok].logprob, abs=1e-4)


def half(t: torch.Tensor, rank: int, dim: int = 0, copies: int = 1) -> torch.Tensor:
    """Rank `rank`'s share of t split over 2 ranks along dim (copies: ranks holding the same part)."""
    size = t.shape[dim] * copies // 2
    return t.narrow(dim, rank // copies * size, size)


@pytest.mark.parametrize("layout", ["gqa", "mqa"])
def test_each_rank_reads_only_its_shard(layout, tiny_model_dir, mqa_dir, monkeypatch):
    """Rank r's parameters are its slices of the checkpoint, and only 1-D tensors (norms) are
    ever read whole: no process group is needed to load, so both ranks are built here."""
    from safetensors.torch import load_file

    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.distributed.parallel_state import TensorParallelGroup
    from myvllm.kernels.fused_ops import FusedOps
    from myvllm.models.loader import load_checkpoint
    from myvllm.models.qwen3_opt import Qwen3ForCausalLM
    from myvllm.models.weight_utils import CheckpointTensor

    path = tiny_model_dir if layout == "gqa" else mqa_dir
    cfg = ModelConfig.from_hf(path)
    full = load_file(os.path.join(path, "model.safetensors"))
    whole_reads = []
    read = CheckpointTensor.read
    monkeypatch.setattr(CheckpointTensor, "read", lambda self: whole_reads.append(self.shape) or read(self))
    for rank in (0, 1):
        model = Qwen3ForCausalLM(cfg, 64, TorchAttentionBackend(), FusedOps(False, "cpu"), TensorParallelGroup(rank, 2))
        load_checkpoint(model, path, cfg.tie_word_embeddings)
        p = dict(model.named_parameters())
        kv_copies = max(1, 2 // cfg.num_key_value_heads)  # ranks sharing one KV head
        attn = "model.layers.1.self_attn."
        q = half(full[attn + "q_proj.weight"], rank)
        k = half(full[attn + "k_proj.weight"], rank, copies=kv_copies)
        v = half(full[attn + "v_proj.weight"], rank, copies=kv_copies)
        assert torch.equal(p[attn + "qkv_proj.weight"], torch.cat([q, k, v]))
        assert torch.equal(p[attn + "o_proj.weight"], half(full[attn + "o_proj.weight"], rank, dim=1))
        mlp = "model.layers.0.mlp."
        gate_up = torch.cat([half(full[mlp + "gate_proj.weight"], rank), half(full[mlp + "up_proj.weight"], rank)])
        assert torch.equal(p[mlp + "gate_up_proj.weight"], gate_up)
        assert torch.equal(p[mlp + "down_proj.weight"], half(full[mlp + "down_proj.weight"], rank, dim=1))
        assert torch.equal(p["model.embed_tokens.weight"], half(full["model.embed_tokens.weight"], rank))
        if not cfg.tie_word_embeddings:
            assert torch.equal(p["lm_head.weight"], half(full["lm_head.weight"], rank))
    assert whole_reads and all(len(shape) == 1 for shape in whole_reads)


def test_shutdown_and_garbage_collection_stop_the_workers(tiny_model_dir):
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **CPU)
    pids = llm.engine.workers.pids
    assert len(pids) == 1 and alive(pids[0]) and pids[0] != os.getpid()
    with pytest.raises(RuntimeError, match="one such engine per process"):
        LLM(tiny_model_dir, tensor_parallel_size=2, **CPU)
    llm.shutdown()
    assert wait_gone(pids)
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    del llm

    # dropped without shutdown(): collected, the workers stop, and a new engine can start
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **CPU)
    pids = llm.engine.workers.pids
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    gc.collect()
    assert wait_gone(pids)


def _fail_in_mlp(runner, layer: int) -> None:
    """Run in a worker: make its next forward raise inside one layer's MLP."""

    def broken(x):
        raise RuntimeError(f"injected failure in layer {layer} of rank {runner.tp.rank}")

    runner.model.model.layers[layer].mlp.forward = broken


def test_worker_error_reaches_the_caller(tiny_model_dir):
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **CPU)
    pids = llm.engine.workers.pids
    assert llm.engine.workers.call(_fail_in_mlp, 1) == [None]
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed.*Traceback.*injected failure in layer 1 of rank 1"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert wait_gone(pids)
    assert not llm.engine.has_unfinished_requests()  # generate aborted its requests
    with pytest.raises(RuntimeError, match="stopped after an error"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    llm.shutdown()


def test_startup_error_stops_the_workers(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "m")
    shutil.copytree(tiny_model_dir, path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    groups = []
    original = WorkerGroup.__init__

    def recording_init(self, *args, **kwargs):
        groups.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(WorkerGroup, "__init__", recording_init)
    with pytest.raises(ValueError, match=r"lacks.*layers\.1\.mlp\.gate_up_proj"):
        LLM(path, tensor_parallel_size=2, **CPU)
    assert len(groups) == 1 and groups[0].pids
    assert wait_gone(groups[0].pids)


def test_invalid_sizes_are_refused_before_any_process_starts(tiny_model_dir, monkeypatch):
    def no_workers(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(WorkerGroup, "__init__", no_workers)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=4"):
        LLM(tiny_model_dir, tensor_parallel_size=3, **CPU)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 is out of range"):
        LLM(tiny_model_dir, tensor_parallel_size=0, **CPU)
    with pytest.raises(TypeError, match="tensor_parallel_size must be an int"):
        LLM(tiny_model_dir, tensor_parallel_size="2", **CPU)

    base = ModelConfig.builtin("qwen3-8b")  # 32 heads, 8 KV heads, intermediate 12288
    for tp in (1, 2, 4, 8, 16, 32):  # KV heads split up to 8 ranks, replicated beyond
        base.check_tensor_parallel(tp)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=32"):
        base.check_tensor_parallel(3)
    import dataclasses

    odd_kv = dataclasses.replace(base, num_attention_heads=24, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=6 and num_key_value_heads=4: one must divide"):
        odd_kv.check_tensor_parallel(6)
    odd_mlp = dataclasses.replace(base, intermediate_size=12290)
    with pytest.raises(ValueError, match=r"does not divide intermediate_size=12290"):
        odd_mlp.check_tensor_parallel(4)
    assert EngineConfig("x", device="cpu", tensor_parallel_size=4).rank_device(3) == torch.device("cpu")


CTRL_C_SCRIPT = """
import sys
from myvllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, dtype="float32", device="cpu", cpu_kv_cache_gib=0.05,
              kvcache_block_size=16)
    print("pids", *llm.engine.workers.pids, flush=True)
    while True:
        llm.generate([list(range(1, 60))] * 4, SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)
        print("generated", flush=True)
"""


def test_ctrl_c_stops_the_workers(tiny_model_dir, tmp_path):
    """Ctrl-C in another process with a tensor-parallel engine stops its workers; this
    process's engine, on the same host at the same time, is untouched."""
    ours = LLM(tiny_model_dir, tensor_parallel_size=2, **CPU)
    expected = ours.generate([[4, 5, 6]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(CTRL_C_SCRIPT))
    env = {**os.environ, "PYTHONPATH": REPO}
    # a session of its own, so that Ctrl-C can be sent to every process of it, as a terminal does
    proc = subprocess.Popen([sys.executable, str(script), tiny_model_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("pids"), line + proc.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        assert proc.stdout.readline().startswith("generated")  # it is busy generating now
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert wait_gone(pids)
    assert ours.generate([[4, 5, 6]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    ours.shutdown()


def test_async_engine_stops_the_workers_of_its_engine(tiny_model_dir):
    import asyncio

    from myvllm.entrypoints.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(tiny_model_dir, tensor_parallel_size=2, **CPU)
    pids = engine.engine.workers.pids

    async def run():
        return [out async for out in engine.generate([5, 6, 7], GREEDY)][-1]

    engine.start()
    try:
        out = asyncio.run(run())  # steps run on the engine thread, collectives included
    finally:
        engine.stop()
    assert out.finished and len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert wait_gone(pids)


# ---- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_gpu_tp_matches_tp1(tmp_path_factory, tp, enforce_eager):
    """Qwen3-8B's head layout (32 heads, 8 KV heads, head_dim 128) with a small hidden size,
    in float32: TP=tp equals TP=1 greedily, eager and with CUDA graphs (all-reduces captured)."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs, {torch.cuda.device_count()} visible")
    path = build_checkpoint(str(tmp_path_factory.mktemp(f"qwen3-8b-heads-tp{tp}")), num_layers=4, hidden=256,
                            heads=32, kv_heads=8, head_dim=128, intermediate=1024, tie=False)
    gpu = dict(dtype="float32", device="cuda:0", num_kv_blocks=64, kvcache_block_size=16, max_model_len=512,
               max_num_seqs=16, cuda_graph_max_batch_size=16, enforce_eager=enforce_eager)
    batch = [list(range(1 + i, 30 + 17 * i)) for i in range(12)]  # 29..216 tokens
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = {}
    for size in (1, tp):
        llm = LLM(path, tensor_parallel_size=size, **gpu)
        if not enforce_eager:
            assert llm.engine.runner.graph_runner is not None
        outputs[size] = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for i, (a, b) in enumerate(zip(outputs[1], outputs[tp])):
        assert a == b, f"prompt {i}"
