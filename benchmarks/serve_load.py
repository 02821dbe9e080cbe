"""A bounded load run against the OpenAI-compatible server: fixed requests, fixed concurrency.

Every request streams a completion of exactly --max-tokens tokens (ignore_eos), and the
run reports requests/s, output tokens/s, and p50/p90/p99 of time to first token (TTFT),
inter-token latency (ITL: the gap between successive streamed chunks, divided by the tokens
the later chunk carries), time per output token after the first (TPOT) and end-to-end latency.

    python -m myvllm.serve --model ./huggingface/Qwen3-0.6B &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --num-requests 200 --concurrency 16

With --launch MODEL the script starts the server itself on a free loopback port (extra
server flags after --server-args) and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches in old "
         "towns near rivers and mountains where people talk about weather food music").split()


@dataclass
class Result:
    ok: bool
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    num_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, args: argparse.Namespace) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    res = Result(ok=False, start=start)
    last = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in event:
                    res.error = event["error"].get("message", "stream error")
                    return res
                if event.get("usage"):
                    res.num_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices"):
                    continue
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.ok = True
    return res


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in ps} | {"mean": float("nan")}
    v = sorted(values)
    out = {f"p{p}": v[min(len(v) - 1, max(0, round(p / 100 * len(v) + 0.5) - 1))] for p in ps}
    out["mean"] = sum(v) / len(v)
    return out


async def run_load(args: argparse.Namespace, url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.request_timeout, limits=limits) as http:
        model = args.model
        if model is None:
            r = await http.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = make_prompts(args.num_requests + args.warmup, args.prompt_words, args.seed)
        for p in prompts[:args.warmup]:
            await one_request(http, model, p, args)
        sem = asyncio.Semaphore(args.concurrency)

        async def bounded(p: str) -> Result:
            async with sem:
                return await one_request(http, model, p, args)

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*[bounded(p) for p in prompts[args.warmup:]]),
                                         timeout=args.timeout)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.num_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]
    return {
        "model": model, "num_requests": args.num_requests, "concurrency": args.concurrency,
        "prompt_words": args.prompt_words, "max_tokens": args.max_tokens, "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": wall, "req_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall,
        "ttft_ms": {k: v * 1e3 for k, v in percentiles([r.ttft for r in ok]).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles([x for r in ok for x in r.itl]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in percentiles(tpot).items()},
        "e2e_ms": {k: v * 1e3 for k, v in percentiles([r.e2e for r in ok]).items()},
    }


def print_report(rep: dict) -> None:
    print(f"model {rep['model']}: {rep['num_requests']} requests, concurrency {rep['concurrency']}, "
          f"{rep['prompt_words']}-word prompts, {rep['max_tokens']} output tokens each")
    print(f"completed {rep['completed']}, failed {rep['failed']} in {rep['wall_s']:.2f} s")
    for e in rep["errors"]:
        print(f"  error: {e}")
    print(f"throughput: {rep['req_per_s']:.2f} req/s, {rep['output_tok_per_s']:.1f} output tok/s")
    print(f"{'ms':<6}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for name in ("ttft", "itl", "tpot", "e2e"):
        row = rep[f"{name}_ms"]
        print(f"{name.upper():<6}" + "".join(f"{row[k]:>10.1f}" for k in ("p50", "p90", "p99", "mean")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "myvllm.serve", "--model", args.launch, "--port", str(port),
           "--log-level", "warning", *shlex.split(args.server_args)]
    if args.model:
        cmd += ["--served-model-name", args.model]
    env = {**os.environ, "MYVLLM_API_KEY": args.api_key} if args.api_key else None
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.terminate()
    sys.exit("the server did not come up in 300 s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (ignored with --launch)")
    p.add_argument("--launch", metavar="MODEL", default=None, help="start a server for MODEL on 127.0.0.1")
    p.add_argument("--server-args", default="", help="extra flags for the launched server, one string")
    p.add_argument("--model", default=None, help="model name in requests (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("MYVLLM_API_KEY"))
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent one by one before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="limit for the whole timed run, in seconds")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or args.prompt_words < 1:
        p.error("--num-requests, --concurrency, --max-tokens and --prompt-words must be >= 1")
    proc = None
    url = args.url
    if args.launch:
        proc, url = launch(args)
    try:
        rep = asyncio.run(run_load(args, url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep)
    if rep["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
