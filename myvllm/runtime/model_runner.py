"""ScheduledBatch -> device tensors + AttentionMetadata -> model -> sampled tokens.

The runner owns the model, the KV cache, the attention backend and (on CUDA, unless
enforce_eager) the decode CUDA graphs; the sampler reads a SamplingMetadata built by
sample/metadata.py. `execute` launches a batch and returns without waiting for the
device; `collect` reads its sampled tokens back (one device-to-host copy per batch, plus
the logprobs when a request asks), so the host can prepare the next batch meanwhile.
A decode-only batch may run several forward passes: pass k+1 reads the tokens pass k
sampled, on the device. A batch with constrained rows (structured outputs) also waits, before
sampling pass k+1 and after launching its forward, for those rows' tokens of pass k alone, so
that their grammars give the next bitmask (sample/structured.py, GrammarWindow); a batch
without them syncs once, when it is collected.

Under tensor parallelism every rank has a runner holding its shard of the model
and of the KV cache. Rank 0's (in the engine's process) sends each batch's inputs to
the others (`workers`), which run the same passes through `forward_passes`; the
layers' collectives keep the ranks in step, and only rank 0 samples.
"""

from __future__ import annotations

import contextlib
import gc
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
from myvllm.models.loader import init_dummy_weights, load_checkpoint
from myvllm.models.registry import model_class
from myvllm.runtime import kv_cache
from myvllm.runtime.compilation import Forward, mark_kv_cache_static, model_forward
from myvllm.runtime.host_copy import HostCopy, host_to_device
from myvllm.runtime.scheduler import ScheduledBatch
from myvllm.runtime.sequence import Sequence
from myvllm.runtime.step_inputs import PromptLogprobRows, StepInputs, build_step_inputs, multi_pass_arrays
from myvllm.sample.metadata import SamplingMetadata, SamplingMetadataBuilder
from myvllm.sample.output import PassOutput, pass_output, prompt_entries, sampled_entries
from myvllm.sample.sampler import Sampler, SamplerOutput, add_token_logprobs
from myvllm.sample.structured import BitmaskFiller, GrammarWindow

logger = logging.getLogger(__name__)

# Prompt logprobs are computed over at most this many rows at a time ([rows, vocab] float32 each).
PROMPT_LOGPROB_ROWS = 1024


@dataclass
class LaunchedBatch:
    """A batch on the device whose sampled tokens are on their way to the host."""

    batch: ScheduledBatch
    sample_rows: list[int]  # batch rows that sample, in the order of the sampled rows
    tokens: torch.Tensor | None  # [num_passes, N] on the device: the token each pass sampled per row
    host_tokens: HostCopy | None  # of tokens
    host_outs: list[HostCopy] | None  # of every pass's SamplerOutput, when a row asks for logprobs
    host_prompt: HostCopy | None = None  # of the prompt tokens' logprobs (a SamplerOutput), if asked for
    prompt_rows: PromptLogprobRows | None = None  # which rows those are
    grammar: GrammarWindow | None = None  # the constrained rows' grammars, when there are some


def _in_flight_columns(in_flight: LaunchedBatch | None, seqs: list[Sequence]) -> np.ndarray:
    """Each seq's column in in_flight.tokens [num_passes, N], the batch computing its tokens in flight."""
    assert in_flight is not None and in_flight.tokens is not None, "tokens in flight without their batch"
    column = {in_flight.batch.seqs[r].seq_id: j for j, r in enumerate(in_flight.sample_rows)}
    return np.array([column[s.seq_id] for s in seqs], dtype=np.int64)


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
        self.kv_dtype = model_config.resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.ops = FusedOps(use_cuda_kernels=config.use_cuda_kernels, device=self.device)
        num_heads = model_config.num_attention_heads // tp.size
        self.backend = create_backend(config.attention_backend, self.device, self.block_size, num_heads,
                                      model_config.head_dim, config.max_num_seqs, max_model_len,
                                      config.kv_cache_dtype)
        start = time.perf_counter()
        with torch.device(self.device), default_dtype(self.dtype):
            self.model = model_class(model_config.architecture)(model_config, max_model_len, self.backend,
                                                                self.ops, tp)
        if checkpoint_path is None:
            init_dummy_weights(self.model, config.seed)
        else:
            load_checkpoint(self.model, checkpoint_path, model_config.tie_word_embeddings)
        self.model.eval()
        self.model_forward = model_forward(self.model, 1 if config.compiles else 0)
        self.tp.barrier()  # every rank loaded (a rank that failed is seen here, before any device collective)
        logger.info("model built and loaded in %.2f s (%s, %s)", time.perf_counter() - start, self.dtype, self.device)
        self.sampler = Sampler()
        self.sampling = SamplingMetadataBuilder(self.device, model_config.vocab_size, config.seed)
        self.bitmask_filler = BitmaskFiller()
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        if config.calculate_kv_scales:
            self.calibrate_kv_scales()
        self.num_blocks = self._allocate_kv_cache()
        if self.device.type == "cuda":
            self.warmup_kernels()
        self.graph_runner = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from myvllm.capture.graph_runner import GraphRunner

            self.graph_runner = GraphRunner(self.model, self.model_forward, self.backend, self.device,
                                            min(config.max_num_seqs, config.cuda_graph_max_batch_size),
                                            max_model_len, self.block_size)
            self.graph_runner.capture_all()

    # ---- KV cache ------------------------------------------------------------------------------

    def _bind_kv_cache(self, cache: torch.Tensor) -> None:
        if self.config.compiles:
            mark_kv_cache_static(cache)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.bind_kv_cache(cache, i)

    @torch.inference_mode()
    def calibrate_kv_scales(self) -> None:
        """calculate_kv_scales: each layer's fp8 K and V scales from one calibration forward with a
        scratch cache of the model's dtype (runtime/kv_cache.py says how)."""
        mc = self.model_config
        inputs, num_blocks = kv_cache.calibration_inputs(self.config, self.max_model_len, mc.vocab_size)
        scratch = kv_cache.allocate_kv_cache(mc.num_hidden_layers, num_blocks, self.block_size, self.num_kv_heads,
                                             mc.head_dim, self.dtype, self.device)
        self._bind_kv_cache(scratch)
        self._forward_eager(inputs)
        scales = kv_cache.kv_scales_from_cache(scratch)  # [2, L]
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_scale.copy_(scales[0, i].expand(self.num_kv_heads))
            attn.v_scale.copy_(scales[1, i].expand(self.num_kv_heads))
        logger.info("fp8 KV scales from %d calibration tokens: K in [%.4g, %.4g], V in [%.4g, %.4g]",
                    inputs.num_tokens, scales[0].min(), scales[0].max(), scales[1].min(), scales[1].max())

    def _allocate_kv_cache(self) -> int:
        cfg, mc = self.config, self.model_config
        per_block = kv_cache.block_bytes(mc.num_hidden_layers, self.block_size, self.num_kv_heads, mc.head_dim,
                                         self.kv_dtype)
        if self.device.type == "cuda":
            peak = self.profile_peak_memory()
            num_blocks = kv_cache.cuda_num_blocks(cfg, per_block, peak, self.device)
        else:
            num_blocks = kv_cache.cpu_num_blocks(cfg, per_block, self.max_model_len)
        num_blocks = self.tp.host_min(num_blocks)  # the scheduler's block ids must be valid on every rank
        kv_cache.check_fits(num_blocks, cfg, self.max_model_len, per_block)
        self.kv_cache = kv_cache.allocate_kv_cache(mc.num_hidden_layers, num_blocks, self.block_size,
                                                   self.num_kv_heads, mc.head_dim, self.kv_dtype, self.device)
        self._bind_kv_cache(self.kv_cache)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s)", num_blocks, self.block_size,
                    num_blocks * self.block_size, num_blocks * per_block / kv_cache.GIB, self.kv_dtype)
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
                                             mc.head_dim, self.kv_dtype, self.device)
        self._bind_kv_cache(scratch)
        num_sampled = min(cfg.max_num_seqs, num_tokens)
        inputs = self._dummy_inputs(lens, lens, decode=False)
        inputs.logits_indices = np.arange(num_tokens - num_sampled, num_tokens, dtype=np.int64)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        # Eager even when compiling: a compiled graph is specialised to the KV cache's size, and
        # this scratch cache is not the one the steps use.
        logits = self._forward_eager(inputs, self.model)
        meta = SamplingMetadata(all_greedy=False, temperatures=torch.ones(num_sampled, device=self.device),
                                generator=self.sampling.generator)
        self.sampler(logits, meta)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, logits
        torch.cuda.empty_cache()
        return peak

    # Batch sizes at which the decode kernel's split count changes (compiled once each).
    WARMUP_DECODE_BATCHES = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128)
    # Query lengths that select each prefill kernel tile configuration.
    WARMUP_PREFILL_LENS = (8, 256)
    # With a compiled forward, also the token counts Dynamo compiles apart (runtime/compilation.py),
    # so that no step compiles a graph mid-run.
    COMPILED_WARMUP_PREFILL_LENS = (1, 2)

    @torch.inference_mode()
    def warmup_kernels(self) -> None:
        """Compile the JIT kernels every step shape uses, before any timed or captured work."""
        start = time.perf_counter()
        compiled = self.COMPILED_WARMUP_PREFILL_LENS if self.config.compiles else ()
        for q_len in (*self.WARMUP_PREFILL_LENS, *compiled):
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

    # ---- one batch -----------------------------------------------------------------------------

    def _forward_eager(self, inputs: StepInputs, model_forward: Forward | None = None) -> torch.Tensor:
        input_ids, positions, meta = inputs.to_device(self.device)
        return self.forward(input_ids, positions, meta, model_forward)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                model_forward: Forward | None = None) -> torch.Tensor:
        """One forward through the model (model_forward, else self.model_forward: the model or it
        compiled) and the LM head: logits [len(meta.logits_indices), vocab]."""
        self.backend.prepare(meta)
        run = self.model_forward if model_forward is None else model_forward
        hidden, residual = run(input_ids, positions, meta)
        return self.model.compute_logits(hidden, residual, meta)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, in_flight: LaunchedBatch | None = None) -> LaunchedBatch:
        """Launch the batch's passes without waiting for them; collect() returns their tokens.
        Sequence i keeps its first batch.passes_kept[i] tokens; past that its rows write nothing
        to the cache. A sequence with tokens in flight (seq.num_inflight_tokens > 0) takes its
        input token from `in_flight`, the batch still computing it, on the device."""
        inputs = build_step_inputs(batch, self.block_size)
        kept = np.asarray(batch.passes_kept, dtype=np.int64)
        if self.workers is not None:
            self.workers.send("forward_passes", inputs, batch.num_passes, kept)
        first_ids = self._in_flight_input_ids(batch, in_flight)
        sample_rows = inputs.sample_rows
        seqs = [batch.seqs[i] for i in sample_rows]
        if not seqs:  # prefill chunks that sample nothing
            prompt = self._run_passes(inputs, batch.num_passes, kept, lambda k, logits: None, first_ids)
            return LaunchedBatch(batch, sample_rows, None, None, None, prompt, inputs.prompt_logprobs)
        meta = self.sampling.build(seqs, batch.num_passes)
        if meta.output_counts is not None:
            self._count_in_flight_tokens(meta, seqs, in_flight)
        grammar = self._grammar_window(seqs, [batch.passes_kept[i] for i in sample_rows], in_flight)
        if grammar is not None:
            meta.grammar_bitmask = grammar.bitmask
        outs: list[SamplerOutput] = []

        def sample(k: int, logits: torch.Tensor) -> torch.Tensor:
            if grammar is not None:  # pass k's forward is launched: the host fills its bitmask meanwhile
                grammar.fill(k)
            outs.append(self.sampler(logits, meta, k))
            if grammar is not None:
                grammar.sampled(k, outs[-1].token_ids)
            return outs[-1].token_ids

        prompt = self._run_passes(inputs, batch.num_passes, kept, sample, first_ids)
        tokens = torch.stack([o.token_ids for o in outs])
        host_outs = [HostCopy(o) for o in outs] if meta.num_logprobs is not None else None
        return LaunchedBatch(batch, sample_rows, tokens, HostCopy(tokens), host_outs, prompt, inputs.prompt_logprobs,
                             grammar)

    def _grammar_window(self, seqs: list[Sequence], passes_kept: list[int],
                        in_flight: LaunchedBatch | None) -> GrammarWindow | None:
        """The GrammarWindow of the sampled seqs, None when none is constrained."""
        if all(s.grammar is None for s in seqs):
            return None
        before = in_flight.grammar if in_flight is not None else None
        watch = self.workers.check if self.workers is not None and self.device.type == "cuda" else None
        return GrammarWindow([s.grammar for s in seqs], [s.num_output_tokens for s in seqs], passes_kept,
                             self.model_config.vocab_size, self.device, self.bitmask_filler, before, watch)

    def collect(self, launched: LaunchedBatch) -> list[PassOutput]:
        """The sampled tokens of a launched batch, one PassOutput per pass (waits for them); the
        first also carries the prompt logprobs the batch computed."""
        outputs = self._collect_passes(launched)
        if launched.grammar is not None:  # the matchers take the last pass's tokens (if no later batch did)
            launched.grammar.finish()
        if launched.host_prompt is not None:
            prompt = launched.prompt_rows
            params = [launched.batch.seqs[i].params for i in prompt.owners]
            outputs[0].prompt_logprobs = prompt_entries(launched.host_prompt.result(), params, prompt.owners)
        return outputs

    def _collect_passes(self, launched: LaunchedBatch) -> list[PassOutput]:
        self._await_workers()
        rows, n = launched.sample_rows, len(launched.batch.seqs)
        if launched.host_outs is not None:
            params = [launched.batch.seqs[i].params for i in rows]
            return [pass_output(*sampled_entries(out.result(), params), rows, n) for out in launched.host_outs]
        if launched.host_tokens is None:  # nothing sampled
            return [pass_output([], [], rows, n)]
        per_pass = launched.host_tokens.result().tolist()  # [num_passes, N]: the batch's one host sync
        return [pass_output(tokens, [None] * len(tokens), rows, n) for tokens in per_pass]

    @torch.inference_mode()
    def forward_passes(self, inputs: StepInputs, num_passes: int, passes_kept: np.ndarray) -> None:
        """A rank > 0's part of execute(): the same passes (its collectives matching rank 0's),
        each pass's tokens received from rank 0; the logits are dropped. No host sync: rank 0
        syncs when it collects the batch, after this rank's all-reduces of the batch and so
        after its copies from the graph runner's staging buffers, which the next batch may
        overwrite."""
        b = inputs.num_tokens

        def receive(k: int, logits: torch.Tensor) -> torch.Tensor:
            return torch.empty(b, dtype=torch.int64, device=self.device)  # filled by the broadcast

        self._run_passes(inputs, num_passes, passes_kept, receive)

    def _in_flight_input_ids(self, batch: ScheduledBatch,
                             in_flight: LaunchedBatch | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids) on the device for the sequences whose last token is still in flight:
        the token in_flight sampled in the last pass each of them kept."""
        rows = [i for i, s in enumerate(batch.seqs) if s.num_inflight_tokens]
        if not rows:
            return None
        cols = _in_flight_columns(in_flight, [batch.seqs[i] for i in rows])
        # the last pass each kept: its tokens in flight are those passes'
        kept = np.array([batch.seqs[i].num_inflight_tokens for i in rows], dtype=np.int64)
        flat = (kept - 1) * in_flight.tokens.shape[1] + cols
        index = host_to_device(flat, self.device)
        return host_to_device(np.asarray(rows, dtype=np.int64), self.device), in_flight.tokens.view(-1)[index]

    def _count_in_flight_tokens(self, meta: SamplingMetadata, seqs: list[Sequence],
                                in_flight: LaunchedBatch | None) -> None:
        """Add the output tokens still in flight (sampled by in_flight, on the device) to the
        penalties' output counts, which the builder made from the tokens the host holds."""
        rows = [j for j, s in enumerate(seqs) if s.num_inflight_tokens]
        if not rows:
            return
        counts = np.array([seqs[j].num_inflight_tokens for j in rows], dtype=np.int64)  # the passes each kept
        cols = np.repeat(_in_flight_columns(in_flight, [seqs[j] for j in rows]), counts)
        passes = np.concatenate([np.arange(n) for n in counts])
        flat = host_to_device(passes * in_flight.tokens.shape[1] + cols, self.device)
        owners = host_to_device(np.repeat(np.asarray(rows, dtype=np.int64), counts), self.device)
        tokens = in_flight.tokens.view(-1)[flat]
        meta.output_counts.index_put_((owners, tokens), torch.ones_like(tokens, dtype=meta.output_counts.dtype),
                                      accumulate=True)

    def _run_passes(self, inputs: StepInputs, num_passes: int, passes_kept: np.ndarray, sample,
                    first_ids: tuple[torch.Tensor, torch.Tensor] | None = None) -> HostCopy | None:
        """The forward passes of a batch. sample(k, logits) gives pass k's tokens [B], the input
        ids of pass k+1; under tensor parallelism rank 0's are broadcast to the other ranks (a
        device collective: the host does not wait for it). first_ids (rows, ids) overrides
        input ids of the first pass with values on the device. Returns the prompt logprobs
        (on their way to the host) when the inputs ask for some."""
        if inputs.prompt_logprobs is not None:  # prefill: one eager pass
            input_ids, positions, meta = inputs.to_device(self.device)
            logits, prompt = self._forward_with_prompt_logprobs(input_ids, positions, meta, inputs)
            sample(0, logits)
            return HostCopy(prompt)
        dev = self.device
        graph = self.graph_runner if self.graph_runner is not None and self.graph_runner.can_run(inputs) else None
        if graph is not None:
            graph.load_host(inputs)
            if first_ids is not None:
                graph.load_input_ids(*first_ids)
        else:
            input_ids, positions, meta = inputs.to_device(dev)
            if first_ids is not None:
                input_ids.index_copy_(0, *first_ids)
        if num_passes > 1:  # one token per sequence
            pass_positions, slots, seq_lens = multi_pass_arrays(inputs, num_passes, passes_kept, self.block_size)
            # [K, 2, B]: pass k's positions and slots are one copy into the graph's inputs
            pos_slots_d = host_to_device(np.stack([pass_positions, slots], axis=1), dev)
            seq_lens_d = host_to_device(seq_lens, dev)
        tokens = None
        for k in range(num_passes):
            if graph is not None:
                if k > 0:
                    graph.load_device(tokens, pos_slots_d[k], seq_lens_d[k])
                logits = graph.replay(inputs.num_tokens)
            else:
                if k > 0:
                    input_ids, positions = tokens, pos_slots_d[k, 0]
                    meta.slot_mapping, meta.seq_lens = pos_slots_d[k, 1], seq_lens_d[k]
                    meta.max_seq_len = int(seq_lens[k].max())
                logits = self.forward(input_ids, positions, meta)
            tokens = sample(k, logits)
            if k + 1 < num_passes:
                self.tp.broadcast(tokens, src=0)
        return None

    def _forward_with_prompt_logprobs(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                                      inputs: StepInputs) -> tuple[torch.Tensor, SamplerOutput]:
        """forward(), plus the logprobs of the prompt tokens inputs.prompt_logprobs names, from the
        raw logits of the rows before them (in slices of PROMPT_LOGPROB_ROWS rows)."""
        self.backend.prepare(meta)
        hidden, residual = self.model_forward(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden, residual, meta)
        wanted = inputs.prompt_logprobs
        rows = host_to_device(wanted.rows, self.device)
        targets = host_to_device(wanted.targets, self.device)
        k = wanted.k
        parts = []
        for start in range(0, rows.shape[0], PROMPT_LOGPROB_ROWS):
            r = rows[start:start + PROMPT_LOGPROB_ROWS]
            raw = torch.log_softmax(self.model.logits(hidden[r], residual[r]).float(), dim=-1)
            part = SamplerOutput(token_ids=targets[start:start + PROMPT_LOGPROB_ROWS])
            add_token_logprobs(part, raw, k)
            parts.append(part)
        return logits, SamplerOutput(
            token_ids=targets, logprobs=torch.cat([p.logprobs for p in parts]),
            ranks=torch.cat([p.ranks for p in parts]),
            top_logprobs=torch.cat([p.top_logprobs for p in parts]) if k > 0 else None,
            top_ids=torch.cat([p.top_ids for p in parts]) if k > 0 else None)

    def _await_workers(self) -> None:
        """Before a host sync on rank 0: wait for the device while watching the other ranks, so
        that a rank that died mid-step raises here instead of leaving a collective waiting."""
        if self.workers is not None:
            self.workers.wait_device(self.device)

    def release(self, seq_ids: list[int]) -> None:
        """Forget per-sequence sampling state of finished sequences."""
        self.sampling.release(seq_ids)

    @property
    def is_closed(self) -> bool:
        return self.model is None

    def close(self) -> None:
        """Free the model, the KV cache and the CUDA graphs now (idempotent); the runner cannot
        run afterwards. The model's parameters refer to their layers' loaders, a cycle that only
        the garbage collector frees: it runs here, so that the device memory is back at once."""
        if self.model is None:
            return
        self.model = self.model_forward = self.graph_runner = self.kv_cache = self.backend = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
