"""ScheduledBatch -> device tensors + AttentionMetadata -> model -> sampled tokens.

The runner owns the model, the KV cache, the attention backend, the sampler and
(on CUDA, unless enforce_eager) the decode CUDA graphs. One device-to-host copy
per step brings the sampled ids back (plus the logprobs, when a request asks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from myvllm.attention.backend import AttentionMetadata
from myvllm.attention.selector import create_backend
from myvllm.config import EngineConfig, ModelConfig
from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.kernels.fused_ops import FusedOps
from myvllm.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from myvllm.models.loader import init_dummy_weights, load_checkpoint
from myvllm.models.qwen3_opt import Qwen3ForCausalLM
from myvllm.outputs import Logprob
from myvllm.runtime import kv_cache
from myvllm.runtime.scheduler import ScheduledBatch
from myvllm.runtime.sequence import Sequence
from myvllm.runtime.step_inputs import StepInputs, build_step_inputs, host_to_device

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Per scheduled sequence: its new token (None if its chunk did not end its tokens)."""

    token_ids: list[int | None]
    logprobs: list[tuple[float, dict[int, Logprob]] | None]  # (sampled logprob, entries) per seq


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 checkpoint_path: str | None, tp: TensorParallelGroup = SINGLE) -> None:
        self.config = config
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.block_size = config.kvcache_block_size
        self.device = config.torch_device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = model_config.resolve_dtype(config.dtype)
        self.ops = FusedOps(use_cuda_kernels=config.use_cuda_kernels, device=self.device)
        num_heads = model_config.num_attention_heads // tp.size
        self.backend = create_backend(config.attention_backend, self.device, self.block_size, num_heads,
                                      model_config.head_dim, config.max_num_seqs, max_model_len)
        start = time.perf_counter()
        with torch.device(self.device), default_dtype(self.dtype):
            self.model = Qwen3ForCausalLM(model_config, max_model_len, self.backend, self.ops, tp)
        if checkpoint_path is None:
            init_dummy_weights(self.model, config.seed)
        else:
            load_checkpoint(self.model, checkpoint_path, model_config.tie_word_embeddings)
        self.model.eval()
        logger.info("model built and loaded in %.2f s (%s, %s)", time.perf_counter() - start, self.dtype, self.device)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.seq_generators: dict[int, torch.Generator] = {}
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.num_blocks = self._allocate_kv_cache()
        self.graph_runner = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from myvllm.capture.graph_runner import GraphRunner

            self.graph_runner = GraphRunner(self, config)
            self.graph_runner.capture_all()

    # ---- KV cache ------------------------------------------------------------------------------

    def _bind_kv_cache(self, cache: torch.Tensor) -> None:
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = cache[0, i], cache[1, i]

    def _allocate_kv_cache(self) -> int:
        cfg, mc = self.config, self.model_config
        per_block = kv_cache.block_bytes(mc.num_hidden_layers, self.block_size, self.num_kv_heads, mc.head_dim,
                                         self.dtype)
        if self.device.type == "cuda":
            peak = self.profile_peak_memory()
            num_blocks = kv_cache.cuda_num_blocks(cfg, per_block, peak, self.device)
        else:
            num_blocks = kv_cache.cpu_num_blocks(cfg, per_block, self.max_model_len)
        kv_cache.check_fits(num_blocks, cfg, self.max_model_len, per_block)
        self.kv_cache = kv_cache.allocate_kv_cache(mc.num_hidden_layers, num_blocks, self.block_size,
                                                   self.num_kv_heads, mc.head_dim, self.dtype, self.device)
        self._bind_kv_cache(self.kv_cache)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.block_size, num_blocks * per_block / kv_cache.GIB)
        return num_blocks

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Peak bytes of one forward of max_num_batched_tokens tokens (plus sampling of max_num_seqs rows)."""
        cfg, mc = self.config, self.model_config
        num_tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * self.max_model_len)
        seq_len = min(self.max_model_len, num_tokens)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        blocks_per_seq = -(-seq_len // self.block_size)
        # A one-block scratch cache: nothing is written (slot -1), reads stay in block 0.
        scratch = kv_cache.allocate_kv_cache(mc.num_hidden_layers, 1, self.block_size, self.num_kv_heads,
                                             mc.head_dim, self.dtype, self.device)
        self._bind_kv_cache(scratch)
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        num_sampled = min(cfg.max_num_seqs, num_tokens)
        inputs = StepInputs(
            input_ids=np.zeros(num_tokens, dtype=np.int64),
            positions=np.concatenate([np.arange(n) for n in lens]).astype(np.int64),
            slot_mapping=np.full(num_tokens, -1, dtype=np.int64),
            seq_lens=np.asarray(lens, dtype=np.int32),
            query_start_loc=qsl,
            block_tables=np.zeros((len(lens), blocks_per_seq), dtype=np.int32),
            logits_indices=np.arange(num_tokens - num_sampled, num_tokens, dtype=np.int64),
            sample_rows=[],
            max_query_len=max(lens),
            max_seq_len=max(lens),
            is_decode_only=False,
        )
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        logits = self._forward_eager(inputs)
        st = SamplingTensors(temperatures=torch.ones(num_sampled, device=self.device), greedy=None,
                             all_greedy=False, generator=self.generator)
        self.sampler(logits, st)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, logits
        torch.cuda.empty_cache()
        return peak

    # ---- one step ------------------------------------------------------------------------------

    def _forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        input_ids, positions, meta = inputs.to_device(self.device)
        return self.forward(input_ids, positions, meta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One forward through the model and LM head: logits [len(meta.logits_indices), vocab]."""
        self.backend.prepare(meta)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden, meta)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        inputs = build_step_inputs(batch, self.block_size)
        if self.graph_runner is not None and self.graph_runner.can_run(inputs, batch.padded_batch_size):
            logits = self.graph_runner.run(inputs, batch.padded_batch_size)
        else:
            logits = self._forward_eager(inputs)
        sampling_seqs = [batch.seqs[i] for i in inputs.sample_rows]
        result = self.sample(logits, sampling_seqs)
        tokens: list[int | None] = [None] * len(batch.seqs)
        logprobs: list = [None] * len(batch.seqs)
        for row, token, lp in zip(inputs.sample_rows, result.token_ids, result.logprobs):
            tokens[row] = token
            logprobs[row] = lp
        return StepResult(tokens, logprobs)

    @torch.inference_mode()
    def execute_multi_step(self, batch: ScheduledBatch) -> list[StepResult]:
        """Run batch.num_steps decode passes; pass k+1 reads the tokens pass k sampled on the
        device, so the host syncs once, at the end. Sequence i keeps its first
        batch.step_limits[i] tokens; past that its rows write nothing to the cache."""
        inputs = build_step_inputs(batch, self.block_size)
        num_steps, b = batch.num_steps, len(batch.seqs)
        limits = np.asarray(batch.step_limits, dtype=np.int64)
        # [K, B] per-pass positions, slots and lengths; passes past a seq's limit repeat its
        # last valid position with slot -1
        offset = np.minimum(np.arange(num_steps)[:, None], limits[None, :] - 1)
        positions = inputs.positions[None, :] + offset
        seq_lens = (inputs.seq_lens[None, :] + offset).astype(np.int32)
        rows = np.broadcast_to(np.arange(b), positions.shape)
        slots = inputs.block_tables[rows, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size
        slots[np.arange(num_steps)[:, None] >= limits[None, :]] = -1
        dev = self.device
        positions_d, slots_d, seq_lens_d = (host_to_device(a, dev) for a in (positions, slots, seq_lens))
        st = self.sampling_tensors(batch.seqs)
        graph = self.graph_runner if (self.graph_runner is not None
                                      and self.graph_runner.can_run(inputs, batch.padded_batch_size)) else None
        outs: list[SamplerOutput] = []
        if graph is not None:
            graph.load_host(inputs, batch.padded_batch_size)
        else:
            input_ids, _, meta = inputs.to_device(dev)
        for k in range(num_steps):
            if graph is not None:
                if k > 0:
                    graph.load_device(outs[-1].token_ids, positions_d[k], slots_d[k], seq_lens_d[k])
                logits = graph.replay(b, batch.padded_batch_size)
            else:
                if k > 0:
                    input_ids = outs[-1].token_ids
                    meta.slot_mapping, meta.seq_lens = slots_d[k], seq_lens_d[k]
                    meta.max_seq_len = int(seq_lens[k].max())
                logits = self.forward(input_ids, positions_d[k], meta)
            outs.append(self.sampler(logits, st))
        return [self._to_host(out, batch.seqs) for out in outs] if st.num_logprobs is not None else \
            [StepResult(tokens, [None] * b) for tokens in torch.stack([o.token_ids for o in outs]).tolist()]

    # ---- sampling ------------------------------------------------------------------------------

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        gen = self.seq_generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.seed)
            self.seq_generators[seq.seq_id] = gen
        return gen

    def release(self, seq_ids: list[int]) -> None:
        """Forget per-sequence sampling state of finished sequences."""
        for seq_id in seq_ids:
            self.seq_generators.pop(seq_id, None)

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        dev = self.device
        params = [s.params for s in seqs]
        greedy = np.fromiter((p.is_greedy for p in params), dtype=bool, count=len(params))
        all_greedy = bool(greedy.all())
        st = SamplingTensors(temperatures=None, greedy=None, all_greedy=all_greedy, generator=self.generator)
        if not all_greedy:
            temps = np.fromiter((p.temperature for p in params), dtype=np.float32, count=len(params))
            temps[greedy] = 1.0
            st.temperatures = host_to_device(temps, dev)
            if greedy.any():
                st.greedy = host_to_device(greedy, dev)
            vocab = self.model_config.vocab_size
            if any(p.top_k_enabled for p in params):
                st.top_k = host_to_device(np.array([p.top_k if p.top_k_enabled else vocab for p in params]), dev)
            if any(p.top_p < 1.0 for p in params):
                st.top_p = host_to_device(np.array([p.top_p for p in params], dtype=np.float32), dev)
            if any(p.min_p > 0.0 for p in params):
                st.min_p = host_to_device(np.array([p.min_p for p in params], dtype=np.float32), dev)
            seeded = [(i, self._generator_for(s)) for i, s in enumerate(seqs)
                      if s.seed is not None and not greedy[i]]
            st.seeded = seeded or None
        banned = [(i, t) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                  for t in s.min_tokens_banned]
        if banned:
            pairs = np.array(banned, dtype=np.int64)
            st.banned_rows = host_to_device(pairs[:, 0], dev)
            st.banned_tokens = host_to_device(pairs[:, 1], dev)
        asks = [p.logprobs for p in params if p.logprobs is not None]
        st.num_logprobs = max(asks) if asks else None
        return st

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> StepResult:
        if not seqs:
            return StepResult([], [])
        return self._to_host(self.sampler(logits, self.sampling_tensors(seqs)), seqs)

    def _to_host(self, out: SamplerOutput, seqs: list[Sequence]) -> StepResult:
        if out.logprobs is None:
            return StepResult(out.token_ids.tolist(), [None] * len(seqs))  # the step's one host sync
        token_ids = out.token_ids.tolist()
        chosen, ranks = out.logprobs.tolist(), out.ranks.tolist()
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else [[] for _ in seqs]
        top_ids = out.top_ids.tolist() if out.top_ids is not None else [[] for _ in seqs]
        entries: list = []
        for i, seq in enumerate(seqs):
            k = seq.params.logprobs
            if k is None:
                entries.append(None)
                continue
            d = {tid: Logprob(lp, r + 1) for r, (tid, lp) in enumerate(zip(top_ids[i][:k], top_lp[i][:k]))}
            d.setdefault(token_ids[i], Logprob(chosen[i], ranks[i]))
            entries.append((chosen[i], d))
        return StepResult(token_ids, entries)
