"""Where bench rows go, appending them to a results CSV (header written once, floats to 6 significant
digits), and the device name every row carries.

Every ``diga bench`` command writes to ``./diga-bench/<name>.csv`` under the current directory unless
told otherwise (``--csv PATH``); only ``--record`` appends to the tracked
``benchmarks/results/<name>.csv`` of the source tree, which is what maintainers do on purpose."""

from __future__ import annotations

import csv
import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_csv(name: str) -> Path:
    """``./diga-bench/<name>.csv``, relative to the current directory when the rows are written."""
    return Path("diga-bench") / f"{name}.csv"


def recorded_csv(name: str) -> Path:
    """``benchmarks/results/<name>.csv`` of the source tree this module was loaded from; refused (a
    ValueError) when the package is installed rather than run from a checkout."""
    if not (RESULTS_DIR.parent.parent / "pyproject.toml").is_file():
        raise ValueError(
            f"--record appends to the source tree's benchmarks/results/, but diga_fast.benchmarks was loaded "
            f"from {RESULTS_DIR.parent}, not from a checkout; give --csv PATH instead"
        )
    return RESULTS_DIR / f"{name}.csv"


def append_rows(rows: list[dict], csv_path: Path, columns: list[str]) -> None:
    """Append ``rows`` below the file's header; a file written with other columns (an older version
    of the bench) is first rewritten with ``columns``, its rows keeping the values they have."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    if not new:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != columns:
                old_rows = list(reader)
                with csv_path.open("w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows({k: v for k, v in r.items() if k is not None} for r in old_rows)
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def device_name(device) -> str:
    """A CUDA device's name; for a CPU, what makes its timings comparable: the model name, family and
    model numbers, the vector extensions (AVX2, AVX-512, VNNI, BF16, AMX) and the CPUs this process may
    use (e.g. 'cpu AMD EPYC (family 25 model 17; avx2 avx512f avx512_vnni avx512_bf16), 2 cpus')."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = " ".join((info.get("model name") or "unknown model").split())
    flags = set(info.get("flags", "").split())
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags) or "no AVX2"
    numbers = f"family {info['cpu family']} model {info['model']}; " if "cpu family" in info and "model" in info else ""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu {model} ({numbers}{vector}), {cpus} cpus"
