"""The OpenAI-compatible HTTP API over an AsyncLLMEngine (FastAPI).

Routes:
    GET  /health               200 while the engine thread runs, else 503 (no API key needed)
    GET  /metrics              Prometheus metrics under vLLM's names (entrypoints/metrics.py; no API key)
    GET  /v1/models            the served model
    POST /v1/completions       text completion; `stream: true` sends server-sent events
    POST /v1/chat/completions  chat completion through the tokenizer's chat template
    GET  /v1/engine/stats      KV blocks and queue lengths: num_blocks, num_free_blocks,
                               num_unfinished_requests, num_waiting_seqs, num_running_seqs,
                               num_preemptions

Every error is {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(the field in `param`), 401 for a missing or wrong API key, 404 for an unknown model or
route, 408 for a body that does not arrive in time, 413 for a body over the size limit, 415
for a body not sent as application/json, 503 when the waiting queue is full.
A streamed request is aborted (its KV blocks freed) as soon as its client goes away.

Text in a body must be valid Unicode (no lone UTF-16 surrogates, which JSON's \\u escapes can
carry). A chat template in the request (`chat_template`, or `chat_template_kwargs.chat_template`)
renders on the engine thread, so it is refused unless the server trusts request templates.

Sampling fields the client leaves out (or sends as null) take the defaults of the model's
generation_config.json (the engine's `generation_config` argument), as in vLLM; max_new_tokens
there is the max_tokens of requests that send none. Values the client sends win.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from myvllm.entrypoints.async_engine import AsyncLLMEngine, EngineDead, EngineOverloaded, RequestStream
from myvllm.entrypoints.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    ChoiceDelta,
    CompletionRequest,
    bad_request,
    chat_logprobs,
    completion_logprobs,
    error_body,
    now,
    parse_request,
    request_field,
    sampling_params,
    usage,
)
from myvllm.entrypoints.parsers.reasoning import REASONING_PARSERS, ReasoningStream, split_reasoning
from myvllm.entrypoints.parsers.tool_calls import TOOL_CALL_PARSERS, ToolCallStream, parse_tool_calls
from myvllm.entrypoints.tool_choice import ForcedToolChoice, forced_tool_choice
from myvllm.outputs import RequestOutput
from myvllm.runtime.engine import LLMEngine
from myvllm.runtime.generation_defaults import apply_defaults
from myvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BODY_READ_TIMEOUT = 30.0  # seconds for a whole request body to arrive
CLIENT_CLOSED = 499  # logged for a request whose client left before the answer
_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 503: "overloaded_error"}
# chat_template_kwargs keys that are apply_chat_template's own arguments, not template variables
_RESERVED_TEMPLATE_KWARGS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                             "return_dict", "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs",
                             "padding", "truncation", "max_length")
# The request fields that give a SamplingParams field a value (chat has two for max_tokens);
# a field not listed is given by the request field of its own name.
_REQUEST_FIELDS = {"max_tokens": ("max_tokens", "max_completion_tokens")}


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, manage_engine: bool = True,
              reasoning_parser: str | None = None, default_chat_template_kwargs: dict | None = None,
              tool_call_parser: str | None = None, trust_request_chat_template: bool = False,
              body_read_timeout: float | None = DEFAULT_BODY_READ_TIMEOUT, enable_metrics: bool = True) -> FastAPI:
    """The FastAPI app. With manage_engine the app starts the engine thread at startup and
    stops it at shutdown; otherwise the caller does. reasoning_parser "qwen3" returns the text
    inside <think>...</think> as `reasoning_content`; default_chat_template_kwargs apply to every
    chat request (its own chat_template_kwargs win). tool_call_parser "hermes" turns on tools
    (tool_choice "auto"): <tool_call> blocks in a reply become tool_calls.
    trust_request_chat_template lets requests bring their own chat template; a request body
    must arrive within body_read_timeout seconds (None: no limit). enable_metrics serves
    /metrics (it needs prometheus-client)."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool_call_parser={tool_call_parser!r} is not supported: choose one of "
                         f"{list(TOOL_CALL_PARSERS)}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser={reasoning_parser!r} is not supported: choose one of "
                         f"{list(REASONING_PARSERS)}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(title="my-vllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    metrics = None
    if enable_metrics:
        try:
            from myvllm.entrypoints.metrics import ServerMetrics
        except ImportError:
            logger.info("prometheus-client is not installed: /metrics is off (pip install prometheus-client)")
        else:
            metrics = ServerMetrics(served_model_name)
    server = _Server(engine, served_model_name, max_body_bytes, reasoning_parser, default_chat_template_kwargs,
                     tool_call_parser, trust_request_chat_template, body_read_timeout, metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("the engine is not running", "server_error", None, "engine_dead"), 503)

    if metrics is not None:
        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            from myvllm.entrypoints.metrics import CONTENT_TYPE

            stats = await server._engine_call(engine.stats())
            return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth_dependency(api_key))])
    router.add_api_route("/models", server.models, methods=["GET"])
    router.add_api_route("/engine/stats", server.stats, methods=["GET"])
    router.add_api_route("/completions", server.completions, methods=["POST"])
    router.add_api_route("/chat/completions", server.chat_completions, methods=["POST"])
    app.include_router(router)
    return app


def _auth_dependency(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 408:  # the rest of a slow body is not waited for
            headers = {"Connection": "close"}
        return JSONResponse(exc.body(), exc.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        logger.debug("the client of %s %s disconnected before its request was read", request.method,
                     request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind, None, None), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None, None), 500)


async def read_json(request: Request, max_bytes: int, timeout: float | None = None) -> Any:
    """The request body as JSON. Refuses a body not sent as application/json (415: a browser
    page can post text/plain or forms to a local server without asking first), over max_bytes
    (413) or not in within timeout seconds (408), bad JSON and text that is not valid Unicode
    (400). A client that leaves mid-body raises starlette's ClientDisconnect."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request body must be sent with Content-Type: application/json, not "
                            f"{media_type or 'none'!r}", "invalid_request_error", None, "unsupported_media_type")
    too_large = APIError(413, f"the request body is over {max_bytes} bytes", "invalid_request_error",
                         None, "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large

    async def read() -> bytearray:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        return body

    try:
        body = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", "invalid_request_error",
                       None, "request_timeout") from None
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    # a lone surrogate comes from a \u escape or from UTF-8 bytes ED A0..BF (json passes those)
    if b"\\u" in body or b"\xed" in body:
        where = lone_surrogate_field(data)
        if where is not None:
            raise bad_request(f"{where or 'a key'} holds a lone UTF-16 surrogate: text must be valid Unicode",
                              where or None, "invalid_value")
    return data


def lone_surrogate_field(data: Any) -> str | None:
    """The dotted path of the first string (or the object holding the first key) in decoded
    JSON that has a lone UTF-16 surrogate, "" for a top-level key; None if there is none."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and not _is_unicode(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii() and not _is_unicode(key):
                    return path
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Server:
    """The /v1 handlers, bound to one engine and model name."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_body_bytes: int,
                 reasoning_parser: str | None = None, default_chat_template_kwargs: dict | None = None,
                 tool_call_parser: str | None = None, trust_request_chat_template: bool = False,
                 body_read_timeout: float | None = None, metrics: Any = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_json = json.dumps(model_name, ensure_ascii=False)
        self.max_body_bytes = max_body_bytes
        self.trust_request_chat_template = trust_request_chat_template
        self.body_read_timeout = body_read_timeout
        self.metrics = metrics  # a ServerMetrics, or None
        self.reasoning_parser = reasoning_parser
        self.default_chat_template_kwargs = dict(default_chat_template_kwargs or {})
        self.tool_call_parser = tool_call_parser
        self.created = now()
        # The generation-config defaults, fixed when the engine was made (safe to read from the loop).
        self.default_sampling = dict(engine.engine.default_sampling)

    def _params(self, req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        """The request's SamplingParams, with the generation-config defaults for the fields the
        client left out (or sent as null); values the client sent win."""
        return with_request_defaults(req, sampling_params(req, self.engine.vocab_size), self.default_sampling)

    async def models(self) -> JSONResponse:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "myvllm",
                "max_model_len": self.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def stats(self) -> JSONResponse:
        return JSONResponse(await self._engine_call(self.engine.stats()))

    # ---- completions -------------------------------------------------------------------------

    async def completions(self, request: Request) -> Any:
        req: CompletionRequest = parse_request(CompletionRequest, await self._read_json(request))
        self._check_model(req.model)
        req.check_unsupported()
        params = self._params(req)
        prompts = req.prompts()
        bound = self.engine.max_waiting_requests
        if bound is not None and len(prompts) > bound:  # could never be queued: not a "retry later"
            raise bad_request(f"prompt: {len(prompts)} prompts in one request are more than the server queues "
                              f"(--max-waiting-requests={bound}): send at most {bound}", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._add(prompts, params, rid, "prompt", req, req.stream)
        if req.stream:
            return _EventStream(self._completion_events(req, params, rid, streams), streams)
        finals = await _until_done_or_disconnect(request, _collect(streams))
        if finals is None:
            return Response(status_code=CLIENT_CLOSED)
        choices, num_prompt, num_out = [], 0, 0
        for i, out in enumerate(finals):
            num_prompt += len(out.prompt_token_ids)
            prompt_lps = None
            if out.prompt_logprobs is not None:
                prompt_lps = await self._prompt_logprobs(out.prompt_logprobs)
            for c in out.outputs:
                num_out += len(c.token_ids)
                lps = (completion_logprobs(c.token_ids, c.logprobs, params.logprobs)
                       if params.logprobs is not None and c.logprobs is not None else None)
                choice = {"index": i * params.n + c.index, "text": c.text, "logprobs": lps,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if prompt_lps is not None:
                    choice["prompt_logprobs"] = prompt_lps
                if req.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["prompt_token_ids"] = out.prompt_token_ids
                choices.append(choice)
        return JSONResponse({"id": rid, "object": "text_completion", "created": now(), "model": self.model_name,
                             "choices": choices, "usage": usage(num_prompt, num_out)})

    async def _prompt_logprobs(self, entries: list) -> list:
        """A RequestOutput's prompt_logprobs as vLLM's JSON, their tokens decoded on the engine thread."""
        return await self._engine_call(self.engine.call(lambda e: _prompt_logprobs_json(e, entries)))

    async def _completion_events(self, req: CompletionRequest, params: SamplingParams, rid: str,
                                 streams: list[RequestStream]) -> AsyncIterator[str]:
        """The chunks as JSON text: one per choice per engine output that brings it tokens (every
        token an engine step made, a whole multi-step window, goes in one chunk; its text may be
        empty while a character or a possible stop string is incomplete). The part that is the
        same in every chunk is serialized once. With prompt_logprobs, the first chunk of each choice
        carries its prompt's (as vLLM streams them): the prompt is computed whole before a token
        is sampled."""
        created = now()
        head = (f'{{"id": "{rid}", "object": "text_completion", "created": {created}, "model": {self.model_json}, '
                f'"choices": [{{"index": ')
        deltas = [[ChoiceDelta(params) for _ in range(params.n)] for _ in streams]
        offsets = [[0] * params.n for _ in streams]
        prompt_json: list[str | None] = [None] * len(streams)  # prompt i's prompt_logprobs, serialized
        sent_prompt = [[False] * params.n for _ in streams]  # whether a choice's chunks carried them
        counts = [0, 0]
        dumps = json.dumps
        async for i, out in _merged(streams):
            for c in out.outputs:
                step = deltas[i][c.index].advance(c, on_tokens=True)
                if step is None:
                    continue
                text, tokens, entries, finish = step
                ids = f'"token_ids": {dumps(tokens)}, ' if req.return_token_ids else ""
                if out.prompt_logprobs is not None and not sent_prompt[i][c.index]:
                    if prompt_json[i] is None:
                        prompt_json[i] = dumps(await self._prompt_logprobs(out.prompt_logprobs), ensure_ascii=False)
                    ids += f'"prompt_logprobs": {prompt_json[i]}, '
                    sent_prompt[i][c.index] = True
                lps = "null"
                if params.logprobs is not None and entries is not None:
                    lps = dumps(completion_logprobs(tokens, entries, params.logprobs, offsets[i][c.index]),
                                ensure_ascii=False)
                offsets[i][c.index] += len(text)
                tail = (f'"finish_reason": {dumps(finish)}, "stop_reason": {dumps(c.stop_reason)}' if finish
                        else '"finish_reason": null')
                yield (f'{head}{i * params.n + c.index}, "text": {dumps(text, ensure_ascii=False)}, {ids}'
                       f'"logprobs": {lps}, {tail}}}]}}')
            if out.finished:
                counts[0] += len(out.prompt_token_ids)
                counts[1] += sum(len(c.token_ids) for c in out.outputs)
        if req.include_usage:
            yield dumps({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                         "choices": [], "usage": usage(*counts)}, ensure_ascii=False)

    # ---- chat --------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self._read_json(request))
        self._check_model(req.model)
        req.check_unsupported()
        params = self._params(req)
        messages = req.template_messages()
        kwargs = {**self.default_chat_template_kwargs, **self._template_kwargs(req)}
        # with a reasoning parser: thinking is on unless the template is told otherwise
        thinking = None if self.reasoning_parser is None else kwargs.get("enable_thinking", True) is not False
        tools = bool(req.tools) and req.tool_choice != "none"
        forced = forced_tool_choice(req)  # "required" or a named function: a constraint, no parser needed
        if forced is not None:
            params = forced.constrain(params, thinking)
        if tools and forced is None and self.tool_call_parser is None:
            raise bad_request("tools need a server started with --enable-auto-tool-choice --tool-call-parser hermes",
                              "tools", "unsupported")
        if tools:
            kwargs["tools"] = req.tools
        prompt = await self._engine_call(self.engine.call(
            lambda e: _render_chat(e, messages, req.add_generation_prompt, kwargs)))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._add([prompt], params, rid, "messages", req, req.stream)
        if req.stream:
            return _EventStream(self._chat_events(req, params, rid, streams[0], thinking, tools, forced), streams)
        finals = await _until_done_or_disconnect(request, _collect(streams))
        if finals is None:
            return Response(status_code=CLIENT_CLOSED)
        (out,) = finals
        choices = []
        for c in out.outputs:
            lps = (chat_logprobs(c.token_ids, c.logprobs, params.logprobs)
                   if params.logprobs is not None and c.logprobs is not None else None)
            message, finish = reply_message(c.text, c.finish_reason, thinking, tools, forced)
            choices.append({"index": c.index, "message": message,
                            "logprobs": lps, "finish_reason": finish, "stop_reason": c.stop_reason})
        num_out = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now(), "model": self.model_name,
                             "choices": choices, "usage": usage(len(out.prompt_token_ids), num_out)})

    async def _chat_events(self, req: ChatCompletionRequest, params: SamplingParams, rid: str,
                           stream: RequestStream, thinking: bool | None = None,
                           tools: bool = False, forced: ForcedToolChoice | None = None) -> AsyncIterator[dict]:
        """The chunks of a streamed chat; with thinking not None (a reasoning parser), text goes
        out as delta.reasoning_content until </think>, then as delta.content; with tools, the
        content from the first <tool_call> on is held back and sent as delta.tool_calls at the end
        (under a forced tool choice, all of the content)."""
        created = now()
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        deltas = [ChoiceDelta(params) for _ in range(params.n)]
        reasoning = [ReasoningStream(thinking) for _ in range(params.n)] if thinking is not None else None
        texts = [""] * params.n
        answers = [""] * params.n
        tool_streams = None
        if tools:
            tool_streams = [forced.stream() if forced is not None else ToolCallStream() for _ in range(params.n)]
        for index in range(params.n):
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        last = None
        async for _, out in _merged([stream]):
            last = out
            for c in out.outputs:
                step = deltas[c.index].advance(c)
                if step is None:
                    continue
                text, tokens, entries, finish = step
                lps = None
                if params.logprobs is not None and entries is not None:
                    lps = chat_logprobs(tokens, entries, params.logprobs)
                delta = {"content": text} if text else {}
                if reasoning is not None:
                    texts[c.index] += text
                    thought, answer = reasoning[c.index].advance(texts[c.index], finish is not None)
                    delta = {k: v for k, v in (("reasoning_content", thought), ("content", answer)) if v}
                if tool_streams is not None:
                    answers[c.index] += delta.pop("content", "")
                    content, calls = tool_streams[c.index].advance(answers[c.index], finish is not None)
                    if content:
                        delta["content"] = content
                    if calls:
                        delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls)]
                        finish = "tool_calls"
                choice = {"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": finish}
                if finish:
                    choice["stop_reason"] = c.stop_reason
                yield {**head, "choices": [choice]}
        if req.include_usage and last is not None:
            num_out = sum(len(c.token_ids) for c in last.outputs)
            yield {**head, "choices": [], "usage": usage(len(last.prompt_token_ids), num_out)}

    def _template_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The request's chat_template_kwargs (with its chat_template, when the server trusts
        request templates); apply_chat_template's own arguments are refused."""
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = next((k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS), None)
        if reserved is not None:
            raise bad_request(f"chat_template_kwargs.{reserved} is not a template variable: it is set by the server",
                              f"chat_template_kwargs.{reserved}")
        for field, template in (("chat_template", req.chat_template),
                                ("chat_template_kwargs.chat_template", kwargs.get("chat_template"))):
            if template is None:
                continue
            if not self.trust_request_chat_template:
                raise bad_request(f"{field}: a chat template sent in the request is refused: the server uses the "
                                  f"model's (start it with --trust-request-chat-template to allow request templates)",
                                  field, "unsupported")
            if not isinstance(template, str):
                raise bad_request(f"{field} must be a string", field, "invalid_type")
            kwargs["chat_template"] = template
        return kwargs

    # ---- shared ------------------------------------------------------------------------------

    async def _read_json(self, request: Request) -> Any:
        return await read_json(request, self.max_body_bytes, self.body_read_timeout)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    async def _engine_call(self, awaitable: Awaitable) -> Any:
        try:
            return await awaitable
        except EngineDead as e:
            raise APIError(503, str(e), "server_error", None, "engine_dead") from None

    async def _add(self, prompts: list, params: SamplingParams, rid: str, field: str,
                   req: CompletionRequest | ChatCompletionRequest, stream: bool) -> list[RequestStream]:
        """Queue one engine request per prompt; all or none (a failure aborts those queued)."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                request_id = rid if len(prompts) == 1 else f"{rid}-{i}"
                observer = None if self.metrics is None else self.metrics.request(stream).output
                streams.append(await self.engine.add_request(_as_engine_prompt(prompt), params, request_id,
                                                             stream=stream, observer=observer))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, EngineOverloaded):
                raise APIError(503, f"the server is overloaded: {e}; retry later", "overloaded_error",
                               None, "server_overloaded") from None
            if isinstance(e, EngineDead):
                raise APIError(503, str(e), "server_error", None, "engine_dead") from None
            if isinstance(e, (ValueError, TypeError)):
                where = f"{field}[{i}]: " if len(prompts) > 1 else ""
                raise bad_request(where + str(e), request_field(str(e), req, field)) from None
            raise
        return streams


def client_sent(req: CompletionRequest | ChatCompletionRequest, name: str) -> bool:
    """Whether the client gave SamplingParams field `name` a value (a null counts as none)."""
    return any(f in req.model_fields_set and getattr(req, f, None) is not None
               for f in _REQUEST_FIELDS.get(name, (name,)))


def with_request_defaults(req: CompletionRequest | ChatCompletionRequest, params: SamplingParams,
                          defaults: dict[str, Any]) -> SamplingParams:
    """params with defaults[name] for every field the client did not send; a combination that
    SamplingParams refuses (min_tokens over the default max_tokens) is a 400 naming the field."""
    unset = {name for name in defaults if not client_sent(req, name)}
    try:
        return apply_defaults(params, defaults, unset)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), request_field(str(e), req)) from None


def _as_engine_prompt(prompt: str | list[int]) -> str | dict:
    return {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt


def reply_message(text: str, finish_reason: str | None, thinking: bool | None, tools: bool,
                  forced: ForcedToolChoice | None = None) -> tuple[dict[str, Any], str | None]:
    """(chat message, finish_reason) of a whole reply: reasoning split off when thinking is not
    None, tool calls parsed when tools are on (finish_reason "tool_calls" when there are some):
    hermes blocks, or the JSON of a forced tool choice."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking is not None:
        message["reasoning_content"], message["content"] = split_reasoning(text, thinking)
    if tools:
        parse = forced.parse if forced is not None else parse_tool_calls
        message["content"], calls = parse(message["content"] or "")
        if calls:
            message["tool_calls"] = calls
            finish_reason = "tool_calls"
    return message, finish_reason


def _prompt_logprobs_json(engine: LLMEngine, entries: list) -> list:
    """vLLM's prompt_logprobs: None for the first token, then token id -> logprob, rank and text
    (decoded on the engine thread, which owns the tokenizer)."""
    dec = engine.decoder
    return [None if entry is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": dec.decode([t]) if dec else None}
             for t, lp in entry.items()}
            for entry in entries]


def _render_chat(engine: LLMEngine, messages: list[dict], add_generation_prompt: bool,
                 kwargs: dict[str, Any]) -> dict:
    """Chat template -> the prompt, as LLM.chat renders it (runs on the engine thread)."""
    if engine.tokenizer is None:
        raise bad_request("chat needs a tokenizer, but the server runs without one", "messages")
    try:
        return engine.processor.render_chat(messages, add_generation_prompt, kwargs)
    except (TypeError, ValueError) as e:
        raise bad_request(str(e), "messages") from None


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they come; aborts them all if left early."""
    if len(streams) == 1:  # the common case, without a task per output
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].abort()
        return
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(s.get()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                out = task.result()
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(streams[i].get())] = i
    finally:
        for task in pending:
            task.cancel()
        for s in streams:
            s.abort()


async def _collect(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in _merged(streams):
        if out.finished:
            finals[i] = out
    return finals  # type: ignore[return-value]


async def _until_done_or_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await work, cancelling it (which aborts its requests) if the client disconnects first
    (then returns None: nobody is left to answer)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return _engine_result(task)
    return None


def _engine_result(task: asyncio.Future) -> Any:
    try:
        return task.result()
    except EngineDead as e:
        raise APIError(503, str(e), "server_error", None, "engine_dead") from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends, even if the
    client left before the first event (when the event generator never starts)."""

    def __init__(self, events: AsyncIterator[dict], streams: list[RequestStream]) -> None:
        super().__init__(_sse_lines(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:
                s.abort()


async def _sse_lines(events: AsyncIterator[dict | str]) -> AsyncIterator[str]:
    """Events (dicts, or JSON text already) as server-sent-event lines, then [DONE]."""
    try:
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"
    except Exception as e:  # the engine failed mid-stream: tell the client, end the stream
        logger.error("stream ended by an engine error: %r", e)
        yield f"data: {json.dumps(error_body(str(e), 'server_error', None, 'engine_error'))}\n\n"
    yield "data: [DONE]\n\n"
