"""Chat with a Qwen3 model through the offline API.

    python download_model.py            # once: fetches Qwen/Qwen3-0.6B into ./huggingface/
    python example.py                   # chat prompts through the model's chat template
"""

from __future__ import annotations

import argparse

from myvllm import LLM, SamplingParams

PROMPTS = [
    "Introduce yourself in one sentence.",
    "List all prime numbers within 100.",
    "Write a haiku about paged memory.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate chat completions with my-vllm")
    parser.add_argument("--model", default="./huggingface/Qwen3-0.6B", help="checkpoint directory or hub id")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per completion (default: %(default)s)")
    parser.add_argument("--enable-thinking", action="store_true", help="let Qwen3 think before answering")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the checkpoint's), bfloat16, float16 or float32 (default: %(default)s)")
    args = parser.parse_args()

    llm = LLM(args.model, enforce_eager=args.enforce_eager, device=args.device, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    outputs = llm.chat(conversations, params, enable_thinking=args.enable_thinking)
    for prompt, out in zip(PROMPTS, outputs):
        print("\n" + "=" * 80)
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
