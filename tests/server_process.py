"""`python -m myvllm.serve` as a real process on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")  # the server tests need an HTTP client; without one they skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny float32 model on CPU with a small cache and neutral sampling defaults.
TINY_ENGINE_FLAGS = ("--dtype", "float32", "--device", "cpu", "--cpu-kv-cache-gib", "0.05", "--kvcache-block-size",
                     "16", "--max-model-len", "256", "--generation-config", "vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(engine_args: dict) -> list[str]:
    """Engine keyword arguments as serve flags (True -> --flag, False -> --no-flag)."""
    out = []
    for k, v in engine_args.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    return out


@contextlib.contextmanager
def running_server(model_dir: str, log_path: Path, flags: list[str], env: dict | None = None,
                   startup_timeout: float = 120.0) -> Iterator[str]:
    """Start the server with these flags; yields its base URL; stops it on exit and fails the
    test if its log holds a traceback (or if it does not come up)."""
    port = free_port()
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "myvllm.serve", "--model", model_dir, "--port", str(port), *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]


@dataclass
class ServerProcess:
    base_url: str  # http://127.0.0.1:PORT/v1, as OpenAI clients take it
    model: str  # the served model name


@contextlib.contextmanager
def server_process(model_dir: str, *extra_args: str, model: str = "tiny") -> Iterator[ServerProcess]:
    """running_server over the tiny model with TINY_ENGINE_FLAGS, for OpenAI-client tests."""
    log_path = Path(model_dir) / f"server-{free_port()}.log"
    flags = ["--served-model-name", model, *TINY_ENGINE_FLAGS, *extra_args]
    with running_server(model_dir, log_path, flags, env={"OMP_NUM_THREADS": "1"}) as url:
        yield ServerProcess(f"{url}/v1", model)
