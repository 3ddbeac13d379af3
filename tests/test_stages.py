"""The DiGA stages end to end on tiny data through the CLI: warm-up (and its ablations), self-training
(label modes, rounds), exact resume of both, and their bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import TINY, assert_one_line_error, crash_then_resume, run

TINY_STAGE = (*TINY, "data.crop=[48, 96]", "warmup.visualize_every=2")


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory):
    from diga_fast.cli.main import main

    out = tmp_path_factory.mktemp("stages") / "warmup"
    try:
        main(["train", "warmup", "--out", str(out), "--iters", "3", *TINY_STAGE])
    except SystemExit as stop:  # pragma: no cover
        assert not stop.code
    return out


def test_warmup_writes_student_teacher_and_grids(warmup_run):
    names = {p.name for p in warmup_run.iterdir()}
    assert {"student.safetensors", "teacher.safetensors", "state.pt", "config.yaml", "eval.json"} <= names
    assert sorted(p.name for p in (warmup_run / "images").iterdir()) == ["0000002.png", "0000003.png"]
    record = json.loads((warmup_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "loss_ce", "loss_dist", "lr"} <= set(record)
    student, teacher = load_file(str(warmup_run / "student.safetensors")), load_file(str(warmup_run / "teacher.safetensors"))
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # the EMA lags the student


@pytest.mark.parametrize("switch, term", [("warmup.distill=false", "loss_ce_view"), ("warmup.crdomix=false", "loss_dist")])
def test_warmup_ablations_run(tmp_path, capsys, switch, term):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--iters", "1", *TINY_STAGE, switch)
    assert code == 0, err
    assert term in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def _same_weights(a, b):
    first, second = load_file(str(a)), load_file(str(b))
    return all(torch.equal(first[k], second[k]) for k in first)


def test_warmup_resume_is_exact(tmp_path, capsys, monkeypatch):
    import diga_fast.stages.warmup as stage

    crashed = crash_then_resume(tmp_path, capsys, monkeypatch, stage, ["train", "warmup"], TINY_STAGE)
    code, _, err = run(capsys, "train", "warmup", "--out", tmp_path / "straight", "--iters", "4", *TINY_STAGE)
    assert code == 0, err
    for name in ("student.safetensors", "teacher.safetensors"):
        assert _same_weights(crashed / name, tmp_path / "straight" / name)


def test_self_training_runs_and_resumes_exactly(tmp_path, capsys, monkeypatch, warmup_run):
    import diga_fast.stages.self_training as stage

    crashed = crash_then_resume(tmp_path, capsys, monkeypatch, stage, ["train", "self", "--init", str(warmup_run)],
                                TINY_STAGE)
    straight = tmp_path / "straight"
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", straight, "--iters", "4", *TINY_STAGE)
    assert code == 0, err
    assert _same_weights(crashed / "student.safetensors", straight / "student.safetensors")
    assert torch.equal(torch.load(crashed / "centroids.pt")["centroids"], torch.load(straight / "centroids.pt")["centroids"])
    initial = torch.load(straight / "initial_centroids.pt")["centroids"]
    assert not torch.equal(initial, torch.load(straight / "centroids.pt")["centroids"])  # updated online
    record = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_src", "loss_mix", "loss_dist", "consensus_kept", "consensus_accuracy"} <= set(record)
    assert 0.0 <= record["consensus_kept"] <= 1.0


def test_self_training_ablation_switches_run(tmp_path, capsys, warmup_run):
    """One run through the ablation path (which labels each mode hands the consensus CE is unit-tested
    in test_method_self_training.py) with the official switches: l2, score upsampling, grouped student
    forwards, train-mode teacher, all-pixel CE normaliser, β 0.3."""
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", tmp_path / "r", "--iters", "1",
                       *TINY_STAGE, "self_training.labels=threshold", "self_training.metric=l2",
                       "self_training.feat_upsample=scores", "self_training.forward=grouped",
                       "warmup.teacher_mode=train", "train.ce_normalizer=all", "self_training.source_beta=0.3")
    assert code == 0, err


def test_two_rounds_relabel_from_the_previous_student(tmp_path, capsys, warmup_run):
    out = tmp_path / "rounds"
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--rounds", "2", "--out", out, "--iters", "1", *TINY_STAGE)
    assert code == 0, err
    for r in (1, 2):
        assert (out / f"round_{r}" / "eval.json").is_file()
        assert (out / f"round_{r}" / "pseudo_labels" / "pseudo_labels.json").is_file()
    assert not torch.equal(torch.load(out / "round_1" / "initial_centroids.pt")["centroids"],
                           torch.load(out / "round_2" / "initial_centroids.pt")["centroids"])


def test_self_training_bad_input(tmp_path, capsys, warmup_run):
    code, _, err = run(capsys, "train", "self", "--out", tmp_path / "a", "--iters", "1", *TINY_STAGE)
    assert_one_line_error(code, err, "--init")
    code, _, err = run(capsys, "train", "self", "--init", tmp_path / "nothing", "--out", tmp_path / "b", *TINY_STAGE)
    assert_one_line_error(code, err, "checkpoint not found")
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", tmp_path / "c", *TINY_STAGE,
                       f"self_training.pseudo_labels={tmp_path / 'none'}")
    assert_one_line_error(code, err, "pseudo-labels")
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", tmp_path / "d", *TINY_STAGE,
                       "self_training.labels=magic")
    assert_one_line_error(code, err, "self_training.labels")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pseudo_label_and_centroid_commands_feed_self_training(tmp_path, capsys, warmup_run):
    code, _, err = run(capsys, "pseudo-label", "--checkpoint", warmup_run, "--out", tmp_path / "pl", *TINY_STAGE)
    assert code == 0, err
    code, _, err = run(capsys, "centroids", "--checkpoint", warmup_run, "--out", tmp_path / "c.pt", *TINY_STAGE)
    assert code == 0, err
    out = tmp_path / "self"
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", out, "--iters", "1", *TINY_STAGE,
                       f"self_training.pseudo_labels={tmp_path / 'pl'}", f"self_training.centroids={tmp_path / 'c.pt'}")
    assert code == 0, err
    assert not (out / "pseudo_labels").exists()
    assert torch.equal(torch.load(out / "initial_centroids.pt")["centroids"], torch.load(tmp_path / "c.pt")["centroids"])


def test_nan_features_stop_self_training_naming_the_step(tmp_path, capsys, monkeypatch, warmup_run):
    import diga_fast.stages.self_training as stage

    real, calls = stage.update_centroids, []

    def nan_features_at_step_2(centroids, features, labels, momentum, min_pixels):
        calls.append(1)
        return real(centroids, features * float("nan") if len(calls) == 3 else features, labels, momentum, min_pixels)

    monkeypatch.setattr(stage, "update_centroids", nan_features_at_step_2)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", out, "--iters", "3", *TINY_STAGE)
    assert_one_line_error(code, err, "centroids is nan at step 2", "no checkpoint was written yet")
    assert not (out / "student.safetensors").exists()


@pytest.mark.slow
def test_compile_and_channels_last_switches(tmp_path, capsys, warmup_run):
    """torch.compile (through dynamo; the eager backend keeps CI fast) and channels_last, for the
    warm-up and self-training forward passes."""
    options = ("--iters", "1", *TINY_STAGE, "train.compile=true", "train.compile_backend=eager", "train.channels_last=true")
    code, _, err = run(capsys, "train", "warmup", "--out", tmp_path / "w", *options)
    assert code == 0, err
    code, _, err = run(capsys, "train", "self", "--init", warmup_run, "--out", tmp_path / "s", *options)
    assert code == 0, err
