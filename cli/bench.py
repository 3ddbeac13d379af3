"""``diga bench``: timings live here and in ``benchmarks/``, never in test assertions."""

from __future__ import annotations

import click

# = diga_fast.benchmarks.kernels.OPS, spelled out so that `diga --help` does not import torch.
KERNEL_OPS = ("assign_centroids", "consensus_cross_entropy", "crdomix_blend", "class_feature_sums")


@click.group(help="Benchmarks")
def bench() -> None:
    pass


@bench.command("kernels")
@click.option("--quick", is_flag=True, help="Small shapes (a CPU run finishes in under a minute).")
@click.option(
    "--csv", "csv_path", type=click.Path(dir_okay=False), default="benchmarks/results/kernels.csv",
    show_default=True, help="CSV to append the result rows to.",
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG of GB/s per op.")
@click.option("--op", "ops", multiple=True, type=click.Choice(KERNEL_OPS), help="Op to bench (repeatable) [default: all].")
@click.option(
    "--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
    help="Input dtype (repeatable) [default: fp32].",
)
def kernels_command(quick: bool, csv_path: str, plot_path: str | None, ops: tuple[str, ...], dtypes: tuple[str, ...]) -> None:
    """Fused Triton kernels vs eager PyTorch (and per-class loops): ms, GB/s, % of copy bandwidth."""
    from diga_fast.benchmarks import kernels

    try:
        kernels.run(quick=quick, csv_path=csv_path, plot_path=plot_path, ops=list(ops) or None, dtypes=list(dtypes) or None)
    except OSError as err:  # an unwritable --csv / --plot path
        raise click.ClickException(f"cannot write {err.filename}: {err.strerror}") from None
