"""Kernel bench: each fused Triton op against its PyTorch reference (``*_ref``) run eagerly and compiled
by ``torch.compile`` (Inductor: what a user would reach for instead of a hand-written kernel) and, for
the ops the official code wrote as per-class Python loops, against such a loop.

The references are timed as a user would call them: fp16/bf16 inputs stay in their dtype (no upcast
pass that the kernel would not pay for). For every op, shape, dtype and implementation the bench
reports the 20/50/80th percentile time, the effective bandwidth (the op's ``traffic_bytes`` model over
the median time), that bandwidth as a share of the copy bandwidth it measures on the same device (a
large device-to-device copy), the memory allocated beyond the inputs (CUDA only), and the speed-up
over the eager and over the compiled reference. The rows of a case are appended to one CSV the moment
the case is measured (a killed run keeps every case before it); rows name the device and versions, so
results from different cards never mix.

On a CPU only the PyTorch paths run (Triton needs a GPU; its interpreter is for tests, not timing).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diga_fast.benchmarks.results_csv import append_rows, device_name
from diga_fast.kernels import (
    assign_centroids,
    assign_centroids_ref,
    class_feature_sums,
    class_feature_sums_ref,
    consensus_cross_entropy,
    consensus_cross_entropy_ref,
    crdomix_blend,
    crdomix_blend_ref,
)
from diga_fast.kernels._common import reference
from diga_fast.utils.printing import print_wide

OPS = ("assign_centroids", "consensus_cross_entropy", "crdomix_blend", "class_feature_sums")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_CLASSES = 19
CSV_COLUMNS = [
    "timestamp", "device", "torch", "triton", "op", "shape", "dtype", "impl",
    "ms_p20", "ms_p50", "ms_p80", "gbps", "pct_copy_bw", "copy_gbps", "extra_mem_mb", "saved_for_backward_mb",
    "speedup_vs_torch", "speedup_vs_compile",
]
DEFAULT_CSV = Path("diga-bench/kernels.csv")  # under the current directory; --record: results/
# eager reference, torch.compile of it, fused kernel, per-class Python loop: the references come first, so
# that every row's speed-ups are known when it is written
IMPL_ORDER = ("torch", "compile", "triton", "loop")

# (B, C or K, H, W) per op. Full: DeepLabV2 feature maps (65×129 for 512×1024 inputs) with 256 and
# 2048 channels, full-resolution features, 19-class logits at label resolution, GTA5-size images.
FULL_SHAPES = {
    "assign_centroids": [(2, 256, 65, 129), (2, 2048, 65, 129), (2, 256, 512, 512), (2, 256, 512, 1024)],
    "consensus_cross_entropy": [(2, NUM_CLASSES, 512, 1024), (3, NUM_CLASSES, 512, 896)],
    "crdomix_blend": [(8, 3, 720, 1280), (3, 3, 512, 896)],
    "class_feature_sums": [(2, 256, 65, 129), (2, 2048, 65, 129), (3, 256, 65, 113)],
}
QUICK_SHAPES = {
    "assign_centroids": [(2, 256, 33, 65)],
    "consensus_cross_entropy": [(2, NUM_CLASSES, 128, 256)],
    "crdomix_blend": [(2, 3, 180, 320)],
    "class_feature_sums": [(2, 256, 33, 65)],
}


def _kernel_module(op: str):
    # ``diga_fast.kernels.<op>`` as an attribute is the function (re-exported); the module is here.
    return importlib.import_module(f"diga_fast.kernels.{op}")


# ----------------------------------------------------------------------------- loop baselines
def assign_centroids_loop(features, centroids, metric="cosine"):
    """The official code's way: one full-size pass per class (distance or similarity map), stacked."""
    centroids = centroids.to(features.dtype)
    maps = []
    for k in range(centroids.shape[0]):
        c = centroids[k].view(1, -1, 1, 1)
        if metric == "l2":
            maps.append(torch.norm(features - c, p=2, dim=1))
        else:
            maps.append(F.cosine_similarity(features, c, dim=1))
    stacked = torch.stack(maps, dim=1)
    score, labels = stacked.min(dim=1) if metric == "l2" else stacked.max(dim=1)
    return labels, score.float()


def crdomix_blend_loop(source, translated, labels, selected):
    """The official code's way: per image, the selected values to the host, one compare per value,
    then a float mask blend."""
    mixed = torch.empty_like(source)
    for b in range(source.shape[0]):
        values = selected[b].nonzero()[:, 0]
        mask = labels[b].long().eq(values[:, None, None]).sum(0).to(source.dtype)[None]
        mixed[b] = mask * source[b] + (1 - mask) * translated[b].to(source.dtype)
    return mixed


def class_feature_sums_loop(features, labels, num_classes, ignore_index=255):
    """The official code's way: per image and class, a mask multiply and a sum."""
    B, C = features.shape[:2]
    sums = torch.zeros(B, num_classes, C, dtype=torch.float32, device=features.device)
    counts = torch.zeros(B, num_classes, dtype=torch.int64, device=features.device)
    for b in range(B):
        for k in range(num_classes):
            mask = labels[b] == k
            sums[b, k] = (features[b].float() * mask).sum(dim=(1, 2))
            counts[b, k] = mask.sum()
    return sums, counts


# ----------------------------------------------------------------------------- inputs
def blocky_labels(B, H, W, num_values, block=16, generator=None, device="cpu"):
    """Spatially coherent random labels (nearest-upsampled blocks), like real label maps."""
    h, w = -(-H // block), -(-W // block)
    low = torch.randint(0, num_values, (B, 1, h, w), generator=generator).float()
    return F.interpolate(low, scale_factor=block, mode="nearest")[:, 0, :H, :W].long().to(device)


def _cases(op: str, shape: tuple, dtype: torch.dtype, device: str, with_triton: bool, with_compile: bool = True):
    """Yield (shape label, traffic bytes, {impl: fn}, {impl: forward-only fn}) for one op/shape/dtype;
    the forward-only functions (ops with a backward) measure what the forward keeps for the backward.
    "torch" is the eager reference in the inputs' dtype, "compile" the same function through
    ``torch.compile``."""
    g = torch.Generator().manual_seed(0)  # small tensors (label blocks, tables), made on the CPU
    gd = torch.Generator(device=device).manual_seed(0)  # large ones, made where they are used
    mod = _kernel_module(op)
    B, C, H, W = shape
    size = torch.tensor([], dtype=dtype).element_size()
    lowp = {} if dtype == torch.float32 else {"upcast": False}  # as a user calls it: no upcast pass

    def references(ref, *args, **kwargs):
        impls = {"torch": lambda: ref(*args, **kwargs)}
        if with_compile:
            compiled = reference(ref, "compile")
            impls["compile"] = lambda: compiled(*args, **kwargs)
        return impls

    if op == "assign_centroids":
        features = torch.randn(B, C, H, W, generator=gd, device=device).to(dtype)
        centroids = torch.randn(NUM_CLASSES, C, generator=gd, device=device)
        for metric in ("cosine", "l2"):
            impls = {**references(assign_centroids_ref, features, centroids, metric, **lowp),
                     "loop": lambda m=metric: assign_centroids_loop(features, centroids, m)}
            if with_triton:
                impls["triton"] = lambda m=metric: assign_centroids(features, centroids, m, backend="triton")
            label = f"{B}x{C}x{H}x{W} K={NUM_CLASSES} {metric}"
            yield label, mod.traffic_bytes(B, C, H, W, NUM_CLASSES, size), impls, {}
    elif op == "consensus_cross_entropy":
        logits = torch.randn(B, C, H, W, generator=gd, device=device).to(dtype).requires_grad_(True)
        prob = blocky_labels(B, H, W, C, generator=g, device=device)
        other = blocky_labels(B, H, W, C, generator=g, device=device)
        keep = blocky_labels(B, H, W, 4, generator=g, device=device) > 0  # ~75% of blocks agree
        feat = torch.where(keep, prob, other)
        prob[blocky_labels(B, H, W, 20, generator=g, device=device) == 0] = 255  # ~5% ignore
        valid = ((prob == feat) & (prob != 255)).float().mean().item()
        losses = references(consensus_cross_entropy_ref, logits, prob, feat, **lowp)
        if with_triton:
            losses["triton"] = lambda: consensus_cross_entropy(logits, prob, feat, backend="triton")
        impls = {name: (lambda fn=fn: torch.autograd.grad(fn(), logits)[0]) for name, fn in losses.items()}
        label = f"{B}x{C}x{H}x{W} fwd+bwd valid={valid:.2f} (GB/s of the minimum traffic)"
        yield label, mod.minimum_traffic_bytes(B, C, H, W, size, 8), impls, losses
    elif op == "crdomix_blend":
        source = torch.rand(B, C, H, W, generator=gd, device=device).to(dtype)
        translated = torch.rand(B, C, H, W, generator=gd, device=device).to(dtype)
        labels = blocky_labels(B, H, W, NUM_CLASSES, block=32, generator=g, device=device)
        labels[blocky_labels(B, H, W, 10, block=32, generator=g, device=device) == 0] = 255
        selected = (torch.rand(B, 256, generator=g) < 0.5).to(device)
        selected[:, 255] = True
        for label_dtype in (torch.int64, torch.uint8):
            lab = labels.to(label_dtype)
            impls = {**references(crdomix_blend_ref, source, translated, lab, selected),
                     "loop": lambda lab=lab: crdomix_blend_loop(source, translated, lab, selected)}
            if with_triton:
                impls["triton"] = lambda lab=lab: crdomix_blend(source, translated, lab, selected, backend="triton")
            label_bytes = lab.element_size()
            yield (f"{B}x{C}x{H}x{W} {str(label_dtype).removeprefix('torch.')} labels",
                   mod.traffic_bytes(B, C, H, W, size, label_bytes), impls, {})
    elif op == "class_feature_sums":
        features = torch.randn(B, C, H, W, generator=gd, device=device).to(dtype)
        labels = blocky_labels(B, H, W, NUM_CLASSES, block=4, generator=g, device=device)
        labels[blocky_labels(B, H, W, 10, block=4, generator=g, device=device) == 0] = 255
        valid = (labels != 255).float().mean().item()
        impls = {**references(class_feature_sums_ref, features, labels, NUM_CLASSES, **lowp),
                 "loop": lambda: class_feature_sums_loop(features, labels, NUM_CLASSES)}
        if with_triton:
            impls["triton"] = lambda: class_feature_sums(features, labels, NUM_CLASSES, backend="triton")
        label = f"{B}x{C}x{H}x{W} K={NUM_CLASSES} labelled={valid:.2f}"
        yield label, mod.traffic_bytes(B, C, H, W, NUM_CLASSES, size, 8, valid_fraction=valid), impls, {}
    else:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


# ----------------------------------------------------------------------------- timing
def _time_ms(fn: Callable, cuda: bool, budget_s: float) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds."""
    if cuda:
        import triton.testing

        rep_ms = max(1, int(budget_s * 1000))
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]))
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def _extra_memory_mb(fn: Callable, cuda: bool) -> float | None:
    """Peak memory allocated while ``fn`` runs (its outputs included) beyond what was allocated before."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def _saved_for_backward_mb(forward: Callable | None, cuda: bool) -> float | None:
    """Memory a forward pass leaves allocated (its autograd graph: what it saved for the backward),
    beyond its output."""
    if forward is None or not cuda:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    del out
    return kept / 2**20


def copy_bandwidth_gbps(device: str, nbytes: int) -> float:
    """Bandwidth of a large device-to-device copy (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device.startswith("cuda"), 0.2)[1]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "n/a"


# ----------------------------------------------------------------------------- output
def _print_table(rows: list[dict], copy_gbps: float, device: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # a bare GPU machine: plain text, the rows are in the CSV all the same
        print(f"diga-fast kernels on {device} (copy bandwidth {copy_gbps:.0f} GB/s)")
        for r in rows:
            print(f"{r['op']:24s} {r['shape']:40s} {r['dtype']:5s} {r['impl']:7s} {r['ms_p50']:9.4g} ms "
                  f"{r['gbps']:8.3g} GB/s {r['pct_copy_bw']:6.3g}% copy {r['speedup_vs_torch']:6.2f}x torch "
                  f"{r['speedup_vs_compile']:6.2f}x compile")
        return

    table = Table(title=f"diga-fast kernels on {device} (copy bandwidth {copy_gbps:.0f} GB/s)")
    for name, justify in [("op", "left"), ("shape", "left"), ("dtype", "left"), ("impl", "left"),
                          ("ms p50 [p20, p80]", "right"), ("GB/s", "right"), ("% copy BW", "right"),
                          ("extra MB", "right"), ("saved for bwd MB", "right"), ("vs torch", "right"),
                          ("vs compile", "right")]:
        table.add_column(name, justify=justify)
    for r in rows:
        extra, saved = (("n/a" if r[k] == "n/a" else f"{r[k]:.3g}")
                        for k in ("extra_mem_mb", "saved_for_backward_mb"))
        table.add_row(
            r["op"], r["shape"], r["dtype"], r["impl"],
            f"{r['ms_p50']:.4g} [{r['ms_p20']:.4g}, {r['ms_p80']:.4g}]",
            f"{r['gbps']:.3g}", f"{r['pct_copy_bw']:.3g}%", extra, saved, f"{r['speedup_vs_torch']:.2f}x",
            f"{r['speedup_vs_compile']:.2f}x",
        )
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=160)
    print_wide(console, table)


def _plot(rows: list[dict], plot_path: Path, copy_gbps: float, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed (pip install 'diga-fast[plot]'); {plot_path} not written")
        return
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in op_rows))
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, group in enumerate(groups):
                for r in op_rows:
                    if r["impl"] == impl and f"{r['shape']}\n{r['dtype']}" == group:
                        xs.append(j + i * width)
                        ys.append(r["gbps"])
            ax.bar(xs, ys, width=width, label=impl)
        ax.axhline(copy_gbps, color="k", linestyle="--", linewidth=1, label="copy")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("effective GB/s (log)")
        ax.set_title(op)
        ax.legend(fontsize=7)
    fig.suptitle(f"diga-fast kernels, {device}")
    fig.tight_layout()
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    print(f"plot written to {plot_path}")


# ----------------------------------------------------------------------------- entry point
def run(
    quick: bool = False,
    csv_path: str | os.PathLike | None = DEFAULT_CSV,
    plot_path: str | os.PathLike | None = None,
    ops: list[str] | None = None,
    dtypes: list[str] | None = None,
    *,
    shapes: dict[str, list[tuple]] | None = None,
    budget_s: float | None = None,
    impls: list[str] | None = None,
    deadline: float | None = None,
    print_table: bool = True,
) -> list[dict]:
    """Bench ``ops`` (default all) in ``dtypes`` (default fp32) with ``impls`` (default all that run
    here); returns the rows, each appended to ``csv_path`` (None: no CSV) as soon as it is measured.
    ``shapes`` overrides the shape sweep per op (tests use tiny ones). Past ``deadline`` (a
    ``time.time()``), the cases left are skipped and named in a last line."""
    ops = list(ops or OPS)
    dtypes = list(dtypes or ["fp32"])
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    wanted = set(impls or IMPL_ORDER)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with_triton = cuda and "triton" in wanted
    if not cuda:
        print("No CUDA device: Triton needs a GPU, so only the PyTorch paths are timed.")
    budget = budget_s if budget_s is not None else (0.1 if cuda else (0.2 if quick else 1.0))
    shape_table = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    copy_gbps = copy_bandwidth_gbps(device, 2**30 if cuda else (2**24 if quick else 2**27))
    name = device_name(device) + ("" if cuda else f", {torch.get_num_threads()} threads")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    common = {"timestamp": stamp, "device": name, "torch": torch.__version__, "triton": _triton_version()}

    rows, skipped = [], []
    for op in ops:
        for shape in shape_table.get(op, []):
            for dtype_name in dtypes:
                if deadline is not None and time.time() > deadline:
                    skipped.append(f"{op} {'x'.join(map(str, shape))} {dtype_name}")
                    continue
                cases = _cases(op, tuple(shape), DTYPES[dtype_name], device, with_triton, "compile" in wanted)
                for label, nbytes, case_impls, forwards in cases:
                    case_rows = []
                    for impl in sorted(set(case_impls) & wanted, key=IMPL_ORDER.index):
                        fn = case_impls[impl]
                        p20, p50, p80 = _time_ms(fn, cuda, budget)
                        gbps = nbytes / (p50 * 1e-3) / 1e9
                        extra = _extra_memory_mb(fn, cuda)
                        saved = _saved_for_backward_mb(forwards.get(impl), cuda)
                        case_rows.append({
                            **common, "op": op, "shape": label, "dtype": dtype_name, "impl": impl,
                            "ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "gbps": gbps,
                            "pct_copy_bw": 100 * gbps / copy_gbps, "copy_gbps": copy_gbps,
                            "extra_mem_mb": "n/a" if extra is None else extra,
                            "saved_for_backward_mb": "n/a" if saved is None else saved,
                        })
                    ms = {r["impl"]: r["ms_p50"] for r in case_rows}
                    for r in case_rows:
                        r["speedup_vs_torch"] = ms["torch"] / r["ms_p50"] if "torch" in ms else float("nan")
                        r["speedup_vs_compile"] = ms["compile"] / r["ms_p50"] if "compile" in ms else float("nan")
                    rows.extend(case_rows)
                    if csv_path is not None and case_rows:  # at once: a killed run keeps every case before it
                        append_rows(case_rows, Path(csv_path), CSV_COLUMNS)
    if csv_path is not None and rows:
        print(f"{len(rows)} rows appended to {csv_path}")
    if skipped:
        print(f"skipped for time: {'; '.join(skipped)}")
    if print_table:
        _print_table(rows, copy_gbps, name)
    if plot_path is not None and rows:
        _plot(rows, Path(plot_path), copy_gbps, name)
    return rows

