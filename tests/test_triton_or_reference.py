"""The choice between a Triton op and its torch reference (kernels/triton_or_reference.py), and
the fused-MoE selection built on it; decisions only, so they run on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from myvllm.kernels import reference_moe
from myvllm.kernels.triton_or_reference import triton_or_reference
from myvllm.layers import fused_moe

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


def test_off_cuda_the_reference_is_chosen_without_importing_the_module():
    op, reason = triton_or_reference(torch.device("cpu"), "myvllm.kernels.no_such_module", "op", sum)
    assert op is sum and reason == "device cpu is not CUDA"


def test_on_cuda_the_module_decides():
    from myvllm.kernels import triton_fused_moe

    module = "myvllm.kernels.triton_fused_moe"
    assert triton_or_reference(CUDA, module, "fused_experts", sum, torch.bfloat16) == (
        triton_fused_moe.fused_experts, None)
    refusal = triton_fused_moe.supports(CUDA, torch.float64)
    assert refusal is not None
    assert triton_or_reference(CUDA, module, "fused_experts", sum, torch.float64) == (sum, refusal)


@pytest.mark.parametrize("device, dtype, logged", [("cpu", torch.bfloat16, False), ("cuda", torch.float64, True)])
def test_fused_moe_logs_a_refusal_on_cuda_only(device, dtype, logged, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=fused_moe.__name__)
    assert fused_moe.select_fused_experts(torch.device(device), dtype) is reference_moe.fused_experts
    messages = [r.getMessage() for r in caplog.records if r.name == fused_moe.__name__]
    assert messages == (["fused MoE: Triton kernel not used (dtype torch.float64 is not one of "
                         "(torch.float16, torch.bfloat16, torch.float32)); running the torch reference instead"]
                        if logged else [])
