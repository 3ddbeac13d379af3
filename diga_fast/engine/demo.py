"""``diga demo``: the whole pipeline on the built-in pair, one sub-folder per stage, one table at
the end (also ``summary.json``: ``{"stages": {name: target-val mIoU in percent}}``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from diga_fast.engine.checkpoint import atomic_write
from diga_fast.engine.recipe import preset_recipe
from diga_fast.errors import DigaError


def run_demo(out: str | Path, device: str | None = None, seed: int = 0, oracle: bool = False) -> dict:
    from diga_fast.method.source_only import train_source

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DigaError(f"--out {out} is not empty; choose a new folder for the demo")
    console = Console(stderr=True)
    stages: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def stage(name: str, description: str, fn) -> None:
        console.rule(f"[bold]{description}")
        start = time.perf_counter()
        summary = fn(out / name)
        seconds[name] = round(time.perf_counter() - start, 1)
        stages[name] = summary["miou"]

    recipe = preset_recipe("demo", "source")
    recipe.train.seed = seed
    stage("source_only", "source-only: supervised on the rendered source", lambda d: train_source(recipe, d, device))
    if oracle:
        oracle_recipe = preset_recipe("demo", "source", source="synthetic:target")
        oracle_recipe.train.seed = seed
        stage("oracle", "oracle: supervised on the target's labels", lambda d: train_source(oracle_recipe, d, device))

    summary = {"stages": stages, "seconds": seconds}
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    table = Table(title="diga demo: target val mIoU per stage (built-in pair)")
    table.add_column("stage")
    table.add_column("mIoU %", justify="right")
    table.add_column("time s", justify="right")
    for name, miou in stages.items():
        table.add_row(name, f"{miou:.2f}", f"{seconds[name]:.0f}")
    Console().print(table)
    return summary
