"""Requests in: a prompt tokenized and validated once, its sampling params checked, chats rendered.

LLMEngine.add_request, LLM.generate / LLM.chat and the OpenAI server all go through one
InputProcessor, so a prompt is tokenized once and every entry point gives the same errors.
Prompts may be strings, lists of token ids, or dicts with "prompt_token_ids" or "prompt".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from myvllm.config import ModelConfig
from myvllm.runtime.block_manager import BlockManager
from myvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


@dataclass(frozen=True)
class ProcessedRequest:
    """A validated request, ready to queue."""

    prompt: str | None  # the prompt's text, None for token-id prompts
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, model_config: ModelConfig, max_model_len: int, block_manager: BlockManager,
                 max_logprobs: int, max_n: int, tensor_parallel_size: int = 1) -> None:
        """block_manager: read for the cache's size (a prompt needing more blocks can never run)."""
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.max_logprobs = max_logprobs
        self.max_n = max_n
        self.tensor_parallel_size = tensor_parallel_size
        self._told_length_cap = False

    def process(self, prompt: PromptType | ProcessedRequest, params: SamplingParams | None) -> ProcessedRequest:
        """Validate one request; raises ValueError / TypeError naming the field and the fix."""
        if isinstance(prompt, ProcessedRequest):
            return prompt
        params = SamplingParams() if params is None else params
        self.check_params(params)
        text, ids = self.process_prompt(prompt)
        self._note_length_cap(len(ids), params)
        return ProcessedRequest(text, ids, params)

    def process_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of one prompt."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")  # the text the ids came from, if the caller has it
                if text is not None and not isinstance(text, str):
                    raise TypeError(f"prompt['prompt'] must be a str, got {type(text).__name__}")
            elif "prompt" in prompt:
                text = prompt["prompt"]
                if not isinstance(text, str):
                    raise TypeError(f"prompt['prompt'] must be a str, got {type(text).__name__}")
                ids = None
            else:
                raise ValueError("a dict prompt needs the key 'prompt_token_ids' or 'prompt'")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)):
            ids = prompt
        else:
            raise TypeError(
                f"a prompt must be a str, a list of token ids or a dict with 'prompt_token_ids', "
                f"got {type(prompt).__name__}"
            )
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer, but skip_tokenizer_init=True: pass token ids")
            if not text:
                raise ValueError("prompt is empty: it must have at least one token")
            ids = self.tokenizer.encode(text)
        return text, self._check_token_ids(ids)

    def _check_token_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"prompt token {i} is {t!r} ({type(t).__name__}): token ids must be ints")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t}: token ids must be in [0, {vocab - 1}]")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens: it must be shorter than max_model_len={self.max_model_len} "
                f"(at most {self.max_model_len - 1} tokens)"
            )
        bm = self.block_manager
        need = bm.blocks_for_tokens(len(ids) + 1)
        if need > bm.num_blocks:
            raise ValueError(
                f"prompt has {len(ids)} tokens and needs {need} KV blocks, but the cache has "
                f"{bm.num_blocks} in all"
            )
        return list(ids)

    def check_params(self, params: SamplingParams) -> None:
        """The checks that need the engine's limits (SamplingParams checks the rest itself)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.vocab_size
        if params.n > self.max_n:
            raise ValueError(f"n={params.n} is out of range: must be <= max_n={self.max_n} "
                             f"(an engine argument)")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > min(self.max_logprobs, vocab):
                raise ValueError(f"{name}={k} is out of range: must be <= max_logprobs={self.max_logprobs} "
                                 f"and <= the vocabulary size {vocab}")
        if params.prompt_logprobs is not None and self.tensor_parallel_size > 1:
            raise ValueError("prompt_logprobs is not supported with tensor_parallel_size > 1 yet")
        if params.stop_list and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, but skip_tokenizer_init=True: use stop_token_ids")
        if any(t >= vocab for t in params.stop_token_ids or ()):  # with min_tokens they index the logits
            raise ValueError(f"stop_token_ids={params.stop_token_ids} is out of range: token ids must be in "
                             f"[0, {vocab - 1}]")

    def _note_length_cap(self, prompt_len: int, params: SamplingParams) -> None:
        """Say once that max_tokens is capped by max_model_len (generation stops at max_model_len
        with finish_reason "length", as in vLLM)."""
        if self._told_length_cap or params.max_tokens is None:
            return
        room = self.max_model_len - prompt_len
        if params.max_tokens > room:
            self._told_length_cap = True
            logger.warning("max_tokens=%d is more than the %d tokens left after a prompt of %d tokens by "
                           "max_model_len=%d: such requests stop at max_model_len with finish_reason 'length' "
                           "(logged once)", params.max_tokens, room, prompt_len, self.max_model_len)

    def render_chat(self, conversation, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> dict:
        """One conversation (a list of {"role", "content"} dicts) through the tokenizer's chat
        template -> {"prompt": text, "prompt_token_ids": ids}."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, but skip_tokenizer_init=True")
        if not isinstance(conversation, (list, tuple)) or not conversation or \
                not all(isinstance(m, dict) for m in conversation):
            raise TypeError("a conversation must be a non-empty list of {'role', 'content'} dicts")
        try:
            text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **(chat_template_kwargs or {}))
        except Exception as e:  # jinja2 errors included: the messages do not fit the template
            raise ValueError(f"messages do not fit the chat template: {e}") from None
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
