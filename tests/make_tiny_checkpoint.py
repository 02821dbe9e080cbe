"""Write the test suite's tiny random Qwen3 checkpoint (with tokenizer) into a directory.

    python tests/make_tiny_checkpoint.py DIR

It needs only the package's own dependencies (torch, transformers, tokenizers, safetensors),
so that a plain `pip install -e .` can run example.py and bench.py on it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_model import build_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="directory to write the checkpoint into (created if missing)")
    args = parser.parse_args(argv)
    print(build_checkpoint(args.dir))


if __name__ == "__main__":
    main()
