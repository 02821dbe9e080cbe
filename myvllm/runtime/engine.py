"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

    add_request -> validate, tokenize, n Sequences -> scheduler.add
    step        -> scheduler.schedule -> model_runner.execute -> scheduler.update
                   -> stop checks -> free finished -> outputs of finished requests

Decode-only batches are launched without waiting for their tokens. With
async_scheduling, the next decode batch is scheduled and launched while the
previous one still runs on the device (its sequences' last tokens are counted in
flight and fed to the new batch on the device); then the previous batch's tokens are
read back, stops checked and outputs made. A sequence that stopped in the previous
batch has computed one more batch for nothing; its tokens are dropped. Prefills wait
for the window in flight to be read back first.
    abort_request frees a request's blocks wherever it is (waiting, running, preempted).

With tensor_parallel_size N > 1 the engine starts N - 1 worker processes (runtime.workers)
holding the other shards of the model; the scheduler, the sampler and this object stay in
the calling process (rank 0). shutdown() stops the workers; it also runs when the engine is
garbage-collected and at interpreter exit. An exception escaping a step stops them too.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field

from myvllm.config import EngineConfig, ModelConfig
from myvllm.models.resolve import load_generation_eos, load_tokenizer, resolve_model
from myvllm.outputs import CompletionOutput, RequestOutput
from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.detokenizer import decode_new_text
from myvllm.runtime.model_runner import DecodeWindow, ModelRunner, StepResult
from myvllm.runtime.scheduler import Scheduler
from myvllm.runtime.sequence import Sequence, SequenceStatus, StopState
from myvllm.runtime.stop_checker import StopChecker
from myvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


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
        graph_sizes = self.runner.graph_runner.batch_sizes if self.runner.graph_runner else []
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   graph_sizes, self.max_model_len, config.num_scheduler_steps)
        self.stop_checker = StopChecker(self.eos_token_ids, self.max_model_len, self.tokenizer)
        self.requests: dict[str, RequestState] = {}
        # Schedule decode windows ahead of the one in flight (not with tensor parallelism,
        # where the other ranks would need the tokens in flight too).
        self.async_scheduling = config.async_scheduling and config.tensor_parallel_size == 1
        self._inflight: DecodeWindow | None = None  # launched, not yet read back
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

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Validate one prompt and return (text or None, token ids)."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                text = prompt["prompt"]
                if not isinstance(text, str):
                    raise TypeError(f"prompt['prompt'] must be a str, got {type(text).__name__}")
                ids = None
            else:
                raise ValueError("a dict prompt needs the key 'prompt_token_ids' or 'prompt'")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)):
            ids = prompt
        else:
            raise TypeError(
                f"a prompt must be a str, a list of token ids or a dict with 'prompt_token_ids', "
                f"got {type(prompt).__name__}"
            )
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer, but skip_tokenizer_init=True: pass token ids")
            if not text:
                raise ValueError("prompt is empty: it must have at least one token")
            ids = self.tokenizer.encode(text)
        ids = self._check_token_ids(ids)
        return text, ids

    def _check_token_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        vocab = self.model_config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"prompt token {i} is {t!r} ({type(t).__name__}): token ids must be ints")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t}: token ids must be in [0, {vocab - 1}]")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens: it must be shorter than max_model_len={self.max_model_len} "
                f"(at most {self.max_model_len - 1} tokens)"
            )
        bm = self.block_manager
        need = bm.blocks_for_tokens(len(ids) + 1)
        if need > bm.num_blocks:
            raise ValueError(
                f"prompt has {len(ids)} tokens and needs {need} KV blocks, but the cache has {bm.num_blocks} in all"
            )
        return list(ids)

    def check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.vocab_size
        if params.logprobs is not None and params.logprobs > min(self.config.max_logprobs, vocab):
            raise ValueError(f"logprobs={params.logprobs} is out of range: must be <= max_logprobs="
                             f"{self.config.max_logprobs} and <= the vocabulary size {vocab}")
        if params.stop_list and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, but skip_tokenizer_init=True: use stop_token_ids")
        if any(t >= vocab for t in params.stop_token_ids or ()):  # with min_tokens they index the logits
            raise ValueError(f"stop_token_ids={params.stop_token_ids} is out of range: token ids must be in "
                             f"[0, {vocab - 1}]")

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = False) -> str:
        """Validate and queue one request; returns its id. Raises before queueing anything.

        With stream=True, step() returns this request's output (text so far) after every
        step that gave it tokens, not only when it finishes."""
        params = SamplingParams() if params is None else params
        self.check_params(params)
        text, ids = self.tokenize_prompt(prompt)
        request_id = self.next_request_id() if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        state = RequestState(request_id, text, ids, params, stream=stream)
        banned = sorted(set(params.stop_token_ids or []) | (set() if params.ignore_eos else self.eos_token_ids))
        arrival = next(self._arrivals)
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(next(self._seq_ids), request_id, ids, params, index=i, seed=seed, arrival=arrival)
            seq.min_tokens_banned = banned if params.min_tokens else []
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

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the outputs of requests that finished in it
        (and of streaming requests that progressed)."""
        finished: list[RequestState] = []
        streaming: dict[str, RequestState] = {}
        if self.workers is None:
            self._step(finished, streaming)
        else:
            with self.workers.guard():
                self._step(finished, streaming)
        outputs = []
        for state in finished:
            streaming.pop(state.request_id, None)
            del self.requests[state.request_id]
            self.runner.release([s.seq_id for s in state.seqs])
            outputs.append(self._make_output(state))
        outputs.extend(self._make_output(state) for state in streaming.values())
        return outputs

    def _step(self, finished: list[RequestState], streaming: dict[str, RequestState]) -> None:
        """Either complete the window in flight, or schedule and launch the next batch (ahead of
        the window in flight when nothing in it depends on that window's tokens) and then
        complete the window in flight. A step that raises before launching leaves the engine
        as it was: the window in flight stays so, and nothing is applied twice."""
        prev = self._inflight
        batch = self.scheduler.schedule() if prev is None or self._can_schedule_ahead() else None
        if batch is None:
            if prev is not None:
                self._inflight = None
                self._complete(prev, finished, streaming)
            return
        if not batch.is_decode_only:  # prefill chunks: one synchronous step
            assert prev is None, "a prefill was scheduled while a decode window was in flight"
            result = self.runner.execute(batch)
            self._apply(batch, result, finished, streaming)
            return
        window = self.runner.launch_decode(batch, prev)
        self.scheduler.advance_window(batch)
        self._inflight = window
        if prev is not None:
            self._complete(prev, finished, streaming)
        elif not self.async_scheduling:
            self._inflight = None
            self._complete(window, finished, streaming)

    def _can_schedule_ahead(self) -> bool:
        """Whether the next batch can be scheduled before the window in flight is read back: it
        then holds only decodes of running sequences (their input tokens are on the device),
        and needs no preemption (which would drop tokens in flight, whose draws a sequence's
        own generator has already made)."""
        sched = self.scheduler
        if not self.async_scheduling or sched.waiting:
            return False
        bm = sched.block_manager
        need = 0
        for s in sched.running:
            if s.num_uncomputed_tokens != 1:
                return False
            need += bm.num_new_blocks(s, 1)
        return need <= bm.num_free_blocks

    def _complete(self, window: DecodeWindow, finished: list[RequestState],
                  streaming: dict[str, RequestState]) -> None:
        self._apply_window(window.batch, self.runner.collect(window), finished, streaming)

    def _apply(self, batch, result: StepResult, finished: list[RequestState],
               streaming: dict[str, RequestState]) -> None:
        """Append one pass's tokens, check stops, collect finished and streaming requests."""
        for seq, lp in zip(batch.seqs, result.logprobs):
            if lp is not None and seq.logprobs is not None and not seq.is_finished:
                seq.cumulative_logprob += lp[0]
                seq.logprobs.append(lp[1])
        for seq in self.scheduler.update(batch, result.token_ids):
            self._check_stop(seq, finished, streaming)

    def _apply_window(self, batch, results: list[StepResult], finished: list[RequestState],
                      streaming: dict[str, RequestState]) -> None:
        """The tokens of a decode-only batch, sequence by sequence: seq i receives the tokens of
        its first limits[i] passes, up to the first that stops it."""
        for i, (seq, limit) in enumerate(zip(batch.seqs, batch.limits)):
            if seq.status is not SequenceStatus.RUNNING:  # finished, aborted or preempted meanwhile
                continue
            tokens = [results[k].token_ids[i] for k in range(limit)]
            p = seq.params
            if seq.logprobs is None and p.ignore_eos and not p.stop_token_ids and not p.stop_list:
                # only a length can stop it, and the window ends at or before that length
                self.scheduler.receive_tokens(seq, tokens)
                self._check_stop(seq, finished, streaming)
                continue
            for k, token in enumerate(tokens):
                lp = results[k].logprobs[i]
                if lp is not None and seq.logprobs is not None:
                    seq.cumulative_logprob += lp[0]
                    seq.logprobs.append(lp[1])
                self.scheduler.receive_tokens(seq, [token])
                if self._check_stop(seq, finished, streaming):
                    break

    def _check_stop(self, seq: Sequence, finished: list[RequestState], streaming: dict[str, RequestState]) -> bool:
        """Finish seq if its last token stops it; True if it did."""
        state = self.requests[seq.request_id]
        stop = self.stop_checker.check(seq)
        if stop is None:
            if state.stream:
                streaming[state.request_id] = state
            return False
        self.scheduler.finish(seq, stop[0])
        seq.stop_reason = stop[1]
        if state.finished:
            finished.append(state)
        return True

    # ---- outputs -------------------------------------------------------------------------------

    def _text(self, seq: Sequence) -> str:
        if seq.output_text is not None:
            return seq.output_text
        if self.tokenizer is None:
            return ""
        if not seq.is_finished:  # streaming: decode only what is new
            if seq.stop_state is None:
                seq.stop_state = StopState()
            decode_new_text(self.tokenizer, seq.output_token_ids, seq.stop_state, seq.params.skip_special_tokens)
            return seq.stop_state.text
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

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
        )

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if there are any (idempotent). The engine cannot
        run steps afterwards."""
        if self.workers is not None:
            self._finalizer()

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        for seq in self.scheduler.all_seqs():
            assert seq.status is not SequenceStatus.FINISHED, f"finished {seq} is still queued"
