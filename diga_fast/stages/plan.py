"""``diga train STAGE ... --dry-run``: a run's plan before a two-day job. Every input of the resolved
recipe is checked (data roots and their image counts, list files, ImageNet weights, the translator, the
VGG file, the output folder); then one short run at the recipe's sizes, in a temporary folder on the
given device, measures the peak memory of a process and the seconds per iteration. Nothing is written
into ``--out``. A run that cannot fit the device is refused in one line."""

from __future__ import annotations

import copy
import json
import math
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diga_fast.config import Recipe
from diga_fast.data.build import eval_target_datasets, source_train_dataset, target_train_dataset, target_val_dataset
from diga_fast.engine.device import resolve_device
from diga_fast.engine.logging import console
from diga_fast.errors import DigaError
from diga_fast.labels import get_label_space
from diga_fast.models.io import load_translator_generator, load_vgg_features
from diga_fast.models.weights_inspect import inspect_weights
from diga_fast.utils import dist

PROBE_ITERS = 3  # the step measured is the last: the first ones pay for allocation and caches


def check_inputs(stage: str, recipe: Recipe) -> list[tuple[str, str]]:
    """``(input, what was found)`` for everything the stage reads; a missing or bad one is a DigaError."""
    space = get_label_space(recipe.data.label_space)
    found = [("source train", f"{recipe.data.source}: {len(source_train_dataset(recipe, space))} images")]
    if stage != "source":
        found.append(("target train", f"{recipe.data.target}: {len(target_train_dataset(recipe, space))} images"))
    if stage != "translator":
        found.append(("target val", f"{recipe.data.target}: {len(target_val_dataset(recipe, space))} labelled images"))
        found += [("eval target", f"{spec}: {len(dataset)} labelled images")
                  for spec, dataset in eval_target_datasets(recipe, space)]
    if stage in ("source", "warmup") and recipe.model.pretrained and recipe.model.pretrained != "none":
        report = inspect_weights(recipe.model.pretrained)
        found.append(("ImageNet weights", f"{recipe.model.pretrained}: {report['description']}, sha256 {report['sha256'][:12]}…"))
    if stage in ("warmup", "self") and recipe.warmup.crdomix and recipe.translator.kind == "cyclegan":
        load_translator_generator(recipe.translator.checkpoint)
        found.append(("translator", f"{recipe.translator.checkpoint}: loads"))
    if stage == "translator" and recipe.translator.vgg_weights:
        load_vgg_features(recipe.translator.vgg_weights)
        found.append(("VGG (perceptual loss)", f"{recipe.translator.vgg_weights}: loads"))
    return found


def outline(stage: str, recipe: Recipe, images: int) -> list[tuple[str, str]]:
    """What would run: iterations, the global batch, epochs over the source, crops and image sizes."""
    data, world = recipe.data, dist.current().world
    batch = data.batch_size * world
    rows = [("stage", f"{stage} ({recipe.preset} preset, {recipe.model.arch})"),
            ("iterations", f"{recipe.train.iters}, checkpoint every {recipe.train.save_every}, evaluation "
                           + (f"every {recipe.train.eval_every}" if recipe.train.eval_every else "at the end")),
            ("batch", f"{data.batch_size} per process x {world} process(es) = {batch}"),
            ("source epochs", f"{recipe.train.iters * batch / max(images, 1):.1f} ({images} images, "
                              f"{math.ceil(images / batch)} iterations each)"),
            ("crop", f"{data.crop[0]}x{data.crop[1]}"),
            ("source sizes", str([list(s) for s in data.source_sizes]) if data.source_sizes else f"resize {data.source_resize}, scale {data.source_scale}"),
            ("target sizes", str([list(s) for s in data.target_sizes]) if data.target_sizes else f"resize {data.target_resize}, scale {data.target_scale}"),
            ("evaluation", f"scales {list(data.eval_scales)}")]
    return rows


def measure_step(recipe: Recipe, device: str | None, train: Callable[..., dict]) -> dict:
    """Peak memory of a process and seconds per iteration of ``train`` (a stage function) run for
    :data:`PROBE_ITERS` iterations at the recipe's sizes in a temporary folder, evaluating one image."""
    probe = copy.deepcopy(recipe)
    probe.train.iters, probe.train.log_every, probe.train.eval_every = PROBE_ITERS, 1, 0
    probe.train.save_every, probe.train.select_on_val, probe.train.eval_targets = 10**9, False, []
    probe.data.eval_max_images = 1
    probe.warmup.visualize_every = 0
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory(prefix="diga-dry-run-") as folder:
        quiet, console.quiet = console.quiet, True
        start = time.perf_counter()
        try:
            train(probe, Path(folder) / "run", device=device, resume=False)
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(dev).total_memory / 2**30
            raise DigaError(f"does not fit: one {probe.stage} step at these sizes ran out of the {total:.0f} GiB of "
                            f"{torch.cuda.get_device_name(dev)} (lower data.batch_size or data.crop, or add processes)") from None
        finally:
            console.quiet = quiet
        seconds = time.perf_counter() - start
        steps = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [row["it_per_s"] for row in steps if row.get("step") == PROBE_ITERS and ("loss" in row or "loss_g" in row)]
    per_iter = 1.0 / rates[-1] if rates and rates[-1] > 0 else float("nan")
    if dev.type == "cuda":
        peak, limit = torch.cuda.max_memory_allocated(dev), torch.cuda.get_device_properties(dev).total_memory
        where = torch.cuda.get_device_name(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        limit, where = _memory_total(), "this machine's memory"
    if limit and peak > 0.95 * limit:
        raise DigaError(f"does not fit: one {probe.stage} step at these sizes peaked at {peak / 2**30:.1f} GiB of the "
                        f"{limit / 2**30:.1f} GiB of {where} (lower data.batch_size or data.crop)")
    return {"peak_bytes": peak, "limit_bytes": limit, "where": where, "seconds_per_iter": per_iter,
            "probe_seconds": seconds, "device": str(dev)}


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dry_run(stage: str, recipe: Recipe, device: str | None, train: Callable[..., dict]) -> list[tuple[str, str]]:
    """The plan of a ``stage`` run of ``recipe``: inputs checked, what would run, one measured step."""
    inputs = check_inputs(stage, recipe)
    images = int(inputs[0][1].rsplit(": ", 1)[1].split()[0])
    rows = [*inputs, *outline(stage, recipe, images)]
    measured = measure_step(recipe, device, train)
    rows.append(("peak memory", f"{measured['peak_bytes'] / 2**30:.2f} GiB per process of {measured['limit_bytes'] / 2**30:.1f} GiB "
                                f"({measured['where']}; {'torch allocator peak' if measured['device'].startswith('cuda') else 'resident set'})"))
    per_iter = measured["seconds_per_iter"]
    rows.append(("time per iteration", f"{per_iter:.2f} s on {measured['device']} (iteration {PROBE_ITERS} of a "
                                       f"{PROBE_ITERS}-iteration probe): {per_iter * recipe.train.iters / 3600:.1f} h "
                                       f"for {recipe.train.iters} iterations, evaluations not counted"))
    return rows
