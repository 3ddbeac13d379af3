"""Compile report: every Triton kernel compiled for a GPU on this machine (no GPU needed) at the
bench shapes and dtypes, and what its machine code says about speed.

How: the public ops run on ``meta`` tensors with each ``@triton.jit`` kernel replaced by a recorder,
so the host code makes exactly the launches (grid, arguments, constexprs, warps, stages) it would
make on an H100/H200; each distinct launch is specialised the way Triton's launcher does it (ints
equal to 1 become constexprs, multiples of 16 and 16-byte-aligned pointers get divisibility hints)
and compiled with ``triton.compile`` for sm_90a and sm_80 (Triton's own ptxas). An autotuned kernel
gives one row per config. The interpreter must be off (``TRITON_INTERPRET`` unset) in this process:
the CLI re-runs itself in a subprocess when it is set.

Per kernel and target it reports: registers per thread, spills (local-memory STL/LDL instructions in
the SASS and the local bytes per thread), shared memory, programs per SM (the tightest of threads,
registers, shared memory and the 32-block limit) and which limit binds, the launch grid's programs
per SM of the card (132 SMs for sm_90a as on an H100 SXM / H200, 108 for sm_80; below 1 some idle), the widths of global loads /
stores and of ``cp.async`` copies (from the PTX), the tensor-core family (``mma.sync`` or ``wgmma``),
the requested pipeline stages and the deepest ``cp.async.wait_group``, ``bar.sync`` barriers
(in all, and inside loops), and the shared-memory buffers left unswizzled (from the TTGIR). Rows go
to ``./diga-bench/compile.csv`` (``--record``: the source tree's ``benchmarks/results/compile.csv``)
with the Triton version and the target.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import subprocess
import sys
import tempfile
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

DEFAULT_CSV = Path("diga-bench/compile.csv")  # ./diga-bench/ of the current directory; --record: results/
TARGETS = {"sm_90a": 90, "sm_80": 80}
CSV_COLUMNS = [
    "timestamp", "triton", "target", "op", "kernel", "case", "config", "num_warps", "num_stages",
    "registers", "spill_instructions", "local_bytes", "shared_bytes", "programs_per_sm", "limited_by",
    "grid_programs", "grid_per_sm",
    "ld_global", "st_global", "cp_async", "tensor_cores", "wait_group_depth", "bar_sync", "bar_sync_in_loops",
    "unswizzled_smem",
]
# Per-SM limits: registers, threads, resident blocks, shared memory (bytes; 1 KB reserved per block).
SM_LIMITS = {90: (65536, 2048, 32, 228 * 1024), 80: (65536, 2048, 32, 164 * 1024)}
SM_COUNT = {90: 132, 80: 108}  # H100 SXM / H200, A100: what the launch grid is measured against
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Launch:
    """One recorded kernel launch: what the compiler needs and a label for the report."""

    op: str
    case: str
    kernel: object  # the JITFunction
    args: dict
    options: dict
    config: str = ""
    grid_programs: int = 0
    key: tuple = field(default=())


# ----------------------------------------------------------------------------- recording launches
class _Recorder:
    """Stands in for a ``@triton.jit`` (or ``triton.autotune``) kernel: ``kernel[grid](...)`` records."""

    def __init__(self, kernel, sink: list, context: dict):
        self.kernel = kernel
        self.sink = sink
        self.context = context

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._record(grid, args, kwargs)

    def _record(self, grid, args, kwargs):
        import triton

        configs = [None]
        fn = self.kernel
        tuner = fn if isinstance(fn, triton.runtime.Autotuner) else None
        if tuner is not None:
            fn = tuner.fn
        named = dict(zip(fn.arg_names, args))
        launch_opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        named.update(kwargs)
        if tuner is not None:  # the configs the autotuner would time for these arguments
            configs = list(tuner.configs)
            if len(configs) > 1 and tuner.early_config_prune:
                configs = list(tuner.early_config_prune(configs, named))
        for cfg in configs:
            values, opts, label = dict(named), {"num_warps": 4, "num_stages": 3, **launch_opts}, ""
            if cfg is not None:
                values.update(cfg.kwargs)
                opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                label = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            label = (label + f" w{opts['num_warps']} s{opts['num_stages']}").strip()
            dims = grid(values) if callable(grid) else grid
            programs = 1
            for d in dims:
                programs *= int(d)
            self.sink.append(Launch(self.context["op"], self.context["case"], fn, values, opts, label, programs))


def _kernel_modules():
    import importlib

    names = ("assign_centroids", "consensus_cross_entropy", "crdomix_blend", "class_feature_sums")
    return [importlib.import_module(f"diga_fast.kernels.{n}") for n in names]


@contextlib.contextmanager
def _recording(sink: list, context: dict, n_sm: int = 132):
    """Every kernel of every kernel module records instead of launching; the host code takes its GPU
    branches (not interpreting, an n_sm-SM device) whatever device the tensors are on."""
    import torch
    import triton

    patches = [mock.patch.object(torch.cuda, "get_device_properties",
                                 lambda *a, **k: types.SimpleNamespace(multi_processor_count=n_sm))]
    for mod in _kernel_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)) and name.startswith("_"):
                patches.append(mock.patch.object(mod, name, _Recorder(obj, sink, context)))
        if hasattr(mod, "interpreting"):
            patches.append(mock.patch.object(mod, "interpreting", lambda: False))
        patches.append(mock.patch.object(mod, "resolve_backend", lambda backend, tensor: "triton"))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def record_launches(shapes: dict | None = None, dtypes=("fp32", "fp16", "bf16")) -> list[Launch]:
    """The launches the four ops make at the bench shapes (``benchmarks.kernels.FULL_SHAPES``)."""
    import torch
    from diga_fast.benchmarks.kernels import FULL_SHAPES, NUM_CLASSES

    from diga_fast import kernels as K

    shapes = shapes or FULL_SHAPES
    meta = "meta"
    sink: list[Launch] = []
    context = {"op": "", "case": ""}
    with _recording(sink, context):
        for op, op_shapes in shapes.items():
            for B, C, H, W in op_shapes:
                for name in dtypes:
                    dtype = getattr(torch, DTYPE_NAMES[name])
                    context.update(op=op, case=f"{B}x{C}x{H}x{W} {name}")
                    if op == "assign_centroids":
                        f = torch.empty(B, C, H, W, dtype=dtype, device=meta)
                        c = torch.empty(NUM_CLASSES, C, dtype=torch.float32, device=meta)
                        for metric in ("cosine", "l2"):
                            context["case"] = f"{B}x{C}x{H}x{W} {name} {metric}"
                            K.assign_centroids(f, c, metric, backend="triton")
                    elif op == "consensus_cross_entropy":
                        x = torch.empty(B, C, H, W, dtype=dtype, device=meta, requires_grad=True)
                        lab = torch.empty(B, H, W, dtype=torch.int64, device=meta)
                        loss = K.consensus_cross_entropy(x, lab, lab, backend="triton")
                        torch.autograd.grad(loss, x)
                    elif op == "crdomix_blend":
                        s = torch.empty(B, C, H, W, dtype=dtype, device=meta)
                        sel = torch.empty(B, 256, dtype=torch.bool, device=meta)
                        for label_dtype in (torch.int64, torch.uint8):
                            context["case"] = f"{B}x{C}x{H}x{W} {name} {str(label_dtype)[6:]} labels"
                            lab = torch.empty(B, H, W, dtype=label_dtype, device=meta)
                            K.crdomix_blend(s, s, lab, sel, backend="triton")
                    elif op == "class_feature_sums":
                        f = torch.empty(B, C, H, W, dtype=dtype, device=meta)
                        lab = torch.empty(B, H, W, dtype=torch.int64, device=meta)
                        K.class_feature_sums(f, lab, NUM_CLASSES, backend="triton")
    return sink


# ----------------------------------------------------------------------------- specialisation
_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}


def specialise(launch: Launch):
    """(signature, constexprs, attrs) as Triton's launcher would build them for these arguments."""
    import torch

    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = launch.args[name]
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not fn.params[i].do_not_specialize:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not fn.params[i].do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {name}={value!r}")
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------- reading the code
def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _widths(ptx: str, op: str) -> str:
    """Histogram of access widths (bytes) of ``ld.global`` / ``st.global`` lines, e.g. '16Bx4 4Bx2'."""
    counts: Counter = Counter()
    for m in re.finditer(rf"\b{op}(?:\.[A-Za-z0-9_:]+)*", ptx):  # e.g. ld.global.L1::evict_first.v4.b32
        parts = m.group(0).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bufs]\d+", p)), 0)
        counts[vec * bits // 8] += 1
    return " ".join(f"{w}Bx{n}" for w, n in sorted(counts.items(), reverse=True)) or "-"


def _cp_async(ptx: str) -> str:
    # cp.async.cg.shared.global [dst], [src], 16, src_bytes;  (the copy size: decimal or 0x hex)
    sizes = re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    counts = Counter(int(size, 0) for size in sizes)
    text = " ".join(f"{w}Bx{n}" for w, n in sorted(counts.items(), reverse=True))
    if "cp.async.bulk" in ptx:
        text = (text + " tma").strip()
    return text or "-"


def _barriers(ptx: str) -> tuple[int, int]:
    """bar.sync count in all and inside loops (between a label and a later branch back to it)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    in_loop = [False] * len(lines)
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), len(lines)) < i:
            for j in range(labels[m.group(1)], i + 1):
                in_loop[j] = True
    bars = [i for i, line in enumerate(lines) if re.search(r"\b(bar|barrier)\.sync\b", line)]
    return len(bars), sum(in_loop[i] for i in bars)


def _unswizzled_buffers(ttgir: str) -> int:
    """2-D shared-memory buffers (``ttg.local_alloc``) left unswizzled (vec 1, one phase): the layout
    Triton falls back to when a pipelined tile has users besides the dot, so the MMA's operand loads
    hit bank conflicts. (1-D buffers, e.g. pipelined labels, feed no MMA and are not counted.)"""
    plain = {m.group(1) for m in re.finditer(
        r"^(#shared\d*) = #ttg\.swizzled_shared<\{vec = 1, perPhase = 1, maxPhase = 1, order = \[\d+, \d+\]",
        ttgir, re.MULTILINE)}
    allocs = re.findall(r"ttg\.local_alloc\b[^\n]*?memdesc<[^>]*?, (#shared\d*)\b", ttgir)
    return sum(name in plain for name in allocs)


def _resources(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", str(path)], capture_output=True, text=True).stdout
    get = lambda key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", res)) else 0
    spills = len(re.findall(r"\b(STL|LDL)(?:\.\w+)*\s", sass))
    return {"registers": get("REG"), "local_bytes": get("LOCAL"), "spill_instructions": spills}


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(programs per SM, the binding limit) for a program of num_warps warps."""
    regs_sm, threads_sm, blocks_sm, smem_sm = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {
        "threads": threads_sm // (32 * num_warps),
        "registers": (regs_sm // regs_per_warp) // num_warps,
        "shared": smem_sm // (shared + 1024) if shared else blocks_sm,
        "blocks": blocks_sm,
    }
    binding = min(limits, key=limits.get)
    return limits[binding], binding


def compile_launch(launch: Launch, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialise(launch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    ptx = compiled.asm["ptx"]
    res = _resources(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared)
    programs, binding = occupancy(arch, res["registers"], shared, launch.options["num_warps"])
    mma = [name for name, pat in (("wgmma", r"\bwgmma\.mma_async"), ("mma.sync", r"\bmma\.sync")) if re.search(pat, ptx)]
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    bars, bars_in_loops = _barriers(ptx)
    return {
        **res, "shared_bytes": shared, "programs_per_sm": programs, "limited_by": binding,
        "ld_global": _widths(ptx, "ld.global"), "st_global": _widths(ptx, "st.global"), "cp_async": _cp_async(ptx),
        "tensor_cores": "+".join(mma) or "-", "wait_group_depth": max(waits) + 1 if waits else 0,
        "bar_sync": bars, "bar_sync_in_loops": bars_in_loops,
        "unswizzled_smem": _unswizzled_buffers(compiled.asm.get("ttgir", "")),
    }


# ----------------------------------------------------------------------------- entry point
def run(
    csv_path: str | os.PathLike | None = DEFAULT_CSV,
    targets: list[str] | None = None,
    ops: list[str] | None = None,
    dtypes: list[str] | None = None,
    shapes: dict | None = None,
    print_table: bool = True,
) -> list[dict]:
    """Compile every distinct launch for each target; return (and append to ``csv_path``) the rows."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (kernels are interpreted otherwise)")
    import triton
    from diga_fast.benchmarks.results_csv import append_rows

    targets = list(targets or TARGETS)
    launches = record_launches(shapes, tuple(dtypes or ("fp32", "fp16", "bf16")))
    if ops:
        launches = [launch for launch in launches if launch.op in ops]
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows, done = [], {}
    for target in targets:
        arch = TARGETS[target]
        for launch in launches:
            signature, constexprs, attrs = specialise(launch)
            key = (launch.kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
                   repr(sorted(attrs)), repr(sorted(launch.options.items())), arch)
            if key not in done:
                done[key] = compile_launch(launch, arch)
                rows.append({
                    "timestamp": stamp, "triton": triton.__version__, "target": target, "op": launch.op,
                    "kernel": launch.kernel.__name__.strip("_").removesuffix("_kernel"), "case": launch.case,
                    "config": launch.config, "num_warps": launch.options["num_warps"],
                    "num_stages": launch.options["num_stages"], **done[key], "grid_programs": launch.grid_programs,
                    "grid_per_sm": round(launch.grid_programs / SM_COUNT[arch], 2),
                })
    if print_table:
        _print_table(rows)
    if csv_path is not None and rows:
        append_rows(rows, Path(csv_path), CSV_COLUMNS)
        print(f"{len(rows)} rows appended to {csv_path}")
    return rows


def _print_table(rows: list[dict]) -> None:
    cols = [("target", 6), ("kernel", 26), ("case", 30), ("config", 22), ("registers", 4), ("spill_instructions", 5),
            ("shared_bytes", 6), ("programs_per_sm", 4), ("limited_by", 9), ("grid_per_sm", 6), ("ld_global", 16),
            ("st_global", 12),
            ("cp_async", 10), ("tensor_cores", 8), ("wait_group_depth", 3), ("bar_sync", 4), ("bar_sync_in_loops", 4),
            ("unswizzled_smem", 4)]
    heads = {"registers": "regs", "spill_instructions": "spill", "shared_bytes": "smem", "programs_per_sm": "prg",
             "limited_by": "limit", "grid_per_sm": "grid/SM", "tensor_cores": "mma", "wait_group_depth": "wg", "bar_sync": "bar",
             "bar_sync_in_loops": "loop", "unswizzled_smem": "unsw"}
    print(" ".join(heads.get(c, c).ljust(w)[:max(w, len(heads.get(c, c)))] for c, w in cols))
    for r in rows:
        print(" ".join(str(r[c]).ljust(w) for c, w in cols))


def run_in_subprocess(args: list[str]) -> int:
    """Run this module's CLI in a fresh interpreter with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "diga_fast.benchmarks.compile_report", *args], env=env)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", default=None, help=f"CSV to append rows to ('' for none) [default: ./{DEFAULT_CSV}]")
    parser.add_argument("--record", action="store_true", help="append to the source tree's benchmarks/results/compile.csv")
    parser.add_argument("--target", action="append", choices=list(TARGETS))
    parser.add_argument("--op", action="append")
    parser.add_argument("--dtype", action="append", choices=list(DTYPE_NAMES))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return run_in_subprocess(list(argv if argv is not None else sys.argv[1:]))
    from diga_fast.benchmarks.results_csv import recorded_csv

    if args.record and args.csv is not None:
        parser.error("give --csv or --record, not both")
    csv_path = recorded_csv("compile") if args.record else (DEFAULT_CSV if args.csv is None else args.csv or None)
    run(csv_path=csv_path, targets=args.target, ops=args.op, dtypes=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
