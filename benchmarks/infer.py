"""Inference bench: one segmentation forward pass (image -> logits at input resolution, the graph
``diga export`` writes) in PyTorch eager (fp32, bf16/fp16 autocast), ``torch.compile`` and ONNX Runtime
(CPU; CUDA with and without IO binding, fp32 and fp16), at Cityscapes sizes, batch 1.

Every implementation computes ``InferenceWrapper(model)`` — normalisation, network, bilinear
upsampling of the logits to the input size — so the numbers compare like with like. The ONNX files
are made by :func:`diga_fast.export.export_model` (and so verified against PyTorch first); the ONNX
Runtime sessions use the settings of :mod:`diga_fast.export.runtime` (``ort-cpu-fp32-basic``: only
the basic graph optimisations, to show what the Conv fusions and NCHWc layout buy).

Reported per (model, size, implementation): p50 and p90 latency over ``repeats`` timed runs after
warm-up, images/s at p50, and the speed-up over torch eager fp32 on the same device. Rows are appended
to ``./diga-bench/infer.csv`` (``--record``: the source tree's ``benchmarks/results/infer.csv``) with
the device name, thread count and library versions, so results from different machines never mix.
Without CUDA the CUDA rows are skipped with a note. Random weights are fine for timing (``--model``);
``--checkpoint`` times a trained one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diga_fast.benchmarks.results_csv import append_rows, device_name
from diga_fast.utils.printing import print_wide

DEFAULT_CSV = Path("diga-bench/infer.csv")  # under the current directory; --record: results/
DEFAULT_SIZES = ((512, 1024), (1024, 2048))
CSV_COLUMNS = [
    "timestamp", "device", "threads", "torch", "onnxruntime", "model", "size", "batch", "impl",
    "ms_p50", "ms_p90", "img_s", "speedup_vs_eager", "repeats", "note",
]
CPU_IMPLS = ("torch-eager-fp32", "torch-eager-bf16", "torch-compile-fp32", "ort-cpu-fp32", "ort-cpu-fp32-basic")
CUDA_IMPLS = ("torch-eager-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp32-iobinding", "ort-cuda-fp16-iobinding")
IMPLS = CPU_IMPLS + CUDA_IMPLS
DEFAULT_CPU = ("torch-eager-fp32", "torch-eager-bf16", "ort-cpu-fp32")
DEFAULT_CUDA = ("torch-eager-fp32", "torch-eager-bf16", "torch-eager-fp16", "torch-compile-fp32",
                "ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp32-iobinding", "ort-cuda-fp16-iobinding")


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "n/a"


def time_ms(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(p50, p90) wall-clock milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


# ----------------------------------------------------------------------------- implementations
def _torch_runner(wrapper, image: torch.Tensor, impl: str) -> Callable[[], object]:
    device = image.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(impl.rsplit("-", 1)[-1])
    module = wrapper.to(device)
    if impl.startswith("torch-compile"):
        module = torch.compile(module)

    def run():
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return module(image)

    return run


def _ort_runner(onnx_path: Path, image: torch.Tensor, impl: str, num_classes: int, threads: int) -> Callable[[], object]:
    from diga_fast.export.runtime import OnnxSegmenter

    if impl.startswith("ort-cpu"):
        segmenter = OnnxSegmenter(onnx_path, device="cpu", threads=threads,
                                  optimization="basic" if impl.endswith("basic") else "all")
        array = image.cpu().numpy()
        return lambda: segmenter.run(array)
    segmenter = OnnxSegmenter(onnx_path, device="cuda", threads=threads)
    if segmenter.provider != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime placed the graph on {segmenter.provider}")
    if not impl.endswith("iobinding"):
        array = image.cpu().numpy()  # host in, host out: includes both copies
        return lambda: segmenter.run(array)
    # IO binding: input and output stay in CUDA memory owned by torch, no host round trip.
    session = segmenter.session
    x = image.contiguous()
    b, _, h, w = x.shape
    out = torch.empty((b, num_classes, h, w), dtype=torch.float32, device=x.device)
    binding = session.io_binding()
    index = x.device.index or 0
    binding.bind_input("image", "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output("logits", "cuda", index, np.float32, tuple(out.shape), out.data_ptr())

    def run():
        session.run_with_iobinding(binding)
        return out

    return run


# ----------------------------------------------------------------------------- output
def _print_table(rows: list[dict], notes: list[str], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"diga-fast inference on {device} (batch {rows[0]['batch'] if rows else 1})")
    for name, justify in [("model", "left"), ("size", "left"), ("impl", "left"), ("p50 ms", "right"),
                          ("p90 ms", "right"), ("img/s", "right"), ("vs eager fp32", "right")]:
        table.add_column(name, justify=justify)
    for r in rows:
        speed = r["speedup_vs_eager"]
        table.add_row(r["model"], r["size"], r["impl"], f"{r['ms_p50']:.1f}", f"{r['ms_p90']:.1f}",
                      f"{r['img_s']:.3g}", "n/a" if math.isnan(speed) else f"{speed:.2f}x")
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    print_wide(console, table)
    for note in notes:
        console.print(f"note: {note}")


# ----------------------------------------------------------------------------- entry point
def run(
    models: list[str] | None = None,
    checkpoint: str | None = None,
    sizes: list[tuple[int, int]] | None = None,
    repeats: int | None = None,
    csv_path: str | os.PathLike | None = DEFAULT_CSV,
    impls: list[str] | None = None,
    batch: int = 1,
    warmup: int | None = None,
    print_table: bool = True,
    note: str = "",
    threads: int | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """Bench each model (arch names, random weights; or the ``checkpoint``) at each (H, W) of ``sizes``
    with each implementation of ``impls`` (default: the device's set). Returns the rows, the rows of a
    (model, size) appended to ``csv_path`` (None: no CSV) as soon as they are measured. ``note`` goes
    into every row (e.g. "machine shared with other jobs"). ``threads``: PyTorch's intra-op threads and
    ONNX Runtime's (default: the physical cores). Past ``deadline`` (a ``time.time()``) the (model,
    size) pairs left are skipped and named in a note."""
    from diga_fast.export import physical_cores

    cuda = torch.cuda.is_available()
    impls, notes = _available(list(impls or (DEFAULT_CUDA if cuda else DEFAULT_CPU)), cuda)
    sizes = list(sizes or DEFAULT_SIZES)
    repeats = repeats or (30 if cuda else 3)
    warmup = warmup if warmup is not None else (5 if cuda else 1)
    threads = threads or physical_cores()
    name = device_name("cuda" if cuda else "cpu")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    common = {"timestamp": stamp, "device": name, "threads": threads, "torch": torch.__version__,
              "onnxruntime": _ort_version(), "batch": batch, "repeats": repeats, "note": note}

    rows = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="diga-bench-") as tmp:
            for label, model, space in _models(models, checkpoint):
                onnx_files = _export_onnx(model, space, impls, Path(tmp))
                for height, width in sizes:
                    if deadline is not None and time.time() > deadline:
                        notes.append(f"{label} {height}x{width} skipped for time")
                        continue
                    image = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
                    image = image.to("cuda" if cuda else "cpu")
                    size_rows = []
                    for impl in impls:
                        try:
                            fn = _runner(impl, model, image, onnx_files, threads)
                            p50, p90 = time_ms(fn, repeats, warmup, cuda)
                        except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler
                            notes.append(f"{label} {height}x{width} {impl} failed: {type(err).__name__}: "
                                         f"{' '.join(str(err).split())[:200]}")
                            continue
                        size_rows.append({**common, "model": label, "size": f"{height}x{width}", "impl": impl,
                                          "ms_p50": p50, "ms_p90": p90, "img_s": batch / (p50 / 1e3)})
                    eager = next((r["ms_p50"] for r in size_rows if r["impl"] == "torch-eager-fp32"), None)
                    for r in size_rows:
                        r["speedup_vs_eager"] = eager / r["ms_p50"] if eager else float("nan")
                    rows.extend(size_rows)
                    if csv_path is not None and size_rows:  # at once: a killed run keeps what it measured
                        append_rows(size_rows, Path(csv_path), CSV_COLUMNS)
    finally:
        torch.set_num_threads(previous_threads)
    if print_table:
        _print_table(rows, notes, name)
    else:
        for note_line in notes:
            print(f"note: {note_line}")
    if csv_path is not None and rows:
        print(f"{len(rows)} rows appended to {csv_path}")
    return rows


def _available(impls: list[str], cuda: bool) -> tuple[list[str], list[str]]:
    """The implementations this machine can run, and a note for each group left out."""
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    notes = []
    try:
        import onnxruntime

        ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        if any(i.startswith("ort") for i in impls):
            notes.append("onnxruntime is not installed: ONNX Runtime rows skipped")
        impls, ort_cuda = [i for i in impls if not i.startswith("ort")], False
    if not cuda and any(i in CUDA_IMPLS for i in impls):
        impls = [i for i in impls if i not in CUDA_IMPLS]
        notes.append("no CUDA device: CUDA rows (torch fp16, ONNX Runtime CUDA) skipped")
    if cuda and not ort_cuda and any(i.startswith("ort-cuda") for i in impls):
        impls = [i for i in impls if not i.startswith("ort-cuda")]
        notes.append("onnxruntime has no CUDA provider (install onnxruntime-gpu): ONNX Runtime CUDA rows skipped")
    return impls, notes


def _models(models: list[str] | None, checkpoint: str | None):
    """(label, model, label space) for a checkpoint or for each arch with random weights."""
    from diga_fast.labels import get_label_space
    from diga_fast.models.io import load_model
    from diga_fast.models import build_model

    if checkpoint is not None:
        model, meta = load_model(checkpoint)
        yield f"{model.arch} ({Path(checkpoint).name})", model.eval(), get_label_space(meta["label_space"])
        return
    space = get_label_space("cityscapes19")
    for arch in models or ["small"]:
        torch.manual_seed(0)
        yield arch, build_model(arch, space.num_classes).eval(), space


def _export_onnx(model, space, impls: list[str], folder: Path) -> dict[str, Path]:
    """The verified ONNX files (fp32, fp16) the ONNX Runtime rows need."""
    from diga_fast.export import export_model

    files = {}
    for precision in sorted({"fp16" if "fp16" in i else "fp32" for i in impls if i.startswith("ort")}):
        files[precision] = folder / f"{model.arch}-{precision}.onnx"
        export_model(model, space, {"onnx": files[precision]}, fp16=precision == "fp16")
    return files


def _runner(impl: str, model, image: torch.Tensor, onnx_files: dict[str, Path], threads: int) -> Callable[[], object]:
    from diga_fast.export import InferenceWrapper

    if impl.startswith("torch"):
        return _torch_runner(InferenceWrapper(model), image, impl)
    precision = "fp16" if "fp16" in impl else "fp32"
    return _ort_runner(onnx_files[precision], image, impl, model.num_classes, threads)

