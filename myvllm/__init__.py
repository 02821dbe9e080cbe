"""my-vllm: a compact, fast and exact LLM inference engine for Qwen3 models."""

from myvllm.llm import LLM
from myvllm.outputs import CompletionOutput, Logprob, RequestOutput
from myvllm.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
