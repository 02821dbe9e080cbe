"""LLMEngine: requests in, one scheduled batch at a time, RequestOutputs out.

    add_request -> InputProcessor.process (tokenize + validate once) -> n Sequences -> scheduler
    step        -> scheduler.schedule -> runner.execute -> scheduler.launched
                   -> scheduler.update_from_output (tokens, stop checks) -> outputs
    abort_request frees a request's blocks wherever it is (waiting, running, preempted).

A launched batch's tokens are read back after the next batch has been launched when the
scheduler allows it (async_scheduling: a decode-only batch whose successor needs none of its
values on the host); the host's work between batches then overlaps the device's. The engine
holds that one batch in flight; the scheduler decides what may run ahead of it.

With tensor_parallel_size N > 1 the engine starts N - 1 worker processes (runtime.workers)
holding the other shards of the model; the scheduler, the sampler and this object stay in
the calling process (rank 0). shutdown() stops the workers and frees the device memory; it
also runs when the engine is garbage-collected and at interpreter exit. An exception
escaping a step stops the workers too.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from dataclasses import dataclass, field

from myvllm.config import EngineConfig, ModelConfig
from myvllm.models.resolve import load_generation_eos, load_tokenizer, resolve_model
from myvllm.outputs import CompletionOutput, RequestOutput
from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.detokenizer import decode_new_text, fast_decoder
from myvllm.runtime.generation_defaults import load_generation_defaults, log_generation_defaults
from myvllm.runtime.input_processor import InputProcessor, ProcessedRequest, PromptType
from myvllm.runtime.model_runner import LaunchedBatch, ModelRunner
from myvllm.runtime.scheduler import Scheduler
from myvllm.runtime.sequence import Sequence, StopState
from myvllm.runtime.stop_checker import StopChecker
from myvllm.sample.structured import StructuredOutputs
from myvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "PromptType", "RequestState"]


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    stream: bool = False  # step() also reports this request while it runs

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        resolved = resolve_model(config)
        self.model_config: ModelConfig = resolved.model_config
        # SamplingParams field -> default, from generation_config.json (used where the caller gives no value)
        self.default_sampling = load_generation_defaults(config, resolved.path)
        log_generation_defaults(config, self.default_sampling)
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        if self.max_model_len < config.max_model_len:
            logger.info("max_model_len lowered to the model's max_position_embeddings=%d", self.max_model_len)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config, resolved)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if resolved.path is not None:
            self.eos_token_ids |= load_generation_eos(resolved.path)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        checkpoint = None if config.load_format == "dummy" else resolved.path
        self.model_config.check_tensor_parallel(config.tensor_parallel_size)
        self.workers = None
        if config.tensor_parallel_size == 1:
            self.runner = ModelRunner(config, self.model_config, self.max_model_len, checkpoint)
        else:
            from myvllm.runtime.workers import WorkerGroup

            self.workers = WorkerGroup(config, self.model_config, self.max_model_len, checkpoint)
            self._finalizer = weakref.finalize(self, self.workers.shutdown)
            with self.workers.guard():
                self.runner = ModelRunner(config, self.model_config, self.max_model_len, checkpoint,
                                          self.workers.tp, self.workers)
                self.workers.wait_ready()
        self.block_manager = BlockManager(self.runner.num_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.processor = InputProcessor(self.tokenizer, self.model_config, self.max_model_len, self.block_manager,
                                        config.max_logprobs, config.max_n, config.tensor_parallel_size)
        self.decoder = fast_decoder(self.tokenizer) if self.tokenizer is not None else None
        stop_checker = StopChecker(self.eos_token_ids, self.max_model_len, self.decoder)
        # Batches run ahead of the one in flight only without tensor parallelism, where the other
        # ranks would need the tokens in flight too.
        self.async_scheduling = config.async_scheduling and config.tensor_parallel_size == 1
        self.scheduler = Scheduler(self.block_manager, stop_checker, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len, config.num_decode_passes,
                                   self.async_scheduling)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.requests: dict[str, RequestState] = {}
        self._in_flight: LaunchedBatch | None = None  # launched, output not yet applied
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._request_ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------------

    def next_request_id(self) -> str:
        """The next number not taken by a request in the engine (callers may pick ids too)."""
        while True:
            request_id = str(next(self._request_ids))
            if request_id not in self.requests:
                return request_id

    def add_request(self, prompt: PromptType | ProcessedRequest, params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = False) -> str:
        """Validate and queue one request; returns its id. Raises before queueing anything.
        A ProcessedRequest (from self.processor.process) is queued as it is.

        With stream=True, step() returns this request's output (text so far) after every
        step that gave it tokens, not only when it finishes."""
        request = self.processor.process(prompt, params)
        request_id = self.next_request_id() if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = request.params
        spec = params.structured_outputs
        grammars = [self.structured.grammar(spec) for _ in range(params.n)] if spec is not None else None
        state = RequestState(request_id, request.prompt, request.prompt_token_ids, params, stream=stream)
        banned = sorted(set(params.stop_token_ids or []) | (set() if params.ignore_eos else self.eos_token_ids))
        arrival = next(self._arrivals)
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(next(self._seq_ids), request_id, request.prompt_token_ids, params, index=i, seed=seed,
                           arrival=arrival)
            seq.min_tokens_banned = banned if params.min_tokens else []
            seq.grammar = grammars[i] if grammars is not None else None
            state.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = state
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its partial output."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        self.runner.release([s.seq_id for s in state.seqs])
        return self._make_output(state)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def num_waiting_requests(self) -> int:
        """Requests with a sequence not yet scheduled (waiting or preempted)."""
        return len({seq.request_id for seq in self.scheduler.waiting})

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of requests that finished in it (and of streaming
        requests that progressed)."""
        if self.runner.is_closed:
            raise RuntimeError("the engine is shut down: make a new one")
        if self.workers is None:
            received = self._step()
        else:
            with self.workers.guard():
                received = self._step()
        finished: dict[str, RequestState] = {}
        streaming: dict[str, RequestState] = {}
        for seq in received:
            state = self.requests[seq.request_id]
            if state.finished:
                finished[state.request_id] = state
            elif state.stream:
                streaming[state.request_id] = state
        outputs = []
        for state in finished.values():
            del self.requests[state.request_id]
            self.runner.release([s.seq_id for s in state.seqs])
            outputs.append(self._make_output(state))
        outputs.extend(self._make_output(state) for state in streaming.values())
        return outputs

    def _step(self) -> list[Sequence]:
        """Schedule and launch the next batch (ahead of the one in flight, if the scheduler allows
        it), then apply the outputs that are due: the batch in flight before, and the new batch
        unless it may stay in flight. A step that raises before launching leaves the engine as it
        was: the batch in flight stays so, and nothing is applied twice. Returns the sequences
        that received tokens."""
        prev = self._in_flight
        batch = self.scheduler.schedule()
        due = [prev] if prev is not None else []
        self._in_flight = None
        if batch is not None:
            try:
                launched = self.runner.execute(batch, prev)
            except BaseException:
                self._in_flight = prev
                raise
            self.scheduler.launched(batch)
            if batch.overlaps_next:
                self._in_flight = launched
            else:
                due.append(launched)
        received = []
        for launched in due:
            received += self.scheduler.update_from_output(launched.batch, self.runner.collect(launched))
        if self._in_flight is not None and not self.scheduler.has_unfinished():
            # every sequence of the batch in flight has finished: apply it now, so that nothing of
            # the finished requests outlives them while the engine waits for new ones
            launched, self._in_flight = self._in_flight, None
            received += self.scheduler.update_from_output(launched.batch, self.runner.collect(launched))
        return received

    # ---- outputs -------------------------------------------------------------------------------

    def _text(self, seq: Sequence) -> str:
        if seq.output_text is not None:
            return seq.output_text
        if self.tokenizer is None:
            return ""
        if not seq.is_finished:  # streaming: decode only what is new
            if seq.stop_state is None:
                seq.stop_state = StopState()
            decode_new_text(self.decoder, seq.output_token_ids, seq.stop_state, seq.params.skip_special_tokens)
            return seq.stop_state.text
        return self.decoder.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _make_output(self, state: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=self._text(seq),
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in state.seqs
        ]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=max(s.num_cached_prompt_tokens for s in state.seqs),
            prompt_logprobs=state.seqs[0].prompt_logprobs,
        )

    def get_stats(self) -> dict[str, int]:
        """The engine's queues, KV cache and scheduling counters."""
        sched, bm = self.scheduler, self.block_manager
        return {
            "num_unfinished_requests": len(self.requests),
            "num_waiting_requests": self.num_waiting_requests(),
            "num_waiting_seqs": len(sched.waiting),
            "num_running_seqs": len(sched.running),
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "prefix_cache_queries": bm.num_queries,
            "prefix_cache_hits": bm.num_hits,
            **dataclasses.asdict(sched.stats),
        }

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if there are any, and free the model, the KV cache
        and the CUDA graphs (idempotent). The engine cannot run steps afterwards."""
        if self.workers is not None:
            self._finalizer()
        self.runner.close()

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
