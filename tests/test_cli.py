"""The ``diga`` command end to end on tiny data: training, resume, eval, predict, data synth, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diga_fast.cli.main import main

from cli_helpers import TINY, assert_one_line_error, run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "source"
    main_args = ["train", "source", "--out", str(out), "--iters", "4", *TINY]
    try:
        main(main_args)
    except SystemExit as stop:  # pragma: no cover - a failure shows up in the assertions below
        assert not stop.code
    return out


def test_train_source_writes_a_complete_run(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "model.safetensors", "state.pt", "metrics.jsonl", "eval.json"} <= names
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["train"]["iters"] == 4 and config["data"]["batch_size"] == 2 and config["model"]["arch"] == "small"
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert 0.0 <= json.loads((trained_run / "eval.json").read_text())["miou"] <= 100.0
    assert torch.load(trained_run / "state.pt", weights_only=False)["step"] == 4
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def test_nan_stops_cleanly_and_resume_is_exact(tmp_path, capsys, monkeypatch, trained_run):
    """A NaN loss at step 4 stops the run with one line and keeps the step-2 checkpoint (written once
    step 3's loss was finite); --resume then ends with the same weights as the uninterrupted 4-step run."""
    import diga_fast.stages.source_only as stage

    real_loss, calls = stage.source_cross_entropy, []

    def loss_with_nan_at_step_4(logits, labels, train):
        calls.append(1)
        loss = real_loss(logits, labels, train)
        return loss * float("nan") if len(calls) == 4 else loss

    out = tmp_path / "run"
    monkeypatch.setattr(stage, "source_cross_entropy", loss_with_nan_at_step_4)
    code, _, err = run(capsys, "train", "source", "--out", out, "--iters", "4", *TINY, "train.save_every=2")
    assert_one_line_error(code, err, "loss is nan at step 4", "step 2")
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(stage, "source_cross_entropy", real_loss)
    code, _, err = run(capsys, "train", "source", "--out", out, "--resume")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]
    from safetensors.torch import load_file

    resumed, straight = load_file(str(out / "model.safetensors")), load_file(str(trained_run / "model.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_divergence_stops_at_a_checkpoint_from_which_a_smaller_learning_rate_trains(tmp_path, capsys):
    """optim.lr=1e30 from step 3 on: step 4's update diverges the weights and step 5's loss is NaN. The
    checkpoint of step 4 was held back (its weights never gave a finite loss), so the stop names that of
    step 3, with finite weights, and the --resume command with a smaller learning rate; the recipe's
    learning rate (not the checkpoint's optimiser's) is what the resume trains at, and it trains on."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "source", "--out", out, "--iters", "3", *TINY, "train.save_every=1")
    assert code == 0, err
    code, _, err = run(capsys, "train", "source", "--resume", "--out", out, "--iters", "8", "optim.lr=1e30")
    assert "optim.lr: 0.025 -> 1e+30; train.iters: 3 -> 8" in err  # what the resume changed, said
    assert_one_line_error(code, err, "loss is nan at step 5", "of step 3", f"--resume --out {out} optim.lr=1e+29")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 3
    assert max(v.abs().max().item() for v in state["modules"]["model"].values() if v.is_floating_point()) < 100
    code, _, err = run(capsys, "train", "source", "--resume", "--out", out, "optim.lr=0.01")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert all(0 < r["lr"] <= 0.01 for r in records if "loss" in r and r["step"] > 3)
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.01  # the recipe it now follows


def test_an_existing_run_is_not_overwritten(capsys, trained_run):
    before = (trained_run / "state.pt").read_bytes()
    code, _, err = run(capsys, "train", "source", "--out", trained_run, "--iters", "2", *TINY)
    assert_one_line_error(code, err, "holds a run", "--resume")
    assert (trained_run / "state.pt").read_bytes() == before


def test_eval_checkpoint_json(tmp_path, capsys, trained_run):
    out = tmp_path / "eval.json"
    code, stdout, err = run(capsys, "eval", "--checkpoint", trained_run, "--target", "synthetic",
                            "--synthetic-images", "2", "--scales", "1.0,0.5", "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result) == {"miou", "iou", "num_classes"} and result["num_classes"] == 19
    assert "road" in result["iou"] and "mIoU" in stdout


def test_eval_of_a_run_defaults_to_the_runs_own_evaluation(tmp_path, capsys):
    """`diga eval --checkpoint RUN` with no other option evaluates as the run did (its target, its
    data.eval_scales, its val image count): the mIoU of the run's own eval.json, and says so."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "source", "--out", out, "--iters", "2", *TINY, "data.eval_scales=[1.0, 0.5]")
    assert code == 0, err
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--json", tmp_path / "eval.json")
    assert code == 0, err
    assert "as " in err and "--target synthetic --scales 1.0,0.5" in err
    assert json.loads((tmp_path / "eval.json").read_text())["miou"] == pytest.approx(json.loads((out / "eval.json").read_text())["miou"])
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--scales", "1.0", "--json", tmp_path / "single.json")
    assert code == 0 and "--scales" not in err  # what is given is used


def test_predict_folder_of_mixed_images(tmp_path, capsys, trained_run):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 41), dtype=np.uint8)).save(images / "sub" / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (25, 25, 4), dtype=np.uint8)).save(images / "sub" / "rgba.png")
    out = tmp_path / "pred"
    code, _, err = run(capsys, "predict", "--checkpoint", trained_run / "model.safetensors", "--images", images,
                       "--out", out, "--overlay")
    assert code == 0, err
    label_ids = np.array(Image.open(out / "sub" / "gray_labelIds.png"))
    assert label_ids.shape == (30, 41)
    assert set(np.unique(label_ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    assert np.array(Image.open(out / "a_color.png")).shape == (37, 53, 3)
    assert (out / "sub" / "rgba_overlay.png").is_file()


def test_data_synth_round_trips_through_the_real_loaders(tmp_path, capsys):
    root = tmp_path / "synth"
    code, _, err = run(capsys, "data", "synth", "--out", root, "--train-images", "4", "--val-images", "2")
    assert code == 0, err
    assert len(list((root / "gta5" / "images").glob("*.png"))) == 4
    assert len(list((root / "cityscapes" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))) == 2
    run_dir = tmp_path / "real"
    code, _, err = run(capsys, "train", "source", "--source", f"gta5:{root / 'gta5'}", "--target",
                       f"cityscapes:{root / 'cityscapes'}", "--preset", "demo", "--iters", "2", "--out", run_dir,
                       "data.batch_size=2", "data.num_workers=0")
    assert code == 0, err
    # predictions written by `diga predict` evaluate through --pred-dir like the checkpoint itself
    pred = tmp_path / "pred"
    code, _, err = run(capsys, "predict", "--checkpoint", run_dir, "--images", root / "cityscapes" / "leftImg8bit" / "val",
                       "--out", pred)
    assert code == 0, err
    via_pngs, via_model = tmp_path / "a.json", tmp_path / "b.json"
    code, _, err = run(capsys, "eval", "--pred-dir", pred, "--target", f"cityscapes:{root / 'cityscapes'}", "--json", via_pngs)
    assert code == 0, err
    code, _, err = run(capsys, "eval", "--checkpoint", run_dir, "--target", f"cityscapes:{root / 'cityscapes'}", "--json", via_model)
    assert code == 0, err
    assert json.loads(via_pngs.read_text()) == json.loads(via_model.read_text())


def test_eval_pred_dir_of_ground_truth_is_perfect(tmp_path, capsys):
    from diga_fast.data.layouts import write_cityscapes_layout
    from diga_fast.data.synthetic import render_scene

    root = tmp_path / "cs"
    write_cityscapes_layout(root, "val", [render_scene("target", "val", i, 0) for i in range(2)])
    pred = tmp_path / "pred"
    pred.mkdir()
    for gt in (root / "gtFine" / "val").rglob("*_labelIds.png"):
        (pred / ("result_" + gt.name)).write_bytes(gt.read_bytes())
    out = tmp_path / "miou.json"
    code, _, err = run(capsys, "eval", "--pred-dir", pred, "--target", f"cityscapes:{root}", "--json", out)
    assert code == 0, err
    assert json.loads(out.read_text())["miou"] == pytest.approx(100.0)
    next(pred.iterdir()).unlink()
    code, _, err = run(capsys, "eval", "--pred-dir", pred, "--target", f"cityscapes:{root}")
    assert_one_line_error(code, err, "have no prediction")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "source", "--out", "{tmp}/r", "--source", "gta5:{tmp}/nowhere"], ["dataset folder not found", "nowhere"]),
        (["train", "source", "--out", "{tmp}/r", "--source", "kitti:{tmp}"], ["unknown dataset", "kitti"]),
        (["train", "source", "--out", "{tmp}/r", "optim.lr=fast"], ["optim.lr: expected a number"]),
        (["train", "source", "--out", "{tmp}/r", "--bogus"], ["No such option", "--bogus"]),
        (["train", "source", "--out", "{tmp}/r", "--model", "vgg"], ["--model", "vgg"]),
        (["train", "source", "--out", "{tmp}/r", "--device", "cuda:7"], ["--device"]),
        (["train", "source", "--out", "{tmp}/r", "--resume"], ["--resume", "state.pt"]),
        (["eval", "--checkpoint", "{tmp}/missing.safetensors"], ["checkpoint not found"]),
        (["eval", "--checkpoint", "{tmp}/junk.safetensors"], ["not a diga-fast checkpoint", "junk.safetensors"]),
        (["predict", "--checkpoint", "{tmp}/junk.safetensors", "--images", "{tmp}", "--out", "{tmp}/p"], ["junk.safetensors"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, fragments):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys, trained_run):
    from safetensors.torch import load_file, save_file

    state = load_file(str(trained_run / "model.safetensors"))
    first = next(iter(state))
    state[first] = torch.zeros(3)
    meta = {"format": "diga-fast/1", "arch": "small", "num_classes": "19", "label_space": "cityscapes19", "recipe": ""}
    save_file(state, str(tmp_path / "other.safetensors"), metadata=meta)
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "other.safetensors", "--synthetic-images", "1")
    assert_one_line_error(code, err, "does not fit", first)


def test_predict_reports_a_corrupt_image(tmp_path, capsys, trained_run):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, err = run(capsys, "predict", "--checkpoint", trained_run, "--images", images, "--out", tmp_path / "p")
    assert_one_line_error(code, err, "broken.png")


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "diga_fast.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "demo" in result.stdout


def test_help_does_not_import_torch():
    """`diga --help` and every command's --help stay fast: nothing below the CLI imports torch for them."""
    import subprocess
    import sys

    commands = [[], ["train"], ["train", "self"], ["train", "warmup"], ["pseudo-label"], ["centroids"], ["eval"],
                ["predict"], ["export"], ["demo"], ["data", "synth"], ["bench", "train"]]
    script = ("import sys\nfrom diga_fast.cli.main import main\n"
              f"for argv in {commands!r}:\n"
              "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins the child to one CPU (Linux)")
def test_an_ordinary_run_prints_no_warning(tmp_path):
    """A recipe's 4 loader workers on a machine with fewer CPUs (the child is pinned to one) follow the
    machine: no DataLoader warning, nor any other, on training, eval and predict."""
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    pin = lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # noqa: E731
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(images / "one.png")
    for argv in (["train", "source", "--out", out, "--iters", "2", *TINY, "data.num_workers=4"],
                 ["eval", "--checkpoint", out], ["predict", "--checkpoint", out, "--images", images, "--out", tmp_path / "p"]):
        done = subprocess.run([sys.executable, "-m", "diga_fast.cli.main", *map(str, argv)], env=env, preexec_fn=pin,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "warn" not in done.stderr.lower(), done.stderr[-2000:]
    assert "wrote predictions for 1 image to" in done.stdout


def test_dry_run_checks_inputs_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """`diga train source --dry-run`: the inputs with their image counts, what would run, the measured
    peak memory and time per iteration; --out stays absent. On a machine whose memory the measured step
    would not fit (here: reported as 100 MiB), one line refuses it."""
    import diga_fast.stages.plan as plan

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "source", "--out", out, "--dry-run", *TINY)
    assert code == 0, err
    text = " ".join(stdout.split())
    for fragment in ("source train synthetic: 8 images", "target val synthetic: 3 labelled images",
                     "iterations 300", "batch 2 per process x 1 process(es) = 2", "source epochs 75.0 (8 images",
                     "peak memory", "GiB per process", "time per iteration", "s on cpu", "nothing was trained"):
        assert fragment in text, fragment
    assert not out.exists()
    monkeypatch.setattr(plan, "_memory_total", lambda: 100 * 2**20)
    code, _, err = run(capsys, "train", "source", "--out", out, "--dry-run", *TINY)
    assert_one_line_error(code, err, "does not fit: one source step at these sizes peaked at", "lower data.batch_size")
    assert not out.exists()
    code, _, err = run(capsys, "train", "source", "--out", out, "--dry-run", *TINY, "data.source=gta5:/nonexistent")
    assert code == 2 and "/nonexistent" in err and not out.exists()
