"""Draw docs/performance.png from the measured figures in docs/performance_data.json.

    pip install matplotlib
    python benchmarks/plot_performance.py [--data docs/performance_data.json] [--out docs/performance.png]

Three panels: the seed workload (`bench.py --dummy`) per card against its physical floor;
the figures of the seed workload by commit; one decode step's throughput against the batch.
Nothing is measured here: add a run's figures to the JSON file, then redraw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"H200": "#1f77b4", "H100": "#ff7f0e"}


def best(values) -> float:
    return max(values) if isinstance(values, list) else values


def latest(rows: list[dict], card: str, key: str | None = None) -> dict | None:
    """The newest row of a card (rows are newest first), optionally one with a same-run figure `key`."""
    for row in rows:
        if row["card"] == card and (key is None or key in row.get("same_run", {})):
            return row
    return None


def bars(ax, data: dict) -> None:
    rows = data["seed_benchmark"]
    labels, values, colors, hatches = [], [], [], []
    for card in data["cards"]:
        floor = data["cards"][card]["floor"]
        entries = [(f"{card}: physical floor (bf16)", floor["tok_s"], "//")]
        row = latest(rows, card)
        if row is not None:
            entries.append((f"{card}: my-vllm, CUDA graphs ({row['commit']})", best(row["tok_s"]), ""))
        row = latest(rows, card, "bench.py --enforce-eager")
        if row is not None:
            eager = row["same_run"]["bench.py --enforce-eager"]
            entries.append((f"{card}: my-vllm, eager ({row['commit']})", eager, ""))
        row = latest(rows, card, "transformers continuous batching")
        if row is not None:
            hf = row["same_run"]["transformers continuous batching"]
            entries.append((f"{card}: transformers, same day and card", hf, ".."))
        for label, value, hatch in entries:
            labels.append(label)
            values.append(value)
            colors.append(COLORS.get(card, "gray") if hatch != "//" else "white")
            hatches.append(hatch)
    y = list(range(len(labels)))[::-1]
    cards = [label.split(":")[0] for label in labels]
    for yi, value, color, hatch, card in zip(y, values, colors, hatches, cards):
        ax.barh(yi, value, color=color, hatch=hatch, edgecolor=COLORS.get(card, "gray"))
        ax.text(value + 400, yi, f"{value:,.0f}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_xlim(0, max(values) * 1.22)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:.0f}k")
    ax.set_title("Seed workload (bench.py --dummy)", fontsize=10)


def history(ax, data: dict) -> None:
    rows = list(reversed(data["seed_benchmark"]))  # oldest first
    for card in data["cards"]:
        xs, ys, names = [], [], []
        for i, row in enumerate(rows):
            if row["card"] == card:
                xs.append(i)
                ys.append(best(row["tok_s"]))
                names.append(row["commit"])
        if not xs:
            continue
        ax.plot(xs, ys, "o-", color=COLORS.get(card, "gray"), label=f"{card}, measured")
        floor = data["cards"][card]["floor"]["tok_s"]
        ax.axhline(floor, ls="--", lw=1, color=COLORS.get(card, "gray"), label=f"{card}, floor {floor:,.0f}")
    ax.set_xticks(range(len(rows)), [f"{r['commit']} {r['date'][5:]}" for r in rows], fontsize=7, rotation=40,
                  ha="right")
    ax.set_ylabel("output tokens/s")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v / 1000:.0f}k")
    ax.set_ylim(0, None)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Seed workload by commit", fontsize=10)


def decode_step(ax, data: dict) -> None:
    step = data["decode_step"]
    batch = step["batch"]
    top = max(b / (ms / 1000) for b, ms in zip(batch, step["graph_ms"]))
    series = (("graph_ms", "o-", "CUDA graph", (-10, 8)), ("eager_ms", "s--", "eager", (6, -10)))
    for key, style, label, offset in series:
        tok_s = [b / (ms / 1000) for b, ms in zip(batch, step[key])]
        ax.plot(batch, tok_s, style, color=COLORS.get(step["card"], "gray"), label=label)
        for b, t in zip(batch, tok_s):
            ax.annotate(f"{t:,.0f}", (b, t), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch, [str(b) for b in batch])
    ax.set_xlabel("sequences in the decode step (context 1024)")
    ax.set_ylabel("tokens/s of one decode step")
    ax.set_xlim(0.7, max(batch) * 1.6)
    ax.set_ylim(-top * 0.04, top * 1.12)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v / 1000:.0f}k")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"One decode step, {step['card']} ({step['commit']})", fontsize=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "docs" / "performance_data.json"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.png"))
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.data).read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw=dict(width_ratios=[1.25, 1.1, 0.8]))
    bars(axes[0], data)
    history(axes[1], data)
    decode_step(axes[2], data)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi, metadata={"Software": None})
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
