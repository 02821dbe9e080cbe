"""AsyncLLMEngine: an asyncio front end over one LLMEngine stepping in its own thread.

The engine is not thread-safe, so every engine call (add_request, abort_request, step,
and whatever is passed to `call`) runs on one background thread. The asyncio side hands
that thread commands through a locked deque and wakes it with a condition; the thread
sleeps on the condition whenever it has neither commands nor unfinished requests.
Outputs travel back with `loop.call_soon_threadsafe` into one RequestStream per request.

Outputs are cumulative (text and tokens so far), so a RequestStream keeps only the
newest one: a slow reader gets the latest state, never a growing backlog.

    engine = AsyncLLMEngine(LLMEngine(config), max_waiting_requests=256)
    engine.start()
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text)
    engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from myvllm.config import EngineConfig
from myvllm.outputs import CompletionOutput, RequestOutput
from myvllm.runtime.detokenizer import decode_new_text
from myvllm.runtime.engine import LLMEngine, PromptType
from myvllm.runtime.sequence import StopState
from myvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    """The waiting queue is at its bound; the request was not queued."""


class EngineDead(RuntimeError):
    """The engine thread has stopped (shut down, or a step failed beyond recovery)."""


class RequestStream:
    """The outputs of one request, as an async iterator that ends after the finished one.

    Leaving the iteration early (break, cancellation, an exception) or calling abort()
    aborts the request on the engine thread, which frees its KV blocks. An observer (the
    server's metrics) sees every output as it is handed out.

    A streamed request's outputs before the finished one carry token ids only; the stream
    decodes their text on the event loop as it hands them out (the finished output has the
    engine's text). The engine thread's time is the engine's: per-step detokenization of every
    stream there would lengthen every step, while the loop decodes when the engine thread waits
    for the device, and only the outputs a reader takes.
    """

    def __init__(self, request_id: str, owner: AsyncLLMEngine, loop: asyncio.AbstractEventLoop,
                 observer: Callable[[RequestOutput], None] | None = None) -> None:
        self.request_id = request_id
        self.loop = loop
        self.observer = observer
        self._owner = owner
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._finished = False  # the finished output was handed out
        self._aborted = False
        self.num_decoded: dict[int, int] = {}  # engine thread: logprob entries given text, per completion
        self.num_sent: dict[int, int] = {}  # engine thread: output tokens handed to the loop, per completion
        self.final_texts: dict[int, str] = {}  # engine thread: text of completions finished before the request
        self._texts: dict[int, _TextStream] | None = None  # loop: incremental text per completion
        self._texts_tokenizer: Any = None
        self._skip_special = True

    @property
    def finished(self) -> bool:
        return self._finished

    # ---- loop side, called through call_soon_threadsafe ------------------------------------

    def _put(self, out: RequestOutput) -> None:
        if not self._aborted:
            self._latest = out
            self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    # ---- consumer side -----------------------------------------------------------------------

    async def get(self) -> RequestOutput:
        """The newest output not yet handed out (waits for one); raises the engine's error."""
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                if self._error is None:
                    self._event.clear()
                self._finished = out.finished
                if self._texts is not None and not out.finished:
                    for c in out.outputs:
                        if c.finish_reason is not None:  # the engine's text
                            continue
                        text = self._texts.get(c.index)
                        if text is None:
                            text = self._texts[c.index] = _TextStream(self._texts_tokenizer, self._skip_special)
                        c.text = text.advance(c.token_ids)
                if self.observer is not None:
                    self.observer(out)
                return out
            if self._error is not None:
                raise self._error
            if self._finished or self._aborted:
                raise EngineDead(f"request {self.request_id!r} has no more outputs")
            await self._event.wait()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._aborted:
            raise StopAsyncIteration
        try:
            return await self.get()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Abort the request unless it already finished; safe to call more than once."""
        if not self._finished and not self._aborted:
            self._aborted = True
            self._owner.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()


class _TextStream:
    """The text of one completion's tokens so far, decoded incrementally (O(new tokens) per call)
    as the engine decodes a streamed sequence (runtime.detokenizer)."""

    __slots__ = ("tokenizer", "skip_special_tokens", "state")

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.state = StopState()

    def advance(self, token_ids: list[int]) -> str:
        decode_new_text(self.tokenizer, token_ids, self.state, self.skip_special_tokens)
        return self.state.text


class _Command:
    """A function to run on the engine thread, and where its result goes."""

    __slots__ = ("fn", "loop", "future", "is_add")

    def __init__(self, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop | None,
                 future: asyncio.Future | None, is_add: bool = False) -> None:
        self.fn, self.loop, self.future, self.is_add = fn, loop, future, is_add

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.future is None or self.loop is None:
            return
        _call_soon(self.loop, _settle, self.future, result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream._put(out)


class AsyncLLMEngine:
    """Runs an LLMEngine on a dedicated thread and serves requests from asyncio.

    max_waiting_requests bounds the requests queued but not yet scheduled (plus those
    handed to the engine thread but not yet queued); past it, add_request raises
    EngineOverloaded instead of letting the queue grow.
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and (isinstance(max_waiting_requests, bool)
                                                 or not isinstance(max_waiting_requests, int)
                                                 or max_waiting_requests < 1):
            raise ValueError(f"max_waiting_requests={max_waiting_requests!r} is out of range: "
                             f"must be None or an int >= 1")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.max_model_len: int = engine.max_model_len  # fixed at construction: safe to read anywhere
        self.vocab_size: int = engine.model_config.vocab_size
        self._cond = threading.Condition()
        self._commands: deque[_Command] = deque()
        self._num_pending_adds = 0  # add commands not yet run; guarded by _cond
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._streaming: dict[str, RequestStream] = {}  # engine thread only: the streamed ones among them
        # the engine's decoder, fixed at construction: safe to use on the loop (decoding is
        # read-only on the tokenizer)
        self._decoder = engine.decoder
        self._owns_engine = False  # made by from_engine_args: stop() shuts it down

    @classmethod
    def from_engine_args(cls, model: str, max_waiting_requests: int | None = None,
                         **engine_args: Any) -> AsyncLLMEngine:
        async_engine = cls(LLMEngine(EngineConfig.from_kwargs(model, **engine_args)), max_waiting_requests)
        async_engine._owns_engine = True
        return async_engine

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="myvllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread; requests still in flight end with EngineDead. An engine made
        by from_engine_args is shut down too (its tensor-parallel workers stop)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._owns_engine and (self._thread is None or not self._thread.is_alive()):
            self.engine.shutdown()

    @property
    def is_healthy(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._dead is None
                and not self._stopping)

    # ---- requests ----------------------------------------------------------------------------

    async def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                          request_id: str | None = None, stream: bool = True,
                          observer: Callable[[RequestOutput], None] | None = None) -> RequestStream:
        """Queue a request on the engine; returns its stream of outputs.

        Raises what LLMEngine.add_request raises (ValueError, TypeError) for a bad request,
        and EngineOverloaded when the waiting queue is full. With stream=False only the
        finished output is delivered. observer(output) runs on the loop for every output
        the stream hands out.
        """
        loop = asyncio.get_running_loop()
        request_id = uuid.uuid4().hex if request_id is None else request_id
        handle = RequestStream(request_id, self, loop, observer)
        bound = self.max_waiting_requests

        def add(engine: LLMEngine) -> RequestStream:
            if bound is not None and engine.num_waiting_requests() >= bound:
                raise EngineOverloaded(f"{bound} requests are waiting already (max_waiting_requests)")
            # the engine reports the request when it finishes; its progress is read after each step
            engine.add_request(prompt, params, request_id, stream=False)
            self._streams[request_id] = handle
            if stream:
                self._streaming[request_id] = handle
                if self._decoder is not None:
                    handle._texts_tokenizer = self._decoder
                    handle._skip_special = engine.requests[request_id].params.skip_special_tokens
                    handle._texts = {}
            return handle

        future = loop.create_future()
        with self._cond:
            if bound is not None and self._num_pending_adds >= bound:
                raise EngineOverloaded(f"{bound} requests are waiting already (max_waiting_requests)")
            self._submit_locked(_Command(add, loop, future, is_add=True))
            self._num_pending_adds += 1
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request_id)  # runs after the add on the engine thread
            raise

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (text so far), the last one finished."""
        handle = await self.add_request(prompt, params, request_id)
        async with handle:
            async for out in handle:
                yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; unknown ids are ignored, and so is
        everything once the engine has stopped, which ends its requests itself)."""
        def run(engine: LLMEngine) -> None:
            self._streams.pop(request_id, None)
            self._streaming.pop(request_id, None)
            engine.abort_request(request_id)

        with self._cond:
            if self._thread is not None and not self._stopping and self._dead is None:
                self._submit_locked(_Command(run, None, None))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread, between steps; returns its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self._submit_locked(_Command(fn, loop, future))
        return await future

    async def stats(self) -> dict[str, int]:
        """KV blocks and queue lengths, read on the engine thread."""
        return await self.call(LLMEngine.get_stats)

    def _submit_locked(self, command: _Command) -> None:
        if self._dead is not None or self._stopping or self._thread is None:
            raise EngineDead("the engine is not running" if self._dead is None else f"the engine failed: "
                             f"{self._dead!r}")
        self._commands.append(command)
        self._cond.notify()

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        busy = False
        try:
            while True:
                with self._cond:
                    while not self._commands and not busy and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._run_command(command)
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as e:
                        logger.exception("engine step failed; aborting the requests in flight")
                        self._abort_all(e)
                    else:
                        self._dispatch(outputs)
                busy = engine.has_unfinished_requests()
        except BaseException as e:
            logger.exception("the engine thread failed")
            self._dead = e
        finally:
            with self._cond:
                self._stopping = True
                commands = list(self._commands)
                self._commands.clear()
            error = EngineDead("the engine stopped")
            for command in commands:
                command.resolve(error=error)
            for handle in self._streams.values():
                _call_soon(handle.loop, handle._fail, error)
            self._streams.clear()

    def _run_command(self, command: _Command) -> None:
        if command.is_add:
            with self._cond:
                self._num_pending_adds -= 1
        try:
            result = command.fn(self.engine)
        except Exception as e:
            command.resolve(error=e)
        else:
            command.resolve(result)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand the step's outputs to their loops: the finished requests', and a token-only
        output of every streamed request that received tokens."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outputs:
            handle = self._streams.get(out.request_id)
            if handle is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
                self._streaming.pop(out.request_id, None)
            for c in out.outputs:
                if c.logprobs is not None:
                    if not out.finished:  # the engine keeps appending to this list
                        c.logprobs = list(c.logprobs)
                    self._decode_logprobs(handle, c.index, c.logprobs)
            by_loop.setdefault(handle.loop, []).append((handle, out))
        for request_id, handle in self._streaming.items():
            out = self._progress(request_id, handle)
            if out is not None:
                by_loop.setdefault(handle.loop, []).append((handle, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver, items)

    def _progress(self, request_id: str, handle: RequestStream) -> RequestOutput | None:
        """A running streamed request's tokens so far (no text), if it received any since the
        last; None otherwise."""
        state = self.engine.requests.get(request_id)
        if state is None:
            return None
        sent = handle.num_sent
        if all(len(seq.token_ids) - seq.num_prompt_tokens == sent.get(seq.index, 0) for seq in state.seqs):
            return None
        completions = []
        decoder = self.engine.decoder
        for seq in state.seqs:
            token_ids = seq.output_token_ids
            sent[seq.index] = len(token_ids)
            logprobs = None
            if seq.logprobs is not None:
                logprobs = list(seq.logprobs)  # the engine keeps appending to its list
                self._decode_logprobs(handle, seq.index, logprobs)
            text = ""
            if seq.is_finished:  # one of n finished before the others: its final text, as the engine makes it
                text = handle.final_texts.get(seq.index)
                if text is None:
                    text = seq.output_text
                    if text is None:
                        text = "" if decoder is None else decoder.decode(
                            token_ids, skip_special_tokens=seq.params.skip_special_tokens)
                    handle.final_texts[seq.index] = text
            completions.append(CompletionOutput(seq.index, text, token_ids, logprobs=logprobs,
                                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        # complete by now: a prompt whose logprobs are asked for is computed before its first token
        prompt_logprobs = state.seqs[0].prompt_logprobs
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, completions,
                             num_cached_tokens=max(s.num_cached_prompt_tokens for s in state.seqs),
                             prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs))

    def _decode_logprobs(self, handle: RequestStream, index: int, logprobs: list) -> None:
        """Give the logprob entries not yet seen their token text (once per entry)."""
        decoder = self.engine.decoder
        start = handle.num_decoded.get(index, 0)
        if decoder is not None:
            try:
                for entry in logprobs[start:]:
                    for token_id, lp in entry.items():
                        if lp.decoded_token is None:
                            lp.decoded_token = decoder.decode([token_id])
            except Exception:  # the output still goes out, with token ids for texts
                logger.exception("decoding logprob tokens of request %s failed", handle.request_id)
        handle.num_decoded[index] = len(logprobs)

    def _abort_all(self, error: BaseException) -> None:
        for request_id, handle in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            finally:
                _call_soon(handle.loop, handle._fail, error)
        self._streams.clear()
