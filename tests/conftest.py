"""Shared test setup.

Triton kernels run on CPU through Triton's interpreter when no GPU is present;
the variable must be set before anything imports triton.
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
