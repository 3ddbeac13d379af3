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
demo:   the demo preset's choices against the official recipe (the fidelity issue): the EMA teacher
        in eval or train mode (official), FDA or the CycleGAN translator trained by `diga train
        translator` on the built-in pair (official), and round 1 with one pooled or the grouped
        (official) student forwards, from each seed's eval-mode warm-up.

``--set KEY=VALUE ...`` adds recipe overrides to every run (the tables of docs/results.md measured before
the demo's current schedule name theirs). ``--jobs N`` runs N runs at a time (each demo run uses one CPU thread: ``train.threads``); a run
starts once the run it starts from has finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and sys.path[0] == str(Path(__file__).resolve().parent):
    # Run as `python benchmarks/NAME.py`, Python put benchmarks/ first on sys.path, where kernels.py,
    # train.py and infer.py would answer to other packages' names (transformers imports `kernels`):
    # the repository root takes its place, which also makes a bare checkout importable.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from diga_fast.benchmarks.results_csv import append_rows, device_name

# name -> (diga argv, the configuration whose run of the same seed it starts from (--init), or a
# {"option": configuration} of recipe options that name another run (e.g. a translator checkpoint))
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
    "demo": {  # each row pins its settings: the demo preset now has the official teacher mode and forwards
        "warm-up, teacher in eval mode, FDA": (["train", "warmup", "warmup.teacher_mode=eval"], None),
        "warm-up, teacher in train mode (official)": (["train", "warmup", "warmup.teacher_mode=train"], None),
        "CycleGAN translator": (["train", "translator"], None),
        "warm-up, CycleGAN translator (official), teacher in eval mode": (
            ["train", "warmup", "translator.kind=cyclegan", "warmup.teacher_mode=eval"],
            {"translator.checkpoint": "CycleGAN translator"}),
        "round 1, pooled forward": (["train", "self", "self_training.forward=pooled", "warmup.teacher_mode=eval"],
                                    "warm-up, teacher in eval mode, FDA"),
        "round 1, grouped forward (official)": (["train", "self", "self_training.forward=grouped",
                                                 "warmup.teacher_mode=eval"], "warm-up, teacher in eval mode, FDA"),
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
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each demo run uses one CPU thread)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every run (e.g. an earlier demo schedule)")
    args = parser.parse_args()

    runs = [(name, seed) for name in CONFIGS[args.table] for seed in args.seeds]
    walls = run_all(CONFIGS[args.table], runs, args.out, args.jobs, args.set)
    results: dict[str, list[tuple[float, float]]] = {}
    for name, seed in runs:
        run = args.out / f"{slug(name)}_s{seed}"
        if (run / "eval.json").is_file():  # a translator run has no score of its own
            miou = json.loads((run / "eval.json").read_text())["miou"]
            results.setdefault(name, []).append((miou, walls[name, seed]))
            print(f"{name} seed {seed}: {miou:.2f} mIoU, {walls[name, seed]:.0f} s", flush=True)

    timestamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = device_name("cpu")
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


def run_all(configs: dict, runs: list[tuple[str, int]], out: Path, jobs: int,
            overrides: list[str]) -> dict[tuple[str, int], float]:
    """Each (configuration, seed) run not yet finished, ``jobs`` at a time, each after the runs it starts
    from, with ``overrides`` on every one; returns every run's wall time (``wall_s.txt`` in its folder)."""
    def folder(name: str, seed: int) -> Path:
        return out / f"{slug(name)}_s{seed}"

    def command(name: str, seed: int) -> list[str]:
        argv, parent = configs[name]
        extra = []
        if isinstance(parent, str):
            extra = ["--init", str(folder(parent, seed))]
        elif isinstance(parent, dict):
            extra = [f"{option}={folder(other, seed)}" for option, other in parent.items()]
        return ["diga", *argv[:2], "--out", str(folder(name, seed)), "--seed", str(seed), *argv[2:], *extra, *overrides]

    def parents(name: str) -> list[str]:
        parent = configs[name][1]
        return [parent] if isinstance(parent, str) else list(parent.values()) if parent else []

    def finished(name: str, seed: int) -> bool:
        return (folder(name, seed) / "wall_s.txt").is_file()

    def launch(name: str, seed: int) -> subprocess.Popen:
        return subprocess.Popen(command(name, seed), stdout=subprocess.DEVNULL)

    todo = [run for run in runs if not finished(*run)]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    while todo or running:
        for run, (process, start) in list(running.items()):
            if process.poll() is not None:
                if process.returncode:
                    raise SystemExit(f"{' '.join(command(*run))} failed with exit code {process.returncode}")
                (folder(*run) / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
                del running[run]
        ready = [run for run in todo if all(finished(parent, run[1]) for parent in parents(run[0]))]
        for run in ready[:max(0, jobs - len(running))]:
            todo.remove(run)
            running[run] = (launch(*run), time.perf_counter())
        if not ready and not running and todo:
            raise SystemExit(f"runs wait for runs outside the table: {todo}")
        time.sleep(1)
    return {run: float((folder(*run) / "wall_s.txt").read_text()) for run in runs}


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
