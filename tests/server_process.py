"""A real server process (`python -m myvllm.serve`) over a tiny checkpoint, for tests that talk
to it through HTTP clients such as `openai`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

STARTUP_TIMEOUT_S = 120.0
ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--cpu-kv-cache-gib", "0.05", "--kvcache-block-size", "16",
                "--max-model-len", "256", "--generation-config", "vllm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ServerProcess:
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the served model name
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log_path: str) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{f.read()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the server did not get healthy in {STARTUP_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def server_process(model_dir: str, *extra_args: str, model: str = "tiny") -> Iterator[ServerProcess]:
    """Start the server on a free local port, wait until /health answers, stop it on exit."""
    port = _free_port()
    log_path = os.path.join(model_dir, f"server-{port}.log")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "myvllm.serve", "--model", model_dir, "--port", str(port),
           "--served-model-name", model, *ENGINE_FLAGS, *extra_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process, log_path)
        yield ServerProcess(f"http://127.0.0.1:{port}/v1", model, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
