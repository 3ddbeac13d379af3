"""benchmarks/gpu_check.py as the first GPU machine will run it: from a bare checkout (no install of the
project) with only a preinstalled package set. Here that machine is imitated by a new virtual
environment that holds just those packages (linked from this one) and a copy of the source tree."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the lent GPU machines have preinstalled, as far as the project touches it
PREINSTALLED = ("torch", "triton", "onnx", "onnxruntime", "onnxscript", "numpy", "click", "rich", "safetensors",
                "pyyaml", "pillow", "pytest", "pytest-xdist", "matplotlib", "transformers")


def _closure(names) -> set:
    """The distributions ``names`` need, recursively (requirements without an extra marker)."""
    seen, todo = set(), [re.sub(r"[-_.]+", "-", n).lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", req).group(0)).lower())
    return seen


def _preinstalled_venv(root: Path) -> Path:
    """A venv whose site-packages links exactly the PREINSTALLED closure from this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = next(root.glob("lib/python*/site-packages"))
    for name in _closure(PREINSTALLED):
        dist = importlib.metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists() and not top.endswith(".pth"):
                (site / top).symlink_to(source)
    assert not list(site.glob("diga_fast*")) and not list(site.glob("__editable__*"))
    return root / "bin" / "python"


def _bare_checkout(root: Path) -> Path:
    """The source tree without .git, virtual environments or build and run outputs (.gitignore's
    entries): what a checkout on a fresh machine holds."""
    ignored = [line.strip().strip("/") for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    shutil.copytree(REPO, root, symlinks=True, ignore=shutil.ignore_patterns(".git", "venv", *ignored))
    return root


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_machine")
    return _preinstalled_venv(base / "venv"), _bare_checkout(base / "checkout")


def _run(python: Path, checkout: Path, out: Path, *args, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    proc = subprocess.run([str(python), "benchmarks/gpu_check.py", "--out", str(out), "--cache", str(out.parent / "cache"),
                           *args], cwd=checkout, env={**clean, **env}, capture_output=True, text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary


@pytest.mark.slow
def test_dry_run_plans_every_stage_on_the_preinstalled_set(machine, tmp_path):
    python, checkout = machine
    proc, summary = _run(python, checkout, tmp_path / "out", "--dry-run")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    env = summary["environment"]
    assert Path(env["diga_fast"]) == (checkout / "diga_fast").resolve()  # the checkout, not an install
    assert env["shadowed_by_this_repository"] == {}
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == {
        name: "ok" for name in ("kernels", "bench", "train", "onnx", "daformer")}
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert re.search(r"\d+ kernel tests \(interpreted", log)
    for preset in ("paper", "paper-daformer"):
        assert f"dry run: one {preset} torch-fp32 step at 64x64 took" in log
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device tool brings back


@pytest.mark.slow
def test_kernels_stage_through_the_interpreter_on_the_preinstalled_set(machine, tmp_path):
    python, checkout = machine
    proc, summary = _run(python, checkout, tmp_path / "out", "--stage", "kernels", TRITON_INTERPRET="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert summary["stages"]["kernels"]["status"] == "ok"
    rows = [json.loads(line) for line in (tmp_path / "out" / "tests.jsonl").read_text().splitlines()]
    files = {row["file"] for row in rows}
    assert files == {f"tests/{name}" for name in ("test_kernel_assign_centroids.py", "test_kernel_consensus_cross_entropy.py",
                                                  "test_kernel_crdomix_blend.py", "test_kernel_class_feature_sums.py")}
    assert rows and all(row["outcome"] in ("passed", "skipped") for row in rows)
    assert any("test_every_config" in row["test"] for row in rows)


def test_a_skipped_stage_makes_the_exit_status_non_zero(tmp_path):
    """Without CUDA a real (not dry) run of the bench stage is skipped, named, and the exit status is 1."""
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--stage", "bench",
                           "--cache", str(tmp_path / "cache")], cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=300)
    if "no CUDA device" not in proc.stdout:
        pytest.skip("a CUDA device is present")
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["bench"]["status"] == "skipped: no CUDA device"
