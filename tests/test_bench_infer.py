"""The inference bench runs on a CPU at a tiny size and appends well-formed CSV rows."""

import csv

import pytest
from click.testing import CliRunner
from diga_fast.benchmarks import infer
from diga_fast.cli.bench import INFER_IMPLS, bench


def test_run_appends_rows(tmp_path, capsys):
    out = tmp_path / "results" / "infer.csv"
    impls = ["torch-eager-fp32", "ort-cpu-fp32", "ort-cpu-fp32-basic", "ort-cuda-fp32-iobinding"]
    rows = infer.run(models=["small"], sizes=[(32, 48)], repeats=2, warmup=0, csv_path=out, impls=impls,
                     threads=1, note="test")
    expected = {"torch-eager-fp32", "ort-cpu-fp32", "ort-cpu-fp32-basic"}
    if infer.torch.cuda.is_available():
        expected.add("ort-cuda-fp32-iobinding")
    else:
        assert "CUDA rows" in capsys.readouterr().out  # skipped with a note, not an error
    assert {r["impl"] for r in rows} == expected
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    for row in written:
        assert list(row) == infer.CSV_COLUMNS
        assert 0 < float(row["ms_p50"]) <= float(row["ms_p90"]) and float(row["img_s"]) > 0
        assert row["device"] and row["torch"] and row["onnxruntime"] and row["size"] == "32x48"
        assert row["threads"] == "1" and row["note"] == "test" and row["model"] == "small"
    assert float(next(r for r in written if r["impl"] == "torch-eager-fp32")["speedup_vs_eager"]) == 1.0


def test_cli_infer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(infer, "run", lambda **kwargs: calls.append(kwargs) or [])
    result = CliRunner().invoke(bench, ["infer", "--model", "small", "--model", "deeplabv2_r101", "--sizes", "64x96,128x256",
                                        "--repeats", "2", "--impl", "ort-cpu-fp32", "--csv", str(tmp_path / "i.csv"),
                                        "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert calls == [{"models": ["small", "deeplabv2_r101"], "checkpoint": None, "sizes": [(64, 96), (128, 256)],
                      "repeats": 2, "csv_path": str(tmp_path / "i.csv"), "impls": ["ort-cpu-fp32"], "batch": 1,
                      "threads": 1, "note": ""}]
    assert set(INFER_IMPLS) == set(infer.IMPLS)


@pytest.mark.parametrize("argv", [["--sizes", "512"], ["--sizes", "8x8"], ["--impl", "tensorrt"],
                                  ["--model", "small", "--checkpoint", "x"]])
def test_cli_infer_rejects_bad_options(argv, monkeypatch):
    monkeypatch.setattr(infer, "run", lambda **kwargs: [])
    assert CliRunner().invoke(bench, ["infer", *argv]).exit_code != 0
