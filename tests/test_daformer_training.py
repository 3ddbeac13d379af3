"""The DAFormer network through the training machinery the CNNs have, on CPU: exact resume (AdamW state,
stochastic depth's draws, rare-class sampling), two ``torchrun`` ranks (gloo) staying identical, and
bf16 autocast with channels_last and ``torch.compile``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import TINY, crash_then_resume, run, torchrun

DAFORMER = ("--model", "daformer_mitb0")
OPTIONS = (*TINY, "data.crop=[48, 64]", "warmup.visualize_every=0", "data.eval_max_images=1")


def test_warmup_resume_is_exact_with_adamw_drop_path_and_rare_class_sampling(tmp_path, capsys, monkeypatch):
    import diga_fast.stages.warmup as stage

    options = (*OPTIONS, "data.rare_class_sampling=true", "data.rcs_min_pixels=200")
    crashed = crash_then_resume(tmp_path, capsys, monkeypatch, stage, ["train", "warmup", *DAFORMER], options)
    straight = tmp_path / "straight"
    code, _, err = run(capsys, "train", "warmup", *DAFORMER, "--out", straight, "--iters", "4", *options)
    assert code == 0, err
    for name in ("student.safetensors", "teacher.safetensors"):
        first, second = load_file(str(crashed / name)), load_file(str(straight / name))
        assert all(torch.equal(first[k], second[k]) for k in first), name
    losses = [[json.loads(line).get("loss") for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (crashed, straight)]
    assert losses[0] == losses[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_ranks_stay_identical(tmp_path):
    warmup = tmp_path / "warmup"
    torchrun(tmp_path, "train", "warmup", *DAFORMER, "--out", warmup, "--iters", "2", *OPTIONS)
    ranks = json.loads((warmup / "ranks.json").read_text())
    assert ranks["world"] == 2 and ranks["identical"], ranks


@pytest.mark.slow
def test_bf16_channels_last_and_compile(tmp_path, capsys):
    options = ("--iters", "1", *OPTIONS, "train.compile=true", "train.compile_backend=eager", "train.channels_last=true")
    warmup = tmp_path / "warmup"
    code, _, err = run(capsys, "train", "warmup", *DAFORMER, "--bf16", "--out", warmup, *options)
    assert code == 0, err
    code, _, err = run(capsys, "train", "self", "--init", warmup, "--out", tmp_path / "self", *options)
    assert code == 0, err
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "self" / "student.safetensors")).values())
