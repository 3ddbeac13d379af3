"""Appending bench rows to a results CSV (header written once, floats to 6 significant digits)."""

from __future__ import annotations

import csv
from pathlib import Path


def append_rows(rows: list[dict], csv_path: Path, columns: list[str]) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
