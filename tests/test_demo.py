"""``diga demo`` end to end at a tiny size: every stage runs, the summary and the ONNX export exist."""

import json

from cli_helpers import TINY, assert_one_line_error, run


def test_demo_runs_every_stage_and_exports(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--out", out, "--rounds", "2", "--device", "cpu", *TINY,
                            "data.crop=[48, 96]", "train.iters=2", "warmup.visualize_every=0")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    stages = ["source_only", "warmup", "self_training_round1", "self_training_round2"]
    assert list(summary["stages"]) == stages and list(summary["seconds"]) == stages
    assert all(0.0 <= miou <= 100.0 for miou in summary["stages"].values())
    for stage in stages:  # each stage's own eval.json holds the number the table shows
        assert round(json.loads((out / stage / "eval.json").read_text())["miou"], 2) == summary["stages"][stage]
    assert summary["final_checkpoint"] == str(out / "self_training_round2")
    assert summary["onnx"] == str(out / "model.onnx") and (out / "model.onnx").is_file()
    assert "self_training_round2" in stdout
    in_turn = {name: s for name, s in summary["seconds"].items() if name != "source_only"}  # it may train beside
    assert sum(in_turn.values()) <= summary["total_seconds"]
    check = summary["onnx_check"]
    assert check["ok"] and 0.0 <= check["max_abs_logit_diff"] <= check["tolerance"] and check["argmax_agreement"] >= 0.999
    # headers: a short rule with the stage's name, what it does on the next line, words whole at 80 columns
    assert all(len(line) <= 80 for line in err.splitlines())
    assert "self-training round 1" in err and "from warmup, bilateral consensus" in " ".join(err.split())
    # diga eval on the demo's checkpoint prints the demo's number (the same val images and scales)
    code, printed, err = run(capsys, "eval", "--checkpoint", out / "self_training_round2", "--synthetic-images", "3",
                             "--device", "cpu")
    assert code == 0, err
    assert f"mIoU19 │ {summary['stages']['self_training_round2']:.2f}" in " ".join(printed.split())


def test_demo_refuses_a_folder_in_use(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "used")
    assert_one_line_error(code, err, "not empty")
    assert (tmp_path / "used" / "notes.txt").read_text() == "keep me"


def test_the_baseline_beside_the_warmup_is_the_baseline_trained_alone(tmp_path, capsys):
    """On a CPU with a core to spare the demo trains source-only in a second process (one thread each):
    the same weights, bit for bit, as `diga train source` with the same arguments in this process."""
    import os

    import pytest
    import torch
    from safetensors.torch import load_file

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPU cores: on one the demo trains the baseline in turn")
    args = (*TINY, "data.crop=[48, 96]", "train.iters=2", "warmup.visualize_every=0")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "demo", "--rounds", "0", "--no-export", "--device", "cpu", *args)
    assert code == 0, err
    assert "trains on a second core beside the warm-up" in " ".join(err.split())
    assert "source: 2/2" in (tmp_path / "demo" / "source_only.log").read_text()
    code, _, err = run(capsys, "train", "source", "--out", tmp_path / "alone", "--device", "cpu", *args)
    assert code == 0, err
    beside, alone = (load_file(d / "model.safetensors") for d in (tmp_path / "demo" / "source_only", tmp_path / "alone"))
    assert beside.keys() == alone.keys() and all(torch.equal(beside[k], alone[k]) for k in beside)

