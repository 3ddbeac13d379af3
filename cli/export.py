"""``diga export``: ONNX / TorchScript / .pt2 files of a checkpoint, each verified before the command returns."""

from __future__ import annotations

import click

OPSET = 18  # = diga_fast.export.OPSET, spelled out so that `diga --help` does not import torch


@click.command("export")
@click.option("--checkpoint", type=click.Path(), required=True, help="Run folder or .safetensors file.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, help="Write an ONNX file (verified in ONNX Runtime).")
@click.option("--torchscript", "torchscript_path", type=click.Path(dir_okay=False), default=None,
              help="Write a traced TorchScript file (legacy: PyTorch deprecates TorchScript).")
@click.option("--pt2", "pt2_path", type=click.Path(dir_okay=False), default=None, help="Write a torch.export program (.pt2).")
@click.option("--argmax", is_flag=True, help="Output 'labels' int64 [B, H, W] instead of 'logits' float32 [B, K, H, W].")
@click.option("--fp16", is_flag=True, help="Half-precision weights and compute; the input and the logits stay float32.")
@click.option("--legacy", is_flag=True, help="ONNX: the TorchScript-based exporter instead of the torch.export-based one.")
@click.option("--opset", type=click.IntRange(13, 23), default=OPSET, show_default=True, help="ONNX opset.")
def export(checkpoint, onnx_path, torchscript_path, pt2_path, argmax, fp16, legacy, opset) -> None:
    """Export a checkpoint for deployment: input 'image' float32 [B, 3, H, W] RGB in [0, 1] (normalised
    inside the graph), output 'logits' [B, K, H, W] at input resolution (or 'labels' with --argmax);
    batch, height and width dynamic (H, W >= 16). Each file is loaded back (ONNX Runtime, torch.jit,
    torch.export) and compared with PyTorch on two other input sizes; a file that does not match is
    deleted and the command fails. ONNX files carry the class names, palette, label space, model and
    training-recipe hash as metadata."""
    from diga_fast.errors import DigaError
    from diga_fast.export import export_checkpoint
    from diga_fast.export.torchscript import LEGACY_NOTE
    from diga_fast.utils.io import check_output_file

    targets = {fmt: path for fmt, path in (("onnx", onnx_path), ("torchscript", torchscript_path), ("pt2", pt2_path)) if path}
    if not targets:
        raise DigaError("nothing to export: give --onnx, --torchscript and/or --pt2")
    if legacy and "onnx" not in targets:
        raise DigaError("--legacy selects the ONNX exporter: give --onnx too")
    for fmt, path in targets.items():
        check_output_file(path, f"--{fmt}")
    if "torchscript" in targets:
        click.echo(f"note: {LEGACY_NOTE}")
    results = export_checkpoint(checkpoint, targets, argmax=argmax, fp16=fp16, legacy=legacy, opset=opset, log=click.echo)
    click.echo(f"{len(results)} file(s) written and verified")
