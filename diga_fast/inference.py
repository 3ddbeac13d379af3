"""Inference: multi-scale prediction (max of upsampled logits, the official protocol) and evaluation.

Everything here takes a ``SegmentationModel`` or, in its place, any ``LogitsFn``: a callable mapping an
image batch (float [B, 3, h, w], RGB in [0, 1]) to logits [B, K, h', w'] at any resolution (they are
upsampled to the image). That is the one thing the PyTorch and ONNX Runtime paths
(``diga_fast.export.OnnxSegmenter``) do differently; folders, PNGs and confusion matrices are shared.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from PIL import Image

from diga_fast.config import Recipe
from diga_fast.data.build import eval_target_datasets, target_val_dataset
from diga_fast.data.datasets import MAX_PIXELS, too_large
from diga_fast.data.loader import usable_workers
from diga_fast.labels import LabelSpace
from diga_fast.errors import DigaError
from diga_fast.metrics import ConfusionMatrix, summarize
from diga_fast.models import SegmentationModel
from diga_fast.models.predict import LogitsFn, predict_logits
from diga_fast.utils import dist
from diga_fast.utils.io import save_png

Progress = Callable[[int, int], None]  # progress(done, total), e.g. engine.logging.progress_callback's


def target_row(target: str, summary: dict) -> dict:
    """One row of a several-dataset evaluation: ``{"target": "KIND:ROOT", "miou", "iou", "num_classes"}``."""
    return {"target": target, "miou": summary["miou"], "iou": summary["iou"], "num_classes": summary["num_classes"]}


@torch.no_grad()
def evaluate_model(
    model: SegmentationModel | LogitsFn,
    dataset: Dataset,
    label_space: LabelSpace,
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 1,
    num_workers: int = 0,
    max_images: int | None = None,
    bf16: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Confusion matrix over every pixel of ``dataset`` (full size; the first ``max_images``) ->
    summary dict (:func:`diga_fast.metrics.summarize`). Under torchrun each rank evaluates every world-th image and the
    counts are summed, so every rank returns the same summary. ``progress(done, total)`` is called after
    each batch (images done over all ranks, about)."""
    is_module = isinstance(model, torch.nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    matrix = ConfusionMatrix(label_space.num_classes, device=device)  # on the device: NCCL reduces it there
    info = dist.current()
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    shard = Subset(dataset, range(info.rank, count, info.world))
    done = 0
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=usable_workers(num_workers)):
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = predict_logits(model, images, scales)
        matrix.update(logits.argmax(1), batch["label"].to(device))
        done += images.shape[0]
        if progress is not None:
            progress(min(count, done * info.world), count)
    matrix.all_reduce()
    if is_module:
        model.train(was_training)
    return summarize(matrix, label_space)


def evaluate_on_target(model: SegmentationModel, recipe: Recipe, label_space: LabelSpace, device: torch.device,
                       progress: Progress | None = None) -> dict:
    """Target-val mIoU of ``model`` with the recipe's inference scales (full-size images): what every
    training stage reports."""
    return evaluate_model(
        model, target_val_dataset(recipe, label_space), label_space, device,
        scales=recipe.data.eval_scales, max_images=recipe.data.eval_max_images, bf16=recipe.train.bf16,
        progress=progress,
    )


def evaluate_datasets(
    model: SegmentationModel | LogitsFn,
    datasets: Sequence[tuple[str, Dataset]],
    label_space: LabelSpace,
    device: torch.device,
    progress_for: Callable[[str], contextlib.AbstractContextManager[Progress]] | None = None,
    **options,
) -> list[tuple[str, dict]]:
    """``(name, summary)`` of ``model`` on each ``(name, dataset)``, one confusion matrix each (the
    several-target table of ``diga eval`` and of ``train.eval_targets``); ``options`` as
    :func:`evaluate_model`'s. ``progress_for(name)`` opens the progress callback of one dataset."""
    results = []
    for name, dataset in datasets:
        with progress_for(name) if progress_for is not None else contextlib.nullcontext() as progress:
            results.append((name, evaluate_model(model, dataset, label_space, device, progress=progress, **options)))
    return results


def evaluate_generalisation(model: SegmentationModel, recipe: Recipe, label_space: LabelSpace, device: torch.device,
                            progress_for: Callable[[str], contextlib.AbstractContextManager[Progress]] | None = None) -> list[dict]:
    """The generalisation table: val mIoU of ``model`` on each of ``train.eval_targets`` with the recipe's
    inference settings, one :func:`target_row` per dataset."""
    results = evaluate_datasets(model, eval_target_datasets(recipe, label_space), label_space, device, progress_for,
                                scales=recipe.data.eval_scales, max_images=recipe.data.eval_max_images,
                                bf16=recipe.train.bf16)
    return [target_row(name, summary) for name, summary in results]


def _unreadable(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be an image (its header and, for PNG, its chunk checksums; more pixels than
    ``max_pixels``), or None. The size comes from the header, before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit is ours
            handle = Image.open(path)
        with handle:
            if (why := too_large(handle.size, max_pixels)) is not None:
                return why
            handle.verify()
    except Exception as err:  # noqa: BLE001 - any decoder complaint means a bad file
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


@torch.no_grad()
def predict_folder(
    model: SegmentationModel | LogitsFn,
    images_dir: str | Path,
    out_dir: str | Path,
    label_space: LabelSpace,
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    overlay: bool = False,
    bf16: bool = False,
    skip_bad: bool = False,
    progress: Progress | None = None,
) -> tuple[int, list[str]]:
    """Segment every image under ``images_dir`` (recursively, any size; never ``out_dir`` itself when it
    lies inside) into ``out_dir``, keeping sub-folders: ``NAME_labelIds.png`` (Cityscapes label ids),
    ``NAME_color.png`` (palette) and, with ``overlay``, ``NAME_overlay.png``. Every file is checked
    first: an unreadable one stops before anything is written, or with ``skip_bad`` is left out.
    Returns (images written, ``"file: why"`` of each skipped one); ``progress(done, total)`` after each image."""
    from diga_fast.data.datasets import ImageFolder

    dataset = ImageFolder(images_dir, exclude=out_dir)
    bad = [(index, f"{sample.image}: {why}") for index, sample in enumerate(dataset.samples)
           if (why := _unreadable(sample.image)) is not None]
    if bad and not skip_bad:
        raise DigaError(f"{len(bad)} of {len(dataset)} images cannot be read (first: {bad[0][1]}); nothing was "
                        "written (--skip-bad leaves them out)")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create --out {out_dir}: {err.strerror or err}") from None
    to_label_id = label_space.train_id_to_label_id()
    if isinstance(model, torch.nn.Module):
        model.eval()
    skipped = [why for _, why in bad]
    todo = sorted(set(range(len(dataset))) - {i for i, _ in bad})
    for done, index in enumerate(todo, start=1):
        if progress is not None:
            progress(done - 1, len(todo))
        try:
            sample = dataset[index]
        except DigaError as err:  # passed the header check, failed to decode
            if not skip_bad:
                raise
            skipped.append(str(err))
            continue
        image = sample["image"].unsqueeze(0).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            labels = predict_logits(model, image, scales).argmax(1)[0].to(torch.uint8).cpu().numpy()
        base = out_dir / sample["name"]
        color = label_space.colorize(labels)
        save_png(base.with_name(base.name + "_labelIds.png"), to_label_id[labels])
        save_png(base.with_name(base.name + "_color.png"), color)
        if overlay:
            rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            blend = (0.5 * rgb + 0.5 * color).round().astype(np.uint8)
            save_png(base.with_name(base.name + "_overlay.png"), blend)
    if progress is not None and todo:
        progress(len(todo), len(todo))
    return len(dataset) - len(skipped), skipped


_SEQ_FRAME = re.compile(r"(\d{6})_(\d{6})")


def match_predictions(pred_dir: Path, stems: Sequence[str]) -> dict[str, Path]:
    """Map each ground-truth stem (``city_seq_frame``) to the prediction PNG whose file name contains
    it anywhere (e.g. ``frankfurt_000000_000294_leftImg8bit.png`` or ``pred/frankfurt_000000_000294.png``).
    The colour and overlay PNGs ``diga predict`` writes beside its label-id PNGs are skipped."""
    by_suffix: dict[str, list[str]] = {}
    for stem in stems:
        by_suffix.setdefault(stem[-13:], []).append(stem)
    found: dict[str, Path] = {}
    for path in sorted(Path(pred_dir).rglob("*.png")):
        if path.name.endswith(("_color.png", "_overlay.png")):
            continue
        for match in _SEQ_FRAME.finditer(path.name):
            for stem in by_suffix.get(match.group(0), ()):
                if stem in path.name:
                    if stem in found:
                        raise DigaError(f"two predictions for {stem}: {found[stem]} and {path}")
                    found[stem] = path
    return found


def evaluate_prediction_folder(pred_dir: str | Path, dataset, label_space: LabelSpace) -> dict:
    """mIoU of label-id prediction PNGs against a Cityscapes-layout dataset's ground truth."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DigaError(f"--pred-dir not found: {pred_dir}")
    stems = [name.split("/")[-1] for name in dataset.names]
    predictions = match_predictions(pred_dir, stems)
    missing = [s for s in stems if s not in predictions]
    if missing:
        raise DigaError(f"{len(missing)} of {len(stems)} ground-truth images have no prediction in {pred_dir} (first: {missing[0]})")
    lut = torch.from_numpy(label_space.cityscapes_id_lut().astype(np.int64))
    matrix = ConfusionMatrix(label_space.num_classes)
    for index, stem in enumerate(stems):
        target = torch.from_numpy(dataset.read(index)[1].astype(np.int64))
        try:
            with Image.open(predictions[stem]) as handle:
                pred_ids = np.array(handle)
        except OSError as err:
            raise DigaError(f"cannot read prediction {predictions[stem]}: {err}") from None
        if pred_ids.ndim != 2 or pred_ids.shape != tuple(target.shape):
            raise DigaError(f"prediction {predictions[stem]} is {pred_ids.shape}, the ground truth is {tuple(target.shape)} (need a single-channel label-id PNG)")
        if pred_ids.max() > 255:
            raise DigaError(f"prediction {predictions[stem]} holds ids above 255; write Cityscapes label ids")
        matrix.update(lut[torch.from_numpy(pred_ids.astype(np.int64))], target)
    return summarize(matrix, label_space)
