"""The training bench runs the real self-training loop on a CPU at a tiny size and appends one
well-formed CSV row per setup; with the Triton interpreter, the kernel setup runs too."""

import csv
import math

import pytest

from cli_helpers import run
from diga_fast.benchmarks import train

SMALL = ("data.batch_size=2", "data.crop=[48, 96]", "data.num_workers=0")


def test_rows_per_setup_and_phases_add_up(tmp_path):
    out = tmp_path / "results" / "train.csv"
    rows = train.run(preset="demo", steps=2, warmup=1, setups=["torch-fp32", "kernels-bf16-cl"], csv_path=out,
                     device="cpu", overrides=SMALL)
    assert [r["setup"] for r in rows] == ["torch-fp32", "kernels-bf16-cl"]
    with out.open() as handle:
        written = list(csv.DictReader(handle))
    assert [r["setup"] for r in written] == ["torch-fp32", "kernels-bf16-cl"]
    for row in written:
        assert list(row) == train.COLUMNS
        phases = [float(row[f"{p}_ms"]) for p in train.PHASES]
        assert all(ms > 0 for ms in phases)
        assert math.isclose(sum(phases), float(row["total_ms"]), rel_tol=1e-4)
        assert row["steps"] == "2" and row["crop"] == "48x96" and row["batch"] == "2+2" and row["arch"] == "small"
    assert float(written[0]["speedup_vs_a"]) == 1.0


@pytest.mark.slow
def test_compiled_references_as_a_setup(tmp_path):
    """The ops' references through torch.compile (train.kernels=compile) train like the eager ones, and
    every row carries its speed-ups over (a), the eager and the compiled reference."""
    out = tmp_path / "train.csv"
    rows = train.run(preset="demo", steps=1, warmup=1, setups=["torch-fp32", "compile-fp32"], csv_path=out,
                     device="cpu", overrides=SMALL)
    eager, compiled = rows
    assert eager["speedup_vs_a"] == eager["speedup_vs_eager_ref"] == 1.0 and math.isnan(eager["speedup_vs_compiled_ref"])
    assert compiled["speedup_vs_compiled_ref"] == 1.0
    assert compiled["speedup_vs_eager_ref"] == compiled["speedup_vs_a"] == eager["total_ms"] / compiled["total_ms"]
    past = train.run(preset="demo", steps=1, warmup=0, setups=["torch-fp32"], csv_path=None, device="cpu",
                     overrides=SMALL, deadline=0.0)
    assert past == []


def test_cli_bench_train_bad_override(tmp_path, capsys):
    code, _, err = run(capsys, "bench", "train", "--steps", "1", "--csv", tmp_path / "t.csv", "train.kernels=maybe")
    assert code != 0 and "train.kernels" in err
