"""The run folder and everything written into it.

A run folder holds ``config.yaml`` (the resolved recipe), weights as ``*.safetensors``
(:mod:`diga_fast.models.io`), ``state.pt`` (everything ``--resume`` needs: step, optimizer, model and
teacher states, RNG states, stage extras), ``metrics.jsonl`` and ``eval.json``. Every file is written
to a temporary name in the same folder and renamed into place, so a crash never leaves a half-written
checkpoint behind. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diga_fast.config import Recipe, load_yaml, recipe_changes, save_yaml
from diga_fast.engine.logging import MetricsLog, console, progress_bar
from diga_fast.engine.optim import load_optimizer_state
from diga_fast.errors import DigaError
from diga_fast.models import SegmentationModel
from diga_fast.models.io import WeightFile, load_state_checked, model_weights, save_weights
from diga_fast.utils import dist
from diga_fast.utils.io import atomic_write, lock_run_folder, run_problem, torch_load_error, write_json, written_together

MIN_FREE_BYTES = 64 * 2**20  # a run folder's disk must have this much free before training starts


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """Create (or, with ``resume``, reopen) a run folder: the last check of
    :func:`~diga_fast.utils.io.run_problem` (a stage may be started without a command's
    ``check_out_folder``), then fail before training when the folder cannot be written or its disk is
    nearly full."""
    out = Path(out)
    if problem := run_problem(out, resume):
        raise DigaError(problem)
    _check_free_space(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise DigaError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return out


def _check_free_space(out: Path) -> None:
    """Refuse a run folder whose disk (that of its nearest existing ancestor) has under ``MIN_FREE_BYTES`` free."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # unreadable: the write probe reports the real problem
    if free < MIN_FREE_BYTES:
        raise DigaError(f"--out {out}: only {free / 2**20:.1f} MiB free on its disk, "
                        f"a run needs at least {MIN_FREE_BYTES // 2**20} MiB for its checkpoints")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``state.pt``: tensors, numbers, strings, lists and dicts only, so that :func:`load_state` can
    read it with ``weights_only=True`` (no pickled object is ever executed)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Read ``state.pt`` with torch's restricted unpickler (``weights_only=True``: tensors and plain
    containers; no allow-listed classes). A file that needs anything else is refused, unexecuted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DigaError(f"refusing {path}: not a state file of tensors and plain values ({torch_load_error(err)}); "
                        "nothing in it was run") from None


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copied(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU and every container rebuilt: a snapshot that the
    training steps after it do not change."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


@dataclass(frozen=True)
class _Checkpoint:
    step: int
    files: dict[str, WeightFile]  # file name in the run folder -> content
    state: dict[str, Any]  # state.pt


def scalar_metrics(summary: dict, prefix: str = "target_val/") -> dict[str, float]:
    """The numbers of an evaluation summary, for metrics.jsonl."""
    return {f"{prefix}{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "num_classes"}


class TrainingRun:
    """A run folder and everything written into it.

    ``modules`` are the models whose weights are saved as ``<name>.safetensors`` (and restored on
    resume); ``extras`` are any other state a stage needs back on resume (e.g. centroids)."""

    def __init__(self, recipe: Recipe, out: str | Path, resume: bool = False) -> None:
        self.recipe = recipe
        self.dir = Path(out)
        self.resume = resume
        self.is_main = dist.current().is_main  # under torchrun only rank 0 writes the folder

        def prepare() -> None:
            prepare_run_dir(out, resume)
            lock_run_folder(self.dir)  # before anything is written; dropped by the stage's end (resumable)
            for leftover in self.dir.glob(".*.tmp"):  # of a writer killed mid-write (atomic_write's names)
                leftover.unlink(missing_ok=True)
            if resume:  # --iters and KEY=VALUE overrides may change the recipe: said, and config.yaml follows
                changes = recipe_changes(load_yaml(self.dir / "config.yaml"), recipe)
                if changes:
                    console.print(f"--resume with a changed recipe: {'; '.join(changes)}", highlight=False)
            else:
                (self.dir / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write(self.dir / "config.yaml", lambda tmp: save_yaml(recipe, tmp))

        dist.on_main(prepare)
        self.metrics = MetricsLog(self.dir) if self.is_main else None
        self.step = 0
        self._last_log_time = time.perf_counter()
        self._last_log_step = 0
        self.last_saved_step: int | None = None  # of the last checkpoint written
        self._pending: _Checkpoint | None = None  # saved, not yet written (see save)

    # -- checkpoints -----------------------------------------------------------------------
    def save(
        self,
        step: int,
        modules: dict[str, SegmentationModel],
        optimizer: torch.optim.Optimizer | None = None,
        extras: dict[str, Any] | None = None,
        files: dict[str, WeightFile] | None = None,
        at_once: bool = False,
    ) -> None:
        """The checkpoint of ``step``: ``<name>.safetensors`` of every module (and the other weight
        ``files``) with ``state.pt``. It is copied now and written once a finite loss has been seen with
        these weights (the next :meth:`check_finite`), so a checkpoint never holds diverged weights;
        ``at_once`` writes it now (the last step, a stop)."""
        self._pending = None
        if self.is_main:
            label_space, digest = self.recipe.data.label_space, self.recipe.digest()
            weights = {f"{name}.safetensors": model_weights(module, label_space, digest) for name, module in modules.items()}
            state = _copied({
                "step": step,
                "recipe": self.recipe.to_dict(),
                "modules": {name: weights[f"{name}.safetensors"].tensors for name in modules},
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "rng": _rng_state(),
                "world": dist.current().world,
                "extras": extras or {},
            })
            checkpoint = _Checkpoint(step, {**weights, **(files or {})}, state)
        else:
            checkpoint = _Checkpoint(step, {}, {})  # only rank 0 writes; every rank knows the step
        if at_once:
            self._write(checkpoint)
        else:
            self._pending = checkpoint

    def _write(self, checkpoint: _Checkpoint) -> None:
        if self.is_main:
            try:
                with written_together():  # the weights and state.pt of one step, or nothing new
                    for name, content in checkpoint.files.items():
                        content.write(self.dir / name)
                    save_state(self.dir / "state.pt", checkpoint.state)
            except DigaError as err:
                kept = (f"the checkpoint of step {self.last_saved_step} is intact" if self.last_saved_step
                        else "no checkpoint was written yet")
                raise DigaError(f"{err}; {kept}") from None
        self.last_saved_step = checkpoint.step

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
            load_optimizer_state(optimizer, state["optimizer"])
        _set_rng_state(state["rng"])
        saved_world, world = int(state.get("world", 1)), dist.current().world
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
            summary = evaluate()
            self.log(step, **scalar_metrics(summary))
            self.keep_if_best(step, summary, modules)

    def keep_if_best(self, step: int, summary: dict, modules: dict[str, SegmentationModel]) -> None:
        """``train.select_on_val`` (the official model selection, on target-val labels): the weights of
        the best target-val mIoU so far go to ``best/`` with ``best/eval.json`` (its step); later stages
        and commands given the run folder take ``best/``."""
        if not (self.recipe.train.select_on_val and self.is_main) or summary.get("miou") is None:
            return
        best = self.dir / "best"
        if (best / "eval.json").is_file() and json.loads((best / "eval.json").read_text())["miou"] >= summary["miou"]:
            return
        best.mkdir(exist_ok=True)
        for name, module in modules.items():
            save_weights(best / f"{name}.safetensors", module, self.recipe.data.label_space, self.recipe.digest())
        write_json(best / "eval.json", {**summary, "step": step})

    def finish(self, modules: dict[str, SegmentationModel], optimizer: torch.optim.Optimizer | None,
               extras: dict[str, Any] | None, evaluate: Callable[[], dict]) -> dict:
        """The last checkpoint first, then the final evaluation (its metrics line and ``eval.json``):
        an evaluation that fails (a bad val image, out of memory at full size) loses no training, and
        the error says how to evaluate the saved weights later. Returns the evaluation summary."""
        step = self.recipe.train.iters
        if dist.current().enabled:
            self._record_rank_agreement(modules, extras or {})
        self.save(step, modules, optimizer, extras, at_once=True)
        try:
            summary = evaluate()
        except Exception as err:  # noqa: BLE001 - whatever stopped it, the weights are safe
            self.close()
            what = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DigaError(f"the final evaluation failed ({what}); the weights of step {step} are saved in "
                            f"{self.dir}: evaluate them with `diga eval --checkpoint {self.dir}`") from None
        self.log(step, **scalar_metrics(summary))
        self.keep_if_best(step, summary, modules)
        self.write_json("eval.json", summary)
        self.close()
        return summary

    def _record_rank_agreement(self, modules: dict[str, SegmentationModel], extras: dict[str, Any]) -> None:
        """Under torchrun: fingerprints of every rank's weights, buffers and tensor extras (centroids),
        written to ``ranks.json``; the ranks must hold identical copies."""
        names = [*modules, *(k for k, v in extras.items() if torch.is_tensor(v) and v.is_floating_point())]
        tensors = [list(modules[n].state_dict().values()) if n in modules else [extras[n]] for n in names]
        mine = torch.stack([dist.fingerprint(group) for group in tensors]).to(dist.current().device)
        every = dist.gather_rows(mine[None]).cpu()
        identical = bool((every == every[0]).all())
        if not identical:
            console.print("[yellow]warning: the ranks' copies of the model differ; see ranks.json[/yellow]")
        self.write_json("ranks.json", {"world": dist.current().world, "identical": identical,
                                       "fingerprints": {n: every[:, i].tolist() for i, n in enumerate(names)}})

    # -- logging ---------------------------------------------------------------------------
    def should_log(self, step: int) -> bool:
        return step % self.recipe.train.log_every == 0 or step == self.recipe.train.iters

    def check_finite(self, step: int, **values: torch.Tensor) -> None:
        """Stop with one line naming the value and the step when one is NaN/inf (on any rank) and the
        last checkpoint written, whose weights gave a finite loss; otherwise write the checkpoint
        :meth:`save` holds back."""
        numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()  # one sync
        bad = [(name, number) for name, number in zip(values, numbers) if not math.isfinite(number)]
        if not dist.any_rank(bool(bad)):
            if self._pending is not None:  # its weights gave this finite loss: now it is a good checkpoint
                checkpoint, self._pending = self._pending, None
                self._write(checkpoint)
            return
        if self.last_saved_step is None:
            where = "no checkpoint was written yet"
        else:
            key = "translator.lr" if self.recipe.stage == "translator" else "optim.lr"
            lr = (self.recipe.translator if key == "translator.lr" else self.recipe.optim).lr
            where = (f"the last checkpoint, of step {self.last_saved_step} (its weights gave a finite loss), is in "
                     f"{self.dir}: continue with a smaller learning rate, `{self.resume_command(f'{key}={lr / 10:g}')}`")
        what = f"{bad[0][0]} is {bad[0][1]}" if bad else "a loss is not finite on another rank"
        raise DigaError(f"{what} at step {step}: training stopped; {where}")

    def resume_command(self, *overrides: str) -> str:
        """The command that continues this run (self-training's rounds from their parent folder)."""
        folder = self.dir.parent if self.dir.name.startswith("round_") else self.dir
        return " ".join(["diga train", self.recipe.stage, "--resume --out", str(folder), *overrides])

    def log(self, step: int, **values: Any) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        rate = (step - self._last_log_step) / max(now - self._last_log_time, 1e-9)
        self._last_log_time, self._last_log_step = now, step
        self.metrics.write(step, **values, it_per_s=round(rate, 3))

    def progress(self, total: int, description: str):
        """A progress bar from this run's step to ``total``; yields ``tick(step, **values)``."""
        return progress_bar(total, description, start=self.step)

    def write_json(self, name: str, data: Any) -> None:
        if self.is_main:
            write_json(self.dir / name, data)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
