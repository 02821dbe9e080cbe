"""Download a Qwen3 checkpoint from the Hugging Face hub into ./huggingface/<name>/.

    python download_model.py                      # Qwen/Qwen3-0.6B
    python download_model.py --repo Qwen/Qwen3-8B --dir /data/models

Only the files the engine reads are fetched: safetensors weights, json configs and
tokenizer files.
"""

from __future__ import annotations

import argparse
import os
import sys

from myvllm.models.resolve import CHECKPOINT_PATTERNS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default="Qwen/Qwen3-0.6B", help="hub repository id (default: %(default)s)")
    parser.add_argument("--dir", default="./huggingface", help="parent directory (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit")
    args = parser.parse_args(argv)

    from huggingface_hub import snapshot_download

    target = os.path.join(args.dir, args.repo.split("/")[-1])
    print(f"downloading {args.repo} into {target}")
    try:
        path = snapshot_download(args.repo, revision=args.revision, local_dir=target,
                                 allow_patterns=CHECKPOINT_PATTERNS)
    except Exception as e:  # network, auth, unknown repo: report the cause, not a traceback
        print(f"error: could not download {args.repo}: {type(e).__name__}: {e}", file=sys.stderr)
        print("check the repository id, your network connection and HF_TOKEN (for gated repos); "
              "HF_HUB_OFFLINE=1 forbids downloads", file=sys.stderr)
        return 1
    print(f"done: {path}")
    print(f"try it: python example.py --model {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
