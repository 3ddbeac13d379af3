"""``diga bench train``: one self-training iteration, timed phase by phase, for several setups.

The iteration is the real one: :func:`diga_fast.stages.self_training.train_self` runs on the built-in
pair while a :class:`PhaseTimer` is installed for the stage's phases
(:func:`diga_fast.stages.common.timing_phases`); it synchronises CUDA around each phase
(data, EMA, teacher, labelling = assignment + consensus, mixing = ClassMix + CrDoMix, forward = student
and teacher passes + losses, centroids, backward = backward + SGD step). The first ``warmup`` steps
(allocation, Triton and Inductor compilation, cuDNN autotuning) are left out of the means.

Setups (rows keyed by device in ``./diga-bench/train.csv``; ``--record``: ``benchmarks/results/train.csv``):
  ``torch-fp32``       (a) every op on its PyTorch reference (``train.kernels=torch``), fp32;
  ``compile-fp32``     the references through torch.compile (``train.kernels=compile``): the baseline a
                       user would reach for instead of hand-written kernels;
  ``kernels-fp32``     (b) the fused Triton ops, fp32;
  ``torch-bf16-cl``, ``compile-bf16-cl``, ``kernels-bf16-cl`` (c): the same with bf16 autocast and
                       channels_last;
  ``kernels-bf16-cl-compile``: (c) with the student's forward through torch.compile (``train.compile``).
Each row carries its speed-up over (a), over the eager reference and over the compiled reference of
the same precision (NaN where that setup was not run before it), and is appended to the CSV as soon
as its setup finishes. On a CPU the Triton ops do not run (only through the interpreter, which times
nothing useful): the default rows there are ``torch-fp32``, ``compile-fp32`` and ``torch-bf16-cl``.

Default preset: ``paper`` on CUDA (deeplabv2_r101, 512x896 crops, 3 source + 3 target per step),
``demo`` on CPU (the small model, 112x224 crops, 4 + 4).
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from diga_fast.benchmarks.results_csv import append_rows, device_name
from diga_fast.utils.printing import print_wide

PHASES = ("data", "ema", "teacher", "labelling", "mixing", "forward", "centroids", "backward")
_FP32 = ["train.bf16=false", "train.channels_last=false"]
_BF16_CL = ["train.bf16=true", "train.channels_last=true"]
SETUPS = {
    "torch-fp32": ["train.kernels=torch", *_FP32],
    "compile-fp32": ["train.kernels=compile", *_FP32],
    "kernels-fp32": ["train.kernels=auto", *_FP32],
    "torch-bf16-cl": ["train.kernels=torch", *_BF16_CL],
    "compile-bf16-cl": ["train.kernels=compile", *_BF16_CL],
    "kernels-bf16-cl": ["train.kernels=auto", *_BF16_CL],
    "kernels-bf16-cl-compile": ["train.kernels=auto", *_BF16_CL, "train.compile=true"],
}
CUDA_SETUPS = ("torch-fp32", "compile-fp32", "kernels-fp32", "torch-bf16-cl", "compile-bf16-cl", "kernels-bf16-cl",
               "kernels-bf16-cl-compile")
CPU_SETUPS = ("torch-fp32", "compile-fp32", "torch-bf16-cl")
COLUMNS = ["timestamp", "device", "preset", "arch", "crop", "batch", "setup", "steps",
           *(f"{p}_ms" for p in PHASES), "total_ms", "it_per_s", "peak_mem_mib", "speedup_vs_a",
           "speedup_vs_eager_ref", "speedup_vs_compiled_ref", "mem_vs_a"]


def _precision(setup: str) -> str:
    return setup.split("-", 1)[1].removesuffix("-compile")  # "fp32" or "bf16-cl"


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
        csv_path: str | Path | None = "diga-bench/train.csv", device: str | None = None,
        overrides: tuple[str, ...] = (), deadline: float | None = None) -> list[dict]:
    """Time each setup; append its row to ``csv_path`` as soon as it is measured and print the table.
    ``overrides`` are recipe ``key=value`` strings applied on top of the preset (e.g. a smaller crop).
    Past ``deadline`` (a ``time.time()``) the setups left are skipped and named."""
    from diga_fast.labels import get_label_space
    from diga_fast.models.io import save_weights
    from diga_fast.engine.device import resolve_device
    from diga_fast.stages.common import timing_phases
    from diga_fast.stages.self_training import train_self
    from diga_fast.models import build_model

    dev = resolve_device(device)
    preset = preset or ("paper" if dev.type == "cuda" else "demo")
    setups = list(setups or (CUDA_SETUPS if dev.type == "cuda" else CPU_SETUPS))
    total_steps = warmup + steps
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="diga-bench-train-") as tmp:
        base = _recipe(preset, total_steps, list(overrides))
        label_space = get_label_space(base.data.label_space)
        torch.manual_seed(0)
        init = Path(tmp) / "init"
        init.mkdir()
        save_weights(init / "student.safetensors", build_model(base.model.arch, label_space.num_classes),
                     label_space.name)
        for setup in setups:
            if deadline is not None and time.time() > deadline:
                skipped.append(setup)
                continue
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
            row = {
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "device": device_name(dev) + ("" if dev.type == "cuda" else f", {torch.get_num_threads()} threads"),
                "preset": preset, "arch": recipe.model.arch,
                "crop": "x".join(map(str, recipe.data.crop)), "batch": f"{recipe.data.batch_size}+{recipe.data.batch_size}",
                "setup": setup, "steps": len(measured), **{f"{p}_ms": v for p, v in phase_ms.items()},
                "total_ms": total, "it_per_s": 1e3 / total,
                "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan"),
            }
            done = {r["setup"]: r for r in rows}
            ratio = lambda other, key="total_ms": done[other][key] / row[key] if other in done else float("nan")  # noqa: E731
            row["speedup_vs_a"] = 1.0 if setup == "torch-fp32" else ratio("torch-fp32")
            row["speedup_vs_eager_ref"] = 1.0 if setup.startswith("torch-") else ratio(f"torch-{_precision(setup)}")
            row["speedup_vs_compiled_ref"] = (1.0 if setup.startswith("compile-")
                                              else ratio(f"compile-{_precision(setup)}"))
            row["mem_vs_a"] = (row["peak_mem_mib"] / done["torch-fp32"]["peak_mem_mib"]
                               if dev.type == "cuda" and "torch-fp32" in done else float("nan"))
            rows.append(row)
            if csv_path is not None:
                append_rows([row], Path(csv_path), COLUMNS)
    if skipped:
        print(f"skipped for time: {', '.join(skipped)}")
    if rows:
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
    for name in ("total", "vs (a)", "vs eager ref", "vs compiled ref", "peak MiB", "mem vs (a)"):
        table.add_column(name, justify="right")
    def shown(value: float, form: str, unit: str = "") -> str:  # not measured (no compiled setup, no CUDA memory)
        return "-" if math.isnan(value) else format(value, form) + unit

    for row in rows:
        table.add_row(row["setup"], *(f"{row[f'{p}_ms']:.1f}" for p in PHASES), f"{row['total_ms']:.1f}",
                      shown(row["speedup_vs_a"], ".2f", "x"), shown(row["speedup_vs_eager_ref"], ".2f", "x"),
                      shown(row["speedup_vs_compiled_ref"], ".2f", "x"), shown(row["peak_mem_mib"], ".0f"),
                      shown(row["mem_vs_a"], ".2f"))
    print_wide(Console(), table)  # whole in logs and pipes too
