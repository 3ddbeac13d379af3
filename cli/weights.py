"""``diga weights inspect FILE``: the format of a local weight file, the network it fits, its size and
sha256, and the options that take it."""

from __future__ import annotations

import json

import click


@click.group()
def weights() -> None:
    """Local weight files: what a file is and where it fits (nothing is downloaded)."""


def _size(n: float) -> str:
    """Bytes in decimal units: 178.8 MB."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@weights.command("inspect")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(file, as_json) -> None:
    """What FILE is: the official DeepLab init, a torchvision ResNet / VGG, a SegFormer or Hugging Face MiT
    (a file or its folder), or a diga-fast model / translator; the network it fits, its parameter count,
    size and sha256, and the options that accept it."""
    from rich.console import Console
    from rich.table import Table

    from diga_fast.stages.weights import inspect_weight_file

    report = inspect_weight_file(file)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table(show_header=False, box=None)  # no borders: the sha256 fits an 80-column line whole
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a long path is folded, never cut to '…'
    tensors = report["tensors"]
    rows = [
        ("file", report["file"]),
        ("format", report["format"]),
        ("what", report["description"]),
        ("network", report["network"]),
        ("parameters", f"{report['parameters']:,} ({report['parameters'] / 1e6:.1f} M; "
                       f"{tensors} tensor{'s' if tensors != 1 else ''} in the file)"),
        ("size", f"{report['file_bytes']:,} bytes ({_size(report['file_bytes'])})"),
        ("sha256", report["sha256"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for i, use in enumerate(report["accepted_by"]):
        table.add_row("accepted by" if i == 0 else "", use)
    Console().print(table)
