"""Where bench rows go, and appending them to a results CSV (header written once, floats to 6
significant digits).

Every ``diga bench`` command writes to ``./diga-bench/<name>.csv`` under the current directory unless
told otherwise (``--csv PATH``); only ``--record`` appends to the tracked
``benchmarks/results/<name>.csv`` of the source tree, which is what maintainers do on purpose."""

from __future__ import annotations

import csv
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
