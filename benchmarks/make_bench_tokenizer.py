"""Write a tokenizer with Qwen3's vocabulary size and special-token ids, for GPU runs on random
weights (`dummy:` models) that need text: structured outputs, chat templates, detokenization.

    python benchmarks/make_bench_tokenizer.py OUT_DIR

The vocabulary is byte-level BPE like Qwen3's: the 256 byte symbols, then merged tokens up to
151,643 regular tokens (each the concatenation of two earlier ones, chosen by a seeded
generator), then `<|endoftext|>` (151643), `<|im_start|>` (151644) and `<|im_end|>` (151645),
Qwen3's ids. Its tokens are not Qwen3's, but a grammar sees as many of them, of similar
lengths, as it would with the real tokenizer: the host's bitmask work is of the same size.
"""

from __future__ import annotations

import argparse
import random

NUM_REGULAR = 151_643  # Qwen3's regular tokens; its special tokens follow
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MAX_TOKEN_CHARS = 16
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    tokens = sorted(alphabet)
    seen = set(tokens)
    merges = []
    rng = random.Random(seed)
    while len(tokens) < NUM_REGULAR:
        # favour short, recent tokens, as BPE's frequent merges are
        a = tokens[rng.randrange(len(tokens)) if rng.random() < 0.5 else rng.randrange(256)]
        b = tokens[rng.randrange(256) if rng.random() < 0.7 else rng.randrange(len(tokens))]
        merged = a + b
        if len(merged) > MAX_TOKEN_CHARS or merged in seen:
            continue
        seen.add(merged)
        tokens.append(merged)
        merges.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    ids = [fast.convert_tokens_to_ids(s) for s in SPECIAL]
    if ids != [NUM_REGULAR, NUM_REGULAR + 1, NUM_REGULAR + 2]:
        raise RuntimeError(f"special tokens got ids {ids}, expected Qwen3's {NUM_REGULAR}..{NUM_REGULAR + 2}")
    return fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tokenizer(args.seed).save_pretrained(args.out_dir)
    print(f"tokenizer with {NUM_REGULAR + len(SPECIAL)} tokens written to {args.out_dir}")


if __name__ == "__main__":
    main()
