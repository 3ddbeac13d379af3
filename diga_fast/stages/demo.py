"""``diga demo``: the whole pipeline on the built-in pair, one sub-folder per stage, one table at
the end (also ``summary.json``: ``{"stages": {name: target-val mIoU in percent}, "seconds": {name: s},
"total_seconds", "final_checkpoint", "onnx": path, "onnx_check": {"max_abs_logit_diff",
"argmax_agreement", ...}}``; every argument is checked before the first stage starts):

    source_only -> warmup -> pseudo-labels + centroids -> self_training round 1 -> round 2 -> eval
    -> ONNX export (verified in ONNX Runtime)

Every stage uses the ``demo`` preset (the small CPU model unless ``--model`` names another network, as
``diga train`` takes it; one CPU thread: ``train.threads``), the same seed and the same data. On a CPU
with a core to spare, the source-only baseline (which nothing later depends on) trains in a second
process beside the warm-up, its output in ``OUT/source_only.log``; one thread per process gives the
same numbers as training the two one after the other.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
from multiprocessing.pool import Pool
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from diga_fast.config import Recipe, absolute_paths, apply_overrides, choose_network, preset_recipe, validate_recipe
from diga_fast.labels import get_label_space
from diga_fast.engine.device import resolve_device
from diga_fast.models.io import load_model
from diga_fast.stages.self_training import train_self_rounds
from diga_fast.stages.source_only import train_source
from diga_fast.stages.warmup import train_warmup
from diga_fast.utils.io import check_out_folder, write_json

console = Console(stderr=True)


def demo_recipe(stage: str, seed: int, overrides: tuple[str, ...] = (), arch: str | None = None,
                pretrained: str | None = None) -> Recipe:
    """The ``demo`` preset's recipe for ``stage``, with ``--model`` / ``--pretrained`` as ``diga train`` takes them."""
    recipe = preset_recipe("demo", stage)
    recipe.train.seed = seed
    choose_network(recipe, arch, pretrained)
    return absolute_paths(validate_recipe(apply_overrides(recipe, overrides)))


def run_demo(out: str | Path, device: str | None = None, seed: int = 0, oracle: bool = False,
             rounds: int = 2, overrides: tuple[str, ...] = (), export: bool = True, arch: str | None = None,
             pretrained: str | None = None) -> dict:
    begin = time.perf_counter()
    out = check_out_folder(out, force=None)  # a new or empty folder

    def recipe(stage: str) -> Recipe:
        return demo_recipe(stage, seed, overrides, arch, pretrained)

    for kind in ("source", "warmup", "self"):  # every KEY=VALUE checked before the first stage prints
        recipe(kind)
    compute_device = resolve_device(device)
    stages: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def stage(name: str, header: str, description: str, fn) -> dict:
        """A short header line (it fits 80 columns), then what the stage does (wrapped between words)."""
        console.rule(f"[bold]{header}")
        console.print(description, highlight=False)
        start = time.perf_counter()
        summary = fn(out / name)
        seconds[name] = round(time.perf_counter() - start, 1)
        stages[name] = round(summary["miou"], 2)
        console.print(f"{name}: target val mIoU {summary['miou']:.2f} ({seconds[name]:.0f} s)")
        return summary

    source_recipe = recipe("source")
    beside = spare_core_pool(source_recipe, compute_device)
    try:
        if beside is None:
            stage("source_only", "source-only", "supervised on the rendered source",
                  lambda d: train_source(source_recipe, d, device))
        else:
            log = out / "source_only.log"
            out.mkdir(parents=True, exist_ok=True)
            pending = beside.apply_async(_logged, (log, train_source, source_recipe, out / "source_only", device))
            console.print(f"source-only (the baseline) trains on a second core beside the warm-up; its output: "
                          f"{log}", highlight=False)
        if oracle:
            oracle_recipe = recipe("source")
            oracle_recipe.data.source = "synthetic:target"
            stage("oracle", "oracle", "supervised on the target's labels (the upper bound)",
                  lambda d: train_source(oracle_recipe, d, device))
        stage("warmup", "warm-up", "CE + distillation between the clean and the CrDoMix view",
              lambda d: train_warmup(recipe("warmup"), d, device))
        if beside is not None:
            with console.status("waiting for the source-only baseline"):
                summary, seconds["source_only"] = pending.get()
            stages["source_only"] = round(summary["miou"], 2)
            console.print(f"source_only: target val mIoU {summary['miou']:.2f} ({seconds['source_only']:.0f} s, "
                          "beside the warm-up)", highlight=False)
            stages = {"source_only": stages.pop("source_only"), **stages}  # the table's first row
            seconds = {"source_only": seconds.pop("source_only"), **seconds}
    finally:
        if beside is not None:  # also when a stage failed or was interrupted: no orphan training on
            beside.terminate()
    self_recipe = recipe("self")
    for r in range(1, rounds + 1):
        init = out / "warmup" if r == 1 else out / f"self_training_round{r - 1}"
        stage(f"self_training_round{r}", f"self-training round {r}",
              f"probability labels + centroids from {init.name}, bilateral consensus",
              lambda d, init=init: train_self_rounds(copy.deepcopy(self_recipe), d, init, rounds=1, device=device))

    final = out / (f"self_training_round{rounds}" if rounds else "warmup")
    exported = export_final(final, out / "model.onnx") if export else None

    total = round(time.perf_counter() - begin, 1)
    summary = {"stages": stages, "seconds": seconds, "total_seconds": total, "final_checkpoint": str(final),
               "onnx": str(exported.path) if exported else None,
               "onnx_check": onnx_check(exported.parity) if exported else None}
    write_json(out / "summary.json", summary)
    network = source_recipe.model.arch
    Console().print(Text(f"diga demo: target val mIoU per stage (built-in pair, {network} network)", style="bold"))
    table = Table()
    table.add_column("stage")
    table.add_column("mIoU %", justify="right")
    table.add_column("time s", justify="right")
    for name, miou in stages.items():
        table.add_row(name, f"{miou:.2f}", f"{seconds[name]:.0f}")
    table.add_section()
    table.add_row("total", "", f"{total:.0f}")
    Console().print(table)
    if exported:
        Console().print(f"exported the final student to {exported.path} (checked in ONNX Runtime: "
                        f"max |Δlogit| {exported.parity.max_abs_error:.1e}, argmax agreement "
                        f"{100 * exported.parity.agreement:.2f} %)", highlight=False, markup=False)
    return summary


def spare_core_pool(recipe: Recipe, device) -> Pool | None:
    """A one-process pool for a stage that can train beside the main one, when the device is a CPU with
    cores for two processes of the recipe's thread count; else None (run it in turn)."""
    threads = recipe.train.threads
    if device.type != "cpu" or threads < 1 or len(os.sched_getaffinity(0)) < 2 * threads:
        return None
    return multiprocessing.get_context("spawn").Pool(1)


def _logged(log: Path, train, recipe: Recipe, out: Path, device: str | None) -> tuple[dict, float]:
    """``train(recipe, out, device)`` with every line of its output (and of its C++ libraries) in
    ``log``: its summary and wall time (what a pool process runs)."""
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        start = time.perf_counter()
        summary = train(recipe, out, device)
        return summary, round(time.perf_counter() - start, 1)


def onnx_check(parity) -> dict:
    """The figures of the ONNX Runtime check (:class:`diga_fast.export.verify.Parity`) for ``summary.json``."""
    return {"max_abs_logit_diff": parity.max_abs_error, "tolerance": parity.tolerance,
            "argmax_agreement": parity.agreement, "strict_argmax_agreement": parity.strict_agreement,
            "shapes": [list(shape) for shape in parity.shapes], "ok": parity.ok}


def export_final(checkpoint: Path, onnx_path: Path):
    """ONNX export of the final student when the exporter and ONNX Runtime are installed: its
    :class:`diga_fast.export.api.ExportResult` (path, parity figures), or None."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        console.print(f"skipping the ONNX export ({err}); install diga-fast[cpu] or [gpu] for it")
        return None
    from diga_fast.export import export_model

    console.rule("[bold]export")
    console.print("ONNX, verified in ONNX Runtime", highlight=False)
    model, meta = load_model(checkpoint)
    with console.status("exporting (torch.export, then ONNX Runtime on two other input sizes)"):  # one call, no count
        results = export_model(model, get_label_space(meta["label_space"]), {"onnx": onnx_path}, checkpoint_meta=meta)
    for result in results:
        console.print(result.summary(), highlight=False, markup=False)
    return results[0]
