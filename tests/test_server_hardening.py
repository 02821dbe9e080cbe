"""Hostile and malformed requests against a real server process: each gets its 4xx naming the
field (or the bound), slow and vanishing clients are cut off quietly, and the server keeps
serving on the same connection."""

from __future__ import annotations

import json
import socket
import time

import pytest
from engine_utils import SMALL_KV
from server_process import engine_flags, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from myvllm.entrypoints.openai_protocol import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS  # noqa: E402

NAME = "tiny"
MAX_WAITING = 4
ENGINE = dict(kvcache_block_size=16, max_model_len=256, max_num_seqs=4, enforce_eager=True, **SMALL_KV)
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 1
DISCONNECT_LOG = "disconnected before its request was read"
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": NAME, "prompt": "the", "max_tokens": 2}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(base URL, log path) of a server with small bounds and short timeouts, logging at debug."""
    log_path = tmp_path_factory.mktemp("hardening") / "server.log"
    flags = ["--served-model-name", NAME, "--max-waiting-requests", str(MAX_WAITING), "--log-level", "debug",
             "--body-read-timeout", str(BODY_TIMEOUT), "--timeout-keep-alive", str(KEEP_ALIVE),
             "--generation-config", "vllm", *engine_flags(ENGINE)]
    with running_server(tiny_model_dir, log_path, flags) as url:
        yield url, log_path


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def post_raw(http: httpx.Client, path: str, body: bytes, content_type: str | None = "application/json"):
    headers = {} if content_type is None else {"Content-Type": content_type}
    return http.post(path, content=body, headers=headers)


def still_serves(http: httpx.Client) -> None:
    """A good request on the same client (the same keep-alive connection) still gets its answer."""
    r = http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---- text that is not Unicode -----------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "\\ud800", "content": "hi"}]}',
     "messages.0.role"),
    ("/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\xed\xbf\xbfb"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x\\udc00", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["ok", "\\ud83d"], "max_tokens": 2}', "stop.1"),
])
def test_lone_surrogate_is_a_400_naming_the_field(http, path, body, param):
    err = error_of(post_raw(http, path, body), 400)
    assert err["param"] == param and "surrogate" in err["message"], err
    still_serves(http)


def test_paired_surrogates_are_text(http):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'
    assert post_raw(http, "/v1/chat/completions", body).status_code == 200


# ---- request chat templates --------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}, "chat_template"),
    ({"chat_template_kwargs": {"chat_template": "{{ messages }}"}}, "chat_template_kwargs.chat_template"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
])
def test_request_chat_template_is_refused(http, extra, param):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, **extra}), 400)
    assert err["param"] == param, err
    if param.endswith("chat_template"):
        assert "--trust-request-chat-template" in err["message"] and err["code"] == "unsupported"
    still_serves(http)


def test_trusted_request_chat_template_is_used(tiny_model_dir):
    from engine_utils import in_process_server
    from transformers import AutoTokenizer

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    want = len(AutoTokenizer.from_pretrained(tiny_model_dir).encode("red green blue", add_special_tokens=False))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "red green blue"}], "max_tokens": 1,
            "chat_template": template}
    with in_process_server(tiny_model_dir, trust_request_chat_template=True) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == want
        plain = client.post("/v1/chat/completions", json={**body, "chat_template": None}).json()
        assert plain["usage"]["prompt_tokens"] > want  # the model's template adds the role markers


# ---- content type ------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_body_must_be_sent_as_json(http, content_type):
    err = error_of(post_raw(http, "/v1/completions", json.dumps(COMPLETION).encode(), content_type), 415)
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    still_serves(http)


def test_json_with_charset_is_accepted(http):
    r = post_raw(http, "/v1/completions", json.dumps(COMPLETION).encode(), "Application/JSON; charset=utf-8")
    assert r.status_code == 200, r.text


# ---- stop strings ------------------------------------------------------------------------------

def test_stop_string_bounds(http):
    err = error_of(http.post("/v1/completions", json={**COMPLETION, "stop": [f"s{i}" for i in range(10_000)]}), 400)
    assert err["param"] == "stop" and str(MAX_STOP_STRINGS) in err["message"], err
    long = "x" * (MAX_STOP_STRING_CHARS + 1)
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "stop": long}), 400)
    assert err["param"] == "stop" and str(MAX_STOP_STRING_CHARS) in err["message"], err
    err = error_of(http.post("/v1/completions", json={**COMPLETION, "stop_token_ids": list(range(500))}), 400)
    assert err["param"] == "stop_token_ids", err
    ok = {**COMPLETION, "stop": [f"zz{i}" for i in range(MAX_STOP_STRINGS - 1)] + ["y" * MAX_STOP_STRING_CHARS]}
    assert http.post("/v1/completions", json=ok).status_code == 200


# ---- messages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, param, code", [
    ([{"role": "wizard", "content": "hi"}], "messages.0.role", "invalid_value"),
    ([{"role": "user", "content": "hi"}, {"role": "function", "content": "x"}], "messages.1.role", "invalid_value"),
    ([{"role": "user"}], "messages.0.content", "missing_field"),
    ([{"role": "system", "content": None}, {"role": "user", "content": "hi"}], "messages.0.content",
     "missing_field"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages.1.content", "missing_field"),
    ([{"role": "tool", "tool_call_id": "c1"}], "messages.0.content", "missing_field"),
])
def test_messages_are_validated(http, messages, param, code):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400)
    assert err["param"] == param and err["code"] == code, err
    still_serves(http)


def test_assistant_message_with_tool_calls_needs_no_content(http):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 200, r.text


# ---- max_tokens named as sent ------------------------------------------------------------------

@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_error_names_the_field_sent(http, field):
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    err = error_of(http.post("/v1/chat/completions", json={**body, field: -1}), 400)
    assert err["param"] == field, err


# ---- a batch over the queue bound --------------------------------------------------------------

def test_batch_larger_than_the_queue_is_a_400(http):
    err = error_of(http.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c", "d", "e"]}), 400)
    assert err["param"] == "prompt" and f"--max-waiting-requests={MAX_WAITING}" in err["message"], err
    r = http.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c", "d"]})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text


# ---- slow and vanishing clients ----------------------------------------------------------------

def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _request_head(length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_client_leaving_mid_body_is_logged_at_debug(served, http):
    url, log_path = served
    before = log_path.read_text().count(DISCONNECT_LOG)
    with _connect(url) as sock:
        sock.sendall(_request_head(500) + b'{"model": "tiny", "prompt": ')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while log_path.read_text().count(DISCONNECT_LOG) == before:
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    log = log_path.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    line = next(line for line in log.splitlines() if DISCONNECT_LOG in line)
    assert " DEBUG " in line, line
    still_serves(http)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (its head, and the body its Content-Length gives)."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            return reply
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_slow_body_gets_408(served):
    url, _ = served
    with _connect(url) as sock:
        start = time.monotonic()
        sock.sendall(_request_head(200) + b'{"model": "tiny", ')
        reply = _read_response(sock)
        elapsed = time.monotonic() - start
        closed = sock.recv(4096) == b""  # the connection is closed after the 408
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT * 0.9 <= elapsed < BODY_TIMEOUT + 4, elapsed
    assert closed


def test_idle_keep_alive_connection_is_closed(served):
    url, _ = served
    with _connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_response(sock)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'"ok"}'), reply
        start = time.monotonic()
        sock.settimeout(KEEP_ALIVE + 4)
        assert sock.recv(4096) == b""  # the server closed the idle connection
        assert time.monotonic() - start < KEEP_ALIVE + 3
