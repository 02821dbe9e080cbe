"""Load on the OpenAI-compatible server: a burst or a Poisson stream of streamed completions,
and the same workload through offline `LLM.generate` for the ratio.

Every request is a streamed /v1/completions of token ids with `ignore_eos` (so it makes exactly
its max_tokens), `return_token_ids` (chunks say how many tokens they carry) and usage. Reported:
output tokens/s, requests/s, and p50/p90/p99/mean of
    TTFT       time to first token (the first chunk with tokens)
    ITL        inter-token latency: each chunk's gap from the previous one, shared by its tokens
               (one sample per token after the first)
    chunk gap  the gap between successive chunks, as a client sees it
    TPOT       (e2e - TTFT) / (tokens - 1) per request
    E2E        end-to-end latency per request

Workloads: `--workload seed` is bench.py's (256 prompts of 100-1024 token ids, 100-1024 output
tokens, temperature 0.6; the sizes follow --num-requests / --max-input-len / --max-output-len);
`--workload fixed` sends --num-requests prompts of --input-len ids for --output-len tokens.
`--request-rate inf` (the default) sends every request at once; a number sends a Poisson stream
of that many requests per second.

    # the server started here, then offline on the same workload, on one GPU:
    python benchmarks/serve_load.py --launch dummy:qwen3-0.6b --offline \\
        --server-args "--load-format dummy --skip-tokenizer-init --max-model-len 4096 --kvcache-block-size 256" \\
        --json out/serve_burst.json --plot out/serve_burst.png
    # against a running server
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --workload fixed --num-requests 64

The client is aiohttp (one session, no connection limit). With --offline (needs --launch) the
server is stopped first, then this process builds `LLM(model, **engine args of --server-args)`,
warms it up and times `generate` on the same prompts and sampling parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEED_WORKLOAD = dict(num_requests=256, max_input_len=1024, max_output_len=1024)
SEED_TEMPERATURE = 0.6


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0  # perf_counter when sent
    ttft: float = 0.0
    e2e: float = 0.0
    num_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)


# ---- workload ------------------------------------------------------------------------------------

def make_workload(args: argparse.Namespace, vocab_size: int) -> list[Request]:
    if args.workload == "seed":
        from bench import workload

        n = args.num_requests or SEED_WORKLOAD["num_requests"]
        prompts, params = workload(n, args.max_input_len or SEED_WORKLOAD["max_input_len"],
                                   args.max_output_len or SEED_WORKLOAD["max_output_len"], args.seed, vocab_size)
        return [Request(list(p), sp.max_tokens) for p, sp in zip(prompts, params)]
    rng = random.Random(args.seed)
    high = min(10000, vocab_size - 1)
    return [Request([rng.randint(0, high) for _ in range(args.input_len)], args.output_len)
            for _ in range(args.num_requests or 64)]


def model_vocab_size(model: str, engine_args: dict) -> int:
    from myvllm.config import EngineConfig
    from myvllm.models.resolve import resolve_model

    return resolve_model(EngineConfig.from_kwargs(model, **engine_args)).model_config.vocab_size


# ---- client --------------------------------------------------------------------------------------

async def one_request(http: aiohttp.ClientSession, url: str, model: str, req: Request, temperature: float,
                      timeout: float) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    res = Result(start=time.perf_counter())
    try:
        async with http.post(f"{url}/v1/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for raw in r.content:  # one line at a time
                if not raw.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                event = json.loads(raw[6:])
                if "error" in event:
                    res.error = event["error"].get("message", "stream error")
                    return res
                if event.get("usage"):
                    res.num_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    ids = choice.get("token_ids")
                    if ids or (ids is None and choice.get("text")):  # a server without return_token_ids
                        res.chunk_times.append(now)
                        res.chunk_tokens.append(len(ids) if ids is not None else 0)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - res.start
    if not res.chunk_times:
        res.error = "no chunk carried tokens"
        return res
    if 0 in res.chunk_tokens:  # chunks without token ids: the usage's tokens spread evenly over them
        per, extra = divmod(res.num_tokens, len(res.chunk_tokens))
        res.chunk_tokens = [per + (i < extra) for i in range(len(res.chunk_tokens))]
    res.ttft = res.chunk_times[0] - res.start
    res.ok = True
    return res


async def run_load(args: argparse.Namespace, url: str, model: str, requests: list[Request]) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        warm = Request(requests[0].prompt[:16], 8)
        for _ in range(args.warmup):
            await one_request(http, url, model, warm, args.temperature, args.request_timeout)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        rng = random.Random(args.seed + 1)

        async def send(req: Request) -> Result:
            if sem is None:
                return await one_request(http, url, model, req, args.temperature, args.request_timeout)
            async with sem:
                return await one_request(http, url, model, req, args.temperature, args.request_timeout)

        t0 = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(send(req)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.timeout)
        wall = time.perf_counter() - t0
    return report(args, model, requests, results, wall)


# ---- report --------------------------------------------------------------------------------------

def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles and the mean, in milliseconds."""
    if not values:
        return {f"p{p}": float("nan") for p in ps} | {"mean": float("nan")}
    v = sorted(values)
    out = {f"p{p}": v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))] * 1e3 for p in ps}
    out["mean"] = sum(v) / len(v) * 1e3
    return out


def token_gaps(r: Result) -> list[float]:
    """Per token after the first: its chunk's gap from the previous chunk, shared by the chunk's
    tokens (tokens that come with the first one count a gap of 0)."""
    gaps = [0.0] * (r.chunk_tokens[0] - 1)
    for prev, now, n in zip(r.chunk_times, r.chunk_times[1:], r.chunk_tokens[1:]):
        gaps += [(now - prev) / n] * n
    return gaps


def report(args: argparse.Namespace, model: str, requests: list[Request], results: list[Result],
           wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.num_tokens for r in ok)
    return {
        "model": model, "mode": "burst" if not math.isfinite(args.request_rate) else "poisson",
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency, "workload": args.workload,
        "num_requests": len(requests), "prompt_tokens": sum(len(q.prompt) for q in requests),
        "max_output_tokens": sum(q.max_tokens for q in requests), "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": wall, "req_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall,
        "output_tokens": out_tokens,
        "tokens_per_chunk_mean": out_tokens / max(1, sum(len(r.chunk_tokens) for r in ok)),
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "itl_ms": percentiles([g for r in ok for g in token_gaps(r)]),
        "chunk_gap_ms": percentiles([b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]),
        "tpot_ms": percentiles([(r.e2e - r.ttft) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
        "_results": ok,
    }


def print_report(rep: dict) -> None:
    rate = "burst (all at once)" if rep["mode"] == "burst" else f"Poisson {rep['request_rate']:g} req/s"
    print(f"model {rep['model']}: {rep['num_requests']} requests, {rate}, {rep['prompt_tokens']} prompt tokens, "
          f"{rep['max_output_tokens']} output tokens")
    print(f"completed {rep['completed']}, failed {rep['failed']} in {rep['wall_s']:.2f} s")
    for e in rep["errors"]:
        print(f"  error: {e}")
    print(f"server: {rep['req_per_s']:.2f} req/s, {rep['output_tok_per_s']:.1f} output tok/s, "
          f"{rep['tokens_per_chunk_mean']:.2f} tokens per chunk")
    if "offline_tok_per_s" in rep:
        print(f"offline LLM.generate: {rep['offline_tok_per_s']:.1f} output tok/s in {rep['offline_s']:.2f} s; "
              f"server / offline = {rep['server_over_offline']:.3f}"
              + ("" if rep["mode"] == "burst" else " (a Poisson run is paced by its rate: compare bursts)"))
    print(f"{'ms':<10}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for name in ("ttft", "itl", "chunk_gap", "tpot", "e2e"):
        row = rep[f"{name}_ms"]
        print(f"{name.upper():<10}" + "".join(f"{row[k]:>10.1f}" for k in ("p50", "p90", "p99", "mean")))


def plot(rep: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = rep["_results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = [("TTFT (ms)", [r.ttft * 1e3 for r in results]),
              ("inter-token latency (ms)", [g * 1e3 for r in results for g in token_gaps(r)])]
    for ax, (label, values) in zip(axes, series):
        v = sorted(values)
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    t0 = min(r.start for r in results)
    times = sorted((t - t0, n) for r in results for t, n in zip(r.chunk_times, r.chunk_tokens))
    total, xs, ys = 0, [], []
    for t, n in times:
        total += n
        xs.append(t)
        ys.append(total)
    axes[2].plot(xs, ys)
    axes[2].set_xlabel("time since the first request (s)")
    axes[2].set_ylabel("output tokens received")
    axes[2].grid(alpha=0.3)
    title = f"{rep['model']}: {rep['mode']}, {rep['num_requests']} requests, {rep['output_tok_per_s']:.0f} tok/s"
    if "server_over_offline" in rep:
        title += f" ({rep['server_over_offline']:.2f}x offline)"
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- server and offline runs ---------------------------------------------------------------------

def launch(args: argparse.Namespace, name: str) -> tuple[subprocess.Popen, str]:
    from myvllm.serve import API_KEY_ENV

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "myvllm.serve", "--model", args.launch, "--port", str(port),
           "--served-model-name", name, "--log-level", "warning", "--max-waiting-requests",
           str(max(256, len_hint(args))), *shlex.split(args.server_args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    if args.api_key:
        env[API_KEY_ENV] = args.api_key
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout

    async def healthy() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{url}/health",
                                                           timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        if asyncio.run(healthy()):
            return proc, url
        time.sleep(0.5)
    proc.terminate()
    sys.exit(f"the server did not come up in {args.startup_timeout:g} s")


def len_hint(args: argparse.Namespace) -> int:
    return args.num_requests or SEED_WORKLOAD["num_requests"]


def run_offline(model: str, engine_args: dict, requests: list[Request], temperature: float) -> float:
    """Seconds of LLM.generate on the workload, after a warm-up."""
    import torch

    from myvllm import LLM, SamplingParams

    llm = LLM(model, **engine_args)
    llm.generate([requests[0].prompt[:16]], SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=8),
                 use_tqdm=False)
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=q.max_tokens) for q in requests]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([q.prompt for q in requests], params, use_tqdm=False)
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (ignored with --launch)")
    p.add_argument("--launch", metavar="MODEL", default=None, help="start a server for MODEL on 127.0.0.1")
    p.add_argument("--server-args", default="", help="extra flags of the launched server (engine flags too), "
                                                     "one string; --offline builds its LLM from them")
    p.add_argument("--model", default=None, help="model name in requests (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("MYVLLM_API_KEY"))
    p.add_argument("--workload", choices=("seed", "fixed"), default="seed")
    p.add_argument("--num-requests", type=int, default=None, help="default: 256 (seed) or 64 (fixed)")
    p.add_argument("--max-input-len", type=int, default=None, help="seed workload: longest prompt (1024)")
    p.add_argument("--max-output-len", type=int, default=None, help="seed workload: largest max_tokens (1024)")
    p.add_argument("--input-len", type=int, default=32, help="fixed workload: prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="fixed workload: output tokens")
    p.add_argument("--vocab-size", type=int, default=None, help="token ids are drawn below min(10001, this) "
                                                                "(default: the launched model's vocabulary)")
    p.add_argument("--temperature", type=float, default=SEED_TEMPERATURE)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: a burst")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no "
                                                                     "limit)")
    p.add_argument("--offline", action="store_true", help="also time LLM.generate on the workload (needs --launch)")
    p.add_argument("--warmup", type=int, default=2, help="short requests sent one by one before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--timeout", type=float, default=3600.0, help="limit for the whole timed run, in seconds")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="write the report here as JSON")
    p.add_argument("--plot", default=None, help="write a plot here (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.offline and not args.launch:
        p.error("--offline needs --launch (it builds the same engine as the server)")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0 (inf for a burst)")
    engine_args: dict = {}
    if args.launch:
        from myvllm.serve import parse_args as serve_args

        _, engine_args = serve_args(["--model", args.launch, *shlex.split(args.server_args)])
    vocab = args.vocab_size or (model_vocab_size(args.launch, engine_args) if args.launch else 10001)
    requests = make_workload(args, vocab)
    name = args.model or "served"
    proc, url = (None, args.url)
    if args.launch:
        proc, url = launch(args, name)
    try:
        if not args.launch and args.model is None:
            async def first_model() -> str:
                async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/models") as r:
                    return (await r.json())["data"][0]["id"]
            name = asyncio.run(first_model())
        rep = asyncio.run(run_load(args, url, name, requests))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if args.offline:
        seconds = run_offline(args.launch, engine_args, requests, args.temperature)
        rep["offline_s"] = seconds
        rep["offline_tok_per_s"] = sum(q.max_tokens for q in requests) / seconds
        rep["server_over_offline"] = rep["output_tok_per_s"] / rep["offline_tok_per_s"]
    rep["server_args"] = args.server_args
    print_report(rep)
    if args.plot:
        plot(rep, args.plot)
    results = rep.pop("_results")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    if rep["failed"] or len(results) != len(requests):
        sys.exit(1)


if __name__ == "__main__":
    main()
