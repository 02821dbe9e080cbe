"""Capturing a callable into a CUDA graph, for tests and measurements (graph-safety checks, kernel timings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls of fn, after one call on a side stream (so that JIT
    compilation and autotuning happen outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def capture_outputs(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """capture(fn) and what fn returned inside the capture: the tensors each replay rewrites."""
    returned: list[T] = []
    graph = capture(lambda: returned.append(fn()))
    return graph, returned[-1]  # [-1]: the captured call's, after the warm-up's
