"""``diga demo``: the whole pipeline on the built-in pair, one sub-folder per stage, one table at
the end (also ``summary.json``: ``{"stages": {name: target-val mIoU in percent}, ...}``):

    source_only -> warmup -> pseudo-labels + centroids -> self_training round 1 -> round 2 -> eval
    -> ONNX export (verified in ONNX Runtime)

Every stage uses the ``demo`` preset (the small CPU model), the same seed and the same data.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from diga_fast.config import Recipe, apply_overrides, preset_recipe, validate_recipe
from diga_fast.data.labels import get_label_space
from diga_fast.errors import DigaError
from diga_fast.models.io import load_model
from diga_fast.stages.self_training import train_self_rounds
from diga_fast.stages.source_only import train_source
from diga_fast.stages.warmup import train_warmup
from diga_fast.utils.io import write_json

console = Console(stderr=True)


def demo_recipe(stage: str, seed: int, overrides: tuple[str, ...] = ()) -> Recipe:
    recipe = preset_recipe("demo", stage)
    recipe.train.seed = seed
    return validate_recipe(apply_overrides(recipe, overrides))


def run_demo(out: str | Path, device: str | None = None, seed: int = 0, oracle: bool = False,
             rounds: int = 2, overrides: tuple[str, ...] = (), export: bool = True) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DigaError(f"--out {out} is not empty; choose a new folder for the demo")
    stages: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def stage(name: str, description: str, fn) -> dict:
        console.rule(f"[bold]{description}")
        start = time.perf_counter()
        summary = fn(out / name)
        seconds[name] = round(time.perf_counter() - start, 1)
        stages[name] = round(summary["miou"], 2)
        console.print(f"{name}: target val mIoU {summary['miou']:.2f} ({seconds[name]:.0f} s)")
        return summary

    stage("source_only", "source-only: supervised on the rendered source",
          lambda d: train_source(demo_recipe("source", seed, overrides), d, device))
    if oracle:
        oracle_recipe = demo_recipe("source", seed, overrides)
        oracle_recipe.data.source = "synthetic:target"
        stage("oracle", "oracle: supervised on the target's labels (upper bound)",
              lambda d: train_source(oracle_recipe, d, device))
    stage("warmup", "warm-up: CE + distillation between the clean and the CrDoMix view",
          lambda d: train_warmup(demo_recipe("warmup", seed, overrides), d, device))
    self_recipe = demo_recipe("self", seed, overrides)
    for r in range(1, rounds + 1):
        init = out / "warmup" if r == 1 else out / f"self_training_round{r - 1}"
        stage(f"self_training_round{r}",
              f"self-training round {r}: probability labels + centroids from {init.name}, bilateral consensus",
              lambda d, init=init: train_self_rounds(copy.deepcopy(self_recipe), d, init, rounds=1, device=device))

    final = out / (f"self_training_round{rounds}" if rounds else "warmup")
    exported = None
    if export:
        exported = export_final(final, out / "model.onnx")

    summary = {"stages": stages, "seconds": seconds, "final_checkpoint": str(final),
               "onnx": str(exported) if exported else None}
    write_json(out / "summary.json", summary)
    table = Table(title="diga demo: target val mIoU per stage (built-in pair, small CPU model)")
    table.add_column("stage")
    table.add_column("mIoU %", justify="right")
    table.add_column("time s", justify="right")
    for name, miou in stages.items():
        table.add_row(name, f"{miou:.2f}", f"{seconds[name]:.0f}")
    Console().print(table)
    if exported:
        Console().print(f"exported the final student to {exported} (checked in ONNX Runtime)")
    return summary


def export_final(checkpoint: Path, onnx_path: Path) -> Path | None:
    """ONNX export of the final student when the exporter and ONNX Runtime are installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        console.print(f"skipping the ONNX export ({err}); install diga-fast[cpu] or [gpu] for it")
        return None
    from diga_fast.export import export_model

    console.rule("[bold]export: ONNX, verified in ONNX Runtime")
    model, meta = load_model(checkpoint)
    for result in export_model(model, get_label_space(meta["label_space"]), {"onnx": onnx_path}, checkpoint_meta=meta):
        console.print(result.summary())
    return onnx_path
