"""The OpenAI-compatible server, tested as a real process on 127.0.0.1 with the tiny model.

One server per module (`python -m myvllm.serve`), started with the API key in
MYVLLM_API_KEY. Greedy outputs through the official `openai` client must equal
`LLM.generate` / `LLM.chat` in-process; concurrent streams, disconnects, overload and
bad requests must leave the server serving and the KV cache empty once idle.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from engine_utils import SMALL_KV
from server_process import engine_flags, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from myvllm import LLM, SamplingParams  # noqa: E402

API_KEY = "test-key-123"
NAME = "tiny-qwen3"
ENGINE = dict(kvcache_block_size=16, max_model_len=1024, max_num_seqs=8, enforce_eager=True, **SMALL_KV)
MAX_WAITING = 40
MAX_BODY = 64 * 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["the quick brown fox", "seven wizards quietly judge", "numbers like one two three", "blue"]
MESSAGES = [[{"role": "user", "content": "tell me about the weather"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red green blue"}]]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Base URL of a running server; its log is printed if it fails to start."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    flags = ["--served-model-name", NAME, "--max-waiting-requests", str(MAX_WAITING), "--max-body-bytes",
             str(MAX_BODY), *engine_flags(ENGINE)]
    with running_server(tiny_model_dir, log_path, flags, {"MYVLLM_API_KEY": API_KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def stats(url: str) -> dict:
    r = httpx.get(f"{url}/v1/engine/stats", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """Engine stats once no request is left; fails unless every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(url)
        if s["num_unfinished_requests"] == 0 and s["num_waiting_seqs"] == 0 and s["num_running_seqs"] == 0:
            assert s["num_free_blocks"] == s["num_blocks"], f"blocks held by an idle engine: {s}"
            return s
        assert time.monotonic() < deadline, f"engine not idle after {timeout} s: {s}"
        time.sleep(0.05)


def sse_events(lines) -> tuple[list[dict], bool]:
    """Decoded `data:` events of a server-sent-event stream, and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected line {line!r}"
            continue
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[len("data: "):]))
    return events, done


# ---- basics ----------------------------------------------------------------------------------------

def test_health_models_stats(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    s = wait_idle(server)
    assert s["num_blocks"] > 0


# ---- outputs equal LLM.generate -------------------------------------------------------------------

def test_completions_match_generate(client, llm):
    expected = llm.generate(PROMPTS, greedy(12), use_tqdm=False)
    for prompt, exp in zip(PROMPTS, expected):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == exp.outputs[0].text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(exp.outputs[0].token_ids) == 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completions_batch_prompts_and_token_ids(client, llm):
    token_ids = llm.get_tokenizer().encode(PROMPTS[1])
    expected = llm.generate([PROMPTS[0], token_ids], greedy(6), use_tqdm=False)
    r = client.completions.create(model=NAME, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [e.outputs[0].text for e in expected]
    r = client.completions.create(model=NAME, prompt=token_ids, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected[1].outputs[0].text


def test_completions_logprobs_match_generate(client, llm):
    (exp,) = llm.generate([PROMPTS[0]], greedy(5, logprobs=2), use_tqdm=False)
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    want = [e[t].logprob for t, e in zip(exp.outputs[0].token_ids, exp.outputs[0].logprobs)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # keyed by text: equal texts merge


def test_completions_stream_match_generate(client, llm):
    expected = llm.generate(PROMPTS, greedy(12), use_tqdm=False)
    for prompt, exp in zip(PROMPTS, expected):
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        texts = [c.choices[0].text for c in chunks if c.choices]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert "".join(texts) == exp.outputs[0].text
        assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
        assert chunks[-1].usage.completion_tokens == 12


def test_chat_matches_llm_chat(client, llm):
    for messages in MESSAGES:
        (exp,) = llm.chat(messages, greedy(10), use_tqdm=False)
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == exp.outputs[0].text
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == 10


def test_chat_stream_matches_llm_chat(client, llm):
    for messages in MESSAGES:
        (exp,) = llm.chat(messages, greedy(10), use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
        stream = client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == exp.outputs[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.prompt_tokens == len(exp.prompt_token_ids)


def test_stop_string_is_cut_from_stream(client, llm):
    (full,) = llm.generate([PROMPTS[2]], greedy(16), use_tqdm=False)
    text = full.outputs[0].text
    stop = text[5:8]
    assert stop and not stop.isspace()
    (exp,) = llm.generate([PROMPTS[2]], greedy(16, stop=[stop]), use_tqdm=False)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == exp.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == exp.outputs[0].finish_reason == "stop"


def test_stream_with_n_and_batch_prompts(server, llm):
    expected = llm.generate(PROMPTS[:2], greedy(6), use_tqdm=False)
    body = {"model": NAME, "prompt": PROMPTS[:2], "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events, done = sse_events(list(r.iter_lines()))
    assert done
    texts = {i: "" for i in range(4)}
    finishes = {}
    for e in events[:-1]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    want = [e.outputs[0].text for e in expected]
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}
    assert finishes == {i: "length" for i in range(4)}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4 * 6


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.8, top_p=0.9, seed=7, n=2,
              extra_body={"top_k": 20, "min_p": 0.05, "ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


# ---- concurrency, disconnects, overload ------------------------------------------------------------

async def _stream_completion(http, prompt: str, max_tokens: int) -> tuple[str, str | None, bool]:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        events, done = sse_events([line async for line in r.aiter_lines()])
    text = "".join(e["choices"][0]["text"] for e in events)
    return text, events[-1]["choices"][0]["finish_reason"], done


def test_32_concurrent_streams(server, llm):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {' '.join(['one', 'two', 'red'][: i % 3])}".strip() for i in range(32)]
    expected = llm.generate(prompts, greedy(8), use_tqdm=False)

    async def run():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*[_stream_completion(http, p, 8) for p in prompts])

    results = asyncio.run(run())
    for (text, finish, done), exp in zip(results, expected):
        assert done and finish == "length"
        assert text == exp.outputs[0].text
    wait_idle(server)


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
    start = time.monotonic()
    wait_idle(server, timeout=20)
    # 1000 tokens take far longer than this: the request was aborted, not run to its end
    assert time.monotonic() - start < 8


def test_disconnect_while_waiting_non_streaming(server):
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    wait_idle(server, timeout=20)


def test_overload_gets_503_and_server_recovers(server, llm):
    n_slots, n_requests = ENGINE["max_num_seqs"], MAX_WAITING + 20

    async def run():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=128)) as http:
            blockers = []
            for i in range(n_slots):  # long streams that hold every running slot
                body = {"model": NAME, "prompt": f"{PROMPTS[0]} {i}", "max_tokens": 1000, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                r = await http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
                assert r.status_code == 200
                lines = r.aiter_lines()  # kept referenced: a collected iterator closes the stream
                while not (await anext(lines)).startswith("data: "):
                    pass
                blockers.append((r, lines))
            body = {"model": NAME, "prompt": PROMPTS[3], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
            tasks = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(n_requests)]
            deadline = time.monotonic() + 30
            while True:  # every request is either answered (503) or waiting
                s = (await http.get("/v1/engine/stats")).json()
                if sum(t.done() for t in tasks) + s["num_waiting_seqs"] == n_requests:
                    break
                assert time.monotonic() < deadline, s
                await asyncio.sleep(0.05)
            assert (await http.get("/v1/engine/stats")).json()["num_running_seqs"] == n_slots
            for r, _ in blockers:
                await r.aclose()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}
    assert codes.count(503) >= n_requests - MAX_WAITING
    err = next(r for r in responses if r.status_code == 503).json()["error"]
    assert err["type"] == "overloaded_error" and err["code"] == "server_overloaded"
    (exp,) = llm.generate([PROMPTS[3]], greedy(2), use_tqdm=False)
    assert all(r.json()["choices"][0]["text"] == exp.outputs[0].text for r in responses if r.status_code == 200)
    wait_idle(server)


# ---- bad requests ----------------------------------------------------------------------------------

COMPLETION = {"model": NAME, "prompt": "the", "max_tokens": 2}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = "invalid_request_error"


def _with(base: dict, **changes) -> dict:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


BAD_REQUESTS = [
    # (id, path, body (dict, or raw bytes), headers, status, error type, param)
    ("missing-model", "completions", _with(COMPLETION, model=...), AUTH, 400, BAD, "model"),
    ("missing-prompt", "completions", _with(COMPLETION, prompt=...), AUTH, 400, BAD, "prompt"),
    ("missing-messages", "chat/completions", _with(CHAT, messages=...), AUTH, 400, BAD, "messages"),
    ("max_tokens-str", "completions", _with(COMPLETION, max_tokens="ten"), AUTH, 400, BAD, "max_tokens"),
    ("max_tokens-float", "completions", _with(COMPLETION, max_tokens=2.5), AUTH, 400, BAD, "max_tokens"),
    ("temperature-str", "completions", _with(COMPLETION, temperature="hot"), AUTH, 400, BAD, "temperature"),
    ("prompt-int", "completions", _with(COMPLETION, prompt=5), AUTH, 400, BAD, "prompt"),
    ("prompt-bool-ids", "completions", _with(COMPLETION, prompt=[True, 3]), AUTH, 400, BAD, "prompt"),
    ("stream-str", "completions", _with(COMPLETION, stream="yes"), AUTH, 400, BAD, "stream"),
    ("ignore_eos-str", "completions", _with(COMPLETION, ignore_eos="true"), AUTH, 400, BAD, "ignore_eos"),
    ("model-int", "completions", _with(COMPLETION, model=3), AUTH, 400, BAD, "model"),
    ("messages-str", "chat/completions", _with(CHAT, messages="hi"), AUTH, 400, BAD, "messages"),
    ("messages-empty", "chat/completions", _with(CHAT, messages=[]), AUTH, 400, BAD, "messages"),
    ("content-int", "chat/completions", _with(CHAT, messages=[{"role": "user", "content": 5}]), AUTH, 400, BAD,
     "messages.0.content"),
    ("role-missing", "chat/completions", _with(CHAT, messages=[{"content": "hi"}]), AUTH, 400, BAD,
     "messages.0.role"),
    ("temperature-neg", "completions", _with(COMPLETION, temperature=-1), AUTH, 400, BAD, "temperature"),
    ("top_p-zero", "completions", _with(COMPLETION, top_p=0), AUTH, 400, BAD, "top_p"),
    ("top_p-big", "chat/completions", _with(CHAT, top_p=1.5), AUTH, 400, BAD, "top_p"),
    ("top_k-neg", "completions", _with(COMPLETION, top_k=-5), AUTH, 400, BAD, "top_k"),
    ("min_p-big", "completions", _with(COMPLETION, min_p=2.0), AUTH, 400, BAD, "min_p"),
    ("max_tokens-zero", "completions", _with(COMPLETION, max_tokens=0), AUTH, 400, BAD, "max_tokens"),
    ("max_completion_tokens-zero", "chat/completions", _with(CHAT, max_tokens=..., max_completion_tokens=0),
     AUTH, 400, BAD, "max_completion_tokens"),
    ("n-zero", "completions", _with(COMPLETION, n=0), AUTH, 400, BAD, "n"),
    ("seed-neg", "completions", _with(COMPLETION, seed=-1), AUTH, 400, BAD, "seed"),
    ("seed-huge", "completions", _with(COMPLETION, seed=2**70, top_k=5), AUTH, 400, BAD, "seed"),
    ("top_k-huge", "completions", _with(COMPLETION, top_k=2**70), AUTH, 400, BAD, "top_k"),
    ("n-huge", "completions", _with(COMPLETION, n=10**6), AUTH, 400, BAD, "n"),
    ("stop_token_ids-range", "completions", _with(COMPLETION, stop_token_ids=[10**6], min_tokens=1), AUTH, 400,
     BAD, "stop_token_ids"),
    ("stop-empty", "completions", _with(COMPLETION, stop=[""]), AUTH, 400, BAD, "stop"),
    ("stop-int", "completions", _with(COMPLETION, stop=[3]), AUTH, 400, BAD, "stop"),
    ("logprobs-big", "completions", _with(COMPLETION, logprobs=1000), AUTH, 400, BAD, "logprobs"),
    ("top_logprobs-big", "chat/completions", _with(CHAT, logprobs=True, top_logprobs=1000), AUTH, 400, BAD,
     "top_logprobs"),
    ("presence_penalty", "completions", _with(COMPLETION, presence_penalty=2.5), AUTH, 400, BAD,
     "presence_penalty"),
    ("repetition_penalty", "chat/completions", _with(CHAT, repetition_penalty=0), AUTH, 400, BAD,
     "repetition_penalty"),
    ("prompt-too-long", "completions", _with(COMPLETION, prompt="one two three " * 600), AUTH, 400, BAD, "prompt"),
    ("chat-too-long", "chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": "one two three " * 600}]), AUTH, 400, BAD, "messages"),
    ("prompt-empty", "completions", _with(COMPLETION, prompt=""), AUTH, 400, BAD, "prompt"),
    ("prompt-id-range", "completions", _with(COMPLETION, prompt=[1, 10**6]), AUTH, 400, BAD, "prompt"),
    ("bad-json", "completions", b'{"model": "tiny-qwen3", "prompt": ', AUTH, 400, BAD, None),
    ("json-nan", "completions", b'{"model": "tiny-qwen3", "prompt": "a", "temperature": NaN}', AUTH, 400, BAD,
     None),
    ("json-array", "completions", b"[1, 2]", AUTH, 400, BAD, None),
    ("body-too-large", "completions", _with(COMPLETION, prompt="a" * (MAX_BODY + 10)), AUTH, 413, BAD, None),
    ("wrong-model", "completions", _with(COMPLETION, model="gpt-4"), AUTH, 404, "not_found_error", "model"),
    ("wrong-key", "completions", COMPLETION, {"Authorization": "Bearer nope"}, 401, "authentication_error",
     None),
    ("no-key", "chat/completions", CHAT, {}, 401, "authentication_error", None),
    ("no-key-models", "models", None, {}, 401, "authentication_error", None),
    ("unknown-route", "embeddings", COMPLETION, AUTH, 404, "not_found_error", None),
]


@pytest.mark.parametrize("name, path, body, headers, status, kind, param", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, name, path, body, headers, status, kind, param):
    url = f"{server}/v1/{path}"
    if body is None:
        r = httpx.get(url, headers=headers, timeout=30)
    elif isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == kind and err["param"] == param, err
    assert err["message"]
    if status == 400 and param is not None:
        assert err["code"] in ("missing_field", "invalid_type", "invalid_value", "unsupported"), err
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_bad_requests_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="the", max_tokens=2, temperature=-3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    # still serving
    assert client.completions.create(model=NAME, prompt="the", max_tokens=2).usage.completion_tokens >= 1


def test_server_still_serves_after_errors(server, client, llm):
    (exp,) = llm.generate([PROMPTS[1]], greedy(4), use_tqdm=False)
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == exp.outputs[0].text
    wait_idle(server)


# ---- in-process pieces -----------------------------------------------------------------------------

def test_async_engine_in_process(llm):
    from myvllm.entrypoints.async_engine import AsyncLLMEngine, EngineDead

    with pytest.raises(ValueError, match="max_waiting_requests"):
        AsyncLLMEngine(llm.engine, max_waiting_requests=0)
    engine = AsyncLLMEngine(llm.engine, max_waiting_requests=4)
    (exp,) = llm.generate([PROMPTS[0]], greedy(6), use_tqdm=False)

    async def run():
        outs = [out async for out in engine.generate(PROMPTS[0], greedy(6))]
        assert outs[-1].finished and outs[-1].outputs[0].text == exp.outputs[0].text
        assert all(not o.finished for o in outs[:-1])
        with pytest.raises(ValueError, match="temperature|prompt"):
            await engine.add_request("", greedy(2))
        stream = await engine.add_request(PROMPTS[0], greedy(500))
        first = await stream.get()
        assert not first.finished
        stream.abort()  # frees its blocks on the engine thread
        stats = await engine.stats()
        assert stats["num_unfinished_requests"] == 0
        assert stats["num_free_blocks"] == stats["num_blocks"]

    engine.start()
    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert not engine.is_healthy

    async def after_stop():
        with pytest.raises(EngineDead):
            await engine.add_request(PROMPTS[0], greedy(2))

    asyncio.run(after_stop())
    llm.engine.check_integrity()


def test_serve_flags_map_onto_engine_args():
    from myvllm.serve import parse_args

    args, engine_args = parse_args(["--model", "m", "--max-model-len", "512", "--enforce-eager", "--dtype", "float32",
                                    "--no-enable-prefix-caching", "--cpu-kv-cache-gib", "0.5", "--api-key", "k"])
    assert engine_args == dict(max_model_len=512, enforce_eager=True, dtype="float32", enable_prefix_caching=False,
                               cpu_kv_cache_gib=0.5)
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key == "k"
    assert math.isclose(engine_args["cpu_kv_cache_gib"], 0.5)
