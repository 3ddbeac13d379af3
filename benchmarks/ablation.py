"""Ablation tables on the built-in pair, each cell a real `diga` run (demo preset), mean ± std over
seeds, written as CSV rows to benchmarks/results/ablation.csv and printed as a markdown table.

    python benchmarks/ablation.py warmup --seeds 0 1 2 --out runs/ablation
    python benchmarks/ablation.py self --seeds 0 1 2 --out runs/ablation   (needs the warmup runs)

warmup: source-only, warm-up without distillation, without CrDoMix, full warm-up (same iterations).
self:   self-training from each seed's full warm-up with probability-only, feature-only, threshold 0.9,
        consensus (cosine), consensus (l2) labels, and a second consensus round started from the first
        (relabelled by its student, teacher reset: what `diga train self --rounds 2` does).
        Also draws consensus.png: the share of target pixels the consensus keeps and their accuracy
        against the true target labels over training (rounds 1 and 2, mean over seeds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from diga_fast.benchmarks.results_csv import append_rows

# name -> (diga argv, the configuration whose run of the same seed it starts from)
CONFIGS = {
    "warmup": {
        "source-only": (["train", "source"], None),
        "warm-up, no distillation": (["train", "warmup", "warmup.distill=false"], None),
        "warm-up, no CrDoMix": (["train", "warmup", "warmup.crdomix=false"], None),
        "warm-up (full)": (["train", "warmup"], None),
    },
    "self": {
        "probability labels only": (["train", "self", "self_training.labels=prob"], "warm-up (full)"),
        "feature labels only": (["train", "self", "self_training.labels=feat"], "warm-up (full)"),
        "threshold 0.9": (["train", "self", "self_training.labels=threshold", "self_training.threshold=0.9"],
                          "warm-up (full)"),
        "consensus (cosine)": (["train", "self"], "warm-up (full)"),
        "consensus (l2)": (["train", "self", "self_training.metric=l2"], "warm-up (full)"),
        "consensus (cosine), round 2": (["train", "self"], "consensus (cosine)"),
    },
}
COLUMNS = ["timestamp", "machine", "table", "config", "seeds", "miou_mean", "miou_std", "wall_s_mean"]


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
    for name, (argv, parent) in CONFIGS[args.table].items():
        for seed in args.seeds:
            run = args.out / f"{slug(name)}_s{seed}"
            extra = ["--init", str(args.out / f"{slug(parent)}_s{seed}")] if parent else []
            if not (run / "eval.json").is_file():
                start = time.perf_counter()
                subprocess.run(["diga", *argv[:2], *extra, "--out", str(run), "--seed", str(seed), *argv[2:]],
                               check=True, stdout=subprocess.DEVNULL)
                (run / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
            miou = json.loads((run / "eval.json").read_text())["miou"]
            wall = float((run / "wall_s.txt").read_text())
            results.setdefault(name, []).append((miou, wall))
            print(f"{name} seed {seed}: {miou:.2f} mIoU, {wall:.0f} s", flush=True)

    timestamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.machine()} {platform.processor() or ''} cpu".strip()
    append_rows([{"timestamp": timestamp, "machine": machine, "table": args.table, "config": name,
                  "seeds": " ".join(map(str, args.seeds)),
                  "miou_mean": f"{statistics.mean(m for m, _ in rows):.2f}",
                  "miou_std": f"{statistics.stdev(m for m, _ in rows) if len(rows) > 1 else 0.0:.2f}",
                  "wall_s_mean": f"{statistics.mean(w for _, w in rows):.0f}"} for name, rows in results.items()],
                args.csv, COLUMNS)
    print("\n| configuration | target val mIoU (mean ± std) | wall time per run |\n|---|---|---|")
    for name, rows in results.items():
        mious = [m for m, _ in rows]
        std = statistics.stdev(mious) if len(mious) > 1 else 0.0
        print(f"| {name} | {statistics.mean(mious):.2f} ± {std:.2f} | {statistics.mean(w for _, w in rows):.0f} s |")
    if args.table == "self":
        plot_consensus(args.out, args.seeds, args.csv.parent / "consensus.png")


def plot_consensus(out: Path, seeds: list[int], png: Path) -> None:
    """Consensus kept-share and accuracy over training, from the runs' metrics.jsonl (logged every
    log step on the mini-batch's target crops), rounds 1 and 2 back to back, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=120)
    offset = 0
    for round_index, name in enumerate(["consensus (cosine)", "consensus (cosine), round 2"], start=1):
        per_seed = [[json.loads(line) for line in (out / f"{slug(name)}_s{seed}" / "metrics.jsonl").open()]
                    for seed in seeds]
        per_seed = [[r for r in records if "consensus_kept" in r] for records in per_seed]
        steps = [r["step"] for r in per_seed[0]]
        for key, label, colour in [("consensus_kept", "share of pixels the consensus keeps", "tab:blue"),
                                   ("consensus_accuracy", "accuracy of the kept pixels", "tab:orange"),
                                   ("prob_accuracy", "accuracy of all probability labels", "tab:green"),
                                   ("feat_accuracy", "accuracy of all feature labels", "tab:red")]:
            mean = [statistics.mean(records[i][key] for records in per_seed) for i in range(len(steps))]
            ax.plot([offset + s for s in steps], mean, color=colour, label=label if round_index == 1 else None)
        offset += steps[-1]
        ax.axvline(offset, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("self-training step (round 1, then round 2)")
    ax.set_ylim(0.4, 1)
    ax.set_title(f"bilateral consensus on target crops, mean of seeds {' '.join(map(str, seeds))}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
