"""Shared test setup.

Triton kernels run on CPU through Triton's interpreter when no GPU is present;
the variable must be set before anything imports triton.

MYVLLM_TEST_GPU_SHARE=F lets several GPU test processes share one card: each engine then sizes
its KV cache from F x the card's memory less its own peak, instead of from
gpu_memory_utilization less everything else on the card (which the other processes hold).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen3 checkpoint (tied embeddings, GQA 2) with tokenizer and chat template."""
    from tiny_model import build_checkpoint

    return build_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen3")))


@pytest.fixture(scope="session")
def hf_tiny(tiny_model_dir):
    from tiny_model import load_hf_model

    return load_hf_model(tiny_model_dir)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module: the tiny model's ops are far too small to
    gain from threads, and spinning threads slow every step down many times over when other
    work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def shared_gpu():
    share = os.environ.get("MYVLLM_TEST_GPU_SHARE")
    if not share:
        yield
        return
    from myvllm.runtime import kv_cache

    def num_blocks(config, bytes_per_block, peak_bytes, device):
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        total = torch.cuda.mem_get_info(device)[1]
        budget = min(float(share), config.gpu_memory_utilization) * total - peak_bytes
        return max(0, int(budget // bytes_per_block))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kv_cache, "cuda_num_blocks", num_blocks)
        yield
