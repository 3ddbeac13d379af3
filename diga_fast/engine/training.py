"""Pieces every training stage shares: device, seeding, the optimizer and its poly schedule, and the
run object that owns the run folder, logging, progress, checkpoints and resume."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diga_fast.engine import distributed
from diga_fast.engine.checkpoint import (
    atomic_write,
    MetricsLog,
    load_state,
    load_state_checked,
    prepare_run_dir,
    save_state,
    save_weights,
)
from diga_fast.engine.recipe import Recipe, save_yaml
from diga_fast.errors import DigaError
from diga_fast.models import SegmentationModel

console = Console(stderr=True)


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device`` names (default: CUDA when available); under torchrun, this rank's."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DigaError(f"--device {name!r} is not a device (use cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DigaError(f"--device {name}: CUDA is not available on this machine")
    device = distributed.setup(device)  # under torchrun: join the group, this rank's GPU
    if not distributed.current().is_main:
        console.quiet = True  # rank 0 speaks for all
    return device


def training_forward(model: SegmentationModel, recipe: Recipe, device: torch.device,
                     *others: torch.nn.Module) -> torch.nn.Module:
    """What a stage calls for the training forward pass of ``model``: channels_last (also applied to
    ``others``, e.g. the EMA teacher) when ``train.channels_last``, DistributedDataParallel under
    torchrun, ``torch.compile`` when ``train.compile``. Weights stay those of ``model``."""
    if recipe.train.channels_last:
        for module in (model, *others):
            module.to(memory_format=torch.channels_last)
    trained = distributed.wrap(model, device)
    if recipe.train.compile:
        trained = torch.compile(trained, backend=recipe.train.compile_backend)
    return trained


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """One optimisation step of ``model`` on ``loss``; under torchrun its BatchNorm statistics are
    then averaged so that every rank (and the EMA teacher built from them) stays identical."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    distributed.average_buffers(model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: SegmentationModel, recipe: Recipe) -> torch.optim.SGD:
    """SGD, base LR for the backbone and ``head_lr_mult`` x for the head (method.md step 5)."""
    cfg = recipe.optim
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult, "base_lr": cfg.lr * cfg.head_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float) -> float:
    """lr = base_lr * (1 - step / total) ** power for every group; returns the first group's lr."""
    factor = (1.0 - step / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def scalar_metrics(summary: dict, prefix: str = "target_val/") -> dict[str, float]:
    """The numbers of an evaluation summary, for metrics.jsonl."""
    return {f"{prefix}{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "num_classes"}


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PhaseTimer:
    """Wall time of named phases of each training step, CUDA synchronised at the phase boundaries
    (``diga bench train``). A disabled timer costs nothing and leaves the step asynchronous."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.enabled = enabled
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self._current[phase] = self._current.get(phase, 0.0) + time.perf_counter() - start

    def next_step(self) -> None:
        if self.enabled:
            self.steps.append(self._current)
            self._current = {}


class TrainingRun:
    """A run folder and everything written into it.

    ``modules`` are the models whose weights are saved as ``<name>.safetensors`` (and restored on
    resume); ``extras`` are any other state a stage needs back on resume (e.g. centroids)."""

    def __init__(self, recipe: Recipe, out: str | Path, resume: bool = False) -> None:
        self.recipe = recipe
        self.dir = Path(out)
        self.resume = resume
        self.is_main = distributed.current().is_main  # under torchrun only rank 0 writes the folder

        def prepare() -> None:
            prepare_run_dir(out, resume)
            if not resume:
                atomic_write(self.dir / "config.yaml", lambda tmp: save_yaml(recipe, tmp))
                (self.dir / "metrics.jsonl").unlink(missing_ok=True)

        distributed.on_main(prepare)
        self.metrics = MetricsLog(self.dir) if self.is_main else None
        self.step = 0
        self._last_log_time = time.perf_counter()
        self._last_log_step = 0
        self.last_saved_step: int | None = None

    # -- checkpoints -----------------------------------------------------------------------
    def save(
        self,
        step: int,
        modules: dict[str, SegmentationModel],
        optimizer: torch.optim.Optimizer | None = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.last_saved_step = step
        if not self.is_main:
            return
        label_space, digest = self.recipe.data.label_space, self.recipe.digest()
        for name, module in modules.items():
            save_weights(self.dir / f"{name}.safetensors", module, label_space, digest)
        state = {
            "step": step,
            "recipe": self.recipe.to_dict(),
            "modules": {name: module.state_dict() for name, module in modules.items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": _rng_state(),
            "world": distributed.current().world,
            "extras": extras or {},
        }
        save_state(self.dir / "state.pt", state)

    def restore(
        self,
        modules: dict[str, SegmentationModel],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> dict[str, Any]:
        """On ``--resume``: load modules, optimizer and RNG state; returns the stage extras and sets
        ``self.step``. Without resume: returns {} and leaves step 0."""
        if not self.resume:
            return {}
        state = load_state(self.dir / "state.pt")
        if state.get("recipe", {}).get("stage") != self.recipe.stage:
            raise DigaError(f"--resume: {self.dir} is a {state.get('recipe', {}).get('stage')!r} run, not {self.recipe.stage!r}")
        for name, module in modules.items():
            if name not in state["modules"]:
                raise DigaError(f"--resume: {self.dir}/state.pt holds no {name!r} weights")
            load_state_checked(module, state["modules"][name], f"{self.dir}/state.pt")
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        saved_world, world = int(state.get("world", 1)), distributed.current().world
        if saved_world != world:
            console.print(f"[yellow]warning: resuming with {world} process(es) a run saved with {saved_world}: the global "
                          "batch changes, so the rest of the run differs from an uninterrupted one[/yellow]")
        self.step = self.last_saved_step = int(state["step"])
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
        return state["extras"]

    def checkpoint_and_evaluate(
        self,
        step: int,
        modules: dict[str, SegmentationModel],
        optimizer: torch.optim.Optimizer,
        extras: Callable[[], dict[str, Any]],
        evaluate: Callable[[], dict],
    ) -> None:
        """Mid-run: checkpoint every ``train.save_every`` and evaluate every ``train.eval_every``
        steps (the last step is left to ``finish``). ``extras`` is only called when saving."""
        cfg = self.recipe.train
        if step == cfg.iters:
            return
        if step % cfg.save_every == 0:
            self.save(step, modules, optimizer, extras() if self.is_main else None)
        if cfg.eval_every and step % cfg.eval_every == 0:
            self.log(step, **scalar_metrics(evaluate()))

    def finish(self, summary: dict, modules: dict[str, SegmentationModel], optimizer: torch.optim.Optimizer,
               extras: dict[str, Any] | None = None) -> dict:
        """The final evaluation's metrics, the last checkpoint, ``eval.json``; returns ``summary``."""
        step = self.recipe.train.iters
        if distributed.current().enabled:
            self._record_rank_agreement(modules, extras or {})
        self.log(step, **scalar_metrics(summary))
        self.save(step, modules, optimizer, extras)
        self.write_json("eval.json", summary)
        self.close()
        return summary

    def _record_rank_agreement(self, modules: dict[str, SegmentationModel], extras: dict[str, Any]) -> None:
        """Under torchrun: fingerprints of every rank's weights, buffers and tensor extras (centroids),
        written to ``ranks.json``; the ranks must hold identical copies."""
        names = [*modules, *(k for k, v in extras.items() if torch.is_tensor(v) and v.is_floating_point())]
        tensors = [list(modules[n].state_dict().values()) if n in modules else [extras[n]] for n in names]
        mine = torch.stack([distributed.fingerprint(group) for group in tensors]).to(distributed.current().device)
        every = distributed.gather_rows(mine[None]).cpu()
        identical = bool((every == every[0]).all())
        if not identical:
            console.print("[yellow]warning: the ranks' copies of the model differ; see ranks.json[/yellow]")
        self.write_json("ranks.json", {"world": distributed.current().world, "identical": identical,
                                       "fingerprints": {n: every[:, i].tolist() for i, n in enumerate(names)}})

    # -- logging ---------------------------------------------------------------------------
    def should_log(self, step: int) -> bool:
        return step % self.recipe.train.log_every == 0 or step == self.recipe.train.iters

    def check_finite(self, step: int, **values: torch.Tensor) -> None:
        """Stop with one line naming the value and the step when one is NaN/inf (on any rank)."""
        numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()  # one sync
        bad = [(name, number) for name, number in zip(values, numbers) if not math.isfinite(number)]
        if not distributed.any_rank(bool(bad)):
            return
        where = (f"the last good checkpoint (step {self.last_saved_step}) is in {self.dir}"
                 if self.last_saved_step is not None else "no checkpoint was written yet")
        what = f"{bad[0][0]} is {bad[0][1]}" if bad else "a loss is not finite on another rank"
        raise DigaError(f"{what} at step {step}: training stopped; {where}")

    def log(self, step: int, **values: Any) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        rate = (step - self._last_log_step) / max(now - self._last_log_time, 1e-9)
        self._last_log_time, self._last_log_step = now, step
        self.metrics.write(step, **values, it_per_s=round(rate, 3))

    @contextmanager
    def progress(self, total: int, description: str) -> Iterator[Callable[..., None]]:
        """A rich progress bar (it/s, ETA, the latest values); yields ``tick(step, **values)``."""
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        start_time, start_step = time.perf_counter(), self.step
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
            task = bar.add_task(description, total=total, completed=self.step, rate="-", info="")

            def tick(step: int, **values: Any) -> None:
                rate = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
                info = " ".join(f"{k} {float(v.detach() if torch.is_tensor(v) else v):.4f}" for k, v in values.items())
                bar.update(task, completed=step, rate=f"{rate:.2f}", info=info)
                if not console.is_terminal and (step % max(1, total // 10) == 0 or step == total):
                    console.print(f"{description}: {step}/{total}  {rate:.2f} it/s  {info}", highlight=False)

            yield tick

    def write_json(self, name: str, data: Any) -> None:
        if self.is_main:
            atomic_write(self.dir / name, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
