"""Tiny random Qwen3 checkpoints in Hugging Face format, and transformers as the oracle.

A checkpoint directory holds config.json, model.safetensors (or shards with an
index), generation_config.json and tokenizer files (a byte-level BPE trained here
with the `tokenizers` library, with a chat template).
"""

from __future__ import annotations

import os

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches in old towns near rivers and mountains where people talk about weather food music "
         "numbers like one two three four five and colours red green blue").split()


def corpus(n: int = 400) -> list[str]:
    g = torch.Generator().manual_seed(1)
    lines = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx) + ".")
    return lines


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_checkpoint(path: str, *, num_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 32, intermediate: int = 128, tie: bool = True, vocab_size: int = 512,
                     max_shard_size: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                     init_std: float = 0.2) -> str:
    """Write a random Qwen3 checkpoint with its tokenizer into path; returns path."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= vocab_size
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
        initializer_range=init_std, architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms away from 1 so that the q/k/layer norms are really exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eos, bos]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_hf_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()


@torch.no_grad()
def greedy_reference(tokenizer_dir: str, model, prompts: list[str],
                     num_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts as token ids (tokenizer_dir's tokenizer) and transformers' greedy continuations
    of them by model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tok.encode(p) for p in prompts]
    return ids, [hf_greedy(model, p, num_tokens)[0] for p in ids]


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation with transformers (no EOS stop): (token ids, logits of each step)."""
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True)
    tokens, logits = [], []
    for _ in range(num_tokens):
        step_logits = out.logits[0, -1].float()
        logits.append(step_logits.cpu())
        token = int(step_logits.argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits
