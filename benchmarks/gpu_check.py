"""One-shot check of the Triton kernels on a real GPU (H100/H200), ready to run blind on a fresh machine
that has torch, triton, onnx and onnxruntime but no internet and no diga-fast install.

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out /tmp/gpu_check --stage kernels --stage parity
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out /tmp/gpu_check --stage bench --stage train
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out /tmp/gpu_check --stage daformer

(commands of well under 10 minutes; no stage may take more than ``STAGE_TIMEOUT_S``). Nothing is
installed: when ``diga_fast.kernels`` is not importable, a tree of links in ``OUT/src`` gives the
source tree the package layout of ``pyproject.toml``, for this process and every subprocess.

Stages (each runs in its own subprocess with a timeout and ends "ok", "FAILED: why" or "skipped: why";
the exit status is non-zero when any stage FAILED, and a failed or timed-out stage never stops the next):
  kernels  the kernel tests compiled for the GPU (pytest, TRITON_INTERPRET unset). Without pytest:
           skipped, saying how to carry it (PYTHONPATH=<a copy of pytest, pluggy, iniconfig, packaging>).
  parity   every kernel at full size against float64 and the eager version; fails on any mismatch
           beyond the stated tolerance, on non-determinism of class_feature_sums (two runs, two
           launch configurations), and on assign_centroids' fp32 dot-precision variants (reported).
  bench    ``diga bench kernels`` (fp32, bf16): rows to OUT/kernels.csv, plot when matplotlib is there.
  train    ``diga bench train`` (paper preset, 10 steps); needs safetensors, PyYAML and Pillow:
           skipped, naming what is missing, without them.
  daformer ``diga bench train --preset paper-daformer`` (MiT-B5, 512x512 crops, batch 2 + 2: the
           measured peak memory the README waits for), fp32 and bf16 + channels_last, then
           ``diga bench infer --model daformer_mitb5`` (torch and ONNX Runtime CUDA rows); same needs.
Results go to ``--out DIR`` (never into the source tree): gpu_check.log, kernels.csv, train.csv,
train_daformer.csv, infer.csv, PNGs.
``--dry-run`` (no GPU needed) imports what each stage imports, checks its prerequisites and prints its
plan; parity and bench run at toy sizes (parity through the Triton interpreter).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and sys.path[0] == str(Path(__file__).resolve().parent):
    # Run as `python benchmarks/NAME.py`, Python put benchmarks/ first on sys.path, where kernels.py,
    # train.py and infer.py would answer to other packages' names (transformers imports `kernels`):
    # the repository root takes its place, which also makes a bare checkout importable.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

REPO = Path(__file__).resolve().parents[1]
STAGES = ("kernels", "parity", "bench", "train", "daformer")
STAGE_TIMEOUT_S = {"kernels": 290, "parity": 240, "bench": 290, "train": 290, "daformer": 290}
PACKAGE_DIRS = {"kernels": "kernels", "cli": "cli", "benchmarks": "benchmarks"}  # pyproject's package-dir
STATUS = "STATUS:"  # a stage's last line: "STATUS: ok" | "STATUS: FAILED: why" | "STATUS: skipped: why"

FULL = {"assign": (2, 256, 512, 1024), "ce": (2, 19, 512, 1024), "crdomix": (8, 3, 720, 1280),
        "sums": [(2, 2048, 65, 129), (2, 256, 512, 1024)], "precision": (2, 256, 512, 512)}
TINY = {"assign": (2, 16, 8, 16), "ce": (2, 19, 8, 16), "crdomix": (2, 3, 8, 32),
        "sums": [(2, 16, 8, 16)], "precision": (2, 16, 8, 16)}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Parity tolerances, relative to the float64 value's scale (fp32 inputs; 16-bit inputs are rounded
# before any kernel sees them, so the tolerance is about the accumulation only).
TOL = {"loss": 1e-5, "grad": 1e-5, "sums": 1e-5, "score": 1e-4, "label_agreement_pct": 99.99}


class StageSkipped(Exception):
    pass


class StageFailed(Exception):
    pass


# ----------------------------------------------------------------------------- source tree
def source_pythonpath(out: Path) -> str | None:
    """A directory that makes ``import diga_fast.kernels`` work from the source tree (links in
    OUT/src), or None when diga-fast is importable as it is (installed, editable or not)."""
    try:
        if importlib.util.find_spec("diga_fast.kernels") is not None:
            return None
    except ModuleNotFoundError:
        pass
    root = out / "src" / "diga_fast"
    root.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "diga_fast").iterdir():
        link = root / entry.name
        if not link.exists():
            link.symlink_to(entry)
    for name, folder in PACKAGE_DIRS.items():
        link = root / name
        if not link.exists():
            link.symlink_to(REPO / folder)
    return str(out / "src")


def missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


# ----------------------------------------------------------------------------- stage: kernels
def stage_kernels(out: Path, dry_run: bool) -> None:
    if missing(["pytest"]):
        raise StageSkipped(
            "pytest is not importable; carry pytest, _pytest, pluggy, iniconfig, packaging (and pygments) "
            "from a virtualenv's site-packages and add that folder to PYTHONPATH"
        )
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernel_*.py"))
    tests.append("tests/test_bench_kernels.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10",
           "-o", "addopts=", "--junitxml", str(out / "kernel_tests.xml"), *tests]
    print("$", " ".join(cmd))
    if dry_run:
        print(f"dry run: would run {len(tests)} test files with TRITON_INTERPRET unset")
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=STAGE_TIMEOUT_S["kernels"] - 20)
    print((proc.stdout + proc.stderr)[-12000:])
    if proc.returncode != 0:
        raise StageFailed(f"pytest exit code {proc.returncode}")


# ----------------------------------------------------------------------------- stage: parity
def _max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


class Checks:
    """Collects pass/fail lines; the stage fails when any check failed."""

    def __init__(self):
        self.failed: list[str] = []

    def check(self, ok: bool, text: str) -> None:
        print(("ok      " if ok else "MISMATCH ") + text, flush=True)
        if not ok:
            self.failed.append(text)


def stage_parity(out: Path, dry_run: bool, dtypes: list[str]) -> None:
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
    from diga_fast.kernels.class_feature_sums import _class_feature_sums_triton

    sizes = TINY if dry_run else FULL
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise StageSkipped("no CUDA device (and not a dry run through the interpreter)")
    g = torch.Generator(device=dev).manual_seed(0)
    gc = torch.Generator().manual_seed(0)
    checks = Checks()

    B, C, H, W = sizes["assign"]
    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        f = torch.randn(B, C, H, W, device=dev, generator=g).to(dtype)
        c = torch.randn(19, C, device=dev, generator=g)
        for metric in ("cosine", "l2"):
            exact_labels, exact_score = assign_centroids_ref(f.double(), c.double(), metric)
            fd = f.double()
            if metric == "cosine":
                sim = torch.einsum("bchw,kc->bkhw", torch.nn.functional.normalize(fd, dim=1),
                                   torch.nn.functional.normalize(c.double(), dim=1))
            else:
                sim = -torch.cdist(fd.flatten(2).transpose(1, 2), c.double()[None].expand(B, -1, -1))
                sim = sim.transpose(1, 2).reshape(B, 19, H, W)
            best = sim.max(dim=1).values
            scale = max(1.0, exact_score.abs().max().item())
            for impl, (labels, score) in [
                ("triton", assign_centroids(f, c, metric, backend="triton")),
                ("triton channels_last",
                 assign_centroids(f.to(memory_format=torch.channels_last), c, metric, backend="triton")),
            ]:
                agree = (labels == exact_labels).double().mean().item() * 100
                regret = (best - sim.gather(1, labels[:, None])[:, 0]).max().item()
                err = _max_abs(score, exact_score)
                checks.check(agree >= TOL["label_agreement_pct"] and regret <= TOL["score"] * scale
                             and err <= TOL["score"] * scale,
                             f"assign_centroids {name} {metric} {impl}: label agreement {agree:.5f}%, "
                             f"max regret {regret:.2e}, max |score err| {err:.2e}")
            del sim, best, fd

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
                              ("triton", lambda *a: consensus_cross_entropy(*a, backend="triton"), x)]:
            xi = inp.detach().clone().requires_grad_(True)
            loss = fn(xi, prob, feat)
            results[impl] = (loss.detach(), torch.autograd.grad(loss, xi)[0])
        (ref_loss, ref_grad), (loss, grad) = results["float64"], results["triton"]
        loss_err, grad_err = abs(loss.item() - ref_loss.item()), _max_abs(grad, ref_grad)
        grad_tol = TOL["grad"] * ref_grad.abs().max().item() * (1 if name == "fp32" else 1000)
        checks.check(loss_err <= TOL["loss"] * abs(ref_loss.item()) and grad_err <= grad_tol,
                     f"consensus_cross_entropy {name}: loss {loss.item():.7f} (float64 {ref_loss.item():.7f}), "
                     f"max |grad err| {grad_err:.2e} (tolerance {grad_tol:.1e})")
        none = consensus_cross_entropy(x.detach().requires_grad_(True), prob, (prob + 1) % K, backend="triton")
        checks.check(none.item() == 0.0, f"consensus_cross_entropy {name} all-disagree loss {none.item()!r}")

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
            checks.check(torch.equal(got, want), f"crdomix_blend {name} {label_dtype} labels: bitwise equal to eager")
        got = crdomix_blend(src.to(memory_format=torch.channels_last), trans, labels, sel, backend="triton")
        checks.check(torch.equal(got, want), f"crdomix_blend {name} channels_last source: bitwise equal to eager")

    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        for shape in sizes["sums"]:
            f = torch.randn(*shape, device=dev, generator=g).to(dtype)
            labels = blocky_labels(shape[0], shape[2], shape[3], 19, block=4, generator=gc, device=dev)
            labels[blocky_labels(shape[0], shape[2], shape[3], 10, block=4, generator=gc, device=dev) == 0] = 255
            ref_sums, ref_counts = class_feature_sums_ref(f.double(), labels, 19)
            sums, counts = class_feature_sums(f, labels, 19, backend="triton")
            err, scale = _max_abs(sums, ref_sums), max(1.0, ref_sums.abs().max().item())
            label = f"class_feature_sums {name} {'x'.join(map(str, shape))}"
            checks.check(torch.equal(counts, ref_counts) and err <= TOL["sums"] * scale,
                         f"{label}: counts equal {torch.equal(counts, ref_counts)}, max |sum err| {err:.2e}")
            again = class_feature_sums(f, labels, 19, backend="triton")
            other = _class_feature_sums_triton(f, labels, 19, 255, block_c=32, spans_per_program=2)
            same = torch.equal(sums, again[0]) and torch.equal(counts, again[1])
            checks.check(same, f"{label}: two runs bitwise equal")
            if dev == "cuda":  # the interpreter's numpy matmul rounds differently per block shape
                checks.check(torch.equal(sums, other[0]), f"{label}: other block size / grid bitwise equal")

    if not dry_run:
        dot_precision_variants(dev, sizes)
    if checks.failed:
        raise StageFailed(f"{len(checks.failed)} mismatches: " + "; ".join(checks.failed)[:400])


def dot_precision_variants(device: str, sizes: dict) -> None:
    """assign_centroids fp32 with each tl.dot precision: speed and accuracy (a report, not a check)."""
    import importlib

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
    eager_ms = triton.testing.do_bench(lambda: assign_centroids_ref(f, c), quantiles=[0.5])[0]
    print(f"eager assign_centroids {B}x{C}x{H}x{W} fp32 cosine: {eager_ms:.3f} ms")
    default = ac.FP32_DOT_PRECISION
    try:
        for precision in ("tf32x3", "ieee", "tf32"):
            ac.FP32_DOT_PRECISION = precision
            labels, score = assign_centroids(f, c, backend="triton")
            ms = triton.testing.do_bench(lambda: assign_centroids(f, c, backend="triton"), quantiles=[0.5])[0]
            agree = (labels == exact_labels).double().mean().item() * 100
            print(f"  dot precision {precision:6s}: {ms:.3f} ms  {nbytes / ms / 1e6:7.0f} GB/s  "
                  f"{eager_ms / ms:5.1f}x eager  label agreement {agree:.5f}%  "
                  f"max |score err| {_max_abs(score, exact_score):.2e}")
    finally:
        ac.FP32_DOT_PRECISION = default


# ----------------------------------------------------------------------------- stages: bench, train
def stage_bench(out: Path, dry_run: bool, dtypes: list[str], quick: bool) -> None:
    import torch
    from diga_fast.benchmarks import kernels

    if dry_run:
        tiny = {op: [(1, 19 if op == "consensus_cross_entropy" else 8, 5, 7)] for op in kernels.OPS}
        tiny["crdomix_blend"] = [(1, 3, 5, 7)]
        rows = kernels.run(quick=True, csv_path=out / "kernels.csv", plot_path=None, dtypes=dtypes,
                           shapes=tiny, budget_s=0.0)
    else:
        if not torch.cuda.is_available():
            raise StageSkipped("no CUDA device")
        tag = "".join(ch if ch.isalnum() else "_" for ch in torch.cuda.get_device_name()).strip("_")
        plot = out / f"kernels_{tag}.png" if not missing(["matplotlib"]) else None
        rows = kernels.run(quick=quick, csv_path=out / "kernels.csv", plot_path=plot, dtypes=dtypes)
    if not rows:
        raise StageFailed("the bench returned no rows")
    print(f"{len(rows)} rows in {out / 'kernels.csv'}")
    print_tuned_configs()


def print_tuned_configs() -> None:
    """The config each autotuned kernel chose per key (shape and dtypes): what to keep in the lists."""
    import importlib

    import triton

    for name in ("assign_centroids", "consensus_cross_entropy", "crdomix_blend", "class_feature_sums"):
        module = importlib.import_module(f"diga_fast.kernels.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner):
                for key, config in getattr(obj, "cache", {}).items():
                    print(f"autotuned {attr} {key}: {config}")


def stage_train(out: Path, dry_run: bool) -> None:
    lacking = missing(["safetensors", "yaml", "PIL"])
    if lacking:
        raise StageSkipped(f"missing {', '.join(lacking)} (pip install safetensors pyyaml pillow)")
    from diga_fast.benchmarks import train

    if dry_run:
        print(f"dry run: would run train.run(steps=10, warmup=3, csv_path={out / 'train.csv'})")
        return
    import torch

    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")
    train.run(steps=10, warmup=3, csv_path=out / "train.csv")


def stage_daformer(out: Path, dry_run: bool) -> None:
    lacking = missing(["safetensors", "yaml", "PIL"])
    if lacking:
        raise StageSkipped(f"missing {', '.join(lacking)} (pip install safetensors pyyaml pillow)")
    from diga_fast.benchmarks import infer, train

    setups = ["torch-fp32", "torch-bf16-cl"]
    if dry_run:
        print(f"dry run: would run train.run(preset='paper-daformer', steps=6, warmup=2, setups={setups}, "
              f"csv_path={out / 'train_daformer.csv'}) and infer.run(models=['daformer_mitb5'], sizes=[(512, 1024)], "
              f"repeats=10, csv_path={out / 'infer.csv'})")
        return
    import torch

    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")
    train.run(preset="paper-daformer", steps=6, warmup=2, setups=setups, csv_path=out / "train_daformer.csv")
    infer.run(models=["daformer_mitb5"], sizes=[(512, 1024)], repeats=10, csv_path=out / "infer.csv", note="gpu_check")


def run_stage(name: str, args) -> int:
    """In the stage's own process: run it and end with the STATUS line; the exit code says the same."""
    out = Path(args.out)
    try:
        if name == "kernels":
            stage_kernels(out, args.dry_run)
        elif name == "parity":
            stage_parity(out, args.dry_run, args.dtypes)
        elif name == "bench":
            stage_bench(out, args.dry_run, args.dtypes, args.quick_bench)
        elif name == "train":
            stage_train(out, args.dry_run)
        elif name == "daformer":
            stage_daformer(out, args.dry_run)
    except StageSkipped as why:
        print(f"{STATUS} skipped: {why}", flush=True)
        return 0
    except StageFailed as why:
        print(f"{STATUS} FAILED: {why}", flush=True)
        return 1
    except Exception as err:  # noqa: BLE001 - a crash is a failure of this stage, not of the others
        import traceback

        traceback.print_exc()
        print(f"{STATUS} FAILED: {type(err).__name__}: {err}", flush=True)
        return 1
    print(f"{STATUS} ok", flush=True)
    return 0


# ----------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", action="append", choices=STAGES, help="stage to run (repeatable) [all]")
    parser.add_argument("--out", required=True, help="folder for the log and the result files")
    parser.add_argument("--dry-run", action="store_true", help="import and plan every stage (CPU is enough)")
    parser.add_argument("--dtype", dest="dtypes", action="append", choices=list(DTYPE_NAMES))
    parser.add_argument("--quick-bench", action="store_true", help="small bench shapes")
    parser.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)  # the per-stage subprocess
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes or ["fp32", "bf16"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    if args.run_stage:
        return run_stage(args.run_stage, args)

    env = dict(os.environ)
    extra = source_pythonpath(out)
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH", "")) if p)
    import torch

    cuda = torch.cuda.is_available()
    if args.dry_run and not cuda:
        env["TRITON_INTERPRET"] = "1"  # parity at toy sizes through the interpreter
    elif env.pop("TRITON_INTERPRET", None) == "1":
        print("TRITON_INTERPRET=1 ignored: the stages check the compiled kernels")
    log = (out / "gpu_check.log").open("a")

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    device = torch.cuda.get_device_name() if cuda else "no CUDA device"
    say(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}: {device}, torch {torch.__version__}, "
        f"python {sys.version.split()[0]}, out {out}, source {'links in ' + extra if extra else 'importable'}"
        + (", dry run" if args.dry_run else ""))
    results = {}
    for name in args.stage or STAGES:
        say(f"\n=== {name} " + "=" * 70)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name, "--out", str(out),
               *(["--dry-run"] if args.dry_run else []), *(["--quick-bench"] if args.quick_bench else []),
               *[f"--dtype={d}" for d in args.dtypes]]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=STAGE_TIMEOUT_S[name])
            text = proc.stdout + proc.stderr
            status = next((line[len(STATUS):].strip() for line in reversed(proc.stdout.splitlines())
                           if line.startswith(STATUS)), f"FAILED: exit code {proc.returncode}, no status line")
        except subprocess.TimeoutExpired as err:
            text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            status = f"FAILED: timed out after {STAGE_TIMEOUT_S[name]} s"
        for line in text.splitlines():
            if not line.startswith(STATUS):
                say("  " + line)
        results[name] = status
        say(f"--- {name}: {status} [{time.perf_counter() - start:.0f} s]")
    say("\nsummary: " + ", ".join(f"{k} {v.split(':')[0]}" for k, v in results.items()))
    log.close()
    return 1 if any(v.startswith("FAILED") for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
