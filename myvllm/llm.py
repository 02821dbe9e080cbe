"""The offline API: LLM(model, **engine_args).generate(...) / .chat(...)."""

from __future__ import annotations

import time
import weakref

from tqdm.auto import tqdm

from myvllm.config import EngineConfig
from myvllm.outputs import RequestOutput
from myvllm.runtime.engine import LLMEngine, PromptType
from myvllm.runtime.generation_defaults import default_sampling_params
from myvllm.sampling_params import SamplingParams


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in x)


class LLM:
    """An engine for offline batched generation.

    >>> llm = LLM("./huggingface/Qwen3-0.6B")
    >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0.6, max_tokens=64))
    """

    def __init__(self, model: str, **engine_args) -> None:
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)
        # `del llm` frees the device memory at once, so that a next LLM fits
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """A new SamplingParams with the model's generation_config.json defaults (per the
        `generation_config` engine argument) over the neutral ones; generate and chat use it
        when sampling_params is None."""
        return default_sampling_params(self.engine.default_sampling)

    def shutdown(self) -> None:
        """Stop the engine: its tensor-parallel worker processes, if any, and its device memory
        (also done when the LLM is garbage-collected, and at exit). Idempotent; the LLM cannot
        generate afterwards."""
        self._finalizer()

    @staticmethod
    def _normalize_prompts(prompts) -> list[PromptType]:
        """A single prompt or a list of them -> a list (contents are checked by the engine)."""
        if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            return list(prompts)
        raise TypeError(
            f"prompts must be a str, a list of str, a list of token-id lists or dicts; got {type(prompts).__name__}"
        )

    def _params_per_prompt(self, sampling_params, num_prompts: int) -> list[SamplingParams]:
        """One SamplingParams per prompt; None means the defaults, a given one is used as is."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != num_prompts:
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {num_prompts} prompts: "
                                 f"pass one, or one per prompt")
            return list(sampling_params)
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, "
                        f"got {type(sampling_params).__name__}")

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in prompt order. sampling_params=None
        uses get_default_sampling_params().

        A bad prompt or parameter raises before any request is queued, so the engine
        is left as it was.
        """
        prompts = self._normalize_prompts(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        engine = self.engine
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append(engine.processor.process(prompt, p))
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompt {i}: {e}") from e
        ids: list[str] = []
        try:  # queueing included: an interrupt between two add_request calls leaves nothing behind
            for request in requests:
                ids.append(engine.add_request(request))
            outputs = self._run(ids, use_tqdm)
        except BaseException:  # KeyboardInterrupt included: leave the engine clean for the next call
            for rid in ids:
                engine.abort_request(rid)
            raise
        return [outputs[rid] for rid in ids]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        start = time.perf_counter()
        num_out_tokens = 0
        while pending:
            for out in self.engine.step():
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    results[out.request_id] = out
                    num_out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    bar.set_postfix(output_tok_s=f"{num_out_tokens / (time.perf_counter() - start):.0f}")
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"requests {sorted(pending)} were lost by the engine")
        bar.close()
        return results

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        enable_thinking: bool | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through
        the tokenizer's chat template. enable_thinking is passed to the template (Qwen3).
        Each output's `prompt` is the rendered template text."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        kwargs = dict(chat_template_kwargs or {})
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        prompts = []
        for i, conv in enumerate(conversations):
            try:
                prompts.append(self.engine.processor.render_chat(conv, add_generation_prompt, kwargs))
            except (TypeError, ValueError) as e:
                raise type(e)(f"conversation {i}: {e}") from e
        return self.generate(prompts, sampling_params, use_tqdm)
