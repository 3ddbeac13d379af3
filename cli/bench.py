"""``diga bench``: timings live here and in ``benchmarks/``, never in test assertions."""

from __future__ import annotations

import functools

import click

from diga_fast.config import ARCHS

# = diga_fast.benchmarks.kernels.OPS and IMPL_ORDER, spelled out so that `diga --help` does not import torch.
KERNEL_OPS = ("assign_centroids", "consensus_cross_entropy", "crdomix_blend", "class_feature_sums")
KERNEL_IMPLS = ("torch", "compile", "triton", "loop")
# = diga_fast.benchmarks.infer.IMPLS, likewise.
INFER_IMPLS = (
    "torch-eager-fp32", "torch-eager-bf16", "torch-compile-fp32", "ort-cpu-fp32", "ort-cpu-fp32-basic",
    "torch-eager-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp32-iobinding", "ort-cuda-fp16-iobinding",
)

# = diga_fast.benchmarks.train.SETUPS, likewise.
TRAIN_SETUPS = ("torch-fp32", "compile-fp32", "kernels-fp32", "torch-bf16-cl", "compile-bf16-cl", "kernels-bf16-cl",
                "kernels-bf16-cl-compile")


def _csv_options(name: str, none_ok: bool = False):
    """``--csv PATH`` (default ./diga-bench/<name>.csv under the current directory) and ``--record``
    (append to the source tree's tracked benchmarks/results/<name>.csv, on purpose): the command gets
    the chosen path as ``csv_path``."""
    extra = " ('' for none)" if none_ok else ""

    def decorate(command):
        @click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
                      help=f"CSV to append the result rows to{extra} [default: ./diga-bench/{name}.csv].")
        @click.option("--record", is_flag=True,
                      help=f"Append to the source tree's benchmarks/results/{name}.csv (what maintainers do on purpose).")
        @functools.wraps(command)
        def wrapper(*args, csv_path, record, **kwargs):
            if record and csv_path is not None:
                raise click.UsageError("give --csv or --record, not both")
            if record:
                from diga_fast.benchmarks.results_csv import recorded_csv

                try:
                    csv_path = str(recorded_csv(name))
                except ValueError as err:
                    raise click.UsageError(str(err)) from None
            elif csv_path is None:
                csv_path = f"diga-bench/{name}.csv"
            return command(*args, csv_path=csv_path, **kwargs)

        return wrapper

    return decorate


@click.group(help="Benchmarks")
def bench() -> None:
    pass


@bench.command("kernels")
@click.option("--quick", is_flag=True, help="Small shapes (a CPU run finishes in under a minute).")
@_csv_options("kernels")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG of GB/s per op.")
@click.option("--op", "ops", multiple=True, type=click.Choice(KERNEL_OPS), help="Op to bench (repeatable) [default: all].")
@click.option(
    "--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
    help="Input dtype (repeatable) [default: fp32].",
)
@click.option("--impl", "impls", multiple=True, type=click.Choice(KERNEL_IMPLS),
              help="Implementation (repeatable) [default: all that run here; triton needs a GPU].")
def kernels_command(quick: bool, csv_path: str, plot_path: str | None, ops: tuple[str, ...], dtypes: tuple[str, ...],
                    impls: tuple[str, ...]) -> None:
    """Fused Triton kernels vs their PyTorch references, eager and torch.compile'd (and per-class
    loops): ms, GB/s, % of copy bandwidth, speed-up over each reference."""
    from diga_fast.benchmarks import kernels

    try:
        kernels.run(quick=quick, csv_path=csv_path, plot_path=plot_path, ops=list(ops) or None, dtypes=list(dtypes) or None,
                    impls=list(impls) or None)
    except OSError as err:  # an unwritable --csv / --plot path
        raise click.ClickException(f"cannot write {err.filename}: {err.strerror}") from None


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        height, sep, width = item.strip().lower().partition("x")
        if not sep or not height.isdigit() or not width.isdigit() or int(height) < 16 or int(width) < 16:
            raise click.BadParameter(f"{item.strip()!r}: expected HxW with both sides >= 16, e.g. 512x1024", param_hint="--sizes")
        sizes.append((int(height), int(width)))
    return sizes


@bench.command("infer")
@click.option("--model", "models", multiple=True, type=click.Choice(ARCHS),
              help="Network with random weights (repeatable) [default: small].")
@click.option("--checkpoint", type=click.Path(), default=None, help="Time a trained checkpoint instead of --model.")
@click.option("--sizes", default="512x1024,1024x2048", show_default=True, help="Comma-separated HxW input sizes.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed runs per row [default: 30 on CUDA, 3 on CPU].")
@click.option("--impl", "impls", multiple=True, type=click.Choice(INFER_IMPLS),
              help="Implementation (repeatable) [default: eager fp32/bf16 + ORT CPU on a CPU; all CUDA ones on a GPU].")
@_csv_options("infer")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of PyTorch and ONNX Runtime [default: the physical cores].")
@click.option("--note", default="", help="Free text stored in every row (e.g. 'shared machine').")
def infer_command(models, checkpoint, sizes, batch, repeats, impls, csv_path, threads, note) -> None:
    """Inference latency: torch eager fp32/bf16/fp16, torch.compile, ONNX Runtime CPU/CUDA (+ IO binding)."""
    from diga_fast.benchmarks import infer

    if checkpoint and models:
        raise click.UsageError("give --model or --checkpoint, not both")
    try:
        infer.run(models=list(models) or None, checkpoint=checkpoint, sizes=_parse_sizes(sizes), repeats=repeats,
                  csv_path=csv_path, impls=list(impls) or None, batch=batch, threads=threads, note=note)
    except OSError as err:  # an unwritable --csv path
        raise click.ClickException(f"cannot write {err.filename}: {err.strerror}") from None


@bench.command("train")
@click.option("--preset", type=click.Choice(["paper", "paper-daformer", "demo"]), default=None,
              help="Recipe to time [default: paper on CUDA, demo on CPU].")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed iterations per setup.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed iterations first.")
@click.option("--setup", "setups", multiple=True, type=click.Choice(TRAIN_SETUPS),
              help="Setup to time (repeatable) [default: all on CUDA; torch-fp32, compile-fp32 and torch-bf16-cl on CPU].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@_csv_options("train")
@click.argument("overrides", nargs=-1)
def train_command(preset, steps, warmup, setups, device, csv_path, overrides) -> None:
    """One self-training iteration split into phases (data, EMA, teacher, labelling, mixing,
    forward, centroids, backward) with peak memory, for the ops' PyTorch references (eager and
    torch.compile'd), the Triton kernels, each in fp32 and bf16 + channels_last, and the kernels with a
    compiled student. OVERRIDES: recipe key=value (e.g. data.batch_size=2)."""
    from diga_fast.benchmarks import train

    try:
        train.run(preset=preset, steps=steps, warmup=warmup, setups=list(setups) or None, csv_path=csv_path,
                  device=device, overrides=overrides)
    except OSError as err:
        raise click.ClickException(f"cannot write {err.filename}: {err.strerror}") from None


@bench.command("compile")
@_csv_options("compile", none_ok=True)
@click.option("--target", "targets", multiple=True, type=click.Choice(["sm_90a", "sm_80"]),
              help="GPU to compile for (repeatable) [default: both].")
@click.option("--op", "ops", multiple=True, type=click.Choice(KERNEL_OPS), help="Op to compile (repeatable) [default: all].")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Input dtype (repeatable) [default: all three].")
def compile_command(csv_path: str, targets: tuple[str, ...], ops: tuple[str, ...], dtypes: tuple[str, ...]) -> None:
    """Compile every kernel at the bench shapes for sm_90a / sm_80 on this machine (no GPU needed):
    registers, spills, shared memory, programs per SM, access widths, tensor-core family, barriers."""
    from diga_fast.benchmarks import compile_report

    argv = ["--csv", csv_path]  # already resolved (--record included)
    argv += [f"--target={t}" for t in targets] + [f"--op={o}" for o in ops] + [f"--dtype={d}" for d in dtypes]
    code = compile_report.main(argv)
    if code:
        raise click.ClickException(f"the compile report failed (exit code {code})")
