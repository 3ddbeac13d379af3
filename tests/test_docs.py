"""The commands of the docs, run as written: every fenced ``bash`` block of README.md and docs/*.md, in
order, on data from ``diga data synth --real-sizes`` (the real layouts at the real image sizes) and
ImageNet weights generated in the accepted formats. A runner may only substitute the paths (``/data/GTA5``
-> the synthetic GTA5 folder, ``resnet101.pth`` -> a generated file, ``runs/`` -> a temporary folder) and
append iteration, crop and size overrides. A block that only illustrates (multi-node lines, the install
commands that CI and the fresh-clone check run) is marked ``<!-- docs-test: skip (why) -->`` on the line
before it.

The blocks run under ``python -m pytest -m docs`` (minutes: the paper networks on a CPU), which CI runs
after the README's test command; the default suite checks that every block is one this runner can run.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Reading order: the README, the datasets page (whose `paper` path trains the translator and warm-up that
# later pages build on), then the other pages.
DOCS = [ROOT / "README.md", ROOT / "docs" / "datasets.md",
        *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "datasets.md")]
BLOCK = re.compile(r"(?P<skip><!-- docs-test: skip[^>]*-->\n)?```bash\n(?P<body>.*?)```", re.S)
SKIP_REASON = re.compile(r"<!-- docs-test: skip \((?P<why>[^)]+)\) -->")

# The docs' dataset roots and weight files -> what the runner generates (relative to its folder).
PATHS = {
    "/data/GTA5_translated": "GTA5_translated",
    "/data/GTA5": "data/gta5",
    "/data/SYNTHIA": "data/synthia",
    "/data/Cityscapes": "data/cityscapes",
    "/data/bdd100k": "data/bdd100k",
    "/data/mapillary": "data/mapillary",
    "/data/acdc": "data/acdc",
    "/data/darkzurich": "data/darkzurich",
}

# Appended to each command: one or two iterations on small crops of images resized small (read from
# files of the real sizes), evaluated and labelled at an eighth of their size.
SMALL = ("data.source_sizes=null", "data.target_sizes=null", "data.batch_size=2", "data.source_resize=[72, 128]",
         "data.target_resize=[64, 128]", "data.crop=[64, 64]", "data.eval_scales=[0.125]", "data.num_workers=0",
         "self_training.pseudo_label_scales=[0.125]")
APPENDED = {
    ("train", "translator"): ("--iters", "1", "translator.crop=[64, 64]", "data.source_resize=[72, 128]",
                              "data.target_resize=[64, 128]", "data.num_workers=0"),
    ("train", "source"): ("--iters", "1", *SMALL),
    ("train", "warmup"): ("--iters", "1", *SMALL),
    ("train", "self"): ("--iters", "1", *SMALL),
    ("pseudo-label",): ("self_training.pseudo_label_scales=[0.125]",),
    ("centroids",): ("self_training.pseudo_label_scales=[0.125]",),
    ("eval",): ("--max-images", "1"),
    ("predict",): ("--scales", "0.125"),
    ("data", "translate"): (),
    ("export",): (),
    ("weights",): (),
}


def doc_blocks() -> list[tuple[str, str, str | None]]:
    """``(where, body, skip reason or None)`` of every bash block, in reading order."""
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start("body")].count("\n")
            skip = match.group("skip")
            why = SKIP_REASON.match(skip).group("why") if skip and SKIP_REASON.match(skip) else ("" if skip else None)
            blocks.append((f"{path.relative_to(ROOT)}:{line}", match.group("body"), why))
    return blocks


def commands(body: str) -> list[list[str]]:
    """The commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def appended(argv: list[str]) -> tuple[str, ...]:
    """The overrides this runner appends to ``diga ARGV`` (KeyError: a command it does not know)."""
    key = tuple(argv[1:3]) if argv[1] in ("train", "data") else (argv[1],)
    return APPENDED[key]


def test_every_docs_block_is_run_or_marked_with_a_reason():
    """Every bash block is a list of `diga` commands this runner knows (no `...` elisions), or is marked
    skip with its reason."""
    blocks = doc_blocks()
    assert len(blocks) >= 5
    for where, body, why in blocks:
        if why is not None:
            assert why, f"{where}: a skipped block says why: <!-- docs-test: skip (reason) -->"
            continue
        for argv in commands(body):
            assert argv[0] == "diga" and "..." not in argv, f"{where}: {shlex.join(argv)}"
            appended(argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder the docs' commands run in: data/ from `diga data synth --real-sizes`, resnet101.pth (a
    torchvision ResNet-101 state dict) and mit_b5.pth (the SegFormer release's MiT-B5), random weights."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from cli_helpers import run
    from test_deeplabv2 import torchvision_state_dict

    from diga_fast.models import build_model

    from diga_fast.models.mit import MIT_CONFIGS, MixVisionTransformer

    folder = tmp_path_factory.mktemp("docs")
    torch.save(torchvision_state_dict(build_model("deeplabv2_r101", 19)), folder / "resnet101.pth")
    release = {**MixVisionTransformer(MIT_CONFIGS["b5"]).state_dict(), "head.weight": torch.zeros(1000, 512),
               "head.bias": torch.zeros(1000)}  # the SegFormer release's layout, ImageNet classifier included
    torch.save(release, folder / "mit_b5.pth")
    code = run(_NoCapture(), "data", "synth", "--out", folder / "data", "--train-images", "1", "--val-images", "1",
               "--real-sizes")[0]
    assert code == 0
    return folder


class _NoCapture:
    """What cli_helpers.run reads output from, for a fixture (which has no capsys)."""

    def readouterr(self):
        return type("Captured", (), {"out": "", "err": ""})()


def _substituted(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        for doc_path, ours in PATHS.items():
            arg = arg.replace(doc_path, ours)
        out.append(arg)
    return out


RUNNABLE = [(where, body) for where, body, why in doc_blocks() if why is None]


@pytest.mark.docs
@pytest.mark.timeout(1800)  # a block of paper-network stages at the real image sizes, on a CPU
@pytest.mark.parametrize("where, body", RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_a_docs_block_runs_as_written(where, body, world, capsys, monkeypatch):
    """The block at WHERE (the blocks build on each other: they run in reading order, in one folder)."""
    from cli_helpers import run

    monkeypatch.chdir(world)
    for argv in commands(body):
        full = [*_substituted(argv[1:]), *appended(argv)]
        code, _, err = run(capsys, *full)
        assert code == 0, f"{where}: diga {shlex.join(full)}\n{err[-3000:]}"
