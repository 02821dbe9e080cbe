"""What the serving path itself costs: the OpenAI server over a stand-in engine whose steps take
a fixed time, against the same stand-in stepped offline (as LLM.generate steps the real one).

The stand-in (`StandInEngine`) does what LLMEngine does around the model: every step gives each
running request a window of tokens (a multi-step decode) after --host-ms of Python holding the
GIL (scheduling and launches) and a wait, GIL released, for the device, which takes --device-ms
per window and overlaps the next step's host work (as async scheduling does); it builds the
same outputs (the finished requests', decoded once). Offline it runs at
window x batch / max(host, device) tokens per second; the ratio shows what the server adds:
the event loop's work per request and per chunk competing for the GIL with the host work, and
the streams' progress read after every step. Set --host-ms and --device-ms to a real engine's
(a profile of bench.py) to see whether its host work, stretched by the server's, passes the
device's.

    python benchmarks/serve_overhead.py --tokenizer ./huggingface/Qwen3-0.6B   # any HF tokenizer dir
    python benchmarks/serve_overhead.py --tokenizer DIR --num-requests 256 --output-len 256 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "benchmarks")) if p not in sys.path]

from myvllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from myvllm.runtime.detokenizer import decode_new_text  # noqa: E402
from myvllm.runtime.sequence import StopState  # noqa: E402


class _Request:
    """One request of one sequence, with the fields of LLMEngine's RequestState and Sequence that
    the async engine reads."""

    def __init__(self, request_id: str, prompt_ids: list[int], params, stream: bool) -> None:
        self.request_id, self.prompt_ids, self.stream = request_id, prompt_ids, stream
        self.params, self.max_tokens, self.skip_special = params, params.max_tokens, params.skip_special_tokens
        self.out_ids: list[int] = []
        self.state = StopState()
        # RequestState / Sequence
        self.prompt, self.prompt_token_ids, self.seqs = None, prompt_ids, [self]
        self.index, self.logprobs, self.is_finished, self.output_text = 0, None, False, None
        self.finish_reason = self.stop_reason = None
        self.num_prompt_tokens, self.num_cached_prompt_tokens = len(prompt_ids), 0

        self.token_ids = list(prompt_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class StandInEngine:
    """The parts of LLMEngine that AsyncLLMEngine and the server use, with fixed-time steps."""

    def __init__(self, tokenizer, max_num_seqs: int, window: int, host_ms: float, device_ms: float,
                 seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.processor = None
        self.max_model_len = 1 << 20
        self.model_config = SimpleNamespace(vocab_size=len(tokenizer))
        self.default_sampling: dict = {}
        self.max_num_seqs, self.window = max_num_seqs, window
        self.host_s, self.device_s = host_ms / 1e3, device_ms / 1e3
        self.rng = random.Random(seed)
        self.vocab = len(tokenizer)
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self.device_done = 0.0  # when the device finishes the window launched last

    def add_request(self, prompt, params, request_id: str, stream: bool = False) -> str:
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else self.tokenizer.encode(prompt)
        req = _Request(request_id, list(ids), params, stream)
        self.requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for queue in (self.waiting, self.running):
                if req in queue:
                    queue.remove(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_waiting_requests(self) -> int:
        return len(self.waiting)

    def get_stats(self) -> dict[str, int]:
        return {"num_unfinished_requests": len(self.requests), "num_waiting_requests": len(self.waiting),
                "num_waiting_seqs": len(self.waiting), "num_running_seqs": len(self.running), "num_blocks": 1,
                "num_free_blocks": 1, "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0}

    def shutdown(self) -> None:
        pass

    def step(self) -> list[RequestOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        end = time.perf_counter() + self.host_s
        while time.perf_counter() < end:  # the host's Python work of a step, holding the GIL
            pass
        # The window just launched runs on the device after the one before it; the step waits
        # (GIL released) for the one before, whose tokens it then applies: host work overlaps the
        # device's as with async scheduling, and a step takes max(host, device) time.
        launch = time.perf_counter()
        previous_done = self.device_done
        self.device_done = max(previous_done, launch) + self.device_s
        if previous_done > launch:
            time.sleep(previous_done - launch)
        outputs, still = [], []
        for req in self.running:
            n = min(self.window, req.max_tokens - len(req.out_ids))
            new = [self.rng.randrange(self.vocab) for _ in range(n)]
            req.out_ids += new
            req.token_ids += new
            done = len(req.out_ids) >= req.max_tokens
            if done:
                del self.requests[req.request_id]
                text = self.tokenizer.decode(req.out_ids, skip_special_tokens=req.skip_special)
            elif req.stream:
                decode_new_text(self.tokenizer, req.out_ids, req.state, req.skip_special)
                text = req.state.text
            else:
                still.append(req)
                continue
            if not done:
                still.append(req)
            outputs.append(RequestOutput(req.request_id, None, req.prompt_ids,
                                         [CompletionOutput(0, text, list(req.out_ids),
                                                           finish_reason="length" if done else None)],
                                         finished=done))
        self.running = still
        return outputs


def offline_tok_per_s(engine: StandInEngine, requests, params_of) -> float:
    for i, q in enumerate(requests):
        engine.add_request({"prompt_token_ids": q.prompt}, params_of(q), f"r{i}")
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return sum(q.max_tokens for q in requests) / (time.perf_counter() - start)


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from transformers import AutoTokenizer

    from myvllm.entrypoints.api_server import build_app
    from myvllm.entrypoints.async_engine import AsyncLLMEngine

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    engine = AsyncLLMEngine(StandInEngine(tok, args.max_num_seqs, args.window, args.host_ms, args.device_ms),
                            max_waiting_requests=max(256, args.num_requests))
    app = build_app(engine, "stand-in")
    gc.collect()
    gc.freeze()  # as myvllm.serve does: startup objects are never collected again
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--window", type=int, default=8, help="tokens per request per step (multi-step decode)")
    p.add_argument("--host-ms", type=float, default=8.0, help="Python work per step, holding the GIL")
    p.add_argument("--device-ms", type=float, default=40.0, help="device time per step, GIL released")
    p.add_argument("--json", default=None)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return

    import serve_load
    from transformers import AutoTokenizer

    from myvllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    load_args = serve_load.build_parser().parse_args(
        ["--workload", "fixed", "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
         "--output-len", str(args.output_len), "--temperature", "0"])
    requests = serve_load.make_workload(load_args, len(tok))
    offline = offline_tok_per_s(StandInEngine(tok, args.max_num_seqs, args.window, args.host_ms, args.device_ms),
                                requests, lambda q: SamplingParams(max_tokens=q.max_tokens, ignore_eos=True))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port),
                             *[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--serve"]], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import aiohttp

        async def wait_up() -> None:
            for _ in range(600):
                try:
                    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            raise SystemExit("the stand-in server did not come up")

        asyncio.run(wait_up())
        rep = asyncio.run(serve_load.run_load(load_args, url, "stand-in", requests))
    finally:
        proc.terminate()
        proc.wait(30)
    rep.pop("_results")
    rep.update(offline_tok_per_s=offline, server_over_offline=rep["output_tok_per_s"] / offline,
               stand_in=dict(window=args.window, host_ms=args.host_ms, device_ms=args.device_ms,
                             max_num_seqs=args.max_num_seqs))
    print(f"offline {offline:.0f} tok/s, server {rep['output_tok_per_s']:.0f} tok/s: "
          f"{rep['server_over_offline']:.3f}x; TTFT p50 {rep['ttft_ms']['p50']:.0f} ms, chunk gap p99 "
          f"{rep['chunk_gap_ms']['p99']:.0f} ms, {rep['tokens_per_chunk_mean']:.2f} tokens per chunk")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)


if __name__ == "__main__":
    main()
