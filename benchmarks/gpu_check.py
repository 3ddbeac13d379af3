"""One-shot check of the Triton kernels on a real GPU (H100/H200), for a session that is lent one.

    pip install --no-deps --no-build-isolation -e .      # once, if diga-fast is not installed there
    python benchmarks/gpu_check.py                        # all four stages below, a few minutes

Options: --skip-tests, --skip-checks, --skip-bench, --skip-train-bench (run the stages as separate commands when one
command may not take that long; the report is appended to), --quick-bench (small shapes), --dtype
(repeatable; default fp32 and bf16). It prints, and writes to ``benchmarks/results/``:
  gpu_check_<device>.txt    everything printed
  kernels.csv               the bench rows (appended)
  kernels_<device>.png      the bench plot
Stage 1 needs pytest (and pygments, pluggy, iniconfig, packaging). If the GPU machine lacks it, carry
those pure-Python packages from this checkout's virtualenv and put them on PYTHONPATH: carry
.venv/lib/python3.11/site-packages/{pytest,_pytest,pluggy,iniconfig,packaging,pygments} and run with
PYTHONPATH=$PWD/.venv/lib/python3.11/site-packages; without pytest the stage is skipped.
Stages: (1) the kernel tests compiled for real (``pytest tests/test_kernel_*.py``); (2) each kernel at
full size against a float64 reference and the eager fp32 version (max abs error, label agreement,
exact equality where the op is a selection); (3) assign_centroids with each fp32 dot precision
(tf32x3 / ieee / tf32) for speed and accuracy; (4) the full bench (``diga bench kernels``); (5) one
self-training iteration of the paper preset, three setups (``diga bench train``; rows in train.csv).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


def _stage(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 90 - len(title)), flush=True)
    return time.perf_counter()


def run_tests() -> int | None:
    if importlib.util.find_spec("pytest") is None:
        print("pytest is not importable here: stage skipped (see the docstring of this script)")
        return None
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernel_*.py"))
    tests.append("tests/test_bench_kernels.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", *tests]
    try:
        importlib.metadata.version("pytest-xdist")  # installed as a plugin, not just importable
        cmd += ["-n", "4"]  # compile the kernel variants in parallel
    except importlib.metadata.PackageNotFoundError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    out = proc.stdout + proc.stderr
    print(out[-12000:])
    return proc.returncode


def _cpu_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


FULL = {"assign": (2, 256, 512, 1024), "ce": (2, 19, 512, 1024), "crdomix": (8, 3, 720, 1280),
        "sums": [(2, 2048, 65, 129), (2, 256, 512, 1024)], "precision": (2, 256, 512, 512)}
# The same code paths at toy size, to dry-run this script on a CPU under TRITON_INTERPRET=1.
TINY = {"assign": (2, 16, 8, 16), "ce": (2, 19, 8, 16), "crdomix": (2, 3, 8, 32),
        "sums": [(2, 16, 8, 16)], "precision": (2, 16, 8, 16)}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def full_size_checks(dtypes, device="cuda", sizes=FULL) -> None:
    import torch

    from diga_fast.benchmarks.kernels import blocky_labels
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

    dev = device
    g = torch.Generator(device=dev).manual_seed(0)
    gc = torch.Generator().manual_seed(0)

    # assign_centroids, 2×256×512×1024, K=19: label agreement with float64, worst "regret" (how much
    # worse, in float64, the chosen centroid is than the best: ~0 means any disagreement is a near-tie).
    B, C, H, W = sizes["assign"]
    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        f = torch.randn(B, C, H, W, device=dev, generator=g).to(dtype)
        c = torch.randn(19, C, device=dev, generator=g)
        for metric in ("cosine", "l2"):
            exact_labels, exact_score = assign_centroids_ref(f.double(), c.double(), metric)
            # float64 similarity of every class, to score the chosen labels
            fd = f.double()
            if metric == "cosine":
                sim = torch.einsum("bchw,kc->bkhw", torch.nn.functional.normalize(fd, dim=1),
                                   torch.nn.functional.normalize(c.double(), dim=1))
            else:
                sim = -torch.cdist(fd.flatten(2).transpose(1, 2), c.double()[None].expand(B, -1, -1))
                sim = sim.transpose(1, 2).reshape(B, 19, H, W)
            best = sim.max(dim=1).values
            del fd
            for impl, (labels, score) in [
                ("triton", assign_centroids(f, c, metric, backend="triton")),
                ("triton channels_last", assign_centroids(f.to(memory_format=torch.channels_last), c, metric,
                                                          backend="triton")),
                ("eager", assign_centroids_ref(f, c, metric)),
            ]:
                agree = (labels == exact_labels).double().mean().item() * 100
                regret = (best - sim.gather(1, labels[:, None])[:, 0]).max().item()
                print(f"assign_centroids {name} {metric:6s} {impl:22s} label agreement {agree:9.5f}%  "
                      f"max regret {regret:.2e}  max |score err| {_max_abs(score, exact_score):.2e}")
            del sim, best, exact_labels, exact_score
        del f
        torch.cuda.empty_cache()

    # consensus_cross_entropy, 2×19×512×1024: loss and gradient against float64.
    B, K, H, W = sizes["ce"]
    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        x = (3 * torch.randn(B, K, H, W, device=dev, generator=g)).to(dtype)
        prob = blocky_labels(B, H, W, K, generator=gc, device=dev)
        feat = torch.where(blocky_labels(B, H, W, 4, generator=gc, device=dev) > 0, prob,
                           blocky_labels(B, H, W, K, generator=gc, device=dev))
        prob[blocky_labels(B, H, W, 20, generator=gc, device=dev) == 0] = 255
        results = {}
        for impl, fn, inp in [("float64", consensus_cross_entropy_ref, x.double()),
                              ("triton", lambda *a: consensus_cross_entropy(*a, backend="triton"), x),
                              ("eager", consensus_cross_entropy_ref, x)]:
            xi = inp.detach().clone().requires_grad_(True)
            loss = fn(xi, prob, feat)
            (grad,) = torch.autograd.grad(loss, xi)
            results[impl] = (loss.detach(), grad)
        ref_loss, ref_grad = results["float64"]
        for impl in ("triton", "eager"):
            loss, grad = results[impl]
            print(f"consensus_cross_entropy {name} {impl:7s} loss {loss.item():.7f} (float64 {ref_loss.item():.7f}, "
                  f"|err| {abs(loss.item() - ref_loss.item()):.2e})  max |grad err| {_max_abs(grad, ref_grad):.2e}  "
                  f"grad dtype {grad.dtype}")
        none = consensus_cross_entropy(x.detach().requires_grad_(True), prob, (prob + 1) % K, backend="triton")
        print(f"consensus_cross_entropy {name} all-disagree loss {none.item()!r}")
        del x, results
        torch.cuda.empty_cache()

    # crdomix_blend, 8×3×720×1280: a selection, so bitwise equal to the eager version.
    B, C, H, W = sizes["crdomix"]
    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        src = torch.rand(B, C, H, W, device=dev, generator=g).to(dtype)
        trans = torch.rand(B, C, H, W, device=dev, generator=g).to(dtype)
        labels = blocky_labels(B, H, W, 19, block=32, generator=gc, device=dev)
        labels[blocky_labels(B, H, W, 10, block=32, generator=gc, device=dev) == 0] = 255
        sel = torch.rand(B, 256, device=dev, generator=g) < 0.5
        want = crdomix_blend_ref(src, trans, labels, sel)
        for label_dtype in (torch.int64, torch.uint8):
            got = crdomix_blend(src, trans, labels.to(label_dtype), sel, backend="triton")
            print(f"crdomix_blend {name} labels {label_dtype}: equal to eager: {torch.equal(got, want)}")
        got = crdomix_blend(src.to(memory_format=torch.channels_last), trans, labels, sel, backend="triton")
        print(f"crdomix_blend {name} channels_last source: equal to eager: {torch.equal(got, want)}")

    # class_feature_sums: DeepLab 2048-channel features and full-resolution 256-channel ones.
    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        for shape in sizes["sums"]:
            f = torch.randn(*shape, device=dev, generator=g).to(dtype)
            labels = blocky_labels(shape[0], shape[2], shape[3], 19, block=4, generator=gc, device=dev)
            labels[blocky_labels(shape[0], shape[2], shape[3], 10, block=4, generator=gc, device=dev) == 0] = 255
            ref_sums, ref_counts = class_feature_sums_ref(f.double(), labels, 19)
            scale = ref_sums.abs().max().item()
            for impl, (sums, counts) in [("triton", class_feature_sums(f, labels, 19, backend="triton")),
                                         ("eager", class_feature_sums_ref(f, labels, 19))]:
                print(f"class_feature_sums {name} {'x'.join(map(str, shape))} {impl:6s} counts equal "
                      f"{torch.equal(counts, ref_counts)}  max |sum err| {_max_abs(sums, ref_sums):.2e} "
                      f"(max |sum| {scale:.1f})")
            del f
            if dev == "cuda":
                torch.cuda.empty_cache()


def dot_precision_variants(device="cuda", sizes=FULL) -> None:
    import torch
    import triton.testing

    from diga_fast.kernels import assign_centroids, assign_centroids_ref

    ac = importlib.import_module("diga_fast.kernels.assign_centroids")
    B, C, H, W = sizes["precision"]
    g = torch.Generator(device=device).manual_seed(1)
    f = torch.randn(B, C, H, W, device=device, generator=g)
    c = torch.randn(19, C, device=device, generator=g)
    exact_labels, exact_score = assign_centroids_ref(f.double(), c.double())
    nbytes = ac.traffic_bytes(B, C, H, W, 19, 4)
    bench = triton.testing.do_bench if device == "cuda" else lambda fn, quantiles: [_cpu_ms(fn)]
    eager_ms = bench(lambda: assign_centroids_ref(f, c), quantiles=[0.5])[0]
    print(f"eager assign_centroids {B}x{C}x{H}x{W} fp32 cosine: {eager_ms:.3f} ms")
    default = ac.FP32_DOT_PRECISION
    try:
        for precision in ("tf32x3", "ieee", "tf32"):
            ac.FP32_DOT_PRECISION = precision
            labels, score = assign_centroids(f, c, backend="triton")
            ms = bench(lambda: assign_centroids(f, c, backend="triton"), quantiles=[0.5])[0]
            agree = (labels == exact_labels).double().mean().item() * 100
            print(f"  dot precision {precision:6s}: {ms:.3f} ms  {nbytes / ms / 1e6:7.0f} GB/s  "
                  f"{eager_ms / ms:5.1f}x eager  label agreement {agree:.5f}%  "
                  f"max |score err| {_max_abs(score, exact_score):.2e}")
    finally:
        ac.FP32_DOT_PRECISION = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--quick-bench", action="store_true")
    parser.add_argument("--skip-train-bench", action="store_true")
    parser.add_argument("--dtype", action="append", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    dtypes = args.dtype or ["fp32", "bf16"]

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this script checks the compiled kernels")
    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = RESULTS / f"gpu_check_{tag}.txt"
    log = report.open("a")  # a run split over several commands (--skip-...) keeps all its parts
    sys.stdout = _Tee(sys.__stdout__, log)
    start = time.perf_counter()
    print(f"device {device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {sys.version.split()[0]}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    failures = 0
    try:
        if not args.skip_tests:
            t = _stage("1. kernel tests, compiled")
            code = run_tests()
            failures += code not in (0, None)
            print(f"[{time.perf_counter() - t:.0f} s]")
        if not args.skip_checks:
            t = _stage("2. full-size checks against float64")
            full_size_checks(dtypes)
            print(f"[{time.perf_counter() - t:.0f} s]")
            t = _stage("3. assign_centroids: fp32 dot precision variants")
            dot_precision_variants()
            print(f"[{time.perf_counter() - t:.0f} s]")
        if not args.skip_bench:
            t = _stage("4. bench")
            from diga_fast.benchmarks import kernels

            kernels.run(quick=args.quick_bench, csv_path=RESULTS / "kernels.csv",
                        plot_path=RESULTS / f"kernels_{tag}.png", dtypes=dtypes)
            print(f"[{time.perf_counter() - t:.0f} s]")
        if not args.skip_train_bench:
            t = _stage("5. training step (diga bench train, paper preset)")
            from diga_fast.benchmarks import train

            train.run(steps=10, warmup=3, csv_path=RESULTS / "train.csv")
            print(f"[{time.perf_counter() - t:.0f} s]")
    finally:
        print(f"\ntotal {time.perf_counter() - start:.0f} s; tests {'FAILED' if failures else 'ok or skipped'}; "
              f"report {report}")
        sys.stdout = sys.__stdout__
        log.close()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
