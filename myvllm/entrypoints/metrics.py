"""Prometheus metrics of one server, under vLLM's names (`vllm:...`) so that vLLM's dashboards
read them unchanged.

Each server owns a CollectorRegistry (no process-global state). Two kinds of metrics:
- per request, recorded on the event loop as outputs reach the server: time to first token,
  inter-token latency and end-to-end latency histograms, prompt / generation token counters,
  finished requests by reason. Time to first token and inter-token latency count streamed
  requests: the server sees the tokens of the others only when they finish.
- engine state, read from LLMEngine.get_stats() on the engine thread when /metrics is
  scraped: requests running and waiting, KV-cache usage, prefix-cache queries and hits
  (tokens), preemptions.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from myvllm.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The metrics of one server for one served model (the `model_name` label)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, in seconds (streamed "
                              "requests).", labels, buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = WeightedHistogram("vllm:inter_token_latency_seconds", "Time between successive output "
                                     "tokens, in seconds (streamed requests).", model_name, ITL_BUCKETS)
        reg.register(self.itl)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency, in seconds.", labels,
                             buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.",
                                         labels, registry=reg).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished choices (sequences), by finish reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self.engine = _EngineCollector(model_name)
        reg.register(self.engine)

    def request(self, streamed: bool) -> RequestMetrics:
        """The recorder of one engine request, started now."""
        return RequestMetrics(self, streamed)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self, engine_stats: dict[str, int]) -> bytes:
        """The exposition text, with the engine state read just before."""
        self.engine.stats = engine_stats
        return generate_latest(self.registry)


class RequestMetrics:
    """Timing and token counts of one request (one engine request per prompt), fed its outputs
    in order on the event loop."""

    __slots__ = ("metrics", "streamed", "start", "last", "num_tokens")

    def __init__(self, metrics: ServerMetrics, streamed: bool) -> None:
        self.metrics = metrics
        self.streamed = streamed
        self.start = time.perf_counter()
        self.last: float | None = None  # when the latest token arrived
        self.num_tokens = 0

    def output(self, out: RequestOutput) -> None:
        num = 0
        for c in out.outputs:
            num += len(c.token_ids)
        new = num - self.num_tokens
        if new > 0:
            now = time.perf_counter()
            m = self.metrics
            if self.streamed:
                if self.last is None:
                    m.ttft.observe(now - self.start)
                    new -= 1
                    gap = 0.0  # tokens that come with the first one reach the client with it
                else:  # the tokens of one multi-step window arrive together: the gap is shared
                    gap = (now - self.last) / new
                m.itl.observe(gap, new)  # one interval per token after the first
            self.last = now
            self.num_tokens = num
        if out.finished:
            m = self.metrics
            m.e2e.observe(time.perf_counter() - self.start)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.generation_tokens.inc(num)
            for c in out.outputs:
                m.finished(c.finish_reason or "abort")


class WeightedHistogram(Collector):
    """A histogram that takes n equal observations in one call (the tokens of one chunk share
    their gap), exposed as a Prometheus histogram. Written and collected on the event loop."""

    def __init__(self, name: str, doc: str, model_name: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.model_name = name, doc, model_name
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        h = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += count
            cumulative.append((bound, total))
        h.add_metric([self.model_name], cumulative, self.sum)
        yield h


class _EngineCollector(Collector):
    """The engine's queues, KV cache and counters, from the stats read at the scrape."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: dict[str, Any] | None = None

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        s = self.stats
        if s is None:
            return
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        waiting = s["num_waiting_requests"]
        yield gauge("vllm:num_requests_running", "Requests with every sequence scheduled.",
                    s["num_unfinished_requests"] - waiting)
        yield gauge("vllm:num_requests_waiting", "Requests with a sequence waiting (or preempted).", waiting)
        blocks = s["num_blocks"]
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                    (blocks - s["num_free_blocks"]) / blocks if blocks else 0.0)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s["prefix_cache_queries"])
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits"])
        yield counter("vllm:num_preemptions", "Sequences preempted (their KV blocks freed, recomputed later).",
                      s["num_preemptions"])
