"""``diga bench train``: one self-training iteration, timed phase by phase, for three setups.

The iteration is the real one: :func:`diga_fast.stages.self_training.train_self` runs on the built-in
pair while a :class:`PhaseTimer` is installed for the stage's phases
(:func:`diga_fast.stages.common.timing_phases`); it synchronises CUDA around each phase
(data, EMA, teacher, labelling = assignment + consensus, mixing = ClassMix + CrDoMix, forward = student
and teacher passes + losses, centroids, backward = backward + SGD step). The first ``warmup`` steps
(allocation, Triton compilation, cuDNN autotuning) are left out of the means.

Setups (rows keyed by device in ``./diga-bench/train.csv``; ``--record``: ``benchmarks/results/train.csv``):
  (a) ``torch-fp32``: every op on its PyTorch reference (``train.kernels=false``), fp32;
  (b) ``kernels-fp32``: the fused Triton ops, fp32;
  (c) ``kernels-bf16-cl``: Triton ops + bf16 autocast + channels_last.
On a CPU the Triton ops do not run (only through the interpreter, which times nothing useful), so
the rows are (a) and ``torch-bf16-cl``.

Default preset: ``paper`` on CUDA (deeplabv2_r101, 512x896 crops, 3 source + 3 target per step),
``demo`` on CPU (the small model, 112x224 crops, 8 + 8).
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from diga_fast.benchmarks.results_csv import append_rows

PHASES = ("data", "ema", "teacher", "labelling", "mixing", "forward", "centroids", "backward")
SETUPS = {
    "torch-fp32": ["train.kernels=false", "train.bf16=false", "train.channels_last=false"],
    "kernels-fp32": ["train.kernels=true", "train.bf16=false", "train.channels_last=false"],
    "kernels-bf16-cl": ["train.kernels=true", "train.bf16=true", "train.channels_last=true"],
    "torch-bf16-cl": ["train.kernels=false", "train.bf16=true", "train.channels_last=true"],
}
COLUMNS = ["timestamp", "device", "preset", "arch", "crop", "batch", "setup", "steps",
           *(f"{p}_ms" for p in PHASES), "total_ms", "it_per_s", "peak_mem_mib", "speedup_vs_a", "mem_vs_a"]


class PhaseTimer:
    """Wall time of named phases of each training step, CUDA synchronised at the phase boundaries."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self._current[phase] = self._current.get(phase, 0.0) + time.perf_counter() - start

    def next_step(self) -> None:
        self.steps.append(self._current)
        self._current = {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} cpu, {torch.get_num_threads()} threads"


def _recipe(preset: str, steps: int, overrides: list[str]):
    from diga_fast.config import apply_overrides, preset_recipe, validate_recipe

    recipe = preset_recipe(preset, "self", "synthetic", "synthetic")
    recipe.data.label_space = "cityscapes19"
    recipe.data.synthetic_train_images = max(12, 2 * recipe.data.batch_size)
    recipe.data.synthetic_val_images = 2
    recipe.data.eval_max_images = 2
    recipe.data.eval_scales = (1.0,)
    recipe.self_training.pseudo_label_scales = (1.0,)
    recipe.train.iters = steps
    recipe.train.log_every = recipe.train.save_every = steps
    recipe.warmup.visualize_every = 0
    recipe.translator.kind = "fda"  # the built-in pair has no trained translator (paper's default is cyclegan)
    return validate_recipe(apply_overrides(recipe, overrides))


def run(preset: str | None = None, steps: int = 20, warmup: int = 5, setups: list[str] | None = None,
        csv_path: str | Path = "diga-bench/train.csv", device: str | None = None,
        overrides: tuple[str, ...] = ()) -> list[dict]:
    """Time each setup; append its row to ``csv_path`` and print the table. ``overrides`` are recipe
    ``key=value`` strings applied on top of the preset (e.g. a smaller crop)."""
    from diga_fast.data.labels import get_label_space
    from diga_fast.models.io import save_weights
    from diga_fast.engine.device import resolve_device
    from diga_fast.stages.common import timing_phases
    from diga_fast.stages.self_training import train_self
    from diga_fast.models import build_model

    dev = resolve_device(device)
    preset = preset or ("paper" if dev.type == "cuda" else "demo")
    setups = setups or (["torch-fp32", "kernels-fp32", "kernels-bf16-cl"] if dev.type == "cuda"
                        else ["torch-fp32", "torch-bf16-cl"])
    total_steps = warmup + steps
    rows = []
    with tempfile.TemporaryDirectory(prefix="diga-bench-train-") as tmp:
        base = _recipe(preset, total_steps, list(overrides))
        label_space = get_label_space(base.data.label_space)
        torch.manual_seed(0)
        init = Path(tmp) / "init"
        init.mkdir()
        save_weights(init / "student.safetensors", build_model(base.model.arch, label_space.num_classes),
                     label_space.name)
        for setup in setups:
            recipe = _recipe(preset, total_steps, [*overrides, *SETUPS[setup]])
            timer = PhaseTimer(dev)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            with timing_phases(timer):
                train_self(recipe, Path(tmp) / setup, init, device=str(dev))
            measured = timer.steps[warmup:]
            phase_ms = {p: 1e3 * statistics.mean(s.get(p, 0.0) for s in measured) for p in PHASES}
            total = sum(phase_ms.values())
            rows.append({
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "device": device_name(dev), "preset": preset, "arch": recipe.model.arch,
                "crop": "x".join(map(str, recipe.data.crop)), "batch": f"{recipe.data.batch_size}+{recipe.data.batch_size}",
                "setup": setup, "steps": len(measured), **{f"{p}_ms": v for p, v in phase_ms.items()},
                "total_ms": total, "it_per_s": 1e3 / total,
                "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan"),
            })
    reference = rows[0]
    for row in rows:
        row["speedup_vs_a"] = reference["total_ms"] / row["total_ms"]
        row["mem_vs_a"] = row["peak_mem_mib"] / reference["peak_mem_mib"] if dev.type == "cuda" else float("nan")
    append_rows(rows, Path(csv_path), COLUMNS)
    _print(rows)
    return rows


def _print(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"one self-training iteration: {first['arch']} {first['crop']}, {first['batch']} crops, "
                        f"{first['device']} (mean of {first['steps']} steps, ms)")
    table.add_column("setup")
    for phase in PHASES:
        table.add_column(phase, justify="right")
    for name in ("total", "speed-up", "peak MiB", "mem vs (a)"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row["setup"], *(f"{row[f'{p}_ms']:.1f}" for p in PHASES), f"{row['total_ms']:.1f}",
                      f"{row['speedup_vs_a']:.2f}x", f"{row['peak_mem_mib']:.0f}", f"{row['mem_vs_a']:.2f}")
    Console().print(table)
