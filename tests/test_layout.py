"""The repository's folders never answer to another package's name, however the project is run: from the
repository root on ``sys.path`` (``python -m pytest``, ``python -c``, a notebook there), from an
install, or from a bare checkout."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = ("kernels", "cli", "benchmarks")  # installed as diga_fast.kernels, diga_fast.cli, diga_fast.benchmarks


def run_in_root(code: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` in the repository root, which Python puts first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_no_top_level_folder_but_diga_fast_is_a_package():
    packages = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert packages == ["diga_fast"], packages


def test_hugging_face_segformer_imports_with_the_repository_root_first_on_sys_path():
    pytest.importorskip("transformers")
    done = run_in_root(
        "import sys; assert sys.path[0] == '', sys.path[:2]\n"
        "from transformers import SegformerConfig, SegformerModel\n"
        "SegformerModel(SegformerConfig(hidden_sizes=[8, 8, 8, 8], num_attention_heads=[1, 1, 1, 1],"
        " depths=[1, 1, 1, 1], decoder_hidden_size=8))\n"
        "print('ok')"
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("name", [*MAPPED, "tests"])
def test_a_top_level_name_never_finds_this_repository(name):
    """An installed package of that name (transformers 5 brings PyPI's ``kernels``) is what ``import``
    finds; without one, at most an empty namespace package with no file of this repository."""
    done = run_in_root(
        "import importlib.util, json\n"
        f"spec = importlib.util.find_spec({name!r})\n"
        "print(json.dumps(None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]))"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = __import__("json").loads(done.stdout)
    if found is not None:
        origin, locations = found
        if origin is not None:  # a regular package or module: not one of ours (a venv in the root may hold it)
            assert not Path(origin).resolve().is_relative_to(REPO / name), origin
        else:  # a namespace package: it can hold our folder, but no module of it is ever run as `name`
            assert all(not (Path(p) / "__init__.py").is_file() for p in locations)


def test_the_mapped_packages_import_from_the_root_with_their_public_names():
    done = run_in_root(
        "from diga_fast.kernels import assign_centroids, consensus_cross_entropy\n"
        "import importlib, diga_fast.cli.main, diga_fast.benchmarks.kernels\n"
        "m = importlib.import_module('diga_fast.kernels.assign_centroids')\n"
        "assert callable(assign_centroids) and m.assign_centroids is assign_centroids\n"
        "print(m.__file__)"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).resolve() == REPO / "kernels" / "assign_centroids.py"


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.py", "benchmarks/ablation.py"])
def test_a_script_in_benchmarks_puts_the_root_first_on_sys_path(script):
    """Run as ``python benchmarks/X.py``, Python puts benchmarks/ first on sys.path, where kernels.py and
    train.py would answer to ``import kernels`` and ``import train``; the scripts put the root there."""
    folder = str(REPO / "benchmarks")
    done = run_in_root(
        f"import runpy, sys; sys.argv = [{script!r}, '--help']; sys.path[0] = {folder!r}\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code in (0, None), stop.code\n"
        "print(sys.path[0])"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(REPO)
