"""OpenAI-compatible request models, their mapping onto SamplingParams, and response pieces.

Requests are validated strictly (no "5" for 5, no true for 1) and every error names
the offending field, so the server can answer HTTP 400 with an OpenAI error object.
Value ranges are checked once, by SamplingParams; its messages are mapped back to the
request field they came from.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from myvllm.outputs import CompletionOutput, Logprob
from myvllm.sampling_params import SamplingParams, StructuredOutputsParams


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---- requests ------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints; the extensions (top_k, ...) follow vLLM's names."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # structured outputs, vLLM's fields: the older guided_* ones, or structured_outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias", "unsupported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # extension, as in vLLM
    echo: bool = False
    return_token_ids: bool = False  # extension, as in vLLM: choices carry token_ids (and prompt_token_ids)
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: a str, a token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise bad_request("prompt is empty: it must have at least one token", "prompt")
        return list(p)

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise bad_request("echo is not supported", "echo", "unsupported")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported: leave it out or set it to n", "best_of", "unsupported")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


CHAT_ROLES = ("system", "user", "assistant", "tool")


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ... reach the template
    role: str
    content: str | list[TextPart] | None = None

    def check(self, where: str) -> None:
        """The role is one the chat API has, and content is there unless an assistant message
        carries tool_calls instead (as the OpenAI API requires)."""
        if self.role not in CHAT_ROLES:
            raise bad_request(f"{where}.role={self.role!r} is not supported: must be one of {', '.join(CHAT_ROLES)}",
                              f"{where}.role")
        if self.content is None and not (self.role == "assistant" and getattr(self, "tool_calls", None)):
            raise bad_request(f"{where}.content is required for a {self.role!r} message"
                              + (" without tool_calls" if self.role == "assistant" else ""),
                              f"{where}.content", "missing_field")

    def to_template(self) -> dict[str, Any]:
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            msg["content"] = "".join(part.text for part in self.content)
        elif self.content is None:
            msg["content"] = ""
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None  # refused unless the server trusts request templates
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        kind = None if self.response_format is None else self.response_format.get("type")
        if kind not in (None, "text", "json_object", "json_schema"):
            raise bad_request(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                              "response_format")
        if kind == "json_schema" and not isinstance((self.response_format.get("json_schema") or {}).get("schema"),
                                                    dict):
            raise bad_request("response_format json_schema needs json_schema.schema, an object", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them; raises APIError(400) for a role the
        chat API does not have or a message without the content it needs."""
        for i, m in enumerate(self.messages):
            m.check(f"messages.{i}")
        return [m.to_template() for m in self.messages]


_UNION_MESSAGES = {
    "prompt": "prompt must be a string, a list of token ids, a list of strings or a list of token-id lists",
    "stop": "stop must be a string or a list of strings",
    "content": "content must be a string or a list of {'type': 'text', 'text': ...} parts",
}


def parse_request(model: type[_Strict], data: Any) -> Any:
    """Validate a decoded JSON body; raises APIError(400) naming the first bad field."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"] if isinstance(p, (str, int))]
        param = _param_of(loc)
        if err["type"] == "missing":
            raise bad_request(f"{param} is required", param, "missing_field") from None
        last = next((p for p in reversed(loc) if p in _UNION_MESSAGES), None)
        message = _UNION_MESSAGES.get(last) if last else None
        raise bad_request(f"{param}: {message or err['msg']}", param, "invalid_type") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "StreamOptions", "ChatMessage"}


def _param_of(loc: list[str]) -> str:
    """('messages', '0', 'content', 'str') -> 'messages.0.content' (union member names dropped)."""
    keep = []
    for p in loc:
        if p.isdigit() or (p.isidentifier() and p not in _TYPE_TAGS):
            keep.append(p)
        else:
            break
    return ".".join(keep) or "body"


# ---- onto the engine -----------------------------------------------------------------------------

_SP_FIELD = re.compile(r"^(\w+)(=| must| strings|:| needs)")
# request fields that set structured outputs (named in their errors)
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")


def structured_outputs(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The request's constraint: response_format (chat), structured_outputs, or a guided_* field."""
    fmt = getattr(req, "response_format", None)
    kind = None if fmt is None else fmt.get("type")
    given = [name for name in STRUCTURED_FIELDS[1:] if getattr(req, name) is not None]
    if kind in ("json_object", "json_schema"):
        given.insert(0, "response_format")
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"{given[0]} and {given[1]} both constrain the output: give one", given[1])
    name = given[0]
    try:
        if name == "response_format":
            if kind == "json_object":
                return StructuredOutputsParams(json_object=True, field_name=name)
            return StructuredOutputsParams(json=fmt["json_schema"]["schema"], field_name=name)
        if name == "structured_outputs":
            unknown = sorted(set(req.structured_outputs) - {"json", "regex", "choice", "grammar", "json_object"})
            if unknown:
                raise bad_request(f"structured_outputs: unknown key(s) {unknown}", name)
            return StructuredOutputsParams(**req.structured_outputs, field_name=name)
        key = name.removeprefix("guided_")
        return StructuredOutputsParams(**{key: getattr(req, name)}, field_name=name)
    except (TypeError, ValueError) as e:
        raise bad_request(str(e), name) from None
MAX_N = 128  # completions per request: each is a sequence holding its own KV blocks
MAX_INT = (1 << 63) - 1  # integers reach the sampler as int64
# Every new piece of text is searched for every stop string, and a stream holds back the longest
# one's length: both bounds keep one request from slowing the others.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64  # each is compared with every sampled token


def sampling_params(req: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    """The request's SamplingParams; out-of-range values raise APIError(400) naming the field."""
    is_chat = isinstance(req, ChatCompletionRequest)
    if req.n > MAX_N:
        raise bad_request(f"n={req.n} is out of range: must be <= {MAX_N}", "n")
    for name in ("seed", "top_k", "min_tokens", "max_tokens", "max_completion_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > MAX_INT:
            raise bad_request(f"{name}={value} is out of range: must be < 2**63", name)
    check_stops(req.stop, req.stop_token_ids)
    bad_ids = [t for t in req.stop_token_ids or () if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad_request(f"stop_token_ids: {bad_ids[0]} is out of range: token ids must be in "
                          f"[0, {vocab_size - 1}]", "stop_token_ids")
    if is_chat:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
    kwargs: dict[str, Any] = dict(prompt_logprobs=getattr(req, "prompt_logprobs", None),
        n=req.n, max_tokens=max_tokens, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
    )
    kwargs["structured_outputs"] = structured_outputs(req)
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), request_field(str(e), req)) from None


def check_stops(stop: str | list[str] | None, stop_token_ids: list[int] | None) -> None:
    """Bounds on the number and length of stop strings and on the number of stop token ids."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(stops)} strings: at most {MAX_STOP_STRINGS} are allowed", "stop")
    long = next((s for s in stops if len(s) > MAX_STOP_STRING_CHARS), None)
    if long is not None:
        raise bad_request(f"stop: a stop string of {len(long)} characters is too long: at most "
                          f"{MAX_STOP_STRING_CHARS} characters each", "stop")
    if stop_token_ids is not None and len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"stop_token_ids has {len(stop_token_ids)} ids: at most {MAX_STOP_TOKEN_IDS} are allowed",
                          "stop_token_ids")


def max_tokens_field(req: CompletionRequest | ChatCompletionRequest) -> str:
    """The request field that carries max_tokens: chat's max_completion_tokens when the client
    sent it, else max_tokens."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def request_field(message: str, req: CompletionRequest | ChatCompletionRequest, prompt_field: str = "prompt") -> str:
    """The request field an engine or SamplingParams error message is about."""
    is_chat = isinstance(req, ChatCompletionRequest)
    m = _SP_FIELD.match(message)
    name = m.group(1) if m else prompt_field
    if name == "max_tokens":
        return max_tokens_field(req)
    if name == "logprobs" and is_chat:
        return "top_logprobs"
    if name in STRUCTURED_FIELDS or name == "tool_choice":
        return name
    if name in ("prompt", "text") or name not in SamplingParams.__dataclass_fields__:
        return prompt_field
    return name


# ---- responses -----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


def _token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"<{token_id}>"


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int,
                        text_offset: int = 0) -> dict[str, list]:
    """The legacy completions `logprobs` object for these tokens."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, logprobs):
        lp = entry[token_id]
        text = _token_text(token_id, lp)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({_token_text(t, e): e.logprob for t, e in _top(entry, k)} if k else None)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int) -> dict[str, list]:
    """The chat `logprobs` object ({"content": [...]}) for these tokens."""
    def item(token_id: int, lp: Logprob) -> dict[str, Any]:
        text = _token_text(token_id, lp)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, entry in zip(token_ids, logprobs):
        content.append({**item(token_id, entry[token_id]),
                        "top_logprobs": [item(t, e) for t, e in _top(entry, k)]})
    return {"content": content}


class ChoiceDelta:
    """What one choice has sent so far while streaming; turns cumulative outputs into deltas.

    While a choice runs, the last (longest stop string - 1) characters are held back, since
    a stop string completed later is cut from the text, along with what precedes it in it.
    """

    __slots__ = ("num_chars", "num_tokens", "finished", "started", "holdback")

    def __init__(self, params: SamplingParams) -> None:
        self.num_chars = 0
        self.num_tokens = 0
        self.finished = False
        self.started = False  # chat: the first chunk (with the role) went out
        stops = params.stop_list
        self.holdback = max(len(s) for s in stops) - 1 if stops and not params.include_stop_str_in_output else 0

    def advance(self, c: CompletionOutput, on_tokens: bool = False) -> tuple[str, list[int], list | None,
                                                                             str | None] | None:
        """(text, token ids, logprob entries, finish_reason) new since the last call, or None
        when nothing is new: no text (with on_tokens: no tokens either) and no finish."""
        if self.finished:
            return None
        finish = c.finish_reason
        text = c.text
        end = len(text) if finish is not None else max(self.num_chars, len(text) - self.holdback)
        delta = text[self.num_chars:end]
        tokens = c.token_ids[self.num_tokens:]
        entries = c.logprobs[self.num_tokens:len(c.token_ids)] if c.logprobs is not None else None
        if not delta and finish is None and not (entries and c.logprobs is not None) \
                and not (on_tokens and tokens):
            return None
        self.num_chars = end
        self.num_tokens = len(c.token_ids)
        self.finished = finish is not None
        return delta, tokens, entries, finish
