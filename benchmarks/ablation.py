"""Ablation tables on the built-in pair, each cell a real `diga` run (demo preset), mean ± std over
seeds, written as CSV rows to benchmarks/results/ablation.csv and printed as a markdown table.

    python benchmarks/ablation.py warmup --seeds 0 1 2 --out runs/ablation
    python benchmarks/ablation.py self --seeds 0 1 2 --out runs/ablation   (needs the warmup runs)

warmup: source-only, warm-up without distillation, without CrDoMix, full warm-up (same iterations).
self:   self-training from each seed's full warm-up with probability-only, feature-only, threshold 0.9,
        consensus (cosine), consensus (l2) labels.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "warmup": {
        "source-only": ["train", "source"],
        "warm-up, no distillation": ["train", "warmup", "warmup.distill=false"],
        "warm-up, no CrDoMix": ["train", "warmup", "warmup.crdomix=false"],
        "warm-up (full)": ["train", "warmup"],
    },
    "self": {
        "probability labels only": ["train", "self", "self_training.labels=prob"],
        "feature labels only": ["train", "self", "self_training.labels=feat"],
        "threshold 0.9": ["train", "self", "self_training.labels=threshold", "self_training.threshold=0.9"],
        "consensus (cosine)": ["train", "self"],
        "consensus (l2)": ["train", "self", "self_training.metric=l2"],
    },
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=sorted(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/ablation.csv"))
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float]]] = {}
    for name, argv in CONFIGS[args.table].items():
        for seed in args.seeds:
            run = args.out / f"{slug(name)}_s{seed}"
            extra = ["--init", str(args.out / f"{slug('warm-up (full)')}_s{seed}")] if argv[1] == "self" else []
            if not (run / "eval.json").is_file():
                start = time.perf_counter()
                subprocess.run(["diga", *argv[:2], *extra, "--out", str(run), "--seed", str(seed), *argv[2:]],
                               check=True, stdout=subprocess.DEVNULL)
                (run / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
            miou = json.loads((run / "eval.json").read_text())["miou"]
            wall = float((run / "wall_s.txt").read_text())
            results.setdefault(name, []).append((miou, wall))
            print(f"{name} seed {seed}: {miou:.2f} mIoU, {wall:.0f} s", flush=True)

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.csv.exists()
    with open(args.csv, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(["timestamp", "machine", "table", "config", "seeds", "miou_mean", "miou_std", "wall_s_mean"])
        for name, rows in results.items():
            mious = [m for m, _ in rows]
            writer.writerow([dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             f"{platform.machine()} {platform.processor() or ''} cpu".strip(), args.table, name,
                             " ".join(map(str, args.seeds)), f"{statistics.mean(mious):.2f}",
                             f"{statistics.stdev(mious) if len(mious) > 1 else 0.0:.2f}",
                             f"{statistics.mean(w for _, w in rows):.0f}"])
    print("\n| configuration | target val mIoU (mean ± std) | wall time per run |\n|---|---|---|")
    for name, rows in results.items():
        mious = [m for m, _ in rows]
        std = statistics.stdev(mious) if len(mious) > 1 else 0.0
        print(f"| {name} | {statistics.mean(mious):.2f} ± {std:.2f} | {statistics.mean(w for _, w in rows):.0f} s |")


if __name__ == "__main__":
    sys.exit(main())
