"""The compile report: every kernel compiled for sm_90a by Triton's own compiler on this CPU (no GPU),
in a subprocess without TRITON_INTERPRET; no kernel may spill at the bench shapes."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from diga_fast.benchmarks import compile_report
from diga_fast.cli.bench import bench

REPO = Path(__file__).resolve().parents[1]


def _ptxas_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return None if ptxas.exists() else f"triton ships no ptxas here ({ptxas})"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    if why := _ptxas_missing():
        pytest.skip(f"cannot compile for CUDA on this machine: {why}")
    out = tmp_path_factory.mktemp("compile") / "compile.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "diga_fast.benchmarks.compile_report", "--csv", str(out), "--target", "sm_90a"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with out.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_kernel_compiles_without_spills(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"assign_centroids", "prepare_centroids", "consensus_ce_target", "consensus_ce_fwd", "scale",
            "crdomix_blend", "class_feature_sums_partial", "class_feature_sums_reduce"} <= kernels
    for r in rows:
        assert set(compile_report.CSV_COLUMNS) <= set(r)
        assert r["target"] == "sm_90a" and r["triton"]
        assert int(r["registers"]) > 0
        assert int(r["spill_instructions"]) == 0 and int(r["local_bytes"]) == 0, r
        assert int(r["programs_per_sm"]) >= 2, r  # the target until a GPU measures


TRAINING_SHAPES = ("2x256x65x129", "2x2048x65x129")  # DeepLabV2's feature maps of 512x1024 inputs


@pytest.mark.slow
def test_what_the_tuning_bought(rows):
    """Regressions the compile report catches: the online-softmax consensus kernel reduces across
    threads only for the per-program loss sum (none in the class loops) and its backward not at all;
    every assign_centroids case has a tuned variant whose feature tile is swizzled for the MMA; at the
    training shapes every assign_centroids and class_feature_sums config launches two or more programs
    per SM of an H100/H200."""
    for r in rows:
        if r["kernel"] == "scale":
            assert int(r["bar_sync"]) == 0, r
        if r["kernel"] == "consensus_ce_fwd":
            assert int(r["bar_sync_in_loops"]) == 0 and int(r["bar_sync"]) <= 8, r
        if r["kernel"] in ("assign_centroids", "class_feature_sums_partial") and r["case"].startswith(TRAINING_SHAPES):
            assert float(r["grid_per_sm"]) >= 2, r
    assign = [r for r in rows if r["kernel"] == "assign_centroids"]
    assert "2x256x65x129" in {r["case"].split()[0] for r in assign}  # (2x2048: the same launch, one row)
    for case in {r["case"] for r in assign}:
        assert any(r["unswizzled_smem"] == "0" for r in assign if r["case"] == case), case


def test_occupancy_model():
    # 255 registers x 256 threads: one program; 64 x 128: eight (the register file), 32 x 128: 16 (threads)
    assert compile_report.occupancy(90, 255, 0, 8) == (1, "registers")
    assert compile_report.occupancy(90, 64, 0, 4)[0] == 8
    assert compile_report.occupancy(90, 32, 0, 4) == (16, "threads")
    assert compile_report.occupancy(80, 32, 100 * 1024, 4) == (1, "shared")


def test_ptx_parsing():
    ptx = """
$L__BB0_1:
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [ %rd2 + 0 ];
    ld.global.L1::evict_first.v2.b32 { %r9, %r10 }, [ %rd5 + 0 ];
    cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;
    bar.sync 0;
    @%p2 bra $L__BB0_1;
    st.global.v2.b32 [ %rd4 + 0 ], { %r7, %r8 };
    bar.sync 0;
"""
    assert compile_report._widths(ptx, "ld.global") == "16Bx1 8Bx1 2Bx1"
    assert compile_report._widths(ptx, "st.global") == "8Bx1"
    assert compile_report._cp_async(ptx) == "16Bx1"
    assert compile_report._barriers(ptx) == (2, 1)


def test_cli_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(compile_report, "main", lambda argv: calls.append(argv) or 0)
    result = CliRunner().invoke(bench, ["compile", "--csv", "x.csv", "--target", "sm_80", "--op", "crdomix_blend"])
    assert result.exit_code == 0, result.output
    assert calls == [["--csv", "x.csv", "--target=sm_80", "--op=crdomix_blend"]]


def test_unswizzled_buffers_counted_from_the_ttgir():
    ttgir = """#shared = #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, order = [1, 0]}>
#shared1 = #ttg.swizzled_shared<{vec = 4, perPhase = 2, maxPhase = 4, order = [1, 0]}>
    %f = ttg.local_alloc : () -> !ttg.memdesc<3x16x128xf32, #shared, #smem, mutable> loc(#loc1)
    %c = ttg.local_alloc : () -> !ttg.memdesc<3x32x16xf32, #shared1, #smem, mutable> loc(#loc2)
"""
    assert compile_report._unswizzled_buffers(ttgir) == 1
    labels = """#shared = #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, order = [0]}>
    %l = ttg.local_alloc : () -> !ttg.memdesc<2x32xi64, #shared, #smem, mutable> loc(#loc1)
"""
    assert compile_report._unswizzled_buffers(labels) == 0  # 1-D: feeds no MMA
    assert compile_report._unswizzled_buffers(ttgir.replace("vec = 1,", "vec = 8,")) == 0


def test_results_csv_rewritten_when_the_columns_change(tmp_path):
    from diga_fast.benchmarks.results_csv import append_rows

    out = tmp_path / "r.csv"
    append_rows([{"a": 1, "b": 2}], out, ["a", "b"])
    append_rows([{"a": 3, "b": 4, "c": 5}], out, ["a", "b", "c"])
    with out.open() as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
