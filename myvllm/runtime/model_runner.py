"""ScheduledBatch -> device tensors + AttentionMetadata -> model -> sampled tokens.

The runner owns the model, the KV cache, the attention backend, the sampler and
(on CUDA, unless enforce_eager) the decode CUDA graphs. One device-to-host copy
per step brings the sampled ids back (plus the logprobs, when a request asks);
decode-only batches are launched without waiting for it (launch_decode) and
collected later (collect), so the host can prepare the next batch meanwhile.

Under tensor parallelism every rank has a runner holding its shard of the model
and of the KV cache. Rank 0's (in the engine's process) sends each step's inputs to
the others (`workers`), which run the same forward through `forward_step` /
`forward_multi_step`; the layers' collectives keep the ranks in step, and only
rank 0 samples.
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
from myvllm.runtime.host_copy import HostCopy
from myvllm.runtime.scheduler import ScheduledBatch
from myvllm.runtime.sequence import Sequence
from myvllm.runtime.step_inputs import StepInputs, build_step_inputs, host_to_device, multi_step_arrays

logger = logging.getLogger(__name__)

# Seeds of the fused sampler (62-bit, so they and their increments fit int64): SEED_MIX spreads user seeds apart,
# and each sampling call of the engine owns ROWS_PER_CALL consecutive seeds.
SEED_MIX = 0x9E3779B97F4A7C15 >> 1
ROWS_PER_CALL = 1 << 20
SEED_MASK = (1 << 62) - 1


@dataclass
class DecodeWindow:
    """A launched decode-only batch whose tokens are on their way to the host."""

    batch: ScheduledBatch
    tokens: torch.Tensor  # [num_steps, B] on the device: the token each pass sampled per row
    host_tokens: HostCopy  # of tokens
    host_outs: list[HostCopy] | None  # of every pass's SamplerOutput, when a row asks for logprobs


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
                 checkpoint_path: str | None, tp: TensorParallelGroup = SINGLE, workers=None) -> None:
        """tp: this rank's group. workers (rank 0 of a tensor-parallel engine only): the
        runtime.workers.WorkerGroup of the other ranks, which get every step's inputs."""
        self.config = config
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.block_size = config.kvcache_block_size
        self.tp = tp
        self.workers = workers
        self.device = config.rank_device(tp.rank)
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
        self.tp.barrier()  # every rank loaded (a rank that failed is seen here, before any device collective)
        logger.info("model built and loaded in %.2f s (%s, %s)", time.perf_counter() - start, self.dtype, self.device)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.seq_generators: dict[int, torch.Generator] = {}
        self._sample_calls = 0
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.num_blocks = self._allocate_kv_cache()
        if self.device.type == "cuda":
            self.warmup_kernels()
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
        num_blocks = self.tp.host_min(num_blocks)  # the scheduler's block ids must be valid on every rank
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
        # A one-block scratch cache: nothing is written (slot -1), reads stay in block 0.
        scratch = kv_cache.allocate_kv_cache(mc.num_hidden_layers, 1, self.block_size, self.num_kv_heads,
                                             mc.head_dim, self.dtype, self.device)
        self._bind_kv_cache(scratch)
        num_sampled = min(cfg.max_num_seqs, num_tokens)
        inputs = self._dummy_inputs(lens, lens, decode=False)
        inputs.logits_indices = np.arange(num_tokens - num_sampled, num_tokens, dtype=np.int64)
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

    # Batch sizes at which the decode kernel's split count changes (compiled once each).
    WARMUP_DECODE_BATCHES = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128)
    # Query lengths that select each prefill kernel tile configuration.
    WARMUP_PREFILL_LENS = (8, 256)

    @torch.inference_mode()
    def warmup_kernels(self) -> None:
        """Compile the JIT kernels every step shape uses, before any timed or captured work."""
        start = time.perf_counter()
        for q_len in self.WARMUP_PREFILL_LENS:
            q_len = min(q_len, self.max_model_len)
            self._forward_eager(self._dummy_inputs([q_len], [q_len], decode=False))
        for batch in self.WARMUP_DECODE_BATCHES:
            if batch <= self.config.max_num_seqs:
                self._forward_eager(self._dummy_inputs([1] * batch, [1] * batch, decode=True))
        torch.cuda.synchronize(self.device)
        logger.info("kernels warmed up in %.2f s", time.perf_counter() - start)

    def _dummy_inputs(self, new_tokens: list[int], seq_lens: list[int], decode: bool) -> StepInputs:
        """Inputs that write nothing to the cache (slot -1) and read only block 0."""
        num_tokens = sum(new_tokens)
        qsl = np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32)
        blocks = -(-max(seq_lens) // self.block_size)
        return StepInputs(
            input_ids=np.zeros(num_tokens, dtype=np.int64),
            positions=np.concatenate([np.arange(s - n, s) for n, s in zip(new_tokens, seq_lens)]).astype(np.int64),
            slot_mapping=np.full(num_tokens, -1, dtype=np.int64),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            query_start_loc=qsl,
            block_tables=np.zeros((len(seq_lens), blocks), dtype=np.int32),
            logits_indices=qsl[1:].astype(np.int64) - 1,
            sample_rows=[],
            max_query_len=max(new_tokens),
            max_seq_len=max(seq_lens),
            is_decode_only=decode,
        )

    # ---- one step ------------------------------------------------------------------------------

    def _forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        input_ids, positions, meta = inputs.to_device(self.device)
        return self.forward(input_ids, positions, meta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One forward through the model and LM head: logits [len(meta.logits_indices), vocab]."""
        self.backend.prepare(meta)
        hidden, residual = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden, residual, meta)

    def _step_logits(self, inputs: StepInputs, padded_batch_size: int) -> torch.Tensor:
        if self.graph_runner is not None and self.graph_runner.can_run(inputs, padded_batch_size):
            return self.graph_runner.run(inputs, padded_batch_size)
        return self._forward_eager(inputs)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        inputs = build_step_inputs(batch, self.block_size)
        if self.workers is not None:
            self.workers.send("forward_step", inputs, batch.padded_batch_size)
        logits = self._step_logits(inputs, batch.padded_batch_size)
        sampling_seqs = [batch.seqs[i] for i in inputs.sample_rows]
        result = self.sample(logits, sampling_seqs)
        tokens: list[int | None] = [None] * len(batch.seqs)
        logprobs: list = [None] * len(batch.seqs)
        for row, token, lp in zip(inputs.sample_rows, result.token_ids, result.logprobs):
            tokens[row] = token
            logprobs[row] = lp
        return StepResult(tokens, logprobs)

    @torch.inference_mode()
    def forward_step(self, inputs: StepInputs, padded_batch_size: int) -> None:
        """A rank > 0's part of execute(): the same forward (its collectives matching rank 0's);
        the logits are dropped, rank 0 samples. No host sync: rank 0 syncs at the end of every
        decode step, after this rank's all-reduces of the step and so after its copies from the
        graph runner's staging buffers, which the next step may overwrite."""
        self._step_logits(inputs, padded_batch_size)

    @torch.inference_mode()
    def launch_decode(self, batch: ScheduledBatch, prev: DecodeWindow | None = None) -> DecodeWindow:
        """Enqueue batch.num_steps decode passes of a decode-only batch without waiting for them;
        pass k+1 reads the tokens pass k sampled on the device. Sequence i keeps its first
        batch.limits[i] tokens; past that its rows write nothing to the cache.

        A sequence with tokens in flight (seq.num_inflight_tokens > 0) takes its input token
        from `prev`, the window still computing it, on the device. collect() returns the tokens."""
        inputs = build_step_inputs(batch, self.block_size)
        num_steps = batch.num_steps
        limits = np.asarray(batch.limits, dtype=np.int64)
        if self.workers is not None:
            self.workers.send("forward_multi_step", inputs, batch.padded_batch_size, num_steps, limits)
        first_ids = self._inflight_input_ids(batch, prev)
        st = self.sampling_tensors(batch.seqs, num_passes=num_steps)
        pass_seeds = st.fused_seeds  # [num_steps, B] or None
        outs: list[SamplerOutput] = []

        def sample(k: int, logits: torch.Tensor) -> torch.Tensor:
            if pass_seeds is not None:
                st.fused_seeds = pass_seeds[k]
            outs.append(self.sampler(logits, st))
            return outs[-1].token_ids

        self._decode_passes(inputs, batch.padded_batch_size, num_steps, limits, sample, first_ids)
        tokens = torch.stack([o.token_ids for o in outs])
        host_outs = [HostCopy(o) for o in outs] if st.num_logprobs is not None else None
        return DecodeWindow(batch, tokens, HostCopy(tokens), host_outs)

    def _inflight_input_ids(self, batch: ScheduledBatch,
                            prev: DecodeWindow | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids) on the device for the sequences whose last token is still in flight:
        the token prev sampled in the last pass each of them kept."""
        rows = [i for i, s in enumerate(batch.seqs) if s.num_inflight_tokens]
        if not rows:
            return None
        assert prev is not None, "tokens in flight without the window computing them"
        prev_row = {s.seq_id: i for i, s in enumerate(prev.batch.seqs)}
        prev_rows = np.array([prev_row[batch.seqs[i].seq_id] for i in rows], dtype=np.int64)
        prev_limits = np.asarray(prev.batch.limits, dtype=np.int64)
        flat = (prev_limits[prev_rows] - 1) * prev.tokens.shape[1] + prev_rows
        index = host_to_device(flat, self.device)
        return host_to_device(np.asarray(rows, dtype=np.int64), self.device), prev.tokens.view(-1)[index]

    def collect(self, window: DecodeWindow) -> list[StepResult]:
        """The results of a launched window, one per pass (waits for its tokens)."""
        self._await_workers()
        seqs = window.batch.seqs
        if window.host_outs is not None:
            return [self._results(out.result(), seqs) for out in window.host_outs]
        return [StepResult(tokens, [None] * len(seqs)) for tokens in window.host_tokens.result().tolist()]

    @torch.inference_mode()
    def forward_multi_step(self, inputs: StepInputs, padded_batch_size: int, num_steps: int,
                           step_limits: np.ndarray) -> None:
        """A rank > 0's part of launch_decode(): the same passes, each pass's tokens
        received from rank 0."""
        b = inputs.num_tokens

        def receive(k: int, logits: torch.Tensor) -> torch.Tensor:
            return torch.empty(b, dtype=torch.int64, device=self.device)  # filled by the broadcast

        self._decode_passes(inputs, padded_batch_size, num_steps, step_limits, receive)

    def _decode_passes(self, inputs: StepInputs, padded_batch_size: int, num_steps: int, limits: np.ndarray,
                       sample, first_ids: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The forward passes of a multi-step decode. sample(k, logits) gives pass k's tokens [B],
        the input ids of pass k+1; under tensor parallelism rank 0's are broadcast to the other
        ranks (a device collective: the host does not wait for it). first_ids (rows, ids)
        overrides input ids of the first pass with values on the device."""
        b = inputs.num_tokens  # one token per sequence
        positions, slots, seq_lens = multi_step_arrays(inputs, num_steps, limits, self.block_size)
        dev = self.device
        # [K, 2, B]: pass k's positions and slots are one copy into the graph's inputs
        pos_slots_d = host_to_device(np.stack([positions, slots], axis=1), dev)
        seq_lens_d = host_to_device(seq_lens, dev)
        graph = self.graph_runner if (self.graph_runner is not None
                                      and self.graph_runner.can_run(inputs, padded_batch_size)) else None
        if graph is not None:
            graph.load_host(inputs, padded_batch_size)
            if first_ids is not None:
                graph.load_input_ids(*first_ids)
        else:
            input_ids, _, meta = inputs.to_device(dev)
            if first_ids is not None:
                input_ids.index_copy_(0, *first_ids)
        tokens = None
        for k in range(num_steps):
            if graph is not None:
                if k > 0:
                    graph.load_device(tokens, pos_slots_d[k], seq_lens_d[k])
                logits = graph.replay(b, padded_batch_size)
            else:
                if k > 0:
                    input_ids = tokens
                    meta.slot_mapping, meta.seq_lens = pos_slots_d[k, 1], seq_lens_d[k]
                    meta.max_seq_len = int(seq_lens[k].max())
                logits = self.forward(input_ids, pos_slots_d[k, 0], meta)
            tokens = sample(k, logits)
            if k + 1 < num_steps:
                self.tp.broadcast(tokens, src=0)

    def _await_workers(self) -> None:
        """Before a host sync on rank 0: wait for the device while watching the other ranks, so
        that a rank that died mid-step raises here instead of leaving a collective waiting."""
        if self.workers is not None:
            self.workers.wait_device(self.device)

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

    def _row_seeds(self, seqs: list[Sequence], num_passes: int | None = None) -> np.ndarray:
        """Philox seeds of the fused sampler [B]: a seeded sequence's depend only on its seed and
        its token index; the others on the engine seed and a per-call counter. With num_passes
        (a multi-step decode), every pass's seeds [num_passes, B]: pass k draws seeded rows at
        token index + k and the others k sampler calls later."""
        self._sample_calls += 1
        base = (self.config.seed * SEED_MIX + self._sample_calls * ROWS_PER_CALL) & SEED_MASK
        seeds = np.arange(base, base + len(seqs), dtype=np.int64)
        for i, s in enumerate(seqs):
            if s.seed is not None:
                seeds[i] = (s.seed * SEED_MIX + s.num_output_tokens) & SEED_MASK
        if num_passes is None:
            return seeds
        seeded = np.fromiter((s.seed is not None for s in seqs), dtype=bool, count=len(seqs))
        step = np.where(seeded, 1, ROWS_PER_CALL).astype(np.int64)
        self._sample_calls += num_passes - 1
        return seeds[None, :] + np.arange(num_passes, dtype=np.int64)[:, None] * step[None, :]

    def _masked_sampling_tensors(self, st: SamplingTensors, seqs: list[Sequence], greedy: np.ndarray) -> None:
        """Inputs of the torch sampling path (top-k / top-p / min-p, generators for seeds)."""
        dev = self.device
        params = [s.params for s in seqs]
        if greedy.any():
            st.greedy = host_to_device(greedy, dev)
        vocab = self.model_config.vocab_size
        if any(p.top_k_enabled for p in params):
            st.top_k = host_to_device(np.array([p.top_k if p.top_k_enabled else vocab for p in params]), dev)
        if any(p.top_p < 1.0 for p in params):
            st.top_p = host_to_device(np.array([p.top_p for p in params], dtype=np.float32), dev)
        if any(p.min_p > 0.0 for p in params):
            st.min_p = host_to_device(np.array([p.min_p for p in params], dtype=np.float32), dev)
        seeded = [(i, self._generator_for(s)) for i, s in enumerate(seqs) if s.seed is not None and not greedy[i]]
        st.seeded = seeded or None

    def sampling_tensors(self, seqs: list[Sequence], num_passes: int | None = None) -> SamplingTensors:
        """The step's sampling inputs. With num_passes (a multi-step decode), fused_seeds holds
        every pass's seeds [num_passes, B] (see _row_seeds)."""
        dev = self.device
        params = [s.params for s in seqs]
        greedy = np.fromiter((p.is_greedy for p in params), dtype=bool, count=len(params))
        all_greedy = bool(greedy.all())
        st = SamplingTensors(temperatures=None, greedy=None, all_greedy=all_greedy, generator=self.generator)
        if not all_greedy:
            temps = np.fromiter((p.temperature for p in params), dtype=np.float32, count=len(params))
            masked = any(p.top_k_enabled or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
            if dev.type == "cuda" and not masked:
                temps[greedy] = 0.0
                st.fused_temperatures = host_to_device(temps, dev)
                st.fused_seeds = host_to_device(self._row_seeds(seqs, num_passes), dev)
            else:
                temps[greedy] = 1.0
                st.temperatures = host_to_device(temps, dev)
                self._masked_sampling_tensors(st, seqs, greedy)
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
        out = self.sampler(logits, self.sampling_tensors(seqs))
        self._await_workers()
        return self._results(out, seqs)

    @staticmethod
    def _results(out: SamplerOutput, seqs: list[Sequence]) -> StepResult:
        """Host lists of a sampler output (device tensors are read with one sync)."""
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
