"""What every training loop does the same way, so that a stage's file holds only its own steps:

    stage = Stage(recipe, out, device, resume)    device (this rank's), seed, label space, draws
    ... build the stage's datasets (fail on bad data before anything is written)
    run = stage.open_run()                          the run folder (checks the target val split first)
    ... build nets and optimiser; stage.restore(...) on --resume
    for step, lr in stage.steps(description, optimizer):   poly LR, progress bar, kernel backend
        ... the stage's losses; run.check_finite; backward_step
        stage.end_step(step + 1, loss, lr, networks, optimizer, evaluate=student, log=...)
    return stage.finish(student, networks, optimizer)      save, then evaluate, eval.json

Phases of a step are marked with :func:`phase`: a ``torch.profiler.record_function`` range (seen by
any profiler) that also reports to a timer when ``diga bench train`` installs one
(:func:`timing_phases`); nothing of the benchmark reaches the training functions' signatures.
"""

from __future__ import annotations

import functools
import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function
from torch.utils.data import Dataset

from diga_fast.config import Recipe
from diga_fast.data.build import eval_target_datasets, target_val_dataset
from diga_fast.labels import get_label_space
from diga_fast.data.loader import InfiniteLoader
from diga_fast.engine.device import resolve_device, seed_everything, set_threads
from diga_fast.engine.logging import console, progress_callback
from diga_fast.engine.optim import build_optimizer, set_poly_lr
from diga_fast.engine.run import TrainingRun, load_state
from diga_fast.errors import Stopped
from diga_fast.inference import evaluate_generalisation, evaluate_on_target, target_row
from diga_fast.kernels import default_backend
from diga_fast.models import SegmentationModel, build_model
from diga_fast.utils import dist
from diga_fast.utils.dist import ShardedGenerator
from diga_fast.utils.io import unlock_run_folder

_phase_timer = None  # what timing_phases installs: timer(name) -> context manager, timer.next_step()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """A named phase of a training step: a profiler range ``diga/<name>``, timed when a timer is installed."""
    with record_function(f"diga/{name}"):
        if _phase_timer is None:
            yield
        else:
            with _phase_timer(name):
                yield


@contextmanager
def timing_phases(timer) -> Iterator[None]:
    """Report every :func:`phase` to ``timer`` (``timer(name)`` a context manager, ``timer.next_step()``
    called after each step) while the block runs."""
    global _phase_timer
    _phase_timer = timer
    try:
        yield
    finally:
        _phase_timer = None


def resumable(train: Callable[..., dict]) -> Callable[..., dict]:
    """A stage function ``train(recipe, out, ..., resume=...)`` whose ``--resume`` of a run that
    finished every step (``eval.json`` written, ``state.pt`` at ``train.iters``) does nothing but say
    so and return the saved evaluation, instead of evaluating and logging it a second time; the run
    folder's lock is dropped when the stage ends, however it ends."""

    @functools.wraps(train)
    def run_or_report(recipe: Recipe, out: str | Path, *args: Any, resume: bool = False, **kwargs: Any) -> dict:
        done = Path(out) / "eval.json"
        if resume and done.is_file() and load_state(Path(out) / "state.pt")["step"] >= recipe.train.iters:
            console.print(f"{out} already finished its {recipe.train.iters} steps: nothing to resume "
                          "(pass a larger --iters to train on)")
            return json.loads(done.read_text())
        try:
            return train(recipe, out, *args, resume=resume, **kwargs)
        finally:  # the run folder's lock (taken when the run opened it), however the stage ended
            unlock_run_folder(Path(out))

    return run_or_report


# preemption (SLURM, Kubernetes, torchrun's forward), SLURM's --signal, Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While a training loop runs, the signals of :data:`STOP_SIGNALS` only note the request (the list
    it yields) and the loop stops at the end of its step with a checkpoint; a second one acts as
    before (SIGINT interrupts at once). Outside the main thread nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum, frame) -> None:
        if received:  # asked twice: no more waiting for the step to end
            signal.signal(signum, previous[signum] if previous[signum] is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class Stage:
    """The shared setup and bookkeeping of a training loop (see the module docstring)."""

    def __init__(self, recipe: Recipe, out: str | Path, device: str | None, resume: bool) -> None:
        self.recipe, self.out, self.resume = recipe, Path(out), resume
        self.device = resolve_device(device, recipe.train.dist_timeout_minutes)
        seed_everything(recipe.train.seed)
        set_threads(recipe.train.threads)
        self.label_space = get_label_space(recipe.data.label_space)
        self.generator = ShardedGenerator(recipe.train.seed)  # augmentation and ClassMix draws
        self.run: TrainingRun | None = None
        self._tick: Callable[..., None] | None = None
        # checkpoint_now(step): write the checkpoint of ``step`` (set by end_step, or by a loop of its own)
        self.checkpoint_now: Callable[[int], None] | None = None

    def open_run(self, check_target_val: bool = True) -> TrainingRun:
        """The run folder (new, or reopened on --resume), once the target val split (and those of
        ``train.eval_targets``) are known to load."""
        if check_target_val:
            target_val_dataset(self.recipe, self.label_space)
            eval_target_datasets(self.recipe, self.label_space)
        self.run = TrainingRun(self.recipe, self.out, self.resume)
        return self.run

    def segmentation_model(self, model: SegmentationModel | None = None) -> SegmentationModel:
        """``model`` (or a new one of the recipe's arch, pretrained as the recipe says) on the device,
        with the recipe's dropout and BatchNorm options."""
        recipe = self.recipe
        if model is None:
            pretrained = recipe.model.pretrained
            if pretrained == "none":
                console.print(f"[yellow]warning: model.pretrained=none: {recipe.model.arch} starts from random "
                              "weights; DiGA's results assume ImageNet-initialised backbones[/yellow]")
                pretrained = None
            model = build_model(recipe.model.arch, self.label_space.num_classes, pretrained)
        model = model.to(self.device)
        model.set_training_options(recipe.model.dropout, recipe.model.freeze_bn_stats)
        return model

    def optimizer(self, model: SegmentationModel) -> torch.optim.SGD:
        return build_optimizer(model, self.recipe)

    def restore(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """On --resume: weights, optimizer, RNG and the stage's draws; returns the stage's extras."""
        extras = self.run.restore(modules, optimizer)
        if "generator" in extras:
            self.generator.set_state(extras["generator"])
        return extras

    def loader(self, dataset: Dataset) -> InfiniteLoader:
        """Endless seeded batches of ``dataset`` from this run's step (this rank's rows under torchrun)."""
        data = self.recipe.data
        return InfiniteLoader(dataset, data.batch_size, shuffle=True, num_workers=data.num_workers,
                              seed=self.recipe.train.seed, start_step=self.run.step)

    def source_loader(self, dataset: Dataset) -> InfiniteLoader:
        """:meth:`loader` of the labelled source crops, drawn by rare-class sampling when
        ``data.rare_class_sampling`` is on (its statistics cached in the run folder)."""
        if self.recipe.data.rare_class_sampling:
            from diga_fast.data.rare_class import with_rare_class_sampling

            dataset = with_rare_class_sampling(dataset, self.recipe, self.label_space.num_classes, self.out,
                                               write=self.run.is_main, class_names=self.label_space.classes)
        return self.loader(dataset)

    def steps(self, description: str, *optimizers: torch.optim.Optimizer) -> Iterator[tuple[int, float]]:
        """``(step, lr)`` from the run's step to ``train.iters``, the poly LR (after ``optim.warmup_iters``
        of linear warm-up) set on every optimiser, inside a progress bar and with the kernel backend the
        recipe asks for. A stop signal (:func:`stop_requests`) ends the loop after the step it came in:
        every rank finishes that step, the checkpoint of it is written, and :class:`Stopped` says so."""
        total, optim = self.recipe.train.iters, self.recipe.optim
        with self.run.progress(total, description) as self._tick, stop_requests() as received, \
                default_backend(None if self.recipe.train.kernels == "auto" else self.recipe.train.kernels):
            for step in range(self.run.step, total):
                lr = [set_poly_lr(optimizer, step, total, optim.poly_power, optim.warmup_iters, optim.warmup_ratio)
                      for optimizer in optimizers][0]
                yield step, lr
                if _phase_timer is not None:
                    _phase_timer.next_step()
                if dist.any_rank(bool(received)):  # every rank stops after the same step
                    self._stop(step + 1, received[0] if received else signal.SIGTERM)

    def _stop(self, done: int, signum: int) -> None:
        """Write the checkpoint of step ``done`` (unless the loop just did) and raise :class:`Stopped`."""
        if self.run.last_saved_step != done:
            self.checkpoint_now(done)
        raise Stopped(signum, f"{signal.Signals(signum).name}: stopped after step {done} of {self.recipe.train.iters}; "
                              f"its checkpoint is in {self.out}; continue with `{self.run.resume_command()}`")

    def end_step(self, done: int, loss: torch.Tensor, lr: float, modules: dict[str, SegmentationModel],
                 optimizer: torch.optim.Optimizer, evaluate: SegmentationModel,
                 extras: Callable[[], dict[str, Any]] = dict, log: Callable[[], dict[str, Any]] = dict) -> None:
        """Progress; every ``train.log_every`` steps a metrics line with ``log()``'s values (computed
        only then); periodic checkpoints (with ``extras()``) and evaluations of ``evaluate``."""
        self.tick(done, loss=loss)
        if self.run.should_log(done):
            self.run.log(done, loss=loss, lr=lr, **log())
        self.checkpoint_now = lambda step: self.run.save(step, modules, optimizer, extras() if self.run.is_main else None,
                                                         at_once=True)
        self.run.checkpoint_and_evaluate(done, modules, optimizer, extras=extras, evaluate=lambda: self.evaluate(evaluate))

    def tick(self, done: int, **values: torch.Tensor) -> None:
        """Advance the progress bar to step ``done``, showing ``values``."""
        self._tick(done, **values)

    def evaluate(self, model: SegmentationModel, final: bool = False) -> dict:
        """Target-val summary of ``model``; with ``train.eval_targets``, at the end of the run (``final``) or
        on every evaluation when ``train.select_on_val`` is on, also the generalisation table (``"targets"``:
        a :func:`~diga_fast.inference.target_row` of the target, then one of each ``train.eval_targets``)."""
        with progress_callback("eval") as progress:
            summary = evaluate_on_target(model, self.recipe, self.label_space, self.device, progress=progress)
        if self.recipe.train.eval_targets and (final or self.recipe.train.select_on_val):
            others = evaluate_generalisation(model, self.recipe, self.label_space, self.device,
                                             lambda spec: progress_callback(f"eval {spec}"))
            summary["targets"] = [target_row(self.recipe.data.target, summary), *others]
        return summary

    def finish(self, model: SegmentationModel, modules: dict[str, SegmentationModel], optimizer: torch.optim.Optimizer,
               extras: dict[str, Any] | None = None) -> dict:
        """The last checkpoint, then the final evaluation of ``model`` (logged, ``eval.json``)."""
        return self.run.finish(modules, optimizer, extras, evaluate=lambda: self.evaluate(model, final=True))

    def is_due(self, every: int, done: int) -> bool:
        """Whether rank 0 should do an every-``every``-steps task (e.g. image grids) at step ``done``."""
        return self.run.is_main and bool(every) and (done % every == 0 or done == self.recipe.train.iters)
