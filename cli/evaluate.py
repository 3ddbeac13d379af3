"""``diga eval`` and ``diga predict``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from diga_fast.cli.common import FORCE, parse_scales
from diga_fast.cli.tables import counted, iou_table, targets_table
from diga_fast.config import DataConfig
from diga_fast.errors import DigaError
from diga_fast.utils.io import check_out_folder, check_output_file
from diga_fast.utils.printing import print_wide


def _write_json(path: str, data: dict) -> None:
    from diga_fast.utils.io import make_parent, write_json

    make_parent(path, "--json")
    try:
        write_json(Path(path), data)
    except OSError as err:
        raise DigaError(f"--json: cannot write {path}: {err.strerror or err}") from None


@click.command("eval")
@click.option("--checkpoint", type=click.Path(), default=None, help="Run folder or .safetensors file to evaluate.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, help="An ONNX file from 'diga export', run in ONNX Runtime.")
@click.option("--pred-dir", type=click.Path(), default=None, help="Folder of label-id prediction PNGs (matched by city_seq_frame).")
@click.option("--target", "targets", multiple=True, metavar="KIND:ROOT",
              help="Labelled data: synthetic, cityscapes:ROOT, gta5:ROOT, synthia:ROOT, bdd100k:ROOT, mapillary:ROOT, "
                   "acdc:ROOT, darkzurich:ROOT, folder:ROOT. Repeat it for one table of several (rows: targets) "
                   "[default: the checkpoint's run's target; synthetic].")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True)
@click.option("--scales", default=None, help="Inference scales; logits are max-combined (official: 1.0,0.5) "
                                             "[default: the checkpoint's run's data.eval_scales; 1.0].")
@click.option("--label-space", default=None, help="cityscapes19 or synthia16 [default: the checkpoint's; cityscapes19 for --pred-dir].")
@click.option("--synthetic-images", type=click.IntRange(min=1), default=None,
              help="Images of the built-in pair's split [default: the checkpoint's run's data.synthetic_val_images "
                   f"(or _train_ for --split train); {DataConfig.synthetic_val_images} / {DataConfig.synthetic_train_images}].")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N images (of each target) [default: the run's data.eval_max_images; all].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda[:N] or auto (with --onnx: the ONNX Runtime provider).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help='Write {miou, iou, num_classes} here; with several --target, {"targets": [{target, miou, iou, num_classes}, ...]}.')
def eval_command(checkpoint, onnx_path, pred_dir, targets, split, scales, label_space, synthetic_images, max_images, device, json_path) -> None:
    """mIoU of a checkpoint, an ONNX export or prediction PNGs on a labelled split, from one confusion matrix
    per target."""
    from diga_fast.stages.evaluation import evaluate

    if json_path is not None:
        check_output_file(json_path, "--json")
    what, results = evaluate(checkpoint, onnx_path, pred_dir, targets, split,
                             parse_scales(scales) if scales is not None else None, label_space, synthetic_images,
                             max_images, device)
    _report(results, what, split, json_path)


def _report(results: list[tuple[str, dict]], what: str, split: str, json_path: str | None) -> None:
    """One target: its per-class table and ``{miou, iou, num_classes}``; several: one table with a row per
    target and ``{"targets": [{target, miou, iou, num_classes}, ...]}``."""
    from diga_fast.inference import target_row

    rows = [target_row(target, summary) for target, summary in results]
    if len(results) == 1:
        target, summary = results[0]
        Console().print(iou_table(summary, title=f"{what} on {target} {split}"))
        data = {key: value for key, value in rows[0].items() if key != "target"}
    else:
        print_wide(Console(), targets_table(rows, title=f"{what} on {len(rows)} targets, {split} split (IoU %)"))
        data = {"targets": rows}
    if json_path:
        _write_json(json_path, data)


@click.command("predict")
@click.option("--checkpoint", type=click.Path(), default=None, help="Run folder or .safetensors file.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, help="An ONNX file from 'diga export', run in ONNX Runtime (CUDA when present).")
@click.option("--images", "images_dir", type=click.Path(), required=True, help="Folder of images (searched recursively).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder (sub-folders are kept).")
@click.option("--scales", default="1.0", show_default=True, help="Inference scales; logits are max-combined.")
@click.option("--overlay", is_flag=True, help="Also write NAME_overlay.png (image blended with the colour map).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda[:N] or auto (with --onnx: the ONNX Runtime provider).")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out (listed at the end, exit status 1) instead of stopping.")
@FORCE
def predict(checkpoint, onnx_path, images_dir, out, scales, overlay, device, skip_bad, force) -> None:
    """Segment every image under --images: NAME_labelIds.png (Cityscapes label ids) and NAME_color.png.
    Images of any size run at full size; greyscale, palette, RGBA and 16-bit files are converted to
    8-bit RGB first (alpha dropped, 16-bit samples keep their high byte)."""
    from diga_fast.stages.evaluation import predict as predict_images

    scale_values = parse_scales(scales)
    if Path(out).resolve() == Path(images_dir).resolve():
        raise DigaError("--out must not be the --images folder (the next run would read the predictions as images); "
                        "a sub-folder of it is fine")
    out_dir = check_out_folder(out, force=force)
    count, skipped = predict_images(checkpoint, onnx_path, images_dir, out_dir, scale_values, overlay, device, skip_bad)
    click.echo(f"wrote predictions for {counted(count, 'image')} to {out_dir}")
    if skipped:
        for why in skipped:
            click.echo(f"skipped {why}", err=True)
        raise click.exceptions.Exit(1)
