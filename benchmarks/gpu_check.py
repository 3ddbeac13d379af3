"""One command for the first minutes on a GPU machine (H100/H200), ready to run blind: no internet, no
install, only a preinstalled package set (e.g. Python 3.12, torch 2.11, triton 3.6, onnx, onnxruntime,
onnxscript, numpy, click, rich, safetensors, pyyaml, pillow, pytest, pytest-xdist, matplotlib):

    python benchmarks/gpu_check.py --out DIR              under 8 minutes in all (--budget, default 450 s)
    python benchmarks/gpu_check.py --out DIR --dry-run    any machine: imports and plans every stage

It runs from a bare checkout (the repository root goes first on sys.path and PYTHONPATH). Stages, in
priority order, each in its own process:
  kernels   every kernel against its reference, compiled for this GPU: the kernel test files with
            DIGA_KERNEL_TESTS=full (``test_every_config`` at the training shapes for every autotune
            config and fp32/fp16/bf16, beside each file's other tests), on pytest-xdist workers when
            it is there. With TRITON_INTERPRET=1 and no GPU: the same files through the interpreter.
  bench     ``diga bench kernels`` at the training shapes, fp32 then bf16 then fp16: each fused kernel
            against its eager and its torch.compile'd reference (and the official per-class loop).
  train     ``diga bench train`` (paper preset, DeepLabV2-R101): torch-fp32, kernels-fp32,
            kernels-bf16-cl, kernels-bf16-cl-compile, then the compiled and bf16 references; peak memory.
  onnx      ``diga bench infer``: ONNX Runtime CUDA (fp32, fp16, IO binding) against eager torch.
  daformer  ``diga bench train --preset paper-daformer`` (MiT-B5) and MiT-B5 inference rows.

Time: one global deadline. Each stage gets a share of what is left (``STAGE_WEIGHTS`` over the stages
still to run, so time a stage leaves goes to the next), is told its deadline, starts no work past it
and names what it skipped for time; a stage still running GRACE_S after its deadline is killed (its
rows so far are kept). A stage that no time is left for is "skipped: no time left".

Output in DIR, at most 8 files (what the device tool brings back): gpu_check.log (everything
printed), summary.json (rewritten after every stage: environment, then status and seconds per
stage), tests.jsonl (one line per kernel test, written as it ends), kernels.csv, train.csv and
infer.csv (rows appended as they are measured). A kill at any point keeps everything before it.
Compiled kernels, Triton's autotune choices and Inductor's code are kept across the stage processes in
``--cache`` (TRITON_CACHE_DIR with TRITON_CACHE_AUTOTUNING=1, TORCHINDUCTOR_CACHE_DIR), never in DIR.

Exit status 0 only when every stage ran in full ("ok"); "partial: skipped for time ...", "skipped:
why" (a missing package, no CUDA device, no CUDA provider in ONNX Runtime) and "FAILED: why" make it 1,
and the summary names each.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path[0] == str(Path(__file__).resolve().parent):
    # Run as `python benchmarks/NAME.py`, Python put benchmarks/ first on sys.path, where kernels.py,
    # train.py and infer.py would answer to other packages' names (transformers imports `kernels`):
    # the repository root takes its place, which also makes a bare checkout importable.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import importlib.util
import json
import os
import platform
import queue
import subprocess
import threading
import time

REPO = Path(__file__).resolve().parents[1]
STAGES = ("kernels", "bench", "train", "onnx", "daformer")
STAGE_WEIGHTS = {"kernels": 3.0, "bench": 2.0, "train": 2.0, "onnx": 1.0, "daformer": 1.5}
DEFAULT_BUDGET_S = 450.0
GRACE_S = 15.0
MIN_STAGE_S = 20.0  # a stage with less than this left is not started
NEEDS = {  # importable modules each stage needs beyond torch
    "kernels": ["triton", "pytest"],
    "bench": ["triton"],
    "train": ["triton", "safetensors", "yaml", "PIL", "click", "rich"],
    "onnx": ["onnx", "onnxruntime", "onnxscript", "safetensors", "yaml", "PIL", "rich"],
    "daformer": ["triton", "safetensors", "yaml", "PIL", "click", "rich"],
}
STATUS = "STATUS:"  # a stage's last line: "STATUS: ok" | "STATUS: partial: why" | "STATUS: skipped: why" | ...
KERNEL_TEST_FILES = ("test_kernel_assign_centroids.py", "test_kernel_consensus_cross_entropy.py",
                     "test_kernel_crdomix_blend.py", "test_kernel_class_feature_sums.py")
# bench shapes: the training shapes first (DeepLabV2 features and logits of the paper crops)
BENCH_SHAPES = {
    "assign_centroids": [(2, 256, 65, 129), (2, 2048, 65, 129)],
    "consensus_cross_entropy": [(3, 19, 512, 896)],
    "crdomix_blend": [(3, 3, 512, 896)],
    "class_feature_sums": [(2, 256, 65, 129), (2, 2048, 65, 129)],
}
TRAIN_SETUPS = ["torch-fp32", "kernels-fp32", "kernels-bf16-cl", "kernels-bf16-cl-compile", "compile-fp32",
                "torch-bf16-cl", "compile-bf16-cl"]
DAFORMER_SETUPS = ["torch-fp32", "kernels-bf16-cl"]
ONNX_IMPLS = ["torch-eager-fp32", "torch-eager-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp32-iobinding",
              "ort-cuda-fp16-iobinding"]


class StageSkipped(Exception):
    pass


class StageFailed(Exception):
    pass


def missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def versions() -> dict:
    """What this machine runs: interpreter, packages, device; and the import names no folder of this
    repository may answer to."""
    import torch

    import diga_fast

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "diga_fast": str(Path(diga_fast.__file__).resolve().parent)}
    for module in ("triton", "onnx", "onnxruntime", "onnxscript", "transformers", "pytest", "xdist", "numpy"):
        spec = importlib.util.find_spec(module)
        if spec is None:
            info[module] = "missing"
            continue
        try:
            info[module] = getattr(__import__(module), "__version__", "present")
        except Exception as err:  # noqa: BLE001 - a broken install is reported, not fatal
            info[module] = f"broken: {type(err).__name__}: {err}"
    if info["onnxruntime"] not in ("missing",) and not info["onnxruntime"].startswith("broken"):
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    else:
        info["device"] = "no CUDA device"
    shadowed = {}
    for name in ("kernels", "cli", "benchmarks", "tests"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(REPO / name):
            shadowed[name] = spec.origin
    info["shadowed_by_this_repository"] = shadowed
    return info


def left(deadline: float) -> float:
    return deadline - time.time()


# ----------------------------------------------------------------------------- stages
def stage_kernels(out: Path, deadline: float, dry_run: bool) -> list[str]:
    import torch

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpreted or dry_run):
        raise StageSkipped("no CUDA device (TRITON_INTERPRET=1 runs the kernel tests through the interpreter)")
    files = [str(REPO / "tests" / name) for name in KERNEL_TEST_FILES]
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
            "-p", "diga_fast.benchmarks.pytest_rows"]
    env = dict(os.environ, DIGA_TEST_ROWS=str(out / "tests.jsonl"))
    if torch.cuda.is_available():
        env["DIGA_KERNEL_TESTS"] = "full"
    collected = subprocess.run([*base, "--collect-only", *files], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=max(30.0, left(deadline)))
    planned = [line for line in collected.stdout.splitlines() if "::" in line]
    if collected.returncode != 0 or not planned:
        print(collected.stdout[-6000:] + collected.stderr[-3000:])
        raise StageFailed(f"collecting the kernel tests failed (exit code {collected.returncode})")
    per_file = {Path(f).name: sum(line.startswith(f"tests/{Path(f).name}::") for line in planned) for f in files}
    mode = "full size, every config" if env.get("DIGA_KERNEL_TESTS") == "full" else (
        "interpreted, test sizes" if interpreted else "test sizes")
    print(f"{len(planned)} kernel tests ({mode}): " + ", ".join(f"{k} {v}" for k, v in per_file.items()))
    if dry_run:
        print("dry run: on a GPU each file's test_every_config runs at the training shapes for every autotune config")
        return []
    workers = []
    if not missing(["xdist"]) and torch.cuda.is_available():
        workers = ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2))), "--dist", "load"]
    cmd = [*base, *workers, "--durations=5", *files]
    print("$", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(10.0, left(deadline)))
    except subprocess.TimeoutExpired as err:
        text = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(text[-6000:])
        ran = _count_rows(out / "tests.jsonl")
        return [f"killed at its deadline after {ran} of {len(planned)} tests (tests.jsonl has each)"]
    print((proc.stdout + proc.stderr)[-8000:])
    if proc.returncode != 0:
        raise StageFailed(f"pytest exit code {proc.returncode} (failures in tests.jsonl)")
    return []


def _count_rows(path: Path) -> int:
    try:
        return sum(1 for _ in path.open())
    except OSError:
        return 0


def stage_bench(out: Path, deadline: float, dry_run: bool) -> list[str]:
    import torch
    from diga_fast.benchmarks import kernels

    if dry_run:
        tiny = {op: [(1, 19 if op == "consensus_cross_entropy" else 8, 5, 7)] for op in kernels.OPS}
        tiny["crdomix_blend"] = [(1, 3, 5, 7)]
        import torch._inductor  # noqa: F401 - the compiled references' backend is importable
        rows = kernels.run(csv_path=out / "kernels.csv", dtypes=["fp32", "bf16"], shapes=tiny, budget_s=0.0,
                           impls=["torch", "loop"], print_table=False)
        print(f"dry run: {len(rows)} rows at toy sizes; on a GPU: {BENCH_SHAPES}, fp32, bf16, fp16, "
              f"impls {kernels.IMPL_ORDER}")
        return []
    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")
    skipped = []
    for dtype in ("fp32", "bf16", "fp16"):  # the bench itself starts no case past the deadline
        rows = kernels.run(csv_path=out / "kernels.csv", dtypes=[dtype], shapes=BENCH_SHAPES, deadline=deadline,
                           print_table=True)
        done = {(r["op"], r["shape"].split()[0]) for r in rows}
        skipped += [f"{op} {'x'.join(map(str, shape))} {dtype}" for op, shapes in BENCH_SHAPES.items()
                    for shape in shapes if (op, "x".join(map(str, shape))) not in done]
    print_tuned_configs()
    return skipped


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


def _plan_training(preset: str, setups: list[str]) -> None:
    """Every setup's recipe resolved and checked, then one real step of the first on this machine at a
    toy crop (the network, the data, pseudo-labels, centroids, the loop): what the stage will run."""
    from diga_fast.benchmarks import train

    for setup in setups:
        recipe = train._recipe(preset, 10, list(train.SETUPS[setup]))
        print(f"dry run: {preset} {setup}: {recipe.model.arch}, crop {recipe.data.crop}, batch "
              f"{recipe.data.batch_size}+{recipe.data.batch_size}, kernels={recipe.train.kernels}, "
              f"bf16={recipe.train.bf16}, compile={recipe.train.compile}")
    rows = train.run(preset=preset, steps=1, warmup=0, setups=setups[:1], csv_path=None,
                     overrides=("data.crop=[64, 64]", "data.num_workers=0"))
    print(f"dry run: one {preset} {setups[0]} step at 64x64 took {rows[0]['total_ms']:.0f} ms here")


def stage_train(out: Path, deadline: float, dry_run: bool) -> list[str]:
    import torch
    from diga_fast.benchmarks import train

    if dry_run:
        _plan_training("paper", TRAIN_SETUPS)
        return []
    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")
    rows = train.run(preset="paper", steps=6, warmup=3, setups=TRAIN_SETUPS, csv_path=out / "train.csv",
                     deadline=deadline)
    return [s for s in TRAIN_SETUPS if s not in {r["setup"] for r in rows}]


def stage_onnx(out: Path, deadline: float, dry_run: bool) -> list[str]:
    import onnxruntime
    import torch
    from diga_fast.benchmarks import infer

    providers = onnxruntime.get_available_providers()
    if dry_run:
        rows = infer.run(models=["small"], sizes=[(64, 96)], repeats=1, warmup=0, impls=["torch-eager-fp32", "ort-cpu-fp32"],
                         csv_path=out / "infer.csv", print_table=False, note="gpu_check dry run")
        print(f"dry run: exported and ran the small model in ONNX Runtime ({len(rows)} rows); providers {providers}; "
              f"on a GPU: deeplabv2_r101 and small at 512x1024, {ONNX_IMPLS}")
        return []
    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")
    if "CUDAExecutionProvider" not in providers:
        raise StageSkipped(f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers: "
                           f"{', '.join(providers)}); onnxruntime-gpu brings it")
    rows = infer.run(models=["deeplabv2_r101", "small"], sizes=[(512, 1024)], impls=ONNX_IMPLS, repeats=20,
                     csv_path=out / "infer.csv", note="gpu_check", deadline=deadline)
    done = {r["model"] for r in rows}
    return [m for m in ("deeplabv2_r101", "small") if m not in done]


def stage_daformer(out: Path, deadline: float, dry_run: bool) -> list[str]:
    import torch
    from diga_fast.benchmarks import infer, train

    if dry_run:
        _plan_training("paper-daformer", DAFORMER_SETUPS)
        print("dry run: inference rows of daformer_mitb5 at 512x1024 follow on a GPU")
        return []
    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA device")
    rows = train.run(preset="paper-daformer", steps=4, warmup=2, setups=DAFORMER_SETUPS,
                     csv_path=out / "train.csv", deadline=deadline)
    skipped = [f"train {s}" for s in DAFORMER_SETUPS if s not in {r["setup"] for r in rows}]
    impls = ["torch-eager-fp32", "torch-eager-bf16"]
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            impls += ["ort-cuda-fp32", "ort-cuda-fp16-iobinding"]
    except ImportError:
        pass
    if not infer.run(models=["daformer_mitb5"], sizes=[(512, 1024)], impls=impls, repeats=10,
                     csv_path=out / "infer.csv", note="gpu_check", deadline=deadline):
        skipped.append("daformer_mitb5 inference")
    return skipped


RUNNERS = {"kernels": stage_kernels, "bench": stage_bench, "train": stage_train, "onnx": stage_onnx,
           "daformer": stage_daformer}


def run_stage(name: str, out: Path, deadline: float, dry_run: bool) -> int:
    """In the stage's own process: run it and end with the STATUS line; the exit code says the same."""
    try:
        lacking = missing(NEEDS[name])
        if lacking:
            raise StageSkipped(f"missing {', '.join(lacking)}")
        skipped = RUNNERS[name](out, deadline, dry_run)
    except StageSkipped as why:
        print(f"{STATUS} skipped: {why}", flush=True)
        return 1
    except StageFailed as why:
        print(f"{STATUS} FAILED: {why}", flush=True)
        return 1
    except Exception as err:  # noqa: BLE001 - a crash is a failure of this stage, not of the others
        import traceback

        traceback.print_exc()
        print(f"{STATUS} FAILED: {type(err).__name__}: {err}", flush=True)
        return 1
    if skipped:
        print(f"{STATUS} partial: skipped for time: {'; '.join(skipped)}", flush=True)
        return 1
    print(f"{STATUS} ok", flush=True)
    return 0


# ----------------------------------------------------------------------------- driver
def stage_environment(cache: Path, interpret: bool) -> dict:
    """The stage processes' environment: the checkout importable, shared compile and autotune caches."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    env["TRITON_CACHE_AUTOTUNING"] = "1"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the log, the summary and the result files")
    parser.add_argument("--stage", action="append", choices=STAGES, help="stage to run (repeatable) [all, in order]")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for everything [%(default)s]")
    parser.add_argument("--dry-run", action="store_true", help="import and plan every stage (a CPU is enough)")
    parser.add_argument("--cache", default=None, help="compile and autotune caches [TMPDIR/diga-gpu-check-cache]")
    parser.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)  # the per-stage subprocess
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.run_stage:
        return run_stage(args.run_stage, out, args.deadline, args.dry_run)

    start = time.time()
    deadline = start + args.budget
    cache = Path(args.cache or Path(os.environ.get("TMPDIR", "/tmp")) / "diga-gpu-check-cache").resolve()
    import torch

    cuda = torch.cuda.is_available()
    # Dry runs and CPU-only kernel runs go through the interpreter; on a GPU the compiled kernels are checked.
    interpret = not cuda and (args.dry_run or os.environ.get("TRITON_INTERPRET") == "1")
    env = stage_environment(cache, interpret)
    log = (out / "gpu_check.log").open("a")

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "dry_run": args.dry_run,
               "interpreted": interpret, "environment": versions(), "stages": {}}

    def save_summary() -> None:
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out / "summary.json")

    say(f"gpu_check {summary['started']}: {json.dumps(summary['environment'])}")
    shadowed = summary["environment"]["shadowed_by_this_repository"]
    save_summary()
    stages = [s for s in STAGES if s in (args.stage or STAGES)]
    for i, name in enumerate(stages):
        remaining = stages[i:]
        share = left(deadline) * STAGE_WEIGHTS[name] / sum(STAGE_WEIGHTS[s] for s in remaining)
        say(f"\n=== {name} ({share:.0f} s of {left(deadline):.0f} s left) " + "=" * 50)
        began = time.time()
        if share < MIN_STAGE_S and not args.dry_run:
            status = "skipped: no time left"
        else:
            stage_deadline = began + share
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name, "--out", str(out),
                   "--deadline", str(stage_deadline), *(["--dry-run"] if args.dry_run else [])]
            status = _run_stage_process(cmd, env, timeout=max(share, 60.0 if args.dry_run else 0.0) + GRACE_S, say=say)
        summary["stages"][name] = {"status": status, "seconds": round(time.time() - began, 1)}
        save_summary()
        say(f"--- {name}: {status} [{time.time() - began:.0f} s]")
    if shadowed:
        summary["stages"]["layout"] = {"status": f"FAILED: repository folders answer to {sorted(shadowed)}"}
    summary["seconds"] = round(time.time() - start, 1)
    save_summary()
    say("\nsummary: " + ", ".join(f"{k} {v['status'].split(':')[0]}" for k, v in summary["stages"].items())
        + f" [{summary['seconds']:.0f} s]")
    log.close()
    return 0 if all(v["status"] == "ok" for v in summary["stages"].values()) else 1


def _run_stage_process(cmd: list[str], env: dict, timeout: float, say) -> str:
    """Run one stage process, its lines into the log as they come (a kill loses nothing already
    printed); its STATUS line, or why there was none. Killed ``timeout`` seconds after its start."""
    lines: queue.Queue = queue.Queue()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    status, stop = None, time.time() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, stop - time.time()))
        except queue.Empty:
            proc.kill()
            proc.wait()
            return f"FAILED: still running {timeout:.0f} s after its start (killed; its rows so far are kept)"
        if line is None:
            break
        if line.startswith(STATUS):
            status = line[len(STATUS):].strip()
        else:
            say("  " + line.rstrip("\n"))
    proc.wait()
    return status or f"FAILED: exit code {proc.returncode}, no status line"


if __name__ == "__main__":
    sys.exit(main())
