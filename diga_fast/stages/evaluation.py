"""``diga eval`` and ``diga predict`` below the face: what is evaluated or run (a checkpoint, an ONNX
export in ONNX Runtime, or a folder of prediction PNGs), on which data, with which label space."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from diga_fast.config import DataConfig, load_yaml
from diga_fast.data import build_dataset, parse_dataset_spec
from diga_fast.engine.device import resolve_device
from diga_fast.engine.logging import console, progress_callback
from diga_fast.errors import DigaError
from diga_fast.inference import evaluate_datasets, evaluate_prediction_folder, predict_folder
from diga_fast.labels import LabelSpace, get_label_space
from diga_fast.models.io import load_model


def load_segmenter(checkpoint: str | None, onnx_path: str | None, device: str | None, label_space: str | None = None,
                   scales: Sequence[float] = (1.0,)):
    """(the model, a ``SegmentationModel`` on its device or an ONNX Runtime session, the label space,
    the device its inputs go to, a name for the tables): ``label_space`` or the file's own; one of
    another class count is refused."""
    if onnx_path is not None:
        from diga_fast.export.runtime import OnnxSegmenter

        segmenter = OnnxSegmenter(onnx_path, device=device)
        if segmenter.returns_labels and tuple(scales) != (1.0,):
            raise DigaError(f"{onnx_path} was exported with --argmax (labels, no logits): --scales needs a logits export")
        space = get_label_space(label_space) if label_space is not None else segmenter.label_space
        _check_classes(space, segmenter.num_classes, onnx_path)
        return segmenter, space, torch.device("cpu"), f"{onnx_path} ({segmenter.provider})"
    dev = resolve_device(device)
    model, meta = load_model(checkpoint)
    space = get_label_space(label_space or meta["label_space"])
    _check_classes(space, model.num_classes, "the checkpoint")
    return model.to(dev), space, dev, str(checkpoint)


def _check_classes(space: LabelSpace, num_classes: int, what: str) -> None:
    if space.num_classes != num_classes:
        raise DigaError(f"--label-space {space.name} has {space.num_classes} classes, {what} predicts {num_classes}")


def run_evaluation_settings(checkpoint: str | None) -> dict | None:
    """How the run that ``checkpoint`` comes from (a run folder, its ``best/``, or a weight file in
    either) evaluated: its ``data`` fields ``target``, ``eval_scales``, ``eval_max_images`` and
    ``synthetic_*_images``; None without a run's config.yaml (a bare weight file)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent):
        if (candidate / "config.yaml").is_file() and (folder == candidate or folder.name == "best"):
            data = load_yaml(candidate / "config.yaml").get("data")
            return data if isinstance(data, dict) else None
    return None


def evaluate(checkpoint: str | None, onnx_path: str | None, pred_dir: str | None, targets: Sequence[str], split: str,
             scales: Sequence[float] | None, label_space: str | None, synthetic_images: int | None,
             max_images: int | None, device: str | None) -> tuple[str, list[tuple[str, dict]]]:
    """``diga eval``: (what was evaluated, ``(target, summary)`` per target), one confusion matrix each.
    What is not given (targets, scales, image counts) is what the checkpoint's run evaluated with (said
    on stderr), else the built-in val split at scale 1.0. Every target is opened first, so that a bad
    one stops before any evaluation runs."""
    if sum(x is not None for x in (checkpoint, onnx_path, pred_dir)) != 1:
        raise DigaError("give exactly one of --checkpoint, --onnx or --pred-dir")
    run = run_evaluation_settings(checkpoint) or {}
    taken = []
    if not targets:
        targets = (str(run.get("target", "synthetic")),)
        taken += [f"--target {targets[0]}"] if run else []
    if scales is None:
        scales = tuple(run.get("eval_scales") or (1.0,))
        taken += [f"--scales {','.join(map(str, scales))}"] if run else []
    if max_images is None and run.get("eval_max_images"):
        max_images = int(run["eval_max_images"])
        taken.append(f"--max-images {max_images}")
    if synthetic_images is None:
        key = "synthetic_train_images" if split == "train" else "synthetic_val_images"
        synthetic_images = int(run.get(key) or getattr(DataConfig, key))
    if taken:
        console.print(f"as {checkpoint}'s run evaluated: {' '.join(taken)}", highlight=False)
    specs = [parse_dataset_spec(target) for target in targets]
    if pred_dir is not None:
        if len(specs) != 1 or specs[0].kind != "cityscapes":
            raise DigaError("--pred-dir evaluates against Cityscapes ground truth: one --target cityscapes:ROOT")
        space = get_label_space(label_space or "cityscapes19")
        dataset = build_dataset(specs[0], role="target", split=split, label_space=space)
        return str(pred_dir), [(targets[0], evaluate_prediction_folder(pred_dir, dataset, space))]
    model, space, dev, what = load_segmenter(checkpoint, onnx_path, device, label_space, scales)
    datasets = [(target, build_dataset(spec, role="target", split=split, label_space=space,
                                       synthetic_images=synthetic_images))
                for target, spec in zip(targets, specs)]
    results = evaluate_datasets(model, datasets, space, dev,
                                lambda name: progress_callback("eval" if len(datasets) == 1 else f"eval {name}"),
                                scales=scales, max_images=max_images)
    return what, results


def predict(checkpoint: str | None, onnx_path: str | None, images_dir: str, out_dir: Path, scales: Sequence[float],
            overlay: bool, device: str | None, skip_bad: bool) -> tuple[int, list[str]]:
    """``diga predict``: label-id and colour PNGs of every image under ``images_dir`` into ``out_dir``;
    returns (images written, why each skipped one was)."""
    if (checkpoint is None) == (onnx_path is None):
        raise DigaError("give exactly one of --checkpoint or --onnx")
    model, space, dev, _ = load_segmenter(checkpoint, onnx_path, device, None, scales)
    with progress_callback("predict") as progress:
        return predict_folder(model, images_dir, out_dir, space, dev, scales, overlay, skip_bad=skip_bad,
                              progress=progress)
