"""The kernel bench runs on a CPU (PyTorch paths only) and appends well-formed CSV rows."""

import csv

import pytest
from click.testing import CliRunner

from diga_fast.benchmarks import kernels
from diga_fast.cli.bench import KERNEL_OPS, bench

TINY = {
    "assign_centroids": [(1, 8, 5, 7)],
    "consensus_cross_entropy": [(1, 19, 8, 9)],
    "crdomix_blend": [(2, 3, 6, 5)],
    "class_feature_sums": [(1, 8, 5, 7)],
}


def test_run_appends_rows(tmp_path):
    out = tmp_path / "results" / "kernels.csv"
    rows = kernels.run(quick=True, csv_path=out, plot_path=None, ops=None, dtypes=["fp32", "bf16"],
                       shapes=TINY, budget_s=0.0, impls=["torch", "loop"], print_table=False)
    assert {r["op"] for r in rows} == set(kernels.OPS) == set(KERNEL_OPS)
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    for row in written:
        assert set(kernels.CSV_COLUMNS) <= set(row)
        assert float(row["ms_p20"]) <= float(row["ms_p50"]) <= float(row["ms_p80"])
        assert float(row["gbps"]) > 0 and row["device"] and row["torch"]
    torch_rows = [r for r in written if r["impl"] == "torch"]
    assert torch_rows and all(float(r["speedup_vs_torch"]) == 1.0 for r in torch_rows)
    # A second run appends below the same header and draws the plot (matplotlib is in the test extra).
    plot = tmp_path / "kernels.png"
    more = kernels.run(quick=True, csv_path=out, plot_path=plot, ops=["crdomix_blend"], shapes=TINY,
                       budget_s=0.0, impls=["torch", "loop"], print_table=False)
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows) + len(more)
    assert plot.stat().st_size > 0


def test_cli_kernels(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "run", lambda **kwargs: calls.append(kwargs) or [])
    result = CliRunner().invoke(bench, ["kernels", "--quick", "--csv", str(tmp_path / "k.csv"),
                                        "--op", "crdomix_blend", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert calls == [{"quick": True, "csv_path": str(tmp_path / "k.csv"), "plot_path": None,
                      "ops": ["crdomix_blend"], "dtypes": ["bf16"], "impls": None}]
    assert CliRunner().invoke(bench, ["kernels", "--dtype", "fp8"]).exit_code != 0


@pytest.mark.slow
def test_compiled_reference_rows_beside_the_eager_ones(tmp_path):
    """Each case times torch.compile of the reference too; both speed-ups are in every row, and a case's
    rows are in the CSV the moment the case is measured."""
    out = tmp_path / "kernels.csv"
    written = []
    real = kernels.append_rows

    def append_and_count(rows, path, columns):
        written.append(len(rows))
        real(rows, path, columns)

    kernels.append_rows, saved = append_and_count, kernels.append_rows
    try:
        rows = kernels.run(csv_path=out, ops=["crdomix_blend"], dtypes=["bf16"], shapes=TINY, budget_s=0.0,
                           impls=["torch", "compile"], print_table=False)
    finally:
        kernels.append_rows = saved
    assert [r["impl"] for r in rows] == ["torch", "compile"] * 2  # int64 and uint8 labels
    assert written == [2, 2]
    for r in rows:
        assert r["speedup_vs_torch"] > 0 and r["speedup_vs_compile"] > 0
    assert all(r["speedup_vs_compile"] == 1.0 for r in rows if r["impl"] == "compile")
    past = kernels.run(csv_path=None, ops=["crdomix_blend"], shapes=TINY, budget_s=0.0, impls=["torch"],
                       deadline=0.0, print_table=False)
    assert past == []


def _fake_runs(monkeypatch):
    """Every bench command's runner replaced by one that records the CSV path it was given."""
    from diga_fast.benchmarks import compile_report, infer, train

    paths = {}
    monkeypatch.setattr(kernels, "run", lambda **kw: paths.setdefault("kernels", kw["csv_path"]) and [])
    monkeypatch.setattr(infer, "run", lambda **kw: paths.setdefault("infer", kw["csv_path"]) and [])
    monkeypatch.setattr(train, "run", lambda **kw: paths.setdefault("train", kw["csv_path"]) and [])
    monkeypatch.setattr(compile_report, "main",
                        lambda argv: paths.setdefault("compile", argv[argv.index("--csv") + 1]) and 0)
    return paths


BENCH_COMMANDS = {"kernels": ["--quick"], "infer": [], "train": [], "compile": []}


def test_bench_commands_write_under_the_current_directory_by_default(tmp_path, monkeypatch):
    """No bench command appends to the tracked benchmarks/results/*.csv unless told to (--record)."""
    paths = _fake_runs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for name, argv in BENCH_COMMANDS.items():
        result = CliRunner().invoke(bench, [name, *argv])
        assert result.exit_code == 0, result.output
    assert paths == {name: f"diga-bench/{name}.csv" for name in BENCH_COMMANDS}


def test_bench_record_appends_to_the_source_tree(tmp_path, monkeypatch):
    from diga_fast.benchmarks.results_csv import RESULTS_DIR

    paths = _fake_runs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for name, argv in BENCH_COMMANDS.items():
        result = CliRunner().invoke(bench, [name, *argv, "--record"])
        assert result.exit_code == 0, result.output
        both = CliRunner().invoke(bench, [name, *argv, "--record", "--csv", "x.csv"])
        assert both.exit_code != 0 and "not both" in both.output
    assert paths == {name: str(RESULTS_DIR / f"{name}.csv") for name in BENCH_COMMANDS}
    assert RESULTS_DIR.name == "results" and (RESULTS_DIR.parent / "kernels.py").is_file()


def test_record_refused_outside_a_checkout(tmp_path, monkeypatch):
    from diga_fast.benchmarks import results_csv

    _fake_runs(monkeypatch)
    monkeypatch.setattr(results_csv, "RESULTS_DIR", tmp_path / "site-packages" / "benchmarks" / "results")
    result = CliRunner().invoke(bench, ["kernels", "--quick", "--record"])
    assert result.exit_code != 0 and "--csv" in result.output
