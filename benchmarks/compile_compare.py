"""Eager against torch.compile in one call: seed workload, single stream, prefill and start-up.

Each variant is one `bench.py --latency` process (a fresh engine, so its start-up is what a
user waits for), one after the other on the same GPU:

    eager            compilation_level 0, the fused CUDA kernels (the default engine)
    compiled-cold    compilation_level 1, fused kernels opaque, an empty compile cache
    compiled-warm    the same again, reusing the cache the cold run wrote (a second start)
    inductor-cold    compilation_level 1 with use_cuda_kernels=False: Inductor fuses the norms,
                     rotary and SiLU from plain torch ops; an empty cache
    inductor-warm    the same again, warm
    eager-torch-ops  compilation_level 0 with use_cuda_kernels=False (what Inductor starts from)

The compile cache is Inductor's (`TORCHINDUCTOR_CACHE_DIR`): each cold variant gets a new empty
directory, its warm variant the same one. Our own Triton kernels keep their usual cache.

    python benchmarks/compile_compare.py --dummy [--variants eager,compiled-cold,compiled-warm]
        [--json out.json] [-- any other bench.py flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# variant -> (bench.py flags, compile cache: None = untouched, else the name of its directory)
VARIANTS = {
    "eager": ([], None),
    "compiled-cold": (["--compilation-level", "1"], "fused"),
    "compiled-warm": (["--compilation-level", "1"], "fused"),
    "inductor-cold": (["--compilation-level", "1", "--no-cuda-kernels"], "inductor"),
    "inductor-warm": (["--compilation-level", "1", "--no-cuda-kernels"], "inductor"),
    "eager-torch-ops": (["--no-cuda-kernels"], None),
}
COLUMNS = (("init_time_s", "start s", "{:8.1f}"), ("throughput_tok_s", "seed tok/s", "{:10.0f}"),
           ("single_stream_ms_per_token", "stream ms/tok", "{:13.3f}"), ("prefill_tok_s", "prefill tok/s", "{:13.0f}"))


def run_variant(name: str, bench_args: list[str], cache_root: str) -> dict:
    flags, cache = VARIANTS[name]
    env = dict(os.environ)
    if cache is not None:
        cache_dir = os.path.join(cache_root, cache)
        if name.endswith("-cold") and os.path.exists(cache_dir):
            raise RuntimeError(f"{name}: the cache directory {cache_dir} is not empty")
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    record = os.path.join(cache_root, f"{name}.json")
    cmd = [sys.executable, str(ROOT / "bench.py"), "--latency", "--json", record, *flags, *bench_args]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        return {"variant": name, "error": f"exit {proc.returncode}"}
    print(proc.stdout.strip(), flush=True)
    with open(record) as f:
        data = json.load(f)
    return {"variant": name, **{key: data.get(key) for key, _, _ in COLUMNS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list, run in this order")
    parser.add_argument("--json", default="", help="write the rows to this path")
    args, bench_args = parser.parse_known_args()
    bench_args = [a for a in bench_args if a != "--"]
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="compile-compare-") as cache_root:
        rows = [run_variant(name, bench_args, cache_root) for name in names]
    print("\n" + f"{'variant':16s} " + " ".join(title for _, title, _ in COLUMNS))
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:16s} {row['error']}")
            continue
        cells = [fmt.format(row[key]) if row[key] is not None else "-" for key, _, fmt in COLUMNS]
        print(f"{row['variant']:16s} " + " ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
