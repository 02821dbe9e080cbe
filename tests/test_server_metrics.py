"""/metrics of a real server process: Prometheus text under vLLM's names, and counters and
histograms that move by exactly what the requests sent in between did."""

from __future__ import annotations

import json
import random

import pytest
from engine_utils import SMALL_KV
from server_process import engine_flags, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

NAME = "tiny"
BLOCK = 16
ENGINE = dict(kvcache_block_size=BLOCK, max_model_len=256, max_num_seqs=4, enforce_eager=True, **SMALL_KV)
LABEL = {"model_name": NAME}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("metrics") / "server.log"
    flags = ["--served-model-name", NAME, "--generation-config", "vllm", *engine_flags(ENGINE)]
    with running_server(tiny_model_dir, log_path, flags) as url:
        yield url


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as (name, sorted labels) -> value."""
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted({**LABEL, **labels}.items())))
    assert key in samples, f"{key} not in {sorted(k[0] for k in samples)}"
    return samples[key]


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - before.get((name, tuple(sorted({**LABEL, **labels}.items()))), 0.0)


def token_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 500) for _ in range(n)]


def complete(url: str, prompt, max_tokens: int, stream: bool) -> None:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1][6:])["choices"][0]["finish_reason"] == "length"


def test_metric_names_are_vllms(server):
    samples = scrape(server)
    names = {k[0] for k in samples}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum"):
        assert name in names, name
    assert value(samples, "vllm:num_requests_running") == 0
    assert value(samples, "vllm:num_requests_waiting") == 0
    assert value(samples, "vllm:kv_cache_usage_perc") == 0.0


def test_counters_move_by_what_the_requests_did(server):
    rng = random.Random(0)
    plain = [token_prompt(rng, n) for n in (5, 9, 20)]
    streamed = [token_prompt(rng, n) for n in (7, 12)]
    out_tokens = 6
    before = scrape(server)
    for p in plain:
        complete(server, p, out_tokens, stream=False)
    for p in streamed:
        complete(server, p, out_tokens, stream=True)
    after = scrape(server)
    prompts = plain + streamed
    assert moved(before, after, "vllm:prompt_tokens_total") == sum(map(len, prompts))
    assert moved(before, after, "vllm:generation_tokens_total") == out_tokens * len(prompts)
    assert moved(before, after, "vllm:e2e_request_latency_seconds_count") == len(prompts)
    assert moved(before, after, "vllm:e2e_request_latency_seconds_sum") > 0
    assert moved(before, after, "vllm:request_success_total", finished_reason="length") == len(prompts)
    # first token and inter-token latency: seen for streamed requests, one gap per later token
    assert moved(before, after, "vllm:time_to_first_token_seconds_count") == len(streamed)
    assert moved(before, after, "vllm:inter_token_latency_seconds_count") == len(streamed) * (out_tokens - 1)
    # every prompt token was looked up; random prompts share no block
    assert moved(before, after, "vllm:prefix_cache_queries_total") == sum(map(len, prompts))
    assert moved(before, after, "vllm:prefix_cache_hits_total") == 0
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0.0


def test_prefix_cache_hits_and_preemptions_follow_the_engine(server):
    rng = random.Random(1)
    prompt = token_prompt(rng, 2 * BLOCK + 3)
    complete(server, prompt, 2, stream=False)
    before = scrape(server)
    complete(server, prompt, 2, stream=False)  # its first two full blocks are cached now
    after = scrape(server)
    assert moved(before, after, "vllm:prefix_cache_queries_total") == len(prompt)
    assert moved(before, after, "vllm:prefix_cache_hits_total") == 2 * BLOCK
    stats = httpx.get(f"{server}/v1/engine/stats", timeout=10).json()
    assert value(after, "vllm:num_preemptions_total") == stats["num_preemptions"]
    assert value(after, "vllm:prefix_cache_hits_total") == stats["prefix_cache_hits"]


def test_registries_are_per_server(tiny_model_dir):
    from engine_utils import in_process_server

    with in_process_server(tiny_model_dir) as a, in_process_server(tiny_model_dir) as b:
        r = a.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3,
                                            "ignore_eos": True})
        assert r.status_code == 200, r.text

        def prompt_tokens(client) -> float:
            text = client.get("/metrics").text
            return next(s.value for f in parser.text_string_to_metric_families(text) for s in f.samples
                        if s.name == "vllm:prompt_tokens_total")

        assert prompt_tokens(a) == 3 and prompt_tokens(b) == 0


def test_weighted_histogram_equals_prometheus_histogram_observed_n_times():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from myvllm.entrypoints.metrics import ITL_BUCKETS, WeightedHistogram

    ours_reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours = WeightedHistogram("h", "doc", "m", ITL_BUCKETS)
    ours_reg.register(ours)
    ref = Histogram("h", "doc", ["model_name"], buckets=ITL_BUCKETS, registry=ref_reg).labels("m")
    rng = random.Random(3)
    for _ in range(200):
        value, n = rng.choice([*ITL_BUCKETS, rng.uniform(0, 100)]), rng.randint(1, 8)  # bounds included
        ours.observe(value, n)
        for _ in range(n):
            ref.observe(value)

    def samples(reg) -> dict:
        text = generate_latest(reg).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in parser.text_string_to_metric_families(text) for s in f.samples
                if not s.name.endswith("_created")}

    got, want = samples(ours_reg), samples(ref_reg)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
